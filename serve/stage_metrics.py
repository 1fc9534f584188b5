"""Cluster-wide series of the stage replicas, exported through Ray's metrics agent.

Each replica records into ``ray.util.metrics``; the metrics agent of every Ray node serves all of
its processes' series on the node's metrics export port (KubeRay: container port ``metrics``, 8080),
with a ``ray_`` prefix and per-process labels (``WorkerId``, ``NodeAddress``), so Prometheus sees
every replica on every node and sums by ``deployment``. The ingress's own ``GET /metrics``
(``metrics.py``, prometheus_client) is separate and unchanged.

The series are defined once here, as data; the Ray metric objects are created on first use inside
a replica (``ray.util.metrics`` needs a connected Ray worker), never when this module is imported.
Outside Ray (unit tests that build a deployment class directly) recording does nothing.
See ``deploy/prometheus/README.md`` for the series as Prometheus shows them and how to aggregate.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Protocol

logger = logging.getLogger("shopreel.serve")

Kind = Literal["counter", "gauge", "histogram"]
TAG_KEYS = ("deployment",)  # the Serve deployment: few values, unlike request ids
RAY_PREFIX = "ray_"  # what Ray's exporter puts before every name
# Ray's metrics agent drops a gauge value not set again within two report intervals (~20 s): a
# replica re-sets its gauges this often, so an idle or long-busy replica's levels stay visible and a
# dead replica's age out.
GAUGE_REFRESH_S = 5.0

# Ray reports a histogram's _sum from bucket midpoints, not exact values: buckets fine enough that
# sum/count stays a useful mean. A denoised shot takes ~0.1 s (tiny, CPU) to a minute (480p, GPU).
SHOT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15)
VIDEO_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class Series:
    name: str  # as recorded; Prometheus shows RAY_PREFIX + name (+ "_total" for a counter)
    kind: Kind
    description: str
    boundaries: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()  # tag keys besides ``deployment``, each with a few fixed values

    @property
    def prometheus_name(self) -> str:
        return RAY_PREFIX + self.name + ("_total" if self.kind == "counter" else "")


# --- generator -----------------------------------------------------------------------------------
DENOISE_SECONDS = Series(
    "shopreel_generator_denoise_seconds", "histogram", "Seconds denoising one shot", SHOT_BUCKETS
)
SHOTS_DENOISED = Series("shopreel_generator_shots_denoised", "counter", "Shots denoised")
SHOT_CACHE_HITS = Series(
    "shopreel_generator_shot_cache_hits",
    "counter",
    "Shots served from the shot cache, by tier",
    labels=("tier",),
)
SHOT_CACHE_MISSES = Series("shopreel_generator_shot_cache_misses", "counter", "Shots the cache did not hold")
SHOT_CACHE_BYTES = Series(
    "shopreel_generator_shot_cache_bytes",
    "gauge",
    "Bytes of latents the shot cache holds, by tier",
    labels=("tier",),
)
GENERATE_ACTIVE = Series(
    "shopreel_generator_active_calls", "gauge", "generate streams running on the replica"
)
# --- renderer ------------------------------------------------------------------------------------
DECODE_SECONDS = Series(
    "shopreel_renderer_decode_seconds", "histogram", "Seconds decoding one latent chunk", CHUNK_BUCKETS
)
CHUNKS_DECODED = Series("shopreel_renderer_chunks_decoded", "counter", "Latent chunks decoded to frames")
CAUSAL_CACHES = Series(
    "shopreel_renderer_causal_caches", "gauge", "Shots whose causal decoder cache the replica holds"
)
HISTORY_REBUILDS = Series(
    "shopreel_renderer_history_rebuilds",
    "counter",
    "Chunks whose shot cache was rebuilt from resent latents (routing miss or lost replica)",
)
# --- compositor ----------------------------------------------------------------------------------
VIDEOS_IN_FLIGHT = Series("shopreel_compositor_videos_in_flight", "gauge", "Videos the replica is producing")
FIRST_FRAGMENT_SECONDS = Series(
    "shopreel_compositor_time_to_first_fragment_seconds",
    "histogram",
    "From the compositor taking a planned video to its first fMP4 fragment",
    VIDEO_BUCKETS,
)
COMPOSE_SECONDS = Series(
    "shopreel_compositor_compose_seconds",
    "histogram",
    "Seconds one video spent composing and encoding (overlays, audio, muxing)",
    VIDEO_BUCKETS,
)
RENDER_RETRIES = Series(
    "shopreel_compositor_render_retries", "counter", "Render calls retried after a renderer replica was lost"
)
GENERATOR_RESTARTS = Series(
    "shopreel_compositor_generator_restarts",
    "counter",
    "Generator streams re-issued after a generator replica was lost",
)
# --- autoscaler (the Serve controller, one series per autoscaled stage) ------------------------
AUTOSCALER_BACKLOG = Series(
    "shopreel_autoscaler_backlog", "gauge", "The stage's backlog (generator: shots to denoise; else calls)"
)
AUTOSCALER_WANTED = Series("shopreel_autoscaler_wanted_replicas", "gauge", "Replicas the backlog asks for")
AUTOSCALER_FLOOR = Series(
    "shopreel_autoscaler_floor_replicas", "gauge", "Replicas the sales-event calendar keeps at least"
)
AUTOSCALER_EVENT_ACTIVE = Series(
    "shopreel_autoscaler_event_active", "gauge", "1 while a sales event (or its pre-warm) raises the floor"
)
GENERATOR_PENDING_SHOTS = Series(
    "shopreel_generator_pending_shots", "gauge", "Shots the replica's streams still have to denoise"
)
# --- ingress: requests and productions this replica handled --------------------------------------
INGRESS_REFUSED = Series(
    "shopreel_ingress_refused",
    "counter",
    "Requests refused before any model work (reason: queue_full, overloaded, quota_exceeded, unauthorized)",
    labels=("reason",),
)
INGRESS_VIDEOS = Series(
    "shopreel_ingress_videos",
    "counter",
    "Productions ended, by outcome (completed, failed, retried, cancelled)",
    labels=("outcome",),
)
INGRESS_ERRORS = Series(
    "shopreel_ingress_errors", "counter", "Productions that failed, by error code", labels=("code",)
)
INGRESS_IN_FLIGHT = Series(
    "shopreel_ingress_in_flight", "gauge", "Productions the replica drives now, by kind", labels=("kind",)
)
INGRESS_VIDEO_SECONDS = Series(
    "shopreel_ingress_video_seconds",
    "histogram",
    "Seconds one completed video spent per stage (summed over shots); 'total' is end to end",
    VIDEO_BUCKETS,
    labels=("stage",),
)
INGRESS_FIRST_FRAGMENT_SECONDS = Series(
    "shopreel_ingress_time_to_first_fragment_seconds",
    "histogram",
    "From accepting a request to its first fMP4 fragment",
    VIDEO_BUCKETS,
)
INGRESS_FRAMES = Series("shopreel_ingress_frames", "counter", "Frames of completed videos")
INGRESS_VIDEOS_SCORED = Series(
    "shopreel_ingress_videos_scored",
    "counter",
    "Completed videos with a quality report, by whether they passed every threshold",
    labels=("passed",),
)
INGRESS_QUALITY_FLAGS = Series(
    "shopreel_ingress_quality_flags",
    "counter",
    "Quality flags on completed videos, by flag",
    labels=("flag",),
)
INGRESS_EXPIRED_VIDEOS = Series(
    "shopreel_ingress_expired_videos", "counter", "Videos the replica's sweeper deleted after they expired"
)
INGRESS_EXPIRED_BYTES = Series(
    "shopreel_ingress_expired_bytes", "counter", "Bytes of video files the replica's sweeper deleted"
)
# --- ingress: the shared job store (every ingress replica reports the same numbers) -------------
JOBS_QUEUED = Series("shopreel_jobs_queued", "gauge", "Jobs in the job store waiting for a worker")
JOBS_IN_PROGRESS = Series("shopreel_jobs_in_progress", "gauge", "Jobs in the job store being produced")
PENDING_LIMIT = Series(
    "shopreel_jobs_pending_limit", "gauge", "max_pending: the pending jobs admission allows"
)
STREAMS_LIMIT = Series(
    "shopreel_streams_limit", "gauge", "max_streams: the streaming/sync productions allowed"
)
STORED_BYTES = Series("shopreel_stored_bytes", "gauge", "Bytes of finished videos in the video store")
STREAMS_ADMITTED = Series(
    "shopreel_streams_admitted", "gauge", "Streaming/sync productions holding an admission slot"
)

ALL_SERIES = (
    DENOISE_SECONDS,
    SHOTS_DENOISED,
    SHOT_CACHE_HITS,
    SHOT_CACHE_MISSES,
    SHOT_CACHE_BYTES,
    GENERATE_ACTIVE,
    DECODE_SECONDS,
    CHUNKS_DECODED,
    CAUSAL_CACHES,
    HISTORY_REBUILDS,
    VIDEOS_IN_FLIGHT,
    FIRST_FRAGMENT_SECONDS,
    COMPOSE_SECONDS,
    RENDER_RETRIES,
    GENERATOR_RESTARTS,
    AUTOSCALER_BACKLOG,
    AUTOSCALER_WANTED,
    AUTOSCALER_FLOOR,
    AUTOSCALER_EVENT_ACTIVE,
    GENERATOR_PENDING_SHOTS,
    INGRESS_REFUSED,
    INGRESS_VIDEOS,
    INGRESS_ERRORS,
    INGRESS_IN_FLIGHT,
    INGRESS_VIDEO_SECONDS,
    INGRESS_FIRST_FRAGMENT_SECONDS,
    INGRESS_EXPIRED_VIDEOS,
    INGRESS_EXPIRED_BYTES,
    INGRESS_FRAMES,
    INGRESS_VIDEOS_SCORED,
    INGRESS_QUALITY_FLAGS,
    JOBS_QUEUED,
    JOBS_IN_PROGRESS,
    PENDING_LIMIT,
    STREAMS_LIMIT,
    STREAMS_ADMITTED,
    STORED_BYTES,
)


class Recorder(Protocol):
    def record(self, series: Series, value: float, tags: dict[str, str]) -> None: ...


class RayRecorder:
    """Records into ``ray.util.metrics`` objects, one per series and process, made on first use."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def _metric(self, series: Series) -> Any:
        with self._lock:
            metric = self._metrics.get(series.name)
            if metric is None:
                from ray.util import metrics

                tag_keys = TAG_KEYS + series.labels
                if series.kind == "counter":
                    metric = metrics.Counter(series.name, series.description, tag_keys=tag_keys)
                elif series.kind == "gauge":
                    metric = metrics.Gauge(series.name, series.description, tag_keys=tag_keys)
                else:
                    metric = metrics.Histogram(
                        series.name, series.description, list(series.boundaries), tag_keys=tag_keys
                    )
                self._metrics[series.name] = metric
            return metric

    def record(self, series: Series, value: float, tags: dict[str, str]) -> None:
        try:
            metric = self._metric(series)
            if series.kind == "counter":
                metric.inc(value, tags=tags)
            elif series.kind == "gauge":
                metric.set(value, tags=tags)
            else:
                metric.observe(value, tags=tags)
        except Exception:  # noqa: BLE001 - a metric must never fail a video; say so once per series
            if series.name not in self._failed:
                self._failed.add(series.name)
                logger.warning("recording %s failed; not reported again", series.name, exc_info=True)


_ray_recorder: RayRecorder | None = None
_ray_recorder_lock = threading.Lock()


def _default_recorder() -> Recorder | None:
    """The process's Ray recorder, or None outside a Ray worker/driver (nothing to export to)."""
    global _ray_recorder
    import ray

    if not ray.is_initialized():
        return None
    with _ray_recorder_lock:
        if _ray_recorder is None:
            _ray_recorder = RayRecorder()
        return _ray_recorder


def _replica_deployment(default: str) -> str:
    """The Serve deployment this process serves (a config may rename it); ``default`` outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().deployment
    except Exception:  # noqa: BLE001 - not inside a replica (unit tests, the driver)
        return default


class StageMetrics:
    """One replica's handle on the series: tags every record with its deployment."""

    def __init__(self, deployment: str, recorder: Recorder | None) -> None:
        self.deployment = deployment
        self.tags = {"deployment": deployment}
        self._recorder = recorder
        # Gauges by name and labels, with their level: what refresh() re-sets.
        self._levels: dict[tuple[str, ...], tuple[Series, float, dict[str, str]]] = {}
        # Gauges change from executor threads and the refresher: record under the lock, so an older
        # level never overwrites a newer one.
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._recorder is not None

    @staticmethod
    def _check(series: Series, kind: Kind, labels: dict[str, str]) -> None:
        if series.kind != kind:
            raise TypeError(f"{series.name} is a {series.kind}, not a {kind}")
        if set(labels) != set(series.labels):
            raise TypeError(f"{series.name} takes labels {series.labels}, got {tuple(labels)}")

    def _record(self, series: Series, value: float, labels: dict[str, str]) -> None:
        if self._recorder is not None:
            self._recorder.record(series, float(value), {**self.tags, **labels} if labels else self.tags)

    def inc(self, series: Series, value: float = 1.0, **labels: str) -> None:
        self._check(series, "counter", labels)
        if value > 0:  # Ray refuses a zero increment; zero retries is simply nothing to count
            self._record(series, value, labels)

    def observe(self, series: Series, value: float, **labels: str) -> None:
        self._check(series, "histogram", labels)
        self._record(series, value, labels)

    def set(self, series: Series, value: float, **labels: str) -> None:
        self._check(series, "gauge", labels)
        with self._lock:
            self._levels[_level_key(series, labels)] = (series, float(value), labels)
            self._record(series, value, labels)

    def add(self, series: Series, delta: float, **labels: str) -> None:
        """Move a gauge this replica owns (calls in flight) by ``delta``."""
        self._check(series, "gauge", labels)
        with self._lock:
            key = _level_key(series, labels)
            level = self._levels.get(key, (series, 0.0, labels))[1] + delta
            self._levels[key] = (series, level, labels)
            self._record(series, level, labels)

    def level(self, series: Series, **labels: str) -> float:
        with self._lock:
            return self._levels.get(_level_key(series, labels), (series, 0.0, labels))[1]

    def refresh(self) -> None:
        """Record every gauge's current level again (see ``GAUGE_REFRESH_S``)."""
        with self._lock:
            for series, value, labels in self._levels.values():
                self._record(series, value, labels)


def _level_key(series: Series, labels: dict[str, str]) -> tuple[str, ...]:
    return (series.name, *(f"{key}={labels[key]}" for key in series.labels))


class _GaugeRefresher:
    """One daemon thread per process that keeps the gauges of its live ``StageMetrics`` fresh."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._watched: weakref.WeakSet[StageMetrics] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, metrics: StageMetrics) -> None:
        with self._lock:
            self._watched.add(metrics)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shopreel-gauges", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                watched = list(self._watched)
            for metrics in watched:
                try:
                    metrics.refresh()
                except Exception:  # noqa: BLE001 - keep refreshing the others
                    logger.warning("refreshing gauges of %s failed", metrics.deployment, exc_info=True)


_refresher = _GaugeRefresher(GAUGE_REFRESH_S)


def stage_metrics(default_deployment: str) -> StageMetrics:
    """The series handle for a replica's constructor (Ray's recorder when Ray is up, else a no-op)."""
    metrics = StageMetrics(_replica_deployment(default_deployment), _default_recorder())
    if metrics.enabled:
        _refresher.watch(metrics)
    return metrics
