"""Sales-event replay: baseline traffic, a 10x ramp in one minute, hold, decay; with and without the calendar.

    .venv/bin/python -m shopreel.benchmarks.sales_event [--baseline-rate 0.1] [--peak-multiplier 10]
        [--baseline-s 60] [--ramp-s 60] [--hold-s 60] [--decay-s 30] [--prewarm-s 45] [--runs calendar none]

Each run starts its own embedded cluster (tiny preset, streaming endpoint, 64x64 two-second briefs)
with the stages autoscaling on their backlog and the stream limit following the generator replicas
that are up (``jobs.streams_per_generator_replica``): admission admits what the running capacity can
take, so capacity that is not there yet shows as refusals. Arrivals are a Poisson process whose rate
follows the schedule (baseline, linear ramp to ``peak-multiplier`` times baseline over ``ramp-s``,
hold, linear decay), with the same seed in both runs. The ``calendar`` run posts the event through
the admin API before the baseline starts (peak at the ramp's start, floors raised ``prewarm-s``
earlier); the ``none`` run has no event, so only the backlog scales the stages.

Per run: requests, admitted, refused (and how fast refusals answered), admitted requests that failed
or timed out, time to first fragment of admitted requests in the baseline and in the spike (ramp and
hold), and replicas per stage sampled every second (``serve.status()``). Writes
``benchmarks/results/sales_event.json``, ``.md`` and ``.png`` (offered rate, replicas, refusals over
time for both runs). Loopback only; bounded by the schedule plus a drain timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .common import free_port, percentile, write_results
from .latency import BRIEF, one_stream

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("generator", "renderer", "compositor")
DRAIN_TIMEOUT_S = 120.0  # after arrivals stop, how long admitted requests may take to finish
ADMIN_KEY = "sales-event-benchmark"


class Schedule:
    """Offered load (requests/s) over time: baseline, ramp, hold, decay."""

    def __init__(
        self,
        baseline_rate: float,
        multiplier: float,
        baseline_s: float,
        ramp_s: float,
        hold_s: float,
        decay_s: float,
    ) -> None:
        self.baseline_rate, self.multiplier = baseline_rate, multiplier
        self.ramp_at = baseline_s
        self.hold_at = baseline_s + ramp_s
        self.decay_at = self.hold_at + hold_s
        self.end = self.decay_at + decay_s

    def rate(self, t: float) -> float:
        peak = self.baseline_rate * self.multiplier
        if t < self.ramp_at:
            return self.baseline_rate
        if t < self.hold_at:
            return self.baseline_rate + (peak - self.baseline_rate) * (t - self.ramp_at) / (
                self.hold_at - self.ramp_at
            )
        if t < self.decay_at:
            return peak
        if t < self.end:
            return peak - (peak - self.baseline_rate) * (t - self.decay_at) / max(
                1e-9, self.end - self.decay_at
            )
        return 0.0

    def phase(self, t: float) -> str:
        if t < self.ramp_at:
            return "baseline"
        if t < self.decay_at:
            return "spike"  # the ramp and the hold
        return "decay"

    def arrivals(self, seed: int) -> list[float]:
        """Poisson arrival times of the whole schedule (thinning: exact for a time-varying rate)."""
        rng = random.Random(seed)
        top = self.baseline_rate * max(1.0, self.multiplier)
        times, t = [], 0.0
        while (t := t + rng.expovariate(top)) < self.end:
            if rng.random() < self.rate(t) / top:
                times.append(t)
        return times


async def _replay(url: str, schedule: Schedule, seed: int) -> tuple[list[dict[str, Any]], float]:
    import httpx

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=url, timeout=DRAIN_TIMEOUT_S + schedule.end, limits=limits
    ) as client:
        started = time.monotonic()
        deadline = started + schedule.end + DRAIN_TIMEOUT_S

        async def one(index: int, at: float) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            sent = time.monotonic() - started
            try:
                result = await asyncio.wait_for(one_stream(client, index), deadline - time.monotonic())
            except (asyncio.TimeoutError, TimeoutError):
                result = {"status": 200, "ok": False, "timed_out": True}
            except Exception as exc:  # noqa: BLE001 - a transport error counts against the server
                result = {"status": 0, "ok": False, "error": repr(exc)[:200]}
            return {**result, "sent_s": round(sent, 3), "phase": schedule.phase(sent)}

        arrivals = schedule.arrivals(seed)
        results = await asyncio.gather(*(one(index, at) for index, at in enumerate(arrivals)))
        return list(results), started


def _sample_replicas(
    app_name: str, stop: threading.Event, started_at: list[float], samples: list[dict[str, Any]]
) -> None:
    """Running replicas per stage, every second, from Serve's own status (not our metrics)."""
    from ray import serve
    from ray.serve.schema import ReplicaState

    while not stop.wait(1.0):
        try:
            deployments = serve.status().applications[app_name].deployments
        except Exception:  # noqa: BLE001 - a sample missed is a gap in the plot, not a failed run
            continue
        if not started_at:
            continue
        sample: dict[str, Any] = {"t": round(time.monotonic() - started_at[0], 1)}
        for stage in STAGES:
            status = deployments.get(stage)
            sample[stage] = 0 if status is None else status.replica_states.get(ReplicaState.RUNNING, 0)
        samples.append(sample)


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    admitted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]

    def firsts(phase: str) -> list[float]:
        return [
            r["first_fragment_s"]
            for r in admitted
            if r.get("ok") and r["phase"] == phase and r.get("first_fragment_s") is not None
        ]

    baseline_p99 = percentile(firsts("baseline"), 0.99)
    spike_p99 = percentile(firsts("spike"), 0.99)
    return {
        "requests": len(results),
        "admitted": len(admitted),
        "completed": sum(1 for r in admitted if r.get("ok")),
        "admitted_failed": sum(1 for r in admitted if not r.get("ok")),
        "timed_out": sum(1 for r in admitted if r.get("timed_out")),
        "refused": len(refused),
        "refused_in_spike": sum(1 for r in refused if r["phase"] == "spike"),
        "other_errors": sum(1 for r in results if r["status"] not in (200, 429, 503)),
        "refused_p99_s": percentile([r["latency_s"] for r in refused], 0.99),
        "first_fragment_baseline_p50_s": percentile(firsts("baseline"), 0.5),
        "first_fragment_baseline_p99_s": baseline_p99,
        "first_fragment_spike_p50_s": percentile(firsts("spike"), 0.5),
        "first_fragment_spike_p99_s": spike_p99,
        "spike_p99_over_baseline_p99": round(spike_p99 / baseline_p99, 2)
        if spike_p99 and baseline_p99
        else None,
    }


def run_once(
    schedule: Schedule,
    *,
    calendar: bool,
    prewarm_s: float,
    floors: dict[str, int],
    seed: int,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    import httpx

    from shopreel.serve.runner import APP_NAME, load_config, start

    os.environ["SHOPREEL_ADMIN_KEY"] = ADMIN_KEY  # read by the ingress replicas (they inherit it)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, **{"jobs.data_dir": tmp, **overrides})
        server = start(config, port=free_port(), ready_timeout_s=600)
        samples: list[dict[str, Any]] = []
        started_at: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(
            target=_sample_replicas, args=(APP_NAME, stop, started_at, samples), daemon=True
        )
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for index in range(3):  # warm the path once per stage replica's first requests
                    client.post(
                        "/v1/product-videos", json={"brief": {**BRIEF, "seed": 10_000 + index}}
                    ).raise_for_status()
                if calendar:
                    peak = datetime.now(timezone.utc) + timedelta(seconds=schedule.ramp_at)
                    event = {
                        "name": "benchmark-peak",
                        "start": peak.isoformat(),
                        "end": (peak + timedelta(seconds=schedule.end - schedule.ramp_at)).isoformat(),
                        "peak_multiplier": schedule.multiplier,
                        "prewarm_s": prewarm_s,
                        "floors": floors,
                    }
                    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
                    client.post("/admin/events", json=event, headers=headers).raise_for_status()
            sampler.start()
            started_at.append(time.monotonic())  # the replay's clock starts now, as does the sampler's
            results, _ = asyncio.run(_replay(server.url, schedule, seed))
        finally:
            stop.set()
            server.stop()
    return {"calendar": calendar, "summary": _summary(results), "replicas": samples, "requests": results}


def run(args: argparse.Namespace) -> dict[str, Any]:
    schedule = Schedule(
        args.baseline_rate, args.peak_multiplier, args.baseline_s, args.ramp_s, args.hold_s, args.decay_s
    )
    floors = {"generator": args.max_generators, "renderer": args.max_renderers}
    overrides = {
        "jobs.max_streams": args.max_streams,
        "jobs.streams_per_generator_replica": args.streams_per_generator,
        "generator.autoscaling": {
            "min_replicas": 1,
            "max_replicas": args.max_generators,
            "backlog_per_replica": 2,
            "upscale_delay_s": 2,
            "downscale_delay_s": 30,
        },
        "renderer.autoscaling": {
            "min_replicas": 1,
            "max_replicas": args.max_renderers,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 2,
            "downscale_delay_s": 30,
        },
        "generator.num_cpus": 0.25,
        "renderer.num_cpus": 0.25,
    }
    runs = [
        run_once(
            schedule,
            calendar=name == "calendar",
            prewarm_s=args.prewarm_s,
            floors=floors,
            seed=args.seed,
            overrides=overrides,
        )
        for name in args.runs
    ]
    return {
        "benchmark": "sales_event",
        "preset": "tiny",
        "brief": BRIEF,
        "schedule": {
            "baseline_rate": args.baseline_rate,
            "peak_multiplier": args.peak_multiplier,
            "baseline_s": args.baseline_s,
            "ramp_s": args.ramp_s,
            "hold_s": args.hold_s,
            "decay_s": args.decay_s,
            "prewarm_s": args.prewarm_s,
            "seed": args.seed,
        },
        "config": {**overrides, "event_floors": floors},
        "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def to_markdown(report: dict[str, Any]) -> str:
    s = report["schedule"]
    lines = [
        "# Sales-event replay: with and without the event calendar, preset tiny",
        "",
        f"Poisson arrivals (seed {s['seed']}) on the streaming endpoint: {s['baseline_rate']} req/s for "
        f"{s['baseline_s']} s, a ramp to {s['peak_multiplier']}x over {s['ramp_s']} s, hold {s['hold_s']} s, "
        f"decay {s['decay_s']} s. Calendar run: the event's floors ({report['config']['event_floors']}) rise "
        f"{s['prewarm_s']} s before the ramp. Stream limit: "
        f"{report['config']['jobs.streams_per_generator_replica']} per running generator replica, "
        "plus one replica's worth "
        f"(at most {report['config']['jobs.max_streams']}). "
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs. {report['timestamp']}.",
        "",
        "| measure | "
        + " | ".join("calendar" if r["calendar"] else "no calendar" for r in report["runs"])
        + " |",
        "|---|" + "---|" * len(report["runs"]),
    ]
    rows = [
        ("requests", "requests"),
        ("admitted", "admitted"),
        ("refused (in the spike)", None),
        ("admitted that failed or timed out", None),
        ("refusal answer p99 s", "refused_p99_s"),
        ("first fragment p50 / p99 s, baseline", None),
        ("first fragment p50 / p99 s, spike", None),
        ("spike p99 / baseline p99", "spike_p99_over_baseline_p99"),
        ("peak generator / renderer replicas", None),
    ]
    for label, key in rows:
        cells = []
        for run_ in report["runs"]:
            m = run_["summary"]
            if key is not None:
                cells.append(_fmt(m[key]))
            elif label.startswith("refused"):
                cells.append(f"{m['refused']} ({m['refused_in_spike']})")
            elif label.startswith("admitted that"):
                cells.append(f"{m['admitted_failed']} ({m['timed_out']} timed out)")
            elif label.endswith("baseline"):
                cells.append(
                    f"{_fmt(m['first_fragment_baseline_p50_s'])} / {_fmt(m['first_fragment_baseline_p99_s'])}"
                )
            elif label.endswith("spike"):
                cells.append(
                    f"{_fmt(m['first_fragment_spike_p50_s'])} / {_fmt(m['first_fragment_spike_p99_s'])}"
                )
            else:
                peaks = [
                    max((r[stage] for r in run_["replicas"]), default=0)
                    for stage in ("generator", "renderer")
                ]
                cells.append(f"{peaks[0]} / {peaks[1]}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Replicas per stage over time and refusals are in `sales_event.png`; every request and every "
        "replica sample is in `sales_event.json`.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["schedule"]
    schedule = Schedule(
        s["baseline_rate"], s["peak_multiplier"], s["baseline_s"], s["ramp_s"], s["hold_s"], s["decay_s"]
    )
    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.8 * len(runs)), sharex=True, squeeze=False)
    for ax, run_ in zip(axes[:, 0], runs, strict=True):
        times = [i * 0.5 for i in range(int(schedule.end * 2) + 1)]
        ax.plot(times, [schedule.rate(t) for t in times], color="gray", label="offered req/s")
        ax.set_ylabel("req/s")
        refused = [r["sent_s"] for r in run_["requests"] if r["status"] in (429, 503)]
        ax.scatter(refused, [0.02] * len(refused), marker="x", color="red", label="refused", zorder=3)
        twin = ax.twinx()
        reps = run_["replicas"]
        for stage, style in (("generator", "-"), ("renderer", "--")):
            twin.step([r["t"] for r in reps], [r[stage] for r in reps], style, where="post", label=stage)
        twin.set_ylabel("replicas")
        twin.set_ylim(0, max([r["generator"] for r in reps] + [r["renderer"] for r in reps] + [1]) + 1)
        ax.set_title("with the event calendar" if run_["calendar"] else "without the calendar")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the replay started")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline-rate", type=float, default=0.1, help="requests/s before and after the peak"
    )
    parser.add_argument("--peak-multiplier", type=float, default=10.0)
    parser.add_argument("--baseline-s", type=float, default=60.0)
    parser.add_argument("--ramp-s", type=float, default=60.0)
    parser.add_argument("--hold-s", type=float, default=60.0)
    parser.add_argument("--decay-s", type=float, default=30.0)
    parser.add_argument("--prewarm-s", type=float, default=45.0, help="calendar lead before the ramp")
    parser.add_argument("--max-generators", type=int, default=3)
    parser.add_argument("--max-renderers", type=int, default=2)
    parser.add_argument("--streams-per-generator", type=int, default=1)
    parser.add_argument("--max-streams", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--runs", nargs="+", choices=["calendar", "none"], default=["calendar", "none"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args)
    write_results(args.out, "sales_event", report, to_markdown(report))
    plot(report, args.out / "sales_event.png")


if __name__ == "__main__":
    main()
