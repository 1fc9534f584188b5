"""Streaming VAE decode on a CUDA GPU at 480p: the Wan 2.1 VAE architecture, fp32 vs bf16 (torch),
and with --compile bf16 with ``torch.compile`` (the torch backend's ``torch_compile`` option;
experimental: no published figures for that row yet).

    python -m shopreel.benchmarks.render_cuda [--latent-frames 21] [--size 832x480] [--compile] [--tensorrt]

--tensorrt adds a TensorRT fp16 row (``pipelines/render/tensorrt_backend.py``, experimental: not covered by
CI; needs TensorRT installed).

The VAE has Wan 2.1's own configuration (base_dim 96, dim_mult [1, 2, 4, 4]) with seeded random
weights: speed and memory are those of the real model; fidelity (bf16 vs fp32 PSNR) is measured on
random weights and latents, so treat it as indicative. Checks that the streaming decoder equals a full
``vae.decode`` on the GPU, then times the streaming decode of one 81-frame shot. Writes
``benchmarks/results/render_cuda.json`` and ``.md``; needs CUDA (exits with a message otherwise).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .common import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def psnr(reference, other) -> float:  # both in [-1, 1]
    mse = float(((reference.float() - other.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _row(label: str, warm_up_s: float, video, first: float, total: float, peak: int, reference) -> dict:
    latent_frames = (video.shape[2] - 1) // 4 + 1
    return {
        "precision": label,
        "warm_up_s": round(warm_up_s, 1),
        "latent_frames_per_s": round(latent_frames / total, 2),
        "pixel_frames_per_s": round(video.shape[2] / total, 1),
        "first_frame_s": round(first, 4),
        "total_s": round(total, 3),
        "peak_memory_gib": round(peak / 2**30, 2),
        "psnr_vs_fp32_db": round(psnr(reference, video), 2),
    }


def run(latent_frames: int, width: int, height: int, compile: bool = False, tensorrt: bool = False) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    from shopreel.pipelines.render import TorchDecoderBackend

    device = torch.device("cuda")
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(device).eval().requires_grad_(False)  # Wan 2.1's default config
    latents = torch.randn(1, vae.config.z_dim, latent_frames, height // 8, width // 8, device=device)

    def stream(dtype, backend=None) -> tuple[torch.Tensor, float, float, int]:
        backend = backend or TorchDecoderBackend(vae.to(dtype=dtype), device)
        state = backend.new_state()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        outputs, first = [], 0.0
        for index in range(latent_frames):
            outputs.append(backend.decode(state, latents[:, :, index : index + 1]))
            if index == 0:
                torch.cuda.synchronize()
                first = time.perf_counter() - started
        torch.cuda.synchronize()
        total = time.perf_counter() - started
        return torch.cat(outputs, dim=2), first, total, torch.cuda.max_memory_allocated()

    # 1. Streaming == full decode on the GPU (fp32), on a short clip.
    short = latents[:, :, :3]
    with torch.inference_mode():
        backend = TorchDecoderBackend(vae, device)
        state = backend.new_state()
        streamed = torch.cat([backend.decode(state, short[:, :, i : i + 1]) for i in range(3)], dim=2)
        z = short / (1.0 / torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1))
        z = z + torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        full = vae.decode(z).sample.clamp(-1, 1)
    equality_max_abs = float((streamed - full).abs().max())

    rows = []
    with torch.inference_mode():
        reference = None
        variants = [("float32", False), ("bfloat16", False)] + ([("bfloat16", True)] if compile else [])
        for dtype_name, compiled in variants:
            dtype = getattr(torch, dtype_name)
            backend = TorchDecoderBackend(vae.to(dtype=dtype), device, compile=compiled)
            warm_started = time.perf_counter()
            stream(dtype, backend)  # warm-up: cuDNN autotuning, allocator, compilation
            warm_up_s = time.perf_counter() - warm_started
            video, first, total, peak = stream(dtype, backend)
            if reference is None:
                reference = video
            label = dtype_name + (" + torch.compile" if compiled else "")
            rows.append(_row(label, warm_up_s, video, first, total, peak, reference))
    if tensorrt:  # experimental backend: see pipelines/render/tensorrt_backend.py
        import tempfile

        from shopreel.pipelines.render.tensorrt_backend import TensorRTDecoderBackend

        with tempfile.TemporaryDirectory() as cache, torch.no_grad():
            warm_started = time.perf_counter()  # export, engine build, fidelity check, first shot
            backend = TensorRTDecoderBackend(
                vae.to(dtype=torch.float32), device, precision="fp16", cache_dir=Path(cache)
            )
            stream(torch.float32, backend)
            warm_up_s = time.perf_counter() - warm_started
            video, first, total, peak = stream(torch.float32, backend)
        rows.append(_row("fp16 (TensorRT, experimental)", warm_up_s, video, first, total, peak, reference))
    speedup = rows[0]["total_s"] / rows[1]["total_s"]
    compile_speedup = rows[1]["total_s"] / rows[2]["total_s"] if compile else None
    return {
        "benchmark": "render_cuda",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "size": f"{width}x{height}",
        "latent_frames": latent_frames,
        "pixel_frames": 1 + 4 * (latent_frames - 1),
        "streaming_equals_full_decode_max_abs": equality_max_abs,
        "rows": rows,
        "bf16_speedup_over_fp32": round(speedup, 2),
        "compiled_bf16_speedup_over_eager_bf16": round(compile_speedup, 2) if compile_speedup else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"# Streaming VAE decode on {report['gpu']} ({report['size']}, {report['pixel_frames']} frames)",
        "",
        f"Wan 2.1 VAE architecture, seeded random weights, torch {report['torch']}. Streaming == full "
        f"decode: max abs {report['streaming_equals_full_decode_max_abs']:.2e}. bf16 is "
        f"{report['bf16_speedup_over_fp32']}x fp32"
        + (
            f"; compiled bf16 is {report['compiled_bf16_speedup_over_eager_bf16']}x eager bf16"
            if report.get("compiled_bf16_speedup_over_eager_bf16")
            else ""
        )
        + f". Warm-up: the first shot (cuDNN autotuning, compilation). {report['timestamp']}",
        "",
        "| precision | latent frames/s | pixel frames/s | first frame s | total s | peak GiB "
        "| PSNR vs fp32 dB | warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['precision']} | {row['latent_frames_per_s']} | {row['pixel_frames_per_s']} | "
            f"{row['first_frame_s']} | {row['total_s']} | {row['peak_memory_gib']} | "
            f"{row['psnr_vs_fp32_db']} | {row.get('warm_up_s', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent-frames", type=int, default=21, help="21 latent frames = 81 video frames")
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--compile", action="store_true", help="add a bf16 torch.compile row")
    parser.add_argument("--tensorrt", action="store_true", help="add a TensorRT fp16 row (needs tensorrt)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("render_cuda: needs a CUDA GPU (none found)")
    width, height = (int(v) for v in args.size.split("x"))
    report = run(args.latent_frames, width, height, compile=args.compile, tensorrt=args.tensorrt)
    write_results(args.out, "render_cuda", report, to_markdown(report))


if __name__ == "__main__":
    main()
