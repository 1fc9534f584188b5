"""The cost of personalisation: 8 shopper variants of one product against one video, with and without
the shot and frame caches, in one run (in process, tiny preset).

    .venv/bin/python -m shopreel.benchmarks.personalisation [--steps 4 30 50] [--repeats 3]

The 8 shoppers differ in interests, segment and caption language (a shopper's own visual style
would change every prompt and share nothing; that case is left out and said so). For each step
count: one video (the first shopper alone), then the 8 variants with the caches and the 8 variants
without, each from empty caches, modes alternating over ``--repeats``. The tiny preset's denoiser
costs little at its default 4 steps, so composing, encoding and scoring each variant dominate; 30
steps (shopreel's default for real checkpoints) and 50 (Wan 2.1's own sampling default) give
denoising more of the share it has in a real model, where it takes minutes and composing seconds.

Writes ``benchmarks/results/personalisation.json``, ``.md`` and ``.png`` (cumulative seconds against
the number of variants). A shared machine: compare the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import write_results

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE_BRIEF = Path(__file__).resolve().parents[1] / "examples" / "brief_en.json"
CONCURRENCY = 2  # variants made at once, in process as by two job workers of the cluster
SHOPPERS: list[dict[str, Any]] = [
    {"segment": "urban runner", "interests": ["rain", "grip"]},
    {"segment": "students", "interests": ["light", "price"]},
    {"segment": "marathoners", "interests": ["cushioning", "long distance"]},
    {"interests": ["breathable", "summer"]},
    {"segment": "commuters", "language": "zh"},
    {"interests": ["foam", "comfort"], "language": "zh"},
    {"segment": "trail runners", "interests": ["wet roads"]},
    {"segment": "gift buyers"},
]


def _fresh_caches(pipeline: Any) -> None:
    """Empty shot and frame caches (a measurement never starts warm from the one before)."""
    from shopreel.pipelines.shot_cache import ShotCache

    if pipeline.generator.cache is not None:
        pipeline.generator.cache = ShotCache(pipeline.generator.cache.config)
    if pipeline.renderer.frame_cache is not None:
        pipeline.renderer.frame_cache = ShotCache(pipeline.renderer.frame_cache.config)


def _measure(pipeline: Any, brief: Any, shoppers: list[Any], out: Path) -> dict[str, Any]:
    """Make one video per shopper; per-video seconds, the stages' sums, and the shots really made."""
    denoised: list[int] = []
    inner = pipeline.generator._denoise_batch

    def counting(batch: list[Any]) -> Any:
        denoised.append(len(batch))
        return inner(batch)

    pipeline.generator._denoise_batch = counting
    _fresh_caches(pipeline)
    finished: list[float] = []
    started = time.perf_counter()
    try:
        results = pipeline.run_variants(
            brief,
            shoppers,
            output_dir=out,
            concurrency=CONCURRENCY,
            on_variant=lambda *_: finished.append(time.perf_counter() - started),
        )
    finally:
        pipeline.generator._denoise_batch = inner
    frame_cache = pipeline.renderer.frame_cache
    return {
        "wall_s": round(time.perf_counter() - started, 3),
        "cumulative_s": [round(value, 3) for value in finished],
        "shots_planned": sum(len(result.storyboard.shots) for result in results),
        "shots_shared": sum(shot.shared for result in results for shot in result.storyboard.shots),
        "shots_denoised": sum(denoised),
        "shots_decoded": (
            frame_cache.stats.misses
            if frame_cache is not None
            else sum(len(r.storyboard.shots) for r in results)
        ),
        **{
            stage: round(sum(getattr(result.timings, stage) for result in results), 3)
            for stage in ("generate_s", "render_s", "compose_s", "quality_s")
        },
    }


def run(steps_list: list[int], repeats: int) -> dict[str, Any]:
    import torch

    from shopreel.pipelines.config import GenerateConfig, PipelineConfig, RenderConfig, ShotCacheConfig
    from shopreel.pipelines.pipeline import ProductVideoPipeline
    from shopreel.pipelines.presets import load_model
    from shopreel.pipelines.types import ProductBrief, ShopperProfile

    data = json.loads(EXAMPLE_BRIEF.read_text())
    data.pop("images")  # a product shot adds the same overlay to every mode
    data.pop("language")  # each shopper's captions in their own language
    brief = ProductBrief.model_validate(data)
    shoppers: list[ShopperProfile | None] = [ShopperProfile.model_validate(s) for s in SHOPPERS]
    model = load_model(PipelineConfig().model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in steps_list:
            pipelines = {
                cached: ProductVideoPipeline(
                    PipelineConfig(
                        generate=GenerateConfig(
                            num_inference_steps=steps, shot_cache=ShotCacheConfig(shared_shots=cached)
                        ),
                        render=RenderConfig(
                            frame_cache_bytes=RenderConfig().frame_cache_bytes if cached else 0
                        ),
                    ),
                    model=model,
                )
                for cached in (True, False)
            }
            _measure(pipelines[False], brief, shoppers[:1], Path(tmp) / "warmup")  # exports, first calls
            runs: dict[str, list[dict[str, Any]]] = {
                "one video": [],
                "8 variants, cached": [],
                "8 variants": [],
            }
            for _ in range(repeats):
                runs["one video"].append(_measure(pipelines[False], brief, shoppers[:1], Path(tmp) / "one"))
                runs["8 variants, cached"].append(_measure(pipelines[True], brief, shoppers, Path(tmp) / "c"))
                runs["8 variants"].append(_measure(pipelines[False], brief, shoppers, Path(tmp) / "u"))
            one = statistics.median(r["wall_s"] for r in runs["one video"])
            for name, measured in runs.items():
                middle = sorted(measured, key=lambda r: r["wall_s"])[len(measured) // 2]
                rows.append(
                    {
                        "steps": steps,
                        "run": name,
                        "wall_s": statistics.median(r["wall_s"] for r in measured),
                        "vs_one_video": round(statistics.median(r["wall_s"] for r in measured) / one, 2),
                        **{key: value for key, value in middle.items() if key != "wall_s"},
                    }
                )
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "device": str(model.device),
        },
        "brief": str(EXAMPLE_BRIEF.name),
        "shoppers": SHOPPERS,
        "repeats": repeats,
        "concurrency": CONCURRENCY,
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Personalisation: 8 shopper variants vs one video (in process, tiny preset, 128x128)",
        "",
        f"{report['machine']['platform']}, {report['machine']['cpus']} threads; median of "
        f"{report['repeats']} runs per row, modes alternating, caches empty at the start of each run, "
        f"{report['concurrency']} variants at a time. Shoppers differ in interests, segment and caption "
        "language.",
        "",
        "| steps | run | wall s | vs one video | shots planned | shared | denoised | decoded "
        "| generate s | render s | compose s | quality s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        counts = " | ".join(
            str(row[k]) for k in ("shots_planned", "shots_shared", "shots_denoised", "shots_decoded")
        )
        stages = " | ".join(f"{row[k]:.2f}" for k in ("generate_s", "render_s", "compose_s", "quality_s"))
        lines.append(
            f"| {row['steps']} | {row['run']} | {row['wall_s']:.2f} | {row['vs_one_video']:.2f}x "
            f"| {counts} | {stages} |"
        )
    lines += [
        "",
        "Denoised and decoded count the shots the model and the decoder really ran; with the caches each "
        "shared shot runs once. What each variant still pays is its own composition (captions, overlays, "
        "audio, H.264 encoding) and quality scoring.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({row["steps"] for row in report["rows"]})
    figure, axes = plt.subplots(1, len(steps_list), figsize=(5 * len(steps_list), 4), squeeze=False)
    for axis, steps in zip(axes[0], steps_list, strict=True):
        for row in (r for r in report["rows"] if r["steps"] == steps):
            cumulative = row["cumulative_s"]
            axis.plot(range(1, len(cumulative) + 1), cumulative, marker="o", label=row["run"])
            if row["run"] == "one video":
                axis.axhline(2 * row["wall_s"], color="grey", linestyle="--", label="2x one video (goal)")
        axis.set_title(f"{steps} denoising steps")
        axis.set_xlabel("variants made")
        axis.set_ylabel("seconds (cumulative)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 30, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.steps, args.repeats)
    write_results(args.out, "personalisation", report, markdown(report))
    plot(report, args.out / "personalisation.png")


if __name__ == "__main__":
    main()
