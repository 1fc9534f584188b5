"""Renderer backends x precision x size on this machine, in one run.

    .venv/bin/python -m shopreel.benchmarks.renderer [--frames 33]

For the tiny preset's VAE at 128x128 and 256x256 and a mid-size Wan VAE (base_dim 32, dim_mult
[1, 2, 4, 4], ~10M parameters, seeded random weights) at 128x128: streaming decode of one shot of
generator latents (the tiny generator's real output) with torch eager fp32, ONNX Runtime fp32 and
ONNX Runtime static INT8 (``quantize_int8``'s recipe: calibrated on seeds 1-3, fp32 fallback layers
chosen on them, first/second steps INT8 when the chain keeps the floor, accepted on held-out seed
31; the measured shot is seed 21). Columns: latent
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**10  # kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) and return the resident size now, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def mid_size_vae() -> Any:
    """Wan VAE, base_dim 32, dim_mult [1, 2, 4, 4] (~10M parameters), seeded: the same in every process."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=32,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    return vae.eval().requires_grad_(False)


def load_vae_by_name(name: str) -> Any:
    from shopreel.pipelines.config import ModelConfig
    from shopreel.pipelines.presets import load_vae

    return load_vae(ModelConfig(device="cpu"))[0] if name == "tiny" else mid_size_vae()


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


def measure_row(spec: dict[str, Any]) -> dict[str, Any]:
    """One backend on one shot, in this (fresh) process: ``spec`` names the VAE, backend, precision,
    cache folder and the .pt files of the shot's latents and of the reference video."""
    import torch

    from shopreel.pipelines.render import TorchDecoderBackend
    from shopreel.pipelines.render.fidelity import decode_clip, psnr_db
    from shopreel.pipelines.render.onnxruntime_backend import OnnxDecoderBackend

    torch.set_num_threads(spec["threads"])
    clip = torch.load(spec["clip"])
    vae = load_vae_by_name(spec["vae"])
    device = torch.device("cpu")
    baseline = reset_peak_rss()  # torch, the VAE and the latents are loaded: decoding adds the rest
    if spec["backend"] == "torch":
        backend: Any = TorchDecoderBackend(vae, device)
    else:
        backend = OnnxDecoderBackend(
            vae, device, precision=spec["precision"], cache_dir=Path(spec["cache"]), min_psnr_db=-math.inf
        )
    decode_clip(backend, clip)  # warm-up (graphs load once per process)
    runs = []
    for _ in range(spec["repeats"]):
        state, outputs, frame_s = backend.new_state(), [], []
        started = time.perf_counter()
        for index in range(clip.shape[2]):
            frame_started = time.perf_counter()
            outputs.append(backend.decode(state, clip[:, :, index : index + 1]).float().cpu())
            frame_s.append(time.perf_counter() - frame_started)
        runs.append((time.perf_counter() - started, frame_s, torch.cat(outputs, dim=2)))
    total, frame_s, video = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # the median run
    if spec.get("reference"):
        quality: float | str = round(psnr_db(torch.load(spec["reference"]), video), 2)
    else:
        torch.save(video, spec["save_video"])
        quality = "ref"
    later = frame_s[2:] or frame_s
    return {
        "latent_frames_per_s": round(clip.shape[2] / total, 2),
        "first_frame_ms": round(frame_s[0] * 1000, 1),
        "frames_0_1_ms": round(sum(frame_s[:2]) * 1000, 1),
        "later_frame_ms": round(sum(later) / len(later) * 1000, 1),
        "total_s": round(total, 3),
        "peak_rss_mib": round(peak_rss_mib() - baseline, 1),
        "psnr_db": quality,
    }


def run_row_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "shopreel.benchmarks.renderer", "--row", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"row {spec['vae']} {spec['backend']} {spec['precision']} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(frames: int, repeats: int) -> dict[str, Any]:
    import torch

    from shopreel.pipelines.config import ModelConfig
    from shopreel.pipelines.presets import load_model
    from shopreel.pipelines.render.int8 import quantize_int8

    model = load_model(ModelConfig(device="cpu"))
    cases = [("tiny", 128), ("tiny", 256), ("mid-10M", 128)]
    device = torch.device("cpu")
    rows: list[dict[str, Any]] = []
    recipes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, size in cases:
            vae = load_vae_by_name("tiny" if name == "tiny" else "mid")
            calibration = generator_latents(model, [1, 2, 3], frames, size)
            held_out = generator_latents(model, [31], frames, size)
            clip_path = Path(cache) / f"clip-{name}-{size}.pt"
            torch.save(generator_latents(model, [21], frames, size)[0], clip_path)
            # The production recipe (accuracy-driven fp32 fallback to reach the floor); where even that
            # is refused, the all-INT8 graph is measured anyway and marked refused.
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
            reference_path = Path(cache) / f"reference-{name}-{size}.pt"
            for backend_name, precision in (
                ("torch", "fp32"),
                ("onnxruntime", "fp32"),
                ("onnxruntime", "int8"),
            ):
                spec = {
                    "vae": "tiny" if name == "tiny" else "mid",
                    "backend": backend_name,
                    "precision": precision,
                    "cache": cache,
                    "clip": str(clip_path),
                    "threads": torch.get_num_threads(),
                    "repeats": repeats,
                }
                if backend_name == "torch":
                    spec["save_video"] = str(reference_path)
                else:
                    spec["reference"] = str(reference_path)
                rows.append(
                    {
                        "vae": name,
                        "size": f"{size}x{size}",
                        "backend": backend_name,
                        "precision": precision,
                        **run_row_in_subprocess(spec),
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
        "repeats": repeats,
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
        "of a shot are special in Wan's decoder (empty caches): ONNX Runtime runs them as separate graphs, "
        "INT8 in int8 rows only where the recipe kept them (int8_steps). frames_0_1_ms is what they cost, "
        "later_frame_ms the mean of each later "
        "frame. peak_rss_mib: the process's peak above its size with torch, the VAE and the latents loaded.",
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
        "int8_steps",
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
        values = [recipe.get(key) for key in recipe_keys]
        cells = [", ".join(v) if isinstance(v, list | tuple) else str(v) for v in values]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
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
                r["speedup_vs_torch"]
                for r in rows
                if (r["vae"], r["size"]) == group and (r["backend"], r["precision"]) == (backend, precision)
            )
            for group in groups
        ]
        bars = ax.bar(
            [i + offset * width for i in range(len(groups))], values, width, label=f"{backend} {precision}"
        )
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.set_xticks([i + width for i in range(len(groups))], [f"{v} {s}" for v, s in groups])
    ax.set_ylabel("latent frames/s vs torch fp32")
    ax.set_title(f"Streaming VAE decode on CPU ({report['latent_frames_per_shot']} latent frames per shot)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=33, help="video frames per shot (4k+1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per row (the median is kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure_row(json.loads(args.row))))
        return
    report = run(args.frames, args.repeats)
    write_results(args.out, "renderer", report, to_markdown(report))
    plot(report, args.out / "renderer.png")


if __name__ == "__main__":
    main()
