"""Bursts against a running cluster: admission never above its limits, fast rejections, no admitted loss.

    .venv/bin/python -m shopreel.benchmarks.admission [--streams 40] [--jobs 60] [--postgres]

For each setup (one ingress replica on the SQLite store; with ``--postgres`` also one and two
ingress replicas sharing a throwaway PostgreSQL server started from the machine's binaries) it
starts the embedded cluster with the tiny preset and replays, all at once:

1. ``--streams`` streaming requests (``POST /v1/product-videos``, ``stream: true``) against
   ``max_streams``: how many were admitted, the most in flight at once (from the client's clock:
   an upper bound on the server's), rejection latency p50/p99, and whether every admitted stream
   delivered a whole video;
2. ``--jobs`` job creations (``POST /v1/videos``) against ``max_pending``: accepted vs refused,
   rejection latency, and whether every accepted job completed.

Writes ``benchmarks/results/admission.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import free_port, percentile, write_results

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BRIEF = {
    "title": "Insulated steel bottle",
    "category": "drinkware",
    "selling_points": ["Keeps drinks cold for 24 hours", "Leak-proof lid"],
    "price": 129,
    "currency": "CNY",
    "duration_s": 2,
    "size": "64x64",
    "fps": 8,
}
MAX_STREAMS = 4
MAX_PENDING = 8
PROBES = 30  # single requests sent one after another while a limit is full


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def _ingress_seconds(headers: Any) -> float | None:
    """The ingress's own time for a response, from its ``Server-Timing: ingress;dur=<ms>`` header."""
    for part in headers.get("server-timing", "").split(","):
        name, _, params = part.strip().partition(";")
        if name == "ingress" and params.startswith("dur="):
            return float(params[4:]) / 1000
    return None


def _reject_figures(refused: list[dict[str, Any]], probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Client-side p50/p99 of the burst's refusals and of single probes; the ingress's part of all."""
    latencies = [r["latency_s"] for r in refused]
    probe_latencies = [p["latency_s"] for p in probes if p["status"] != 200]
    inside = [r["ingress_s"] for r in refused + [p for p in probes if p["status"] != 200]]
    inside = [value for value in inside if value is not None]
    return {
        "reject_p50_s": percentile(latencies, 0.5),
        "reject_p99_s": percentile(latencies, 0.99),
        "probes_refused": len(probe_latencies),
        "probe_reject_p50_s": percentile(probe_latencies, 0.5),
        "probe_reject_p99_s": percentile(probe_latencies, 0.99),
        "ingress_reject_p50_s": percentile(inside, 0.5),
        "ingress_reject_p99_s": percentile(inside, 0.99),
    }


async def _healthz_burst(client: Any, count: int) -> list[float]:
    """``count`` GET /healthz at once: what any burst costs through Serve's HTTP path, admission or not."""

    async def one() -> float:
        started = time.perf_counter()
        response = await client.get("/healthz")
        response.raise_for_status()
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _probe_while_full(one: Any, client: Any, first_index: int) -> list[dict[str, Any]]:
    """Single requests, one after another, until one is admitted (a slot came free) or PROBES are sent."""
    probes: list[dict[str, Any]] = []
    for index in range(PROBES):
        probes.append(await one(client, first_index + index))
        if probes[-1]["status"] == 200:
            break
    return probes


async def _stream_burst(url: str, count: int) -> dict[str, Any]:
    import httpx

    async def one(client: httpx.AsyncClient, index: int) -> dict[str, Any]:
        # More denoising steps than the job burst: admitted streams hold their slots while probes run.
        body = {"brief": {**BRIEF, "seed": index}, "stream": True, "num_inference_steps": 8}
        started = time.perf_counter()
        async with client.stream("POST", "/v1/product-videos", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {
                    "status": response.status_code,
                    "latency_s": time.perf_counter() - started,
                    "ingress_s": _ingress_seconds(response.headers),
                    "retry_after": response.headers.get("retry-after"),
                }
            data = await response.aread()
            return {
                "status": 200,
                "interval": (started, time.perf_counter()),
                "bytes": len(data),
                "id": response.headers["x-shopreel-video-id"],
            }

    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        burst = [asyncio.create_task(one(client, index)) for index in range(count)]
        # 2. Once the burst's refusals are back, single probes while the slots are still held: the
        #    latency of one rejection, without the burst's own queueing on the client and proxy.
        deadline = time.monotonic() + 60
        while sum(task.done() for task in burst) < count - MAX_STREAMS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        probes = await _probe_while_full(one, client, count)
        floor = await _healthz_burst(client, count)  # the same burst on the cheapest route, same load
        results = await asyncio.gather(*burst, return_exceptions=True)
        results.extend(p for p in probes if p["status"] == 200)
        admitted = [r for r in results if isinstance(r, dict) and r["status"] == 200]
        refused = [r for r in results if isinstance(r, dict) and r["status"] != 200]
        errors = [repr(r) for r in results if not isinstance(r, dict)]
        statuses = [(await client.get(f"/v1/videos/{r['id']}")).json()["status"] for r in admitted]
    return {
        "requests": count,
        "limit": MAX_STREAMS,
        **_reject_figures(refused, probes),
        "healthz_burst_p50_s": percentile(floor, 0.5),
        "healthz_burst_p99_s": percentile(floor, 0.99),
        "admitted": len(admitted),
        "max_in_flight": _max_overlap([r["interval"] for r in admitted]),
        "refused": len(refused),
        "refused_statuses": sorted({r["status"] for r in refused}),
        "retry_after_present": all(r["retry_after"] for r in refused),
        "admitted_failed": sum(1 for s in statuses if s != "completed") + len(errors),
        "client_errors": errors[:3],
    }


async def _job_burst(url: str, count: int) -> dict[str, Any]:
    import httpx

    async def one(client: httpx.AsyncClient, index: int) -> dict[str, Any]:
        body = {"prompt": f"A ceramic mug, glaze {index}. Keeps coffee hot.", "seconds": 2, "size": "64x64"}
        started = time.perf_counter()
        response = await client.post("/v1/videos", json=body)
        latency = time.perf_counter() - started
        return {
            "status": response.status_code,
            "latency_s": latency,
            "ingress_s": _ingress_seconds(response.headers),
            "id": response.json().get("id") if response.status_code == 200 else None,
        }

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*(one(client, index) for index in range(count)))
        probes = await _probe_while_full(one, client, count)  # the queue is still full
        accepted = [r["id"] for r in results + probes if r["status"] == 200]
        refused = [r for r in results if r["status"] != 200]
        deadline = time.monotonic() + 600
        statuses: list[str] = []
        while time.monotonic() < deadline:
            statuses = [
                (await client.get(f"/v1/videos/{video_id}")).json()["status"] for video_id in accepted
            ]
            if all(status in ("completed", "failed") for status in statuses):
                break
            await asyncio.sleep(0.5)
    return {
        "requests": count,
        "limit": MAX_PENDING,
        **_reject_figures(refused, probes),
        "accepted": len(accepted),
        "refused": len(refused),
        "refused_statuses": sorted({r["status"] for r in refused}),
        "accepted_failed": sum(1 for status in statuses if status != "completed"),
    }


def run_setup(
    name: str,
    store_url: str | None,
    ingress_replicas: int,
    streams: int,
    jobs: int,
) -> dict[str, Any]:
    from shopreel.serve.runner import load_config, start

    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, Any] = {
            "jobs.data_dir": tmp,
            "jobs.store": store_url,
            "jobs.max_streams": MAX_STREAMS,
            "jobs.max_pending": MAX_PENDING,
            "jobs.max_running": 2,
            "jobs.concurrency": 1,
            "ingress.num_replicas": ingress_replicas,
            "pipeline.generate.num_inference_steps": 2,
        }
        server = start(load_config(None, **overrides), port=free_port(), ready_timeout_s=600)
        try:
            stream_row = asyncio.run(_stream_burst(server.url, streams))
            job_row = asyncio.run(_job_burst(server.url, jobs))
        finally:
            server.stop()
    return {"setup": name, "ingress_replicas": ingress_replicas, "streams": stream_row, "jobs": job_row}


def _postgres_helper() -> Any:
    spec = importlib.util.spec_from_file_location("shopreel_test_postgres", ROOT / "tests" / "postgres.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(streams: int, jobs: int, postgres: bool) -> dict[str, Any]:
    rows = [run_setup("sqlite, 1 ingress", None, 1, streams, jobs)]
    if postgres:
        helper = _postgres_helper()
        if (reason := helper.unavailable_reason()) is not None:
            raise SystemExit(f"--postgres: {reason}")
        with helper.postgres_server() as server:
            rows.append(run_setup("postgres, 1 ingress", server.new_database(), 1, streams, jobs))
            rows.append(run_setup("postgres, 2 ingress", server.new_database(), 2, streams, jobs))
    return {
        "benchmark": "admission",
        "preset": "tiny",
        "brief": BRIEF,
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Admission under bursts, preset tiny",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs. {report['timestamp']}. "
        "All requests of a burst are sent at once; then single requests, one after another, while the "
        "limit is still full. Latencies are the client's, HTTP and Serve's proxy included; client, "
        "proxy and every replica share the machine's cores. 'In the ingress' is the replica's own time "
        "(its Server-Timing header), from the request reaching it to the refusal; the rest of a "
        "client's latency is waiting in front of it (client, Serve's HTTP proxy, the CPU). The GET "
        "/healthz burst (as many requests, sent at once while the streams still run) is the floor any "
        "burst pays on this machine, admission or not.",
        "",
        "| setup | burst | limit | admitted | most in flight | refused (status) "
        "| burst reject p50 / p99 ms | same burst of GET /healthz p50 / p99 ms "
        "| single reject p50 / p99 ms (n) | in the ingress p50 / p99 ms | admitted that failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    for row in report["rows"]:
        s, j = row["streams"], row["jobs"]
        lines.append(
            f"| {row['setup']} | {s['requests']} streams | max_streams {s['limit']} | {s['admitted']} | "
            f"{s['max_in_flight']} | {s['refused']} ({', '.join(map(str, s['refused_statuses']))}) | "
            f"{ms(s['reject_p50_s'])} / {ms(s['reject_p99_s'])} | "
            f"{ms(s['healthz_burst_p50_s'])} / {ms(s['healthz_burst_p99_s'])} | "
            f"{ms(s['probe_reject_p50_s'])} / {ms(s['probe_reject_p99_s'])} ({s['probes_refused']}) | "
            f"{ms(s['ingress_reject_p50_s'])} / {ms(s['ingress_reject_p99_s'])} | "
            f"{s['admitted_failed']} |"
        )
        lines.append(
            f"| {row['setup']} | {j['requests']} jobs | max_pending {j['limit']} | {j['accepted']} | - | "
            f"{j['refused']} ({', '.join(map(str, j['refused_statuses']))}) | "
            f"{ms(j['reject_p50_s'])} / {ms(j['reject_p99_s'])} | - | "
            f"{ms(j['probe_reject_p50_s'])} / {ms(j['probe_reject_p99_s'])} ({j['probes_refused']}) | "
            f"{ms(j['ingress_reject_p50_s'])} / {ms(j['ingress_reject_p99_s'])} | "
            f"{j['accepted_failed']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=40, help="streaming requests in the burst")
    parser.add_argument("--jobs", type=int, default=60, help="job creations in the burst")
    parser.add_argument(
        "--postgres", action="store_true", help="also run on PostgreSQL with 1 and 2 ingresses"
    )
    args = parser.parse_args()
    report = run(args.streams, args.jobs, args.postgres)
    write_results(RESULTS, "admission", report, to_markdown(report))


if __name__ == "__main__":
    main()
