"""Generator batching against one shot at a time, on the same cluster shape (tiny preset).

    .venv/bin/python -m shopreel.benchmarks.batching [--videos 16] [--concurrency 4] [--sizes 64x64 128x128]

Starts the embedded cluster twice, with one generator replica that takes up to 4 streams at once:
``generate.batch_max_shots: 1`` (each shot its own pipeline call) and ``4`` (same-shaped shots of
concurrent videos in one call, waiting at most ``batch_wait_ms``). For each, ``--concurrency``
clients stream ``--videos`` 4-shot videos per size (different seeds, so different noise); reports
videos per minute and latency.

Writes ``benchmarks/results/batching.json`` and ``.md``. The two clusters run one after the other
on a shared machine: compare them as a ratio, not as absolute figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import free_port, write_results
from .serving import BRIEF, stream_once, throughput

RESULTS = Path(__file__).resolve().parent / "results"
MODES = (1, 4)


def run_mode(batch_max_shots: int, sizes: list[str], concurrency: int, videos: int) -> list[dict[str, Any]]:
    import httpx

    from shopreel.serve.runner import load_config, start

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "jobs.data_dir": tmp,
            "jobs.max_streams": concurrency + 1,
            "generator.max_ongoing_requests": 4,
            "pipeline.generate.batch_max_shots": batch_max_shots,
            "pipeline.generate.batch_wait_ms": 20,
        }
        server = start(load_config(None, **overrides), port=free_port(), ready_timeout_s=600)
        try:
            for size in sizes:
                brief = {**BRIEF, "size": size}
                with httpx.Client(base_url=server.url, timeout=900) as client:
                    stream_once(client, brief)  # warm-up at this size
                rows.append(
                    {
                        "batch_max_shots": batch_max_shots,
                        "size": size,
                        **throughput(server.url, brief, concurrency, videos),
                    }
                )
        finally:
            server.stop()
    return rows


def run(sizes: list[str], concurrency: int, videos: int) -> dict[str, Any]:
    return {
        "benchmark": "batching",
        "preset": "tiny",
        "brief": BRIEF,
        "rows": [row for mode in MODES for row in run_mode(mode, sizes, concurrency, videos)],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "# Generator batching vs one shot at a time, preset tiny",
        "",
        f"4-shot briefs, 1 generator replica taking 4 streams, {rows[0]['concurrency']} clients streaming "
        f"{rows[0]['videos']} videos per size. Machine: {report['machine']['platform']}, "
        f"{report['machine']['cpus']} CPUs. {report['timestamp']}.",
        "",
        "| size | batch_max_shots | videos/min | latency p50 s | latency max s | throughput vs unbatched |",
        "|---|---|---|---|---|---|",
    ]
    baseline = {row["size"]: row for row in rows if row["batch_max_shots"] == 1}
    for row in rows:
        ratio = row["videos_per_min"] / baseline[row["size"]]["videos_per_min"]
        lines.append(
            f"| {row['size']} | {row['batch_max_shots']} | {row['videos_per_min']} | "
            f"{row['latency_p50_s']} | {row['latency_max_s']} | x{ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["64x64", "128x128"])
    args = parser.parse_args()
    report = run(args.sizes, args.concurrency, args.videos)
    write_results(RESULTS, "batching", report, to_markdown(report))


if __name__ == "__main__":
    main()
