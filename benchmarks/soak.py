"""Soak: the cluster held at its capacity for a bounded time; memory growth per replica, errors, drift.

    .venv/bin/python -m shopreel.benchmarks.soak [--minutes 12] [--warmup-minutes 2] [--concurrency 2]

Starts the embedded cluster (tiny preset) as deploy/ runs it in the ways that accumulate state:
authentication on (requests carry a key; the key cache turns over), a one-minute video TTL with the
expiry sweeper running every few seconds (files and records are deleted while new ones are written).
``--concurrency`` closed-loop clients each stream a product video (``POST /v1/product-videos``);
every fourth request is an OpenAI-style job instead (create, poll, download, delete). On the 2-core
machine the cluster's throughput is flat from 1 to 4 clients (``serving.md``), so 2 keep it at its
capacity without queueing past the stream limit.

Every ``--sample-s`` the resident memory of each Serve replica process is read from ``/proc``
(processes titled ``ray::ServeReplica:shopreel:<stage>``). After ``--warmup-minutes`` (models loaded,
ONNX graphs built, allocator pools grown) the report compares, per replica, the median of the
first three samples with the median of the last three: growth in %, goal < 5 %. It also counts
errors (any answer other than a video, apart from the designed 429/503 refusals, counted apart) and
latency drift (median latency of the last quarter of the run over that of the first quarter).

Writes ``benchmarks/results/soak.json``, ``.md`` and ``.png`` (memory per replica and latency over time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import free_port, percentile, write_results
from .latency import BRIEF, PROMPT

RESULTS = Path(__file__).resolve().parent / "results"
REPLICA_TITLE = "ray::ServeReplica:shopreel:"
GROWTH_GOAL_PCT = 5.0
JOB_EVERY = 4  # every 4th request is an OpenAI-style job; the others stream


def replica_memory() -> dict[str, int]:
    """RSS bytes of every Serve replica process of the app on this machine, by ``stage/pid``."""
    page = os.sysconf("SC_PAGE_SIZE")
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(REPLICA_TITLE):
                continue
            resident_pages = int(Path(f"/proc/{entry}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
        # The title names the method being run too while the replica is busy ("generator.handle_...").
        stage = title.removeprefix(REPLICA_TITLE).split()[0].split(".")[0]
        found[f"{stage}/{entry}"] = resident_pages * page
    return found


async def _stream(client: Any, index: int) -> dict[str, Any]:
    started = time.perf_counter()
    body = {"brief": {**BRIEF, "seed": index}, "stream": True}
    async with client.stream("POST", "/v1/product-videos", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"kind": "stream", "status": response.status_code}
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
        video_id = response.headers.get("x-shopreel-video-id")
    record = (await client.get(f"/v1/videos/{video_id}")).json()
    ok = record.get("status") == "completed" and size > 0
    return {"kind": "stream", "status": 200, "ok": ok, "latency_s": time.perf_counter() - started}


async def _job(client: Any, index: int) -> dict[str, Any]:
    started = time.perf_counter()
    body = {"prompt": f"{PROMPT} Take {index}.", "seconds": "2", "size": "64x64"}
    response = await client.post("/v1/videos", json=body)
    if response.status_code != 200:
        return {"kind": "job", "status": response.status_code}
    video_id = response.json()["id"]
    deadline = time.monotonic() + 300
    status = "queued"
    while status in ("queued", "in_progress") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status = (await client.get(f"/v1/videos/{video_id}")).json().get("status")
    content = await client.get(f"/v1/videos/{video_id}/content") if status == "completed" else None
    deleted = (await client.delete(f"/v1/videos/{video_id}")).status_code == 200
    ok = content is not None and content.status_code == 200 and len(content.content) > 0 and deleted
    return {"kind": "job", "status": 200, "ok": ok, "latency_s": time.perf_counter() - started}


async def _clients(url: str, key: str, concurrency: int, until: float, t0: float) -> list[dict[str, Any]]:
    import httpx

    results: list[dict[str, Any]] = []
    counter = iter(range(10**9))

    async def client_loop() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
            while time.monotonic() < until:
                index = next(counter)
                started = time.monotonic() - t0
                try:
                    result = await (_job if index % JOB_EVERY == JOB_EVERY - 1 else _stream)(client, index)
                except httpx.HTTPError as exc:
                    result = {"kind": "?", "status": 0, "error": type(exc).__name__}
                results.append({**result, "t": round(started, 2)})
                if result["status"] in (429, 503):
                    await asyncio.sleep(0.5)  # a designed refusal: back off as a client should

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


def _median(values: list[int]) -> float:
    return float(statistics.median(values))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from shopreel.serve.auth import new_key
    from shopreel.serve.runner import load_config, start
    from shopreel.serve.store_url import open_job_store

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            **{
                "jobs.data_dir": tmp,
                "jobs.video_ttl_s": 60,
                "jobs.expiry_sweep_s": 5,
                "auth.enabled": True,
                "auth.key_cache_s": 2,
            },
        )
        created = new_key("soak")
        with open_job_store(config.jobs.store_url()) as jobs:
            jobs.create_key(created.record, created.secret_sha256)
        server = start(config, port=free_port(), ready_timeout_s=600)
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append({"t": round(time.monotonic() - t0, 1), "rss": replica_memory()})
                stop.wait(args.sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            until = t0 + args.minutes * 60
            results = asyncio.run(_clients(server.url, created.secret, args.concurrency, until, t0))
        finally:
            stop.set()
            sampler.join()
            server.stop()
    return _report(args, results, samples)


def _report(
    args: argparse.Namespace, results: list[dict[str, Any]], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    warm_s = args.warmup_minutes * 60
    after = [s for s in samples if s["t"] >= warm_s]
    replicas: list[dict[str, Any]] = []
    for name in sorted({name for s in after for name in s["rss"]}):
        series = [s["rss"][name] for s in after if name in s["rss"]]
        if len(series) < 6:  # started or died mid-run (autoscaling, a crash): no baseline to compare
            replicas.append({"replica": name, "samples": len(series)})
            continue
        first, last = _median(series[:3]), _median(series[-3:])
        replicas.append(
            {
                "replica": name,
                "samples": len(series),
                "rss_after_warmup_mb": round(first / 2**20, 1),
                "rss_end_mb": round(last / 2**20, 1),
                "rss_max_mb": round(max(series) / 2**20, 1),
                "growth_pct": round(100 * (last - first) / first, 2),
            }
        )
    measured = [r for r in results if r["t"] >= warm_s]
    videos = [r for r in measured if r["status"] == 200 and r.get("ok")]
    refused = [r for r in measured if r["status"] in (429, 503)]
    errors = [
        r for r in measured if r["status"] not in (429, 503) and not (r["status"] == 200 and r.get("ok"))
    ]
    span = max(1.0, args.minutes * 60 - warm_s)
    quarter = span / 4

    def window_p50(start: float) -> float | None:
        return percentile([r["latency_s"] for r in videos if start <= r["t"] - warm_s < start + quarter], 0.5)

    first_p50, last_p50 = window_p50(0), window_p50(3 * quarter)
    grown = [r["growth_pct"] for r in replicas if "growth_pct" in r]
    return {
        "benchmark": "soak",
        "preset": "tiny",
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "concurrency": args.concurrency,
        "requests_after_warmup": len(measured),
        "videos_after_warmup": len(videos),
        "videos_per_min": round(len(videos) / span * 60, 2),
        "refused": len(refused),
        "errors": len(errors),
        "error_samples": errors[:10],
        "latency_p50_s": percentile([r["latency_s"] for r in videos], 0.5),
        "latency_p95_s": percentile([r["latency_s"] for r in videos], 0.95),
        "latency_p50_first_quarter_s": first_p50,
        "latency_p50_last_quarter_s": last_p50,
        "latency_drift": round(last_p50 / first_p50, 3) if first_p50 and last_p50 else None,
        "replicas": replicas,
        "max_growth_pct": max(grown) if grown else None,
        "goal_growth_pct": GROWTH_GOAL_PCT,
        "samples": samples,
        "per_minute": per_minute(results),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def per_minute(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Videos, refusals, errors and latency p50/p95 per minute of the run (by request start)."""
    minutes: list[dict[str, Any]] = []
    for minute in range(int(max((r["t"] for r in results), default=0) // 60) + 1):
        window = [r for r in results if minute * 60 <= r["t"] < (minute + 1) * 60]
        videos = [r["latency_s"] for r in window if r["status"] == 200 and r.get("ok")]
        refused = sum(r["status"] in (429, 503) for r in window)
        minutes.append(
            {
                "minute": minute,
                "videos": len(videos),
                "refused": refused,
                "errors": len(window) - len(videos) - refused,
                "p50_s": percentile(videos, 0.5),
                "p95_s": percentile(videos, 0.95),
            }
        )
    return minutes


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Soak: the cluster at capacity, preset tiny",
        "",
        f"{report['minutes']} min with {report['concurrency']} closed-loop clients (3 streams, then a job "
        "that is downloaded and deleted, in turn); authentication on; videos expire after 60 s and the "
        f"sweeper runs every 5 s. Figures after {report['warmup_minutes']} min of warm-up. Machine: "
        f"{report['machine']['platform']}, {report['machine']['cpus']} CPUs. {report['at']}",
        "",
        "| requests | videos | videos/min | refused (429/503) | errors | p50 s | p95 s | p50 first quarter s "
        "| p50 last quarter s | drift |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {report['requests_after_warmup']} | {report['videos_after_warmup']} | {report['videos_per_min']} "
        f"| {report['refused']} | {report['errors']} | {report['latency_p50_s']} | {report['latency_p95_s']} "
        f"| {report['latency_p50_first_quarter_s']} | {report['latency_p50_last_quarter_s']} "
        f"| {report['latency_drift']} |",
        "",
        "Resident memory per replica process (median of 3 samples after warm-up and at the end; "
        f"goal: growth < {report['goal_growth_pct']} %):",
        "",
        "| replica (stage/pid) | after warm-up MB | end MB | max MB | growth % |",
        "|---|---|---|---|---|",
    ]
    for replica in report["replicas"]:
        if "growth_pct" not in replica:
            lines.append(f"| {replica['replica']} | (only {replica['samples']} samples) | | | |")
            continue
        lines.append(
            f"| {replica['replica']} | {replica['rss_after_warmup_mb']} | {replica['rss_end_mb']} "
            f"| {replica['rss_max_mb']} | {replica['growth_pct']} |"
        )
    lines += [
        "",
        "Per minute (by request start):",
        "",
        "| minute | videos | refused | errors | p50 s | p95 s |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for row in report["per_minute"]:
        lines.append(
            f"| {row['minute']} | {row['videos']} | {row['refused']} | {row['errors']} | {row['p50_s']} "
            f"| {row['p95_s']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, latency) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    names = sorted({name for s in report["samples"] for name in s["rss"]})
    for name in names:
        points = [(s["t"] / 60, s["rss"][name] / 2**20) for s in report["samples"] if name in s["rss"]]
        memory.plot(*zip(*points, strict=True), label=name)
    memory.axvline(report["warmup_minutes"], color="grey", linestyle="--", linewidth=1)
    memory.set_ylabel("RSS MB")
    memory.legend(fontsize=7, ncol=2)
    memory.set_title("Serve replica memory and video latency under a soak (tiny preset)")
    rows = [row for row in report["per_minute"] if row["p50_s"] is not None]
    for quantile in ("p50_s", "p95_s"):
        latency.plot(
            [row["minute"] + 0.5 for row in rows], [row[quantile] for row in rows], marker="o", label=quantile
        )
    latency.axvline(report["warmup_minutes"], color="grey", linestyle="--", linewidth=1)
    latency.set_xlabel("minutes")
    latency.set_ylabel("latency s")
    latency.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=12.0, help="whole run, warm-up included")
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 0 <= args.warmup_minutes < args.minutes:
        parser.error("--warmup-minutes must be shorter than --minutes")
    report = run(args)
    write_results(args.out, "soak", report, to_markdown(report))
    plot(report, args.out / "soak.png")


if __name__ == "__main__":
    main()
