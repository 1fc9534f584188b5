"""What the HTTP ingress records: its own ``GET /metrics`` and the cluster-wide ``ray_shopreel_ingress_*``.

Each event is recorded twice, on purpose. ``GET /metrics`` (prometheus_client, names ``shopreel_*``)
is one replica's registry: handy on one machine, but behind the Serve proxy each scrape lands on
whichever ingress replica the proxy picks. The same events also go through Ray's metrics agent on
every node (``stage_metrics.py``, names ``ray_shopreel_ingress_*``), where Prometheus sees every
ingress replica on every node and sums them, like the stage replicas' series and Ray's own
``ray_serve_*``. See ``deploy/prometheus/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import stage_metrics as sm

STAGES = ("understand", "generate", "render", "compose", "total")
KINDS = ("job", "stream", "sync")
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    def __init__(self, cluster: sm.StageMetrics | None = None) -> None:
        self.cluster = cluster or sm.stage_metrics("ingress")
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_latency = Histogram(
            "shopreel_stage_latency_seconds",
            "Seconds one video spent in a stage (summed over its shots); 'total' is end to end",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_fragment = Histogram(
            "shopreel_time_to_first_fragment_seconds",
            "From accepting a request to the first fMP4 fragment leaving the compositor",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "shopreel_queue_depth", "Jobs accepted and waiting for a worker", registry=self.registry
        )
        self.in_flight = Gauge(
            "shopreel_in_flight_requests", "Videos being produced now", ["kind"], registry=self.registry
        )
        self.frames_rendered = Counter(
            "shopreel_frames_rendered_total", "Video frames decoded and composed", registry=self.registry
        )
        self.videos = Counter(
            "shopreel_videos_total", "Videos finished, by outcome", ["outcome"], registry=self.registry
        )
        self.errors = Counter(
            "shopreel_errors_total", "Errors answered or met, by type", ["type"], registry=self.registry
        )
        self.videos_scored = Counter(
            "shopreel_videos_scored_total",
            "Completed videos with a quality report, by whether they passed every threshold",
            ["passed"],
            registry=self.registry,
        )
        self.quality_flags = Counter(
            "shopreel_video_quality_flags_total",
            "Quality flags raised on completed videos, by flag",
            ["flag"],
            registry=self.registry,
        )
        self.videos_expired = Counter(
            "shopreel_videos_expired_total", "Expired videos deleted (files, record)", registry=self.registry
        )
        self.expired_bytes = Counter(
            "shopreel_expired_bytes_total", "Bytes of expired videos deleted", registry=self.registry
        )
        for kind in KINDS:
            self.in_flight.labels(kind=kind)
            self.cluster.set(sm.INGRESS_IN_FLIGHT, 0, kind=kind)  # the series exist before the first video
        for stage in STAGES:
            self.stage_latency.labels(stage=stage)

    def refused(self, reason: str) -> None:
        """Admission said no (``queue_full`` or ``overloaded``) before any model work."""
        self.errors.labels(type=reason).inc()
        self.cluster.inc(sm.INGRESS_REFUSED, reason=reason)

    def production_started(self, kind: str) -> None:
        self.in_flight.labels(kind=kind).inc()
        self.cluster.add(sm.INGRESS_IN_FLIGHT, 1, kind=kind)

    def production_ended(self, kind: str, outcome: str, error_code: str | None = None) -> None:
        """``outcome``: completed, failed, retried (requeued) or cancelled; failures give their code."""
        self.in_flight.labels(kind=kind).dec()
        self.cluster.add(sm.INGRESS_IN_FLIGHT, -1, kind=kind)
        self.videos.labels(outcome=outcome).inc()
        self.cluster.inc(sm.INGRESS_VIDEOS, outcome=outcome)
        if error_code is not None:
            self.errors.labels(type=error_code).inc()
            self.cluster.inc(sm.INGRESS_ERRORS, code=error_code)

    def observe_video(self, timings: Mapping[str, float | None], frames: int) -> None:
        """A completed video's stage timings (``<stage>_s``) and frame count."""
        for stage in STAGES:
            value = timings.get(f"{stage}_s")
            if value is not None:
                self.stage_latency.labels(stage=stage).observe(value)
                self.cluster.observe(sm.INGRESS_VIDEO_SECONDS, value, stage=stage)
        first = timings.get("first_fragment_s")
        if first is not None:
            self.time_to_first_fragment.observe(first)
            self.cluster.observe(sm.INGRESS_FIRST_FRAGMENT_SECONDS, first)
        self.frames_rendered.inc(frames)
        self.cluster.inc(sm.INGRESS_FRAMES, frames)

    def limits(self, max_pending: int, max_streams: int) -> None:
        """The admission limits, next to the levels, so saturation is a ratio a rule can alert on."""
        self.cluster.set(sm.PENDING_LIMIT, max_pending)
        self.cluster.set(sm.STREAMS_LIMIT, max_streams)

    def store_counts(self, counts: Mapping[str, int]) -> None:
        """The shared job store's levels (every ingress replica reports the same numbers)."""
        self.queue_depth.set(counts["queued"])
        self.cluster.set(sm.JOBS_QUEUED, counts["queued"])
        self.cluster.set(sm.JOBS_IN_PROGRESS, counts["in_progress"])
        self.cluster.set(sm.STREAMS_ADMITTED, counts.get("admitted_stream", 0))  # absent: none admitted
        self.cluster.set(sm.STORED_BYTES, counts.get("stored_bytes", 0))

    def observe_quality(self, flags: Sequence[str]) -> None:
        """A completed video's quality flags (none: it passed)."""
        self.videos_scored.labels(passed=str(not flags).lower()).inc()
        self.cluster.inc(sm.INGRESS_VIDEOS_SCORED, passed=str(not flags).lower())
        for flag in flags:
            self.quality_flags.labels(flag=flag).inc()
            self.cluster.inc(sm.INGRESS_QUALITY_FLAGS, flag=flag)

    def expired(self, videos: int, size: int) -> None:
        """The sweeper deleted ``videos`` expired videos of ``size`` bytes."""
        self.videos_expired.inc(videos)
        self.expired_bytes.inc(size)
        self.cluster.inc(sm.INGRESS_EXPIRED_VIDEOS, videos)
        self.cluster.inc(sm.INGRESS_EXPIRED_BYTES, size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
