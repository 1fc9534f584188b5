"""Latency and throughput under load: closed-loop concurrency and open-loop Poisson arrivals.

    # the embedded cluster with the tiny preset (started and stopped here):
    .venv/bin/python -m shopreel.benchmarks.latency [--endpoint stream|videos] [--concurrency 1 2 4]
        [--rates 0.5 1 2] [--duration 30]
    # any server speaking OpenAI's /v1/videos (only --endpoint videos applies there):
    .venv/bin/python -m shopreel.benchmarks.latency --url http://host:8000 --endpoint videos --model NAME

For each closed-loop level, N clients each send a request as soon as their previous one finished;
for each open-loop rate, requests arrive as a Poisson process whatever the server's state (what a
flash sale does). Every level runs ``--duration`` seconds of arrivals, then waits (bounded) for the
admitted requests to finish. Per level: throughput (completed videos/min), rejections (429/503),
time to first fragment (``stream``: the first body byte) and latency p50/p95/p99, admitted requests
that failed or timed out, and, against a shopreel server, the mean seconds per stage from its
``/metrics`` (the change over the level).

Writes ``benchmarks/results/latency.json``, ``.md`` and ``.png`` (latency against offered load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import free_port, percentile, write_results

RESULTS = Path(__file__).resolve().parent / "results"
BRIEF: dict[str, Any] = {
    "title": "Thermo Mug",
    "category": "drinkware",
    "selling_points": ["Keeps coffee hot for 6 hours", "Leak-proof lid"],
    "price": 89,
    "currency": "CNY",
    "duration_s": 2,
    "size": "64x64",
    "fps": 8,
}
PROMPT = "A steel thermo mug on a kitchen table. Keeps coffee hot for 6 hours. Leak-proof lid."
STAGES = ("understand", "generate", "render", "compose", "total")
DRAIN_TIMEOUT_S = 300.0  # after arrivals stop, how long admitted requests may take to finish


async def one_stream(client: Any, index: int) -> dict[str, Any]:
    """One streamed video of ``BRIEF`` (seed ``index``): status, first-byte and total seconds, ok."""
    started = time.perf_counter()
    body = {"brief": {**BRIEF, "seed": index}, "stream": True}
    async with client.stream("POST", "/v1/product-videos", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "latency_s": time.perf_counter() - started}
        first = None
        expected = int(response.headers.get("x-shopreel-num-frames", "0"))
        async for _ in response.aiter_bytes():
            if first is None:
                first = time.perf_counter() - started
        video_id = response.headers.get("x-shopreel-video-id")
    record = (await client.get(f"/v1/videos/{video_id}")).json()
    ok = record.get("status") == "completed" and expected > 0
    return {"status": 200, "ok": ok, "first_fragment_s": first, "latency_s": time.perf_counter() - started}


async def _one_job(client: Any, index: int, model: str | None, deadline: float) -> dict[str, Any]:
    started = time.perf_counter()
    body: dict[str, Any] = {"prompt": f"{PROMPT} Take {index}.", "seconds": "2", "size": "64x64"}
    if model:
        body["model"] = model
    response = await client.post("/v1/videos", json=body)
    if response.status_code != 200:
        return {"status": response.status_code, "latency_s": time.perf_counter() - started}
    video_id = response.json()["id"]
    while time.monotonic() < deadline:
        status = (await client.get(f"/v1/videos/{video_id}")).json().get("status")
        if status in ("completed", "failed"):
            return {"status": 200, "ok": status == "completed", "latency_s": time.perf_counter() - started}
        await asyncio.sleep(0.1)
    return {"status": 200, "ok": False, "timed_out": True, "latency_s": time.perf_counter() - started}


async def _stage_sums(client: Any) -> dict[str, tuple[float, float]] | None:
    """(sum, count) of each stage's latency histogram on a shopreel server's /metrics; None elsewhere."""
    try:
        text = (await client.get("/metrics")).text
    except Exception:  # noqa: BLE001 - not every server has /metrics
        return None
    sums: dict[str, tuple[float, float]] = {}
    for stage in STAGES:
        total = re.search(rf'^shopreel_stage_latency_seconds_sum{{stage="{stage}"}} (\S+)$', text, re.M)
        count = re.search(rf'^shopreel_stage_latency_seconds_count{{stage="{stage}"}} (\S+)$', text, re.M)
        if total and count:
            sums[stage] = (float(total.group(1)), float(count.group(1)))
    return sums or None


async def run_level(
    url: str, endpoint: str, model: str | None, *, mode: str, load: float, duration_s: float
) -> dict[str, Any]:
    """One closed-loop concurrency (``load`` clients) or open-loop rate (``load`` requests/s)."""
    import httpx

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=DRAIN_TIMEOUT_S + duration_s, limits=limits) as client:
        before = await _stage_sums(client)
        started = time.monotonic()
        stop_at, deadline = started + duration_s, started + duration_s + DRAIN_TIMEOUT_S
        counter = iter(range(1_000_000))

        async def one() -> dict[str, Any]:
            index = next(counter)
            if endpoint == "stream":
                return await asyncio.wait_for(one_stream(client, index), deadline - time.monotonic())
            return await _one_job(client, index, model, deadline)

        async def guarded() -> dict[str, Any]:
            try:
                return await one()
            except (asyncio.TimeoutError, TimeoutError):
                return {"status": 200, "ok": False, "timed_out": True}
            except Exception as exc:  # noqa: BLE001 - a transport error counts against the server
                return {"status": 0, "ok": False, "error": repr(exc)[:200]}

        results: list[dict[str, Any]] = []
        if mode == "closed":

            async def client_loop() -> None:
                while time.monotonic() < stop_at:
                    results.append(await guarded())

            await asyncio.gather(*(client_loop() for _ in range(int(load))))
        else:
            rng = random.Random(1111)
            tasks = []
            next_at = started
            while (next_at := next_at + rng.expovariate(load)) < stop_at:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                tasks.append(asyncio.create_task(guarded()))
            results = list(await asyncio.gather(*tasks))
        wall_s = time.monotonic() - started
        after = await _stage_sums(client)

    admitted = [r for r in results if r["status"] == 200]
    completed = [r for r in admitted if r.get("ok")]
    refused = [r for r in results if r["status"] in (429, 503)]
    stages = None
    if before is not None and after is not None:
        stages = {
            stage: round((after[stage][0] - before.get(stage, (0, 0))[0]) / delta, 4)
            for stage in after
            if (delta := after[stage][1] - before.get(stage, (0, 0))[1]) > 0
        }
    firsts = [r["first_fragment_s"] for r in completed if r.get("first_fragment_s") is not None]
    latencies = [r["latency_s"] for r in completed]
    return {
        "mode": mode,
        "load": load,
        "requests": len(results),
        "admitted": len(admitted),
        "completed": len(completed),
        "admitted_failed": len(admitted) - len(completed),
        "timed_out": sum(1 for r in admitted if r.get("timed_out")),
        "refused": len(refused),
        "other_errors": sum(1 for r in results if r["status"] not in (200, 429, 503)),
        "refused_p99_s": percentile([r["latency_s"] for r in refused], 0.99),
        "videos_per_min": round(len(completed) / wall_s * 60, 2),
        "first_fragment_p50_s": percentile(firsts, 0.5),
        "first_fragment_p95_s": percentile(firsts, 0.95),
        "first_fragment_p99_s": percentile(firsts, 0.99),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_p99_s": percentile(latencies, 0.99),
        "stage_mean_s": stages,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = None
    url = args.url
    tmp = tempfile.TemporaryDirectory()
    if url is None:
        from shopreel.serve.runner import load_config, start

        overrides = {"jobs.data_dir": tmp.name, "jobs.max_streams": args.max_streams, "jobs.concurrency": 2}
        server = start(load_config(None, **overrides), port=free_port(), ready_timeout_s=600)
        url = server.url
    try:
        levels = [("closed", float(c)) for c in args.concurrency] + [("open", rate) for rate in args.rates]
        rows = [
            asyncio.run(
                run_level(url, args.endpoint, args.model, mode=mode, load=load, duration_s=args.duration)
            )
            for mode, load in levels
        ]
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    return {
        "benchmark": "latency",
        "target": "embedded tiny cluster" if args.url is None else args.url,
        "endpoint": args.endpoint,
        "duration_s": args.duration,
        "brief": BRIEF if args.endpoint == "stream" else {"prompt": PROMPT, "seconds": "2", "size": "64x64"},
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"# Latency under load: {report['target']}, endpoint {report['endpoint']}",
        "",
        f"{report['duration_s']:g} s of arrivals per level, then admitted requests finish. Machine: "
        f"{report['machine']['platform']}, {report['machine']['cpus']} CPUs. {report['timestamp']}. "
        "Latencies are the client's; first fragment only for the streaming endpoint.",
        "",
        "| load | requests | completed | refused (p99 s) | admitted failed | videos/min "
        "| first fragment p50 / p95 / p99 s | latency p50 / p95 / p99 s | mean s per stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        load = f"{int(row['load'])} clients" if row["mode"] == "closed" else f"{row['load']:g} req/s Poisson"
        stages = ", ".join(f"{k} {v:.2f}" for k, v in (row["stage_mean_s"] or {}).items()) or "-"
        first = " / ".join(s(row[f"first_fragment_p{q}_s"]) for q in (50, 95, 99))
        latency = " / ".join(s(row[f"latency_p{q}_s"]) for q in (50, 95, 99))
        refused = f"{row['refused']} ({s(row['refused_p99_s'])})"
        lines.append(
            f"| {load} | {row['requests']} | {row['completed']} | {refused} | {row['admitted_failed']} | "
            f"{row['videos_per_min']} | {first} | {latency} | {stages} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, mode, label in (
        (axes[0], "closed", "concurrent clients"),
        (axes[1], "open", "arrivals per second"),
    ):
        rows = [row for row in report["rows"] if row["mode"] == mode]
        loads = [row["load"] for row in rows]
        for key, name in (
            ("latency_p50_s", "latency p50"),
            ("latency_p99_s", "latency p99"),
            ("first_fragment_p99_s", "first fragment p99"),
        ):
            values = [row[key] for row in rows]
            if any(value is not None for value in values):
                axis.plot(
                    loads, [v if v is not None else float("nan") for v in values], marker="o", label=name
                )
        axis.set_xlabel(label)
        axis.set_ylabel("seconds")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"shopreel latency under load ({report['endpoint']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server; default: start the embedded tiny cluster")
    parser.add_argument("--endpoint", choices=["stream", "videos"], default="stream")
    parser.add_argument("--model", help="model id for /v1/videos on another server")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument(
        "--rates", type=float, nargs="*", default=[0.5, 1.0, 2.0], help="open-loop arrivals/s"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per level")
    parser.add_argument("--max-streams", type=int, default=4, help="embedded cluster's jobs.max_streams")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if any(rate <= 0 for rate in args.rates) or any(c < 1 for c in args.concurrency) or args.duration <= 0:
        parser.error("rates and duration must be > 0, concurrency >= 1")
    report = run(args)
    stem = "latency" if args.endpoint == "stream" else "latency_videos"
    write_results(args.out, stem, report, to_markdown(report))
    plot(report, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
