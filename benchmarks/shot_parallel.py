"""Shot-parallel generation against shots in turn, on the same cluster shape (tiny preset).

    .venv/bin/python -m shopreel.benchmarks.shot_parallel [--repeats 5] [--sizes 128x128 256x256]

Starts the embedded cluster with two generator replicas twice: ``shot_parallel: 1`` (a video's
shots denoised in turn by one generator call) and ``shot_parallel: 2`` (one call per shot, two at
once, spread over the replicas). For each, streams the same 4-shot brief ``--repeats`` times per
size at concurrency 1 and records time to first fragment and full latency (client side).

Writes ``benchmarks/results/shot_parallel.json`` and ``.md``. The two clusters run one after the
other on a shared machine: compare medians, not single runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import free_port, write_results
from .serving import BRIEF, stream_once

RESULTS = Path(__file__).resolve().parent / "results"
MODES = (1, 2)


def run_mode(shot_parallel: int, sizes: list[str], repeats: int) -> list[dict[str, Any]]:
    import httpx

    from shopreel.serve.runner import load_config, start

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "jobs.data_dir": tmp,
            "shot_parallel": shot_parallel,
            "generator.num_replicas": 2,
            "generator.num_cpus": 0.25,  # two replicas fit next to the other stages on 2 cores
        }
        server = start(load_config(None, **overrides), port=free_port(), ready_timeout_s=600)
        try:
            with httpx.Client(base_url=server.url, timeout=900) as client:
                for size in sizes:
                    brief = {**BRIEF, "size": size}
                    stream_once(client, brief)  # warm-up at this size
                    runs = [stream_once(client, brief) for _ in range(repeats)]
                    rows.append(
                        {
                            "shot_parallel": shot_parallel,
                            "size": size,
                            "first_fragment_s": statistics.median(first for first, _, _ in runs),
                            "latency_s": statistics.median(total for _, total, _ in runs),
                            "runs": [{"first_fragment_s": f, "latency_s": t} for f, t, _ in runs],
                        }
                    )
        finally:
            server.stop()
    return rows


def run(sizes: list[str], repeats: int) -> dict[str, Any]:
    rows = [row for mode in MODES for row in run_mode(mode, sizes, repeats)]
    return {
        "benchmark": "shot_parallel",
        "preset": "tiny",
        "brief": BRIEF,
        "repeats": repeats,
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Shot-parallel generation vs shots in turn, preset tiny",
        "",
        f"4-shot brief, 2 generator replicas, median of {report['repeats']} streamed videos at "
        f"concurrency 1. Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs. "
        f"{report['timestamp']}.",
        "",
        "| size | shot_parallel | time to first fragment s | latency s | vs shots in turn |",
        "|---|---|---|---|---|",
    ]
    baseline = {row["size"]: row for row in report["rows"] if row["shot_parallel"] == 1}
    for row in report["rows"]:
        base = baseline[row["size"]]
        lines.append(
            f"| {row['size']} | {row['shot_parallel']} | {row['first_fragment_s']:.3f} | "
            f"{row['latency_s']:.3f} | "
            f"first fragment x{row['first_fragment_s'] / base['first_fragment_s']:.2f}, "
            f"latency x{row['latency_s'] / base['latency_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["128x128", "256x256"])
    args = parser.parse_args()
    report = run(args.sizes, args.repeats)
    write_results(RESULTS, "shot_parallel", report, to_markdown(report))


if __name__ == "__main__":
    main()
