"""The soak benchmark's report from synthetic samples: growth per replica, errors apart from refusals."""

from __future__ import annotations

import argparse

from shopreel.benchmarks.soak import _report, per_minute, to_markdown

MB = 2**20


def test_growth_errors_and_drift_are_computed_after_warm_up():
    args = argparse.Namespace(minutes=4.0, warmup_minutes=1.0, concurrency=2)
    # Every 10 s: the generator holds 500 MB; the compositor grows 1 MB per sample after warm-up.
    samples = [
        {"t": t, "rss": {"generator/1": 500 * MB, "compositor/2": (400 + max(0, (t - 60) // 10)) * MB}}
        for t in range(0, 241, 10)
    ]
    samples[-1]["rss"]["planner/3"] = 100 * MB  # appeared at the end: too few samples to judge
    results = [{"t": 10.0, "status": 200, "ok": True, "latency_s": 9.0}]  # warm-up: not counted
    results += [{"t": 60.0 + i, "status": 200, "ok": True, "latency_s": 1.0} for i in range(40)]
    results += [{"t": 200.0 + i, "status": 200, "ok": True, "latency_s": 1.5} for i in range(40)]
    results += [
        {"t": 150.0, "status": 429},
        {"t": 151.0, "status": 500},
        {"t": 152.0, "status": 200, "ok": False},
    ]
    report = _report(args, results, samples)
    growth = {row["replica"]: row.get("growth_pct") for row in report["replicas"]}
    # Compositor: median of the first three samples after warm-up (401 MB) against the last three (417 MB).
    assert growth == {"compositor/2": 3.99, "generator/1": 0.0, "planner/3": None}
    assert report["max_growth_pct"] == 3.99
    assert (report["videos_after_warmup"], report["refused"], report["errors"]) == (80, 1, 2)
    assert report["latency_drift"] == 1.5  # last quarter's median over the first quarter's
    minutes = per_minute(results)
    assert [row["videos"] for row in minutes] == [1, 40, 0, 40]
    assert (minutes[2]["refused"], minutes[2]["errors"]) == (1, 2)
    assert "| compositor/2 | 401.0 | 417.0 | 418.0 | 3.99 |" in to_markdown(
        {**report, "machine": {"platform": "x", "cpus": 2}, "at": "now"}
    )
