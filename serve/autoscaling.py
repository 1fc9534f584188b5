"""Stage autoscaling for sales events: each stage scales on its own backlog, floors rise before events.

Ray Serve's controller calls ``StagePolicy`` (Ray's custom autoscaling policy hook) every control
loop tick, one instance per autoscaled stage. Two things decide the replica count it asks for:

1. **The stage's own backlog.** The generator reports the shots its streams still have to denoise
   (``record_autoscaling_stats``); a 4-shot video is four units of work there, one request at the
   ingress. The other stages count their ongoing and queued calls (Ray's request metric). Wanted
   replicas: backlog / ``backlog_per_replica``.
2. **The sales-event calendar.** From ``prewarm_s`` before an event's start to its end, the stage's
   floor is raised (``SalesEvent.floor``: ``min_replicas`` x the expected peak multiplier, or an
   explicit floor), so replicas have loaded and warmed their models when midnight comes. Events come
   from the config and from the job store (``POST /admin/events``), read every few seconds.

Ray applies the rest around the number returned here: ``min_replicas``/``max_replicas`` bounds and
the upscale/downscale delays. Every change of floor or event is logged, and each stage's backlog,
wanted replicas and floor are exported (``ray_shopreel_autoscaler_*``) from the controller.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import stage_metrics as sm
from .config import JobSettings, SalesEvent

logger = logging.getLogger("shopreel.serve")

# The custom metric the generator reports; the other stages use Ray's request count.
PENDING_SHOTS = "pending_shots"
BACKLOG_METRICS = {"generator": PENDING_SHOTS}
EVENTS_REFRESH_S = 5.0  # how often the policy reads run-time events from the job store


@dataclass(frozen=True)
class Decision:
    """One tick's reasoning for one stage."""

    backlog: float  # units of work waiting or in progress (shots for the generator, calls otherwise)
    wanted: float  # replicas the backlog asks for
    floor: int  # replicas the calendar keeps (min_replicas outside events)
    event: str | None  # the event that raised the floor, if any

    @property
    def replicas(self) -> float:
        return max(self.wanted, float(self.floor))


def calendar_floor(
    events: list[SalesEvent], stage: str, now: datetime, min_replicas: int, max_replicas: int
) -> tuple[int, str | None]:
    """The highest floor any event raises for ``stage`` at ``now``, and that event's name."""
    floor, raised_by = min_replicas, None
    for event in events:
        if event.raises_floors_at(now):
            event_floor = event.floor(stage, min_replicas, max_replicas)
            if event_floor > floor:
                floor, raised_by = event_floor, event.name
    return floor, raised_by


def decide(
    stage: str,
    *,
    backlog: float,
    backlog_per_replica: float,
    events: list[SalesEvent],
    now: datetime,
    min_replicas: int,
    max_replicas: int,
) -> Decision:
    """What one stage needs now: pure, so the policy's decisions are testable without a cluster."""
    floor, event = calendar_floor(events, stage, now, min_replicas, max_replicas)
    return Decision(backlog=backlog, wanted=backlog / backlog_per_replica, floor=floor, event=event)


class StagePolicy:
    """Ray Serve custom autoscaling policy (``autoscaling_config.policy``) for one shopreel stage."""

    def __init__(
        self,
        stage: str,
        backlog_per_replica: float,
        events: list[dict[str, Any]] | None = None,
        jobs: dict[str, Any] | None = None,
    ) -> None:
        if backlog_per_replica <= 0:
            raise ValueError("backlog_per_replica must be > 0")
        self.stage = stage
        self.backlog_per_replica = backlog_per_replica
        self.configured_events = [SalesEvent.model_validate(event) for event in events or []]
        self.jobs = JobSettings.model_validate(jobs) if jobs is not None else None
        self._stored_events: list[SalesEvent] = []
        self._events_read_at = -math.inf
        self._store: Any = None
        self._last: tuple[int, str | None] | None = None  # floor and event of the last tick, for the log
        self._reported: dict[str, float] = {}  # gauge values last recorded
        self.metrics = sm.stage_metrics(stage)  # in the controller: tagged with the stage it scales

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``ctx``: Ray's ``AutoscalingContext``. Returns desired replicas and the policy state."""
        now = datetime.fromtimestamp(ctx.current_time or time.time(), tz=timezone.utc)
        decision = decide(
            self.stage,
            backlog=self._backlog(ctx),
            backlog_per_replica=self.backlog_per_replica,
            events=self.configured_events + self._events_from_store(),
            now=now,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
        )
        self._report(decision, ctx.current_num_replicas)
        return decision.replicas, dict(ctx.policy_state)

    def _backlog(self, ctx: Any) -> float:
        metric = BACKLOG_METRICS.get(self.stage)
        if metric is not None:
            per_replica = (ctx.aggregated_metrics or {}).get(metric)
            if per_replica:  # replicas report it; none yet (starting): fall back to requests
                return float(sum(per_replica.values()))
        return float(ctx.total_num_requests)

    def _events_from_store(self) -> list[SalesEvent]:
        """Run-time events, re-read every ``EVENTS_REFRESH_S``; on a store error the last ones stay."""
        if self.jobs is None or time.monotonic() - self._events_read_at < EVENTS_REFRESH_S:
            return self._stored_events
        self._events_read_at = time.monotonic()
        try:
            if self._store is None:
                from .store_url import open_job_store

                self._store = open_job_store(self.jobs.store_url(), pool_size=1)
            self._stored_events = self._store.events()
        except Exception:  # noqa: BLE001 - scaling goes on with the events known so far
            logger.warning("autoscaler %s: reading sales events failed", self.stage, exc_info=True)
        return self._stored_events

    def _report(self, decision: Decision, current: int) -> None:
        if (decision.floor, decision.event) != self._last:
            if decision.event is not None:
                logger.info(
                    "autoscaler %s: event %s raises the floor to %d replicas (now %d)",
                    self.stage,
                    decision.event,
                    decision.floor,
                    current,
                )
            elif self._last is not None:
                logger.info("autoscaler %s: no event; floor back to %d replicas", self.stage, decision.floor)
            self._last = (decision.floor, decision.event)
        # Every control-loop tick (0.1 s) decides; record a gauge only when it moved (the refresher
        # re-sets unchanged ones for Ray's agent).
        levels = (
            (sm.AUTOSCALER_BACKLOG, decision.backlog),
            (sm.AUTOSCALER_WANTED, decision.wanted),
            (sm.AUTOSCALER_FLOOR, float(decision.floor)),
            (sm.AUTOSCALER_EVENT_ACTIVE, 1.0 if decision.event else 0.0),
        )
        for series, value in levels:
            if self._reported.get(series.name) != value:
                self._reported[series.name] = value
                self.metrics.set(series, value)
