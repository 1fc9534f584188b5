"""Per-stage time and frames/s of the in-process pipeline, tiny preset, at two sizes, with the torch
renderer and the default (auto: ONNX Runtime) one side by side.

    .venv/bin/python -m shopreel.benchmarks.pipeline [--sizes 128x128 256x256] [--repeats 3]

Writes ``benchmarks/results/pipeline.json`` and ``pipeline.md``. One warm-up run per size is not
counted; the table shows the median over repeats. The machine is shared and noisy: compare rows of
one run with each other, not with another run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from .common import write_results

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE_BRIEF = Path(__file__).resolve().parents[1] / "examples" / "brief_en.json"


def run(sizes: list[str], repeats: int, steps: int | None, renderers: list[str]) -> dict:
    import torch

    from shopreel.cli import _inline_image_paths
    from shopreel.pipelines.config import GenerateConfig, PipelineConfig, RenderConfig
    from shopreel.pipelines.pipeline import ProductVideoPipeline
    from shopreel.pipelines.types import ProductBrief

    brief_data = _inline_image_paths(json.loads(EXAMPLE_BRIEF.read_text()), EXAMPLE_BRIEF.parent)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for renderer, size in [(renderer, size) for renderer in renderers for size in sizes]:
            pipeline = ProductVideoPipeline(
                PipelineConfig(
                    generate=GenerateConfig(num_inference_steps=steps),
                    render=RenderConfig(backend=renderer),  # type: ignore[arg-type]
                )
            )
            brief = ProductBrief.model_validate({**brief_data, "size": size})
            pipeline.run(brief, output_path=Path(tmp) / "warmup.mp4")  # weights/allocator warm-up
            runs = []
            for index in range(repeats):
                result = pipeline.run(brief, output_path=Path(tmp) / f"{size}-{index}.mp4")
                runs.append(result)
            timings = [r.timings for r in runs]

            def median(values: list[float]) -> float:
                return round(statistics.median(values), 4)

            frames = runs[0].compose.num_frames
            total = median([t.total_s for t in timings])
            rows.append(
                {
                    "renderer": f"{renderer}: {pipeline.renderer.backend_name}",
                    "size": size,
                    "shots": len(runs[0].storyboard.shots),
                    "frames": frames,
                    "steps": runs[0].num_inference_steps,
                    "understand_s": median([t.understand_s for t in timings]),
                    "generate_s": median([t.generate_s for t in timings]),
                    "render_s": median([t.render_s for t in timings]),
                    "compose_s": median([t.compose_s for t in timings]),
                    "first_fragment_s": median([t.first_fragment_s or 0.0 for t in timings]),
                    "total_s": total,
                    "frames_per_s": round(frames / total, 2),
                    "render_frames_per_s": round(frames / median([t.render_s for t in timings]), 2),
                }
            )
    return {
        "benchmark": "pipeline",
        "preset": "tiny",
        "repeats": repeats,
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }


def to_markdown(report: dict) -> str:
    columns = [
        ("renderer", "renderer"),
        ("size", "size"),
        ("shots", "shots"),
        ("frames", "frames"),
        ("steps", "steps"),
        ("understand_s", "understand s"),
        ("generate_s", "generate s"),
        ("render_s", "render s"),
        ("compose_s", "compose s"),
        ("first_fragment_s", "first fragment s"),
        ("total_s", "total s"),
        ("frames_per_s", "frames/s"),
    ]
    lines = [
        f"# In-process pipeline, preset {report['preset']} (median of {report['repeats']})",
        "",
        f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, "
        f"{report['machine']['torch_threads']} torch threads, CUDA {report['machine']['cuda']}. "
        f"{report['timestamp']}",
        "",
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(str(row[key]) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["128x128", "256x256"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--renderers", nargs="+", default=["torch", "auto"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.sizes, args.repeats, args.steps, args.renderers)
    write_results(args.out, "pipeline", report, to_markdown(report))


if __name__ == "__main__":
    main()
