"""Renderer backends x precision x size on this machine, in one run.

    .venv/bin/python -m shopreel.benchmarks.renderer [--frames 33]

For the tiny preset's VAE at 128x128 and 256x256 and a mid-size Wan VAE (base_dim 32, dim_mult
[1, 2, 4, 4], ~10M parameters, seeded random weights) at 128x128: streaming decode of one shot of
generator latents (the tiny generator's real output) with torch eager fp32, ONNX Runtime fp32 and
ONNX Runtime static INT8 (``quantize_int8``'s recipe: calibrated on seeds 1-3, fp32 fallback layers
chosen on them, accepted on held-out seed 31; the measured shot is seed 21). Columns: latent
frames/s over the whole shot, time to the first frame, the torch warm-up frames' cost, peak resident
memory above the start (psutil, sampled every 5 ms: includes the ONNX session), PSNR vs the torch
reference. Where the recipe is refused, the all-INT8 graph is measured anyway and marked refused:
the renderer would not activate it.
Writes benchmarks/results/renderer.json, renderer.md and renderer.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


class PeakRss:
    """Peak resident set size above the value at start, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def generator_latents(model: Any, seeds: list[int], frames: int, size: int) -> list[Any]:
    """One shot of ``frames`` video frames per seed, denoised by the tiny generator (2 steps)."""
    import torch
    from shopreel.pipelines.generate import LatentGenerator
    from shopreel.pipelines.types import Shot, ShotKind, Storyboard

    generator = LatentGenerator(model)
    clips = []
    for seed in seeds:
        shot = Shot(
            index=0,
            kind=ShotKind.hook,
            prompt="a running shoe on a white studio background, soft light",
            caption="",
            num_frames=frames,
            seed=seed,
        )
        storyboard = Storyboard(
            title="bench", language="en", width=size, height=size, fps=16, shots=[shot], aigc_label="AI"
        )
        chunks = generator.generate(storyboard, request_id=f"bench{seed}", num_inference_steps=2)
        clips.append(torch.cat([chunk.latents for chunk in chunks], dim=2))
    return clips


def measure(backend: Any, clip: Any, reference_video: Any | None) -> dict[str, float]:
    import torch
    from shopreel.pipelines.render_onnx import decode_clip, psnr_db

    decode_clip(backend, clip)  # warm-up (and the one-time export/load of a graph)
    state = backend.new_state()
    outputs, frame_s = [], []
    with PeakRss() as memory:
        started = time.perf_counter()
        for index in range(clip.shape[2]):
            frame_started = time.perf_counter()
            outputs.append(backend.decode(state, clip[:, :, index : index + 1]).float().cpu())
            frame_s.append(time.perf_counter() - frame_started)
            if index == 0:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
    steady = frame_s[2:] or frame_s
    video = torch.cat(outputs, dim=2)
    quality = math.inf if reference_video is None else psnr_db(reference_video, video)
    return {
        "latent_frames_per_s": round(clip.shape[2] / total, 2),
        "first_frame_ms": round(first * 1000, 1),
        "total_s": round(total, 3),
        # Latent frames 0-1 (torch in every row: Wan's cache warm-up) vs the mean of the rest.
        "frames_0_1_ms": round(sum(frame_s[:2]) * 1000, 1),
        "later_frame_ms": round(sum(steady) / len(steady) * 1000, 1),
        "peak_rss_mib": round(memory.mib, 1),
        "psnr_db": round(quality, 2) if math.isfinite(quality) else "ref",
        "video": video,
    }


def run(frames: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan
    from shopreel.pipelines.config import ModelConfig
    from shopreel.pipelines.presets import load_model
    from shopreel.pipelines.render import TorchDecoderBackend
    from shopreel.pipelines.render_onnx import OnnxDecoderBackend, quantize_int8

    model = load_model(ModelConfig(device="cpu"))
    torch.manual_seed(0)
    mid_vae = (
        AutoencoderKLWan(
            base_dim=32,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        .eval()
        .requires_grad_(False)
    )
    cases = [("tiny", model.vae, 128), ("tiny", model.vae, 256), ("mid-10M", mid_vae, 128)]
    device = torch.device("cpu")
    rows: list[dict[str, Any]] = []
    recipes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, vae, size in cases:
            calibration = generator_latents(model, [1, 2, 3], frames, size)
            clip = generator_latents(model, [21], frames, size)[0]
            reference = TorchDecoderBackend(vae, device)
            # The production recipe (accuracy-driven fp32 fallback to reach the floor); where even that
            # is refused, the all-INT8 graph is measured anyway and marked refused.
            held_out = generator_latents(model, [31], frames, size)
            report = quantize_int8(vae, device, calibration, held_out, cache_dir=Path(cache))
            refused = not report.accepted
            if refused:
                report = quantize_int8(
                    vae, device, calibration, held_out, cache_dir=Path(cache), min_psnr_db=-math.inf
                )
            recipes[f"{name} {size}x{size}"] = {
                key: value
                for key, value in dataclasses.asdict(report).items()
                if key not in ("model_path", "quantized_nodes", "fp32_nodes")
            } | {"int8_convs": len(report.quantized_nodes), "fp32_convs": len(report.fp32_nodes)}
            backends = [
                ("torch", "fp32", reference),
                ("onnxruntime", "fp32", OnnxDecoderBackend(vae, device, cache_dir=Path(cache))),
                (
                    "onnxruntime",
                    "int8",
                    OnnxDecoderBackend(
                        vae, device, precision="int8", cache_dir=Path(cache), min_psnr_db=-math.inf
                    ),
                ),
            ]
            reference_video = None
            for backend_name, precision, backend in backends:
                result = measure(backend, clip, reference_video)
                if reference_video is None:
                    reference_video = result["video"]
                del result["video"]
                rows.append(
                    {
                        "vae": name,
                        "size": f"{size}x{size}",
                        "backend": backend_name,
                        "precision": precision,
                        **result,
                        "status": "refused (< 35 dB)" if refused and precision == "int8" else "ok",
                    }
                )
    for row in rows:
        base = next(
            r for r in rows if (r["vae"], r["size"], r["backend"]) == (row["vae"], row["size"], "torch")
        )
        row["speedup_vs_torch"] = round(row["latent_frames_per_s"] / base["latent_frames_per_s"], 2)
    return {
        "benchmark": "renderer",
        "latent_frames_per_shot": (frames - 1) // 4 + 1,
        "rows": rows,
        "int8_recipes": recipes,
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    keys = [
        "vae",
        "size",
        "backend",
        "precision",
        "latent_frames_per_s",
        "speedup_vs_torch",
        "first_frame_ms",
        "frames_0_1_ms",
        "later_frame_ms",
        "peak_rss_mib",
        "psnr_db",
        "status",
    ]
    lines = [
        f"# Renderer backends ({report['latent_frames_per_shot']} latent frames per shot, CPU)",
        "",
        f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, "
        f"{report['machine']['torch_threads']} threads. {report['timestamp']}. The first two latent frames "
        "of every shot decode in torch in all rows (Wan's cache warm-up): frames_0_1_ms is what that costs, "
        "later_frame_ms the mean decode time of each later latent frame.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(str(row[key]) for key in keys) + " |")
    recipe_keys = [
        "accepted",
        "psnr_db",
        "calibration_psnr_db",
        "int8_convs",
        "fp32_convs",
        "candidates_tried",
        "search_s",
        "speedup_vs_fp32",
    ]
    lines += [
        "",
        "INT8 recipes (held-out PSNR decides acceptance; speedup_vs_fp32 is quantize_int8's own timing "
        "of the held-out shot):",
        "",
        "| vae size | " + " | ".join(recipe_keys) + " |",
        "|" + "---|" * (len(recipe_keys) + 1),
    ]
    for case, recipe in report["int8_recipes"].items():
        lines.append(f"| {case} | " + " | ".join(str(recipe[key]) for key in recipe_keys) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    groups = sorted({(r["vae"], r["size"]) for r in rows}, key=lambda g: (g[0], g[1]))
    variants = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.26
    for offset, (backend, precision) in enumerate(variants):
        values = [
            next(
                r["latent_frames_per_s"]
                for r in rows
                if (r["vae"], r["size"]) == group and (r["backend"], r["precision"]) == (backend, precision)
            )
            for group in groups
        ]
        ax.bar(
            [i + offset * width for i in range(len(groups))], values, width, label=f"{backend} {precision}"
        )
    ax.set_xticks([i + width for i in range(len(groups))], [f"{v} {s}" for v, s in groups])
    ax.set_ylabel("latent frames / s")
    ax.set_title("Streaming VAE decode on CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=33, help="video frames per shot (4k+1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.frames)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "renderer.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "renderer.md").write_text(to_markdown(report))
    plot(report, args.out / "renderer.png")
    print(to_markdown(report))


if __name__ == "__main__":
    main()
