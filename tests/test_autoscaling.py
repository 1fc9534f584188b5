"""Stage autoscaling: the policy's decisions for given backlogs and calendar windows, and its wiring.

Fast tests call the policy with a stand-in for Ray's ``AutoscalingContext``; the integration test
adds an event through the admin API of a running cluster and watches Serve start the replica.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from shopreel.serve import autoscaling
from shopreel.serve.autoscaling import PENDING_SHOTS, StagePolicy, calendar_floor, decide
from shopreel.serve.config import SalesEvent, ServeConfig

MIDNIGHT = datetime(2026, 11, 11, tzinfo=timezone(timedelta(hours=8)))  # 11.11 in Beijing


def _event(name: str = "11.11", **fields: Any) -> SalesEvent:
    spec = {"name": name, "start": MIDNIGHT, "end": MIDNIGHT + timedelta(days=1), "prewarm_s": 3600}
    return SalesEvent.model_validate({**spec, **fields})


@pytest.mark.parametrize(
    ("at", "floor", "raised_by"),
    [
        (MIDNIGHT - timedelta(hours=2), 1, None),  # before the pre-warm
        (MIDNIGHT - timedelta(minutes=59), 8, "11.11"),  # pre-warming: replicas load before the peak
        (MIDNIGHT + timedelta(hours=12), 8, "11.11"),
        (MIDNIGHT + timedelta(days=1), 1, None),  # the end releases the floor
    ],
)
def test_the_calendar_raises_the_floor_from_the_prewarm_to_the_end(at, floor, raised_by):
    # min 1 x peak 10, capped at max 8
    assert calendar_floor([_event(peak_multiplier=10)], "generator", at, 1, 8) == (floor, raised_by)


def test_explicit_floors_the_highest_event_and_the_bounds():
    at = MIDNIGHT + timedelta(hours=1)
    events = [_event("a", peak_multiplier=3), _event("b", peak_multiplier=1, floors={"renderer": 5})]
    assert calendar_floor(events, "generator", at, 2, 16) == (6, "a")  # 2 x 3 beats b's 2 x 1
    assert calendar_floor(events, "renderer", at, 2, 16) == (6, "a")  # 6 beats b's explicit 5
    assert calendar_floor(events, "renderer", at, 1, 4) == (4, "b")  # a: 3, b: 5 capped at max 4
    assert calendar_floor([_event(floors={"planner": 0})], "planner", at, 1, 4) == (
        1,
        None,
    )  # never below min


def test_decisions_scale_on_the_stages_own_backlog_and_never_below_the_floor():
    quiet = decide(
        "generator", backlog=9, backlog_per_replica=2, events=[], now=MIDNIGHT, min_replicas=1, max_replicas=8
    )
    assert (quiet.wanted, quiet.floor, quiet.replicas, quiet.event) == (4.5, 1, 4.5, None)
    peak = decide(
        "generator",
        backlog=0,
        backlog_per_replica=2,
        events=[_event(floors={"generator": 6})],
        now=MIDNIGHT,
        min_replicas=1,
        max_replicas=8,
    )
    assert (peak.wanted, peak.replicas, peak.event) == (0.0, 6.0, "11.11")


def _ctx(*, requests: float = 0, pending: dict[str, float] | None = None, now: datetime = MIDNIGHT) -> Any:
    """The parts of Ray Serve's AutoscalingContext the policy reads."""
    return SimpleNamespace(
        current_time=now.timestamp(),
        total_num_requests=requests,
        aggregated_metrics={PENDING_SHOTS: pending} if pending is not None else {},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        current_num_replicas=1,
        policy_state={"kept": True},
    )


def test_the_generator_counts_shots_and_other_stages_count_calls(monkeypatch):
    recorded: list[tuple[str, float]] = []
    monkeypatch.setattr(autoscaling.sm, "_default_recorder", lambda: None)
    generator = StagePolicy("generator", backlog_per_replica=4)
    generator.metrics.set = lambda series, value: recorded.append((series.name, value))  # type: ignore[method-assign]
    # Two replicas with 7 and 5 shots to denoise: 3 replicas wanted, whatever the request count says.
    assert generator(_ctx(requests=2, pending={"r1": 7, "r2": 5})) == (3.0, {"kept": True})
    assert ("shopreel_autoscaler_backlog", 12.0) in recorded
    assert ("shopreel_autoscaler_wanted_replicas", 3.0) in recorded
    assert generator(_ctx(requests=6))[0] == 1.5  # no replica reported yet: its calls stand in
    renderer = StagePolicy("renderer", backlog_per_replica=2)
    assert renderer(_ctx(requests=6, pending={"r1": 50}))[0] == 3.0  # the renderer's own calls


def test_events_added_at_run_time_come_from_the_job_store(tmp_path, monkeypatch):
    from shopreel.serve.store_url import open_job_store

    monkeypatch.setattr(autoscaling, "EVENTS_REFRESH_S", 0.0)
    jobs = ServeConfig.model_validate({"jobs": {"data_dir": str(tmp_path)}}).jobs
    policy = StagePolicy("renderer", backlog_per_replica=2, jobs=jobs.model_dump(mode="json"))
    assert policy(_ctx())[0] == 1.0
    with open_job_store(jobs.store_url()) as store:
        store.put_event(_event(floors={"renderer": 4}))
        assert policy(_ctx())[0] == 4.0
        store.delete_event("11.11")
    assert policy(_ctx())[0] == 1.0


def test_sales_events_refuse_ambiguous_or_impossible_windows():
    with pytest.raises(ValidationError, match="UTC offset"):
        SalesEvent(name="618", start=datetime(2026, 6, 18), end=datetime(2026, 6, 19, tzinfo=timezone.utc))
    with pytest.raises(ValidationError, match="end must be after start"):
        _event(end=MIDNIGHT)
    with pytest.raises(ValidationError, match="unknown stages"):
        _event(floors={"gpu": 2})
    with pytest.raises(ValidationError, match="unique"):
        ServeConfig(events=[_event(), _event()])


def test_every_autoscaled_stage_gets_the_policy_with_the_calendar():
    from ray.serve.config import AutoscalingConfig

    config = ServeConfig.model_validate(
        {
            "generator": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "backlog_per_replica": 3}},
            "renderer": {"autoscaling": {"max_replicas": 4, "initial_replicas": 2, "policy": "ray"}},
            "events": [_event().model_dump(mode="json")],
        }
    )
    generator = config.stage_options("generator")["autoscaling_config"]
    kwargs = generator["policy"]["policy_kwargs"]
    assert (kwargs["stage"], kwargs["backlog_per_replica"]) == ("generator", 3)
    assert [event["name"] for event in kwargs["events"]] == ["11.11"]
    json.dumps(generator)  # Ray keeps the config as JSON
    # Ray resolves the import path (and pickles the policy) when it builds the config.
    built = AutoscalingConfig(**generator)
    assert built.policy.policy_function == "shopreel.serve.autoscaling:StagePolicy"
    renderer = config.stage_options("renderer")["autoscaling_config"]
    assert "policy" not in renderer and renderer["initial_replicas"] == 2
    assert "num_replicas" in config.stage_options("planner")  # fixed: no autoscaling at all
    with pytest.raises(ValidationError, match="initial_replicas"):
        ServeConfig.model_validate({"renderer": {"autoscaling": {"max_replicas": 2, "initial_replicas": 3}}})


# --- integration: an event added through the admin API scales a running cluster ------------------


@pytest.mark.serve
@pytest.mark.slow
def test_an_admin_event_raises_the_generator_floor_and_its_end_releases_it(tmp_path, monkeypatch):
    import httpx
    from net import free_port
    from ray import serve

    from shopreel.serve.runner import APP_NAME, load_config, start

    monkeypatch.setenv("SHOPREEL_ADMIN_KEY", "test-admin-key")  # before Ray starts: replicas inherit it
    config = load_config(
        None,
        **{
            "jobs.data_dir": str(tmp_path / "serve-data"),
            "generator.autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "upscale_delay_s": 0,
                "downscale_delay_s": 1,
            },
        },
    )
    running = start(config, port=free_port(), ready_timeout_s=300)

    def generator_replicas() -> int:
        status = serve.status().applications[APP_NAME].deployments["generator"]
        return status.replica_states.get("RUNNING", 0)

    def wait_for(replicas: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while generator_replicas() != replicas:
            assert time.monotonic() < deadline, f"generator stayed at {generator_replicas()} replicas"
            time.sleep(1)

    now = datetime.now(timezone.utc)
    event = {
        "name": "flash-sale",
        "start": (now + timedelta(minutes=10)).isoformat(),  # pre-warm (1 h) is under way
        "end": (now + timedelta(hours=1)).isoformat(),
        "prewarm_s": 3600,
        "floors": {"generator": 2},
    }
    admin = {"Authorization": "Bearer test-admin-key"}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            assert generator_replicas() == 1
            assert http.post("/admin/events", json=event).status_code == 401
            wrong = http.post("/admin/events", json=event, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            bad = http.post("/admin/events", json={**event, "end": event["start"]}, headers=admin)
            assert bad.status_code == 400 and "end must be after start" in bad.json()["error"]["message"]
            assert http.post("/admin/events", json=event, headers=admin).status_code == 200
            listed = http.get("/admin/events", headers=admin).json()["data"]
            assert [(e["name"], e["source"], e["raising_floors"]) for e in listed] == [
                ("flash-sale", "admin", True)
            ]
            wait_for(2)  # no request arrived: the calendar alone started the second replica
            assert http.delete("/admin/events/flash-sale", headers=admin).status_code == 200
            assert http.delete("/admin/events/flash-sale", headers=admin).status_code == 404
            wait_for(1)
    finally:
        running.stop()
        os.environ.pop("SHOPREEL_ADMIN_KEY", None)
