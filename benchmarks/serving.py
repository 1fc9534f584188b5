"""The serving cluster against the in-process pipeline, in one run on this machine (tiny preset).

    .venv/bin/python -m shopreel.benchmarks.serving [--repeats 3] [--videos 8] [--concurrency 1 2 4]

Measures, for one 4-shot brief:
1. latency at concurrency 1: in-process ``ProductVideoPipeline`` vs the cluster's streaming
   endpoint, interleaved run by run so both see the same machine load;
2. the cluster's time to first fragment (client side, first body byte) vs its full latency;
3. throughput (videos/min) at each concurrency, ``--videos`` requests per level.

Writes ``benchmarks/results/serving.json``, ``serving.md`` and ``serving.png``. Compare rows of one
run with each other: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import free_port

RESULTS = Path(__file__).resolve().parent / "results"
BRIEF: dict[str, Any] = {
    "title": "Thermo Mug",
    "category": "drinkware",
    "selling_points": ["Keeps coffee hot for 6 hours", "Leak-proof lid"],
    "price": 89,
    "currency": "CNY",
    "language": "en",
    "duration_s": 4,
    "size": "128x128",
    "fps": 16,
    "seed": 7,
}


def stream_once(client: Any, brief: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to the first body byte, seconds to the last, bytes) for one streamed video."""
    started = time.perf_counter()
    first = None
    size = 0
    with client.stream("POST", "/v1/product-videos", json={"brief": brief, "stream": True}) as response:
        response.raise_for_status()
        video_id = response.headers["x-shopreel-video-id"]
        for chunk in response.iter_bytes():
            if first is None:
                first = time.perf_counter() - started
            size += len(chunk)
    total = time.perf_counter() - started
    record = client.get(f"/v1/videos/{video_id}").json()
    if record["status"] != "completed":  # a benchmark of failures would be worthless: stop
        raise RuntimeError(f"video {video_id} did not complete: {record}")
    return first or 0.0, total, size


def throughput(url: str, brief: dict[str, Any], concurrency: int, videos: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    next_index = iter(range(videos))
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=900) as client:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                _, total, _ = stream_once(client, {**brief, "seed": index})
                with lock:
                    latencies.append(total)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "videos": videos,
        "wall_s": round(wall, 3),
        "videos_per_min": round(videos / wall * 60, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
    }


def run(repeats: int, videos: int, levels: list[int]) -> dict[str, Any]:
    import httpx
    import torch

    from shopreel.pipelines.pipeline import ProductVideoPipeline
    from shopreel.pipelines.types import ProductBrief
    from shopreel.serve.runner import load_config, start

    brief = ProductBrief.model_validate(BRIEF)
    pipeline = ProductVideoPipeline()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, **{"jobs.data_dir": tmp, "jobs.max_streams": max(levels) + 1})
        server = start(config, port=free_port(), ready_timeout_s=600)
        try:
            rows: list[dict[str, float]] = []
            with httpx.Client(base_url=server.url, timeout=900) as client:
                stream_once(client, BRIEF)  # warm both paths once
                pipeline.run(brief, output_path=Path(tmp) / "warm.mp4")
                for index in range(repeats):
                    result = pipeline.run(brief, output_path=Path(tmp) / f"in-process-{index}.mp4")
                    first, total, _ = stream_once(client, BRIEF)
                    rows.append(
                        {
                            "in_process_s": result.timings.total_s,
                            "in_process_first_fragment_s": result.timings.first_fragment_s or 0.0,
                            "cluster_s": total,
                            "cluster_first_fragment_s": first,
                        }
                    )
            frames = result.compose.num_frames
            shots = len(result.storyboard.shots)
            levels_rows = [throughput(server.url, BRIEF, level, videos) for level in levels]
        finally:
            server.stop()

    def median(key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 3)

    latency = {key: median(key) for key in rows[0]}
    latency["cluster_over_in_process"] = round(latency["cluster_s"] / latency["in_process_s"], 3)
    latency["first_fragment_share"] = round(latency["cluster_first_fragment_s"] / latency["cluster_s"], 3)
    return {
        "benchmark": "serving",
        "preset": "tiny",
        "brief": BRIEF,
        "shots": shots,
        "frames": frames,
        "repeats": repeats,
        "latency": latency,
        "runs": rows,
        "throughput": levels_rows,
        "goals": {"cluster_over_in_process_max": 1.15, "first_fragment_share_max": 0.25},
        "machine": {
            "platform": platform.platform(),
            "cpus": __import__("os").cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    latency = report["latency"]
    lines = [
        f"# Serving cluster vs in-process, preset {report['preset']}",
        "",
        f"{report['shots']} shots, {report['frames']} frames at {report['brief']['size']}, "
        f"{report['brief']['fps']} fps; median of {report['repeats']} interleaved runs. "
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
        f"CUDA {report['machine']['cuda']}. {report['timestamp']}",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| in-process latency s | {latency['in_process_s']} | |",
        f"| cluster latency s (streaming endpoint) | {latency['cluster_s']} | |",
        f"| cluster / in-process | {latency['cluster_over_in_process']} | <= 1.15 |",
        f"| cluster time to first fragment s | {latency['cluster_first_fragment_s']} | |",
        f"| first fragment / full latency | {latency['first_fragment_share']} | <= 0.25 |",
        f"| in-process time to first fragment s | {latency['in_process_first_fragment_s']} | |",
        "",
        "| concurrency | videos | wall s | videos/min | p50 latency s | max latency s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["throughput"]:
        lines.append(
            f"| {row['concurrency']} | {row['videos']} | {row['wall_s']} | {row['videos_per_min']} | "
            f"{row['latency_p50_s']} | {row['latency_max_s']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["throughput"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["concurrency"] for r in rows], [r["videos_per_min"] for r in rows], marker="o")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("videos / min")
    ax.set_title(f"shopreel cluster, tiny preset, {report['frames']} frames/video")
    ax.set_xticks([r["concurrency"] for r in rows])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--videos", type=int, default=8, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.repeats, args.videos, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    (args.out / "serving.md").write_text(markdown)
    plot(report, args.out / "serving.png")
    print(markdown)


if __name__ == "__main__":
    main()
