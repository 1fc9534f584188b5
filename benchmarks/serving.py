"""The serving cluster against the in-process pipeline, in one run on this machine (tiny preset).

    .venv/bin/python -m shopreel.benchmarks.serving [--repeats 3] [--videos 8] [--concurrency 1 2 4]
        [--sizes 128x128 256x256] [--serve-modes fast default]

Measures, for one 4-shot brief:
1. latency at concurrency 1 at each size: in-process ``ProductVideoPipeline`` vs the cluster's
   streaming endpoint, interleaved run by run so both see the same machine load, once per Serve
   request path (``fast``, what ``serve/runner.py`` starts, and Serve's ``default``);
2. time to first fragment (cluster: client side, first body byte) against the in-process one;
3. throughput (videos/min) at each concurrency, ``--videos`` requests per level.

Writes ``benchmarks/results/serving.json``, ``serving.md`` and ``serving.png``. Compare rows of one
run with each other: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import free_port, write_results

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


SIZES = ("128x128", "256x256")
GOALS = {"cluster_over_in_process_max": 1.10, "first_fragment_over_in_process_max": 1.25}


def latency_rows(client: Any, pipeline: Any, brief: dict[str, Any], repeats: int, tmp: str) -> dict[str, Any]:
    """In-process and cluster runs of one brief, interleaved so both see the same machine load."""
    from shopreel.pipelines.types import ProductBrief

    product_brief = ProductBrief.model_validate(brief)
    stream_once(client, brief)  # warm both paths at this size once
    pipeline.run(product_brief, output_path=Path(tmp) / "warm.mp4")
    rows: list[dict[str, float]] = []
    for index in range(repeats):
        result = pipeline.run(product_brief, output_path=Path(tmp) / f"in-process-{index}.mp4")
        first, total, _ = stream_once(client, brief)
        rows.append(
            {
                "in_process_s": result.timings.total_s,
                "in_process_first_fragment_s": result.timings.first_fragment_s or 0.0,
                "cluster_s": total,
                "cluster_first_fragment_s": first,
            }
        )
    median = {key: round(statistics.median(row[key] for row in rows), 3) for key in rows[0]}
    median["cluster_over_in_process"] = round(median["cluster_s"] / median["in_process_s"], 3)
    median["first_fragment_over_in_process"] = round(
        median["cluster_first_fragment_s"] / median["in_process_first_fragment_s"], 3
    )
    median["first_fragment_share"] = round(median["cluster_first_fragment_s"] / median["cluster_s"], 3)
    return {"size": brief["size"], "median": median, "runs": rows}


def run(repeats: int, videos: int, levels: list[int], sizes: list[str], modes: list[str]) -> dict[str, Any]:
    """``modes``: ``fast`` (Serve's low-overhead path, what ``runner.start`` sets up) and/or ``default``."""
    import os

    import httpx
    import torch

    from shopreel.pipelines.pipeline import ProductVideoPipeline
    from shopreel.serve.deployments import torch_threads
    from shopreel.serve.runner import SERVE_DEFAULT_ENV, SERVE_FAST_PATH_ENV, load_config, start

    pipeline = ProductVideoPipeline()
    latency: list[dict[str, Any]] = []
    levels_rows: list[dict[str, float]] = []
    for mode in modes:
        # Ray reads these when its processes start: each mode gets its own embedded cluster.
        os.environ.update(SERVE_FAST_PATH_ENV if mode == "fast" else SERVE_DEFAULT_ENV)
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(None, **{"jobs.data_dir": tmp, "jobs.max_streams": max(levels) + 1})
            server = start(config, port=free_port(), ready_timeout_s=600)
            try:
                with httpx.Client(base_url=server.url, timeout=900) as client:
                    for size in sizes:
                        row = latency_rows(client, pipeline, {**BRIEF, "size": size}, repeats, tmp)
                        latency.append({"serve_mode": mode, **row})
                if mode == modes[0]:
                    levels_rows = [throughput(server.url, BRIEF, level, videos) for level in levels]
            finally:
                server.stop()
    return {
        "benchmark": "serving",
        "preset": "tiny",
        "brief": BRIEF,
        "repeats": repeats,
        "latency": latency,
        "throughput": levels_rows,
        "throughput_serve_mode": modes[0],
        "goals": GOALS,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "replica_torch_threads": torch_threads(load_config(None)),
            "in_process_torch_threads": torch.get_num_threads(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    goals = report["goals"]
    machine = report["machine"]
    lines = [
        f"# Serving cluster vs in-process, preset {report['preset']}",
        "",
        f"One 4-shot brief ({report['brief']['fps']} fps); median of {report['repeats']} runs, in-process "
        f"and cluster interleaved. Cluster times are the client's (HTTP streaming endpoint, first body byte "
        f"and last). Serve mode `fast`: Serve's low-overhead request path as `serve/runner.py` starts it; "
        f"`default`: Serve's defaults. Machine: {machine['platform']}, {machine['cpus']} CPUs, CUDA "
        f"{machine['cuda']}; torch threads: {machine['in_process_torch_threads']} in process, "
        f"{machine['replica_torch_threads']} per torch replica. {report['timestamp']}",
        "",
        "| serve mode | size | in-process s | cluster s | cluster / in-process | in-process first fragment s "
        "| cluster first fragment s | first fragment ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["latency"]:
        m = row["median"]
        lines.append(
            f"| {row['serve_mode']} | {row['size']} | {m['in_process_s']} | {m['cluster_s']} | "
            f"{m['cluster_over_in_process']} | {m['in_process_first_fragment_s']} | "
            f"{m['cluster_first_fragment_s']} | {m['first_fragment_over_in_process']} |"
        )
    lines += [
        "",
        f"Goals: cluster / in-process <= {goals['cluster_over_in_process_max']}, first fragment ratio <= "
        f"{goals['first_fragment_over_in_process_max']}.",
        "",
        f"Throughput (serve mode `{report['throughput_serve_mode']}`, {report['brief']['size']}):",
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
    ax.set_title(f"shopreel cluster, tiny preset, {report['brief']['size']}")
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
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument(
        "--serve-modes",
        nargs="+",
        choices=["fast", "default"],
        default=["fast", "default"],
        help="Serve request paths to measure, each on its own embedded cluster (throughput: the first)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.repeats, args.videos, args.concurrency, args.sizes, args.serve_modes)
    write_results(args.out, "serving", report, to_markdown(report))
    plot(report, args.out / "serving.png")


if __name__ == "__main__":
    main()
