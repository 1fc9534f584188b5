"""The sales-event replay's traffic schedule: the shape the benchmark claims to replay."""

from __future__ import annotations

import pytest

from shopreel.benchmarks.sales_event import Schedule


def test_rate_is_baseline_then_a_ramp_to_the_peak_a_hold_and_a_decay():
    schedule = Schedule(0.1, 10, baseline_s=60, ramp_s=60, hold_s=60, decay_s=30)
    rates = [schedule.rate(t) for t in (0, 59.9, 90, 120, 179.9, 195, 209.99, 210)]
    assert rates == pytest.approx([0.1, 0.1, 0.55, 1.0, 1.0, 0.55, 0.1, 0.0], abs=1e-3)
    assert [schedule.phase(t) for t in (10, 60, 150, 185)] == ["baseline", "spike", "spike", "decay"]


def test_arrivals_follow_the_rate_and_repeat_for_a_seed():
    schedule = Schedule(0.5, 10, baseline_s=200, ramp_s=100, hold_s=200, decay_s=100)
    arrivals = schedule.arrivals(seed=7)
    assert arrivals == schedule.arrivals(seed=7) and arrivals != schedule.arrivals(seed=8)
    assert arrivals == sorted(arrivals) and arrivals[0] > 0 and arrivals[-1] < schedule.end

    def count(start: float, end: float) -> int:
        return sum(1 for t in arrivals if start <= t < end)

    # Expected 100 in the baseline and 1000 in the hold (Poisson: within a few standard deviations).
    assert 70 < count(0, 200) < 130
    assert 900 < count(300, 500) < 1100
