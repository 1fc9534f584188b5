"""Prometheus series of the HTTP ingress (``GET /metrics``).

Each ingress replica keeps its own registry, and a scrape through the Serve proxy reaches whichever
replica the proxy picks. Cluster-wide series come from Ray's metrics agent on every node, not from
here: the stage replicas' ``ray_shopreel_*`` (``stage_metrics.py``) and Ray's own ``ray_serve_*``
(per-deployment queue lengths, replica counts, handle latencies). See ``deploy/prometheus/``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("understand", "generate", "render", "compose", "total")
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    def __init__(self) -> None:
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
        for kind in ("job", "stream", "sync"):
            self.in_flight.labels(kind=kind)
        for stage in STAGES:
            self.stage_latency.labels(stage=stage)

    def observe_video(self, timings: dict[str, float | None], frames: int) -> None:
        for stage in STAGES:
            value = timings.get(f"{stage}_s")
            if value is not None:
                self.stage_latency.labels(stage=stage).observe(value)
        first = timings.get("first_fragment_s")
        if first is not None:
            self.time_to_first_fragment.observe(first)
        self.frames_rendered.inc(frames)
        self.videos.labels(outcome="completed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
