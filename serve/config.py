"""Serving configuration: one typed object from which every deployment and the HTTP app are built.

``ServeConfig`` is what ``build_app`` takes and what the ``args:`` of a Serve config file in
``deploy/`` hold; every field has a default sized for a 2-core CPU machine running the tiny preset,
bounds, and a one-line doc. Replicas ask for fractional CPUs there because Ray gives each replica
1 CPU by default and a third deployment would never schedule on 2 cores.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shopreel.pipelines.config import PipelineConfig
from shopreel.pipelines.types import SpeedProfileName

JOBS_STORE_ENV = "SHOPREEL_JOBS_STORE"
STAGES = ("planner", "generator", "renderer", "compositor", "ingress")
TENANT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSettings(_Config):
    min_replicas: int = Field(default=1, ge=0, le=64, description="replicas kept when idle, outside events")
    max_replicas: int = Field(default=1, ge=1, le=64, description="upper bound under load and during events")
    initial_replicas: int | None = Field(
        default=None, ge=0, le=64, description="replicas started with the app; None: min_replicas"
    )
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, le=64, description="ongoing requests per replica the autoscaler aims at"
    )
    backlog_per_replica: float | None = Field(
        default=None,
        gt=0,
        le=1024,
        description="the stage's own backlog per replica (generator: shots waiting to be denoised); "
        "None: target_ongoing_requests",
    )
    policy: Literal["backlog", "ray"] = Field(
        default="backlog",
        description="backlog: the stage's own backlog and the sales-event calendar (serve/autoscaling.py); "
        "ray: Ray Serve's default policy on ongoing requests only",
    )
    upscale_delay_s: float = Field(default=5.0, ge=0, le=600, description="load must persist this long")
    downscale_delay_s: float = Field(default=60.0, ge=0, le=3600, description="idle this long to drop one")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must be between min_replicas and max_replicas")
        return self

    def ray_config(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config``, without the policy (``ServeConfig.stage_options`` adds it)."""
        return self.model_dump(exclude={"backlog_per_replica", "policy"}, exclude_none=True)


class SalesEvent(_Config):
    """A sales event (11.11, 618, ...): heavy stages get raised replica floors from ``prewarm_s`` before
    ``start`` until ``end``, so their replicas have loaded and warmed models when the peak comes."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    start: datetime = Field(description="when the peak traffic starts (with a UTC offset)")
    end: datetime = Field(description="when the floors are released (with a UTC offset)")
    peak_multiplier: float = Field(
        default=10.0, ge=1, le=100, description="expected traffic over normal: floor = min_replicas x this"
    )
    prewarm_s: float = Field(
        default=1800.0,
        ge=0,
        le=7 * 86400,
        description="floors rise this long before start (model load, warm-up)",
    )
    floors: dict[str, int] = Field(
        default_factory=dict,
        description="explicit replica floor per stage, instead of the multiplier (other stages keep it)",
    )
    speed_profile: SpeedProfileName | None = Field(
        default=None,
        description="speed profile of videos accepted from start to end that name none (fast: fewer "
        "steps and a step cache at the peak); None: the server's",
    )

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("give a UTC offset (e.g. 2026-11-11T00:00:00+08:00): a bare time is ambiguous")
        return value

    @model_validator(mode="after")
    def _window(self) -> SalesEvent:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        unknown = set(self.floors) - set(STAGES)
        if unknown:
            raise ValueError(f"floors name unknown stages {sorted(unknown)}; stages are {list(STAGES)}")
        if any(not 0 <= floor <= 64 for floor in self.floors.values()):
            raise ValueError("floors must be between 0 and 64 replicas")
        return self

    def raises_floors_at(self, now: datetime) -> bool:
        return self.start - timedelta(seconds=self.prewarm_s) <= now < self.end

    def peaks_at(self, now: datetime) -> bool:
        """Between start and end: the traffic peak itself (the prewarm before it is not)."""
        return self.start <= now < self.end

    def floor(self, stage: str, min_replicas: int, max_replicas: int) -> int:
        """The stage's replica floor while this event raises floors, within [min, max] replicas."""
        wanted = self.floors.get(stage, math.ceil(max(min_replicas, 1) * self.peak_multiplier))
        return max(min_replicas, min(max_replicas, wanted))


class TenantQuotas(_Config):
    """What one tenant may use at once; ``None``: no limit of its own (the cluster's limits still hold).
    Also the tenant's own advertising-rule policy, for its briefs that do not name one."""

    max_jobs: int | None = Field(default=None, ge=1, le=100_000, description="queued + running jobs at once")
    max_streams: int | None = Field(
        default=None, ge=1, le=100_000, description="streaming + sync videos in production at once"
    )
    videos_per_minute: int | None = Field(
        default=None, ge=1, le=100_000, description="videos accepted per rolling minute, of every kind"
    )
    max_stored_bytes: int | None = Field(
        default=None, ge=1, le=2**53, description="bytes of finished videos kept (freed by delete or expiry)"
    )
    compliance: Literal["reject", "rewrite"] | None = Field(
        default=None,
        description="policy for this tenant's briefs that name none (a brief's own wins); None: the server's",
    )

    def describe(self) -> str:
        limits = [f"{name}={value}" for name, value in self.model_dump().items() if value is not None]
        return ", ".join(limits) or "no limits of its own"


class AuthSettings(_Config):
    """API keys and tenants (serve/auth.py). Off for the embedded quick start; on in deploy/."""

    enabled: bool = Field(
        default=False,
        description="require an API key (Authorization: Bearer) on /v1; off: every request is tenant default",
    )
    key_cache_s: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description="a replica re-reads a key and its quotas after this long (the revocation delay)",
    )
    default_quotas: TenantQuotas = Field(
        default_factory=TenantQuotas, description="quotas of tenants without their own (shopreel tenants set)"
    )


class DeploymentSettings(_Config):
    """Scaling and resources of one stage's deployment."""

    num_replicas: int = Field(default=1, ge=1, le=64, description="fixed replica count (no autoscaling)")
    autoscaling: AutoscalingSettings | None = Field(
        default=None, description="set to autoscale between min and max replicas instead"
    )
    num_cpus: float = Field(default=0.25, ge=0, le=64, description="CPUs reserved per replica")
    num_gpus: float = Field(default=0.0, ge=0, le=8, description="GPUs per replica (fractions share one)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources, e.g. to pin a stage to a node pool"
    )
    max_ongoing_requests: int = Field(default=4, ge=1, le=1024, description="concurrent calls per replica")
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        le=100_000,
        description="calls waiting per caller before back-pressure (-1: no cap)",
    )
    health_check_period_s: float = Field(default=10.0, gt=0, le=600, description="how often Serve checks")
    health_check_timeout_s: float = Field(default=30.0, gt=0, le=600, description="a check slower fails")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                **({"resources": dict(self.resources)} if self.resources else {}),
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": 2.0,
            "graceful_shutdown_wait_loop_s": 0.2,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.ray_config()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class JobSettings(_Config):
    """The cluster's job queue and admission limits: one store shared by every ingress replica."""

    data_dir: Path = Field(
        default=Path("shopreel-data"), description="default home of the SQLite store and the video files"
    )
    store: str | None = Field(
        default=None,
        description="job store URL: sqlite:///PATH or postgresql://...; None: $SHOPREEL_JOBS_STORE or SQLite",
    )
    video_dir: Path | None = Field(
        default=None, description="finished videos (shared storage when several nodes serve); None: data_dir"
    )
    concurrency: int = Field(default=2, ge=1, le=256, description="job workers per ingress replica")
    max_running: int = Field(
        default=2, ge=1, le=100_000, description="jobs produced at once in the whole cluster (all replicas)"
    )
    max_pending: int = Field(
        default=32, ge=0, le=100_000, description="jobs waiting cluster-wide before 429 Retry-After"
    )
    max_streams: int = Field(
        default=4, ge=1, le=100_000, description="sync + streaming videos at once cluster-wide before 503"
    )
    streams_per_generator_replica: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="stream slots per running generator replica, plus one replica's worth (admission follows "
        "the capacity that is up, at most max_streams); None: max_streams whatever runs",
    )
    capacity_poll_s: float = Field(
        default=2.0,
        ge=0.1,
        le=60,
        description="how often an ingress replica reads the running generator replicas",
    )
    bulk_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="bulk jobs are refused once the queue holds this share of max_pending (normal jobs: all)",
    )
    interactive_reserve: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="stream slots only interactive streams may take: sync requests are refused before them",
    )
    lease_s: float = Field(
        default=15.0, ge=0.5, le=3600, description="a worker that stops renewing for this long loses its job"
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="times a job is started before a lost worker fails it for good"
    )
    poll_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="idle workers look for jobs this often"
    )
    store_pool_size: int = Field(default=8, ge=1, le=256, description="PostgreSQL connections per replica")
    retry_after_s: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Retry-After of a 429/503 when no video of its kind finished lately",
    )
    drain_window_s: float = Field(
        default=300.0,
        ge=10,
        le=86_400,
        description="Retry-After of a refusal is the wait this window's completion rate predicts for a slot",
    )
    refusal_memory_s: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="after the store refuses a slot, a replica refuses that kind itself for this long "
        "(a burst's refusals cost no store round trip; it never admits on its own); 0: always ask the store",
    )
    video_ttl_s: int = Field(
        default=24 * 3600,
        ge=60,
        le=30 * 24 * 3600,
        description="a finished video expires this long after it completed (a failed one: after it was made)",
    )
    expiry_sweep_s: float = Field(
        default=60.0,
        ge=0.1,
        le=86_400,
        description="how often each ingress replica deletes expired videos: files, then records",
    )

    @model_validator(mode="after")
    def _reserve_below_limit(self) -> JobSettings:
        if self.interactive_reserve >= self.max_streams:
            raise ValueError("interactive_reserve must leave sync requests at least one of max_streams")
        return self

    def stream_limit(self, generator_replicas: int | None = None) -> int:
        """Stream slots now: ``max_streams``, or what the running generator replicas take if less.

        Slots for replicas that are not up yet would admit videos only to queue them behind the
        ones running, past every client's patience; refused at once, a client can come back. One
        replica's worth of slots more than run: the backlog the generator scales on must be able to
        show more demand than its replicas take, or refused demand would never grow the stage.
        """
        if self.streams_per_generator_replica is None or generator_replicas is None:
            return self.max_streams
        return min(self.max_streams, self.streams_per_generator_replica * (generator_replicas + 1))

    def limit_of(self, admission_class: str, generator_replicas: int | None = None) -> int:
        """Slots held (of the class's kind) at which a class is refused: lower classes are shed first."""
        if admission_class == "bulk":
            return max(1, math.floor(self.max_pending * self.bulk_share))
        if admission_class == "job":
            return self.max_pending
        streams = self.stream_limit(generator_replicas)
        # Under reduced capacity the reserve may take every slot: sync requests then wait their turn.
        return max(0, streams - self.interactive_reserve) if admission_class == "sync" else streams

    def store_url(self) -> str:
        """``store``, else $SHOPREEL_JOBS_STORE (a password stays out of config files), else SQLite."""
        return (
            self.store
            or os.environ.get(JOBS_STORE_ENV)
            or f"sqlite:///{(self.data_dir / 'jobs.sqlite3').absolute()}"
        )

    def videos_path(self) -> Path:
        return self.video_dir or self.data_dir / "videos"


# Each stage's own defaults. A config that sets some fields of a stage (``ingress: {num_replicas: 2}``)
# keeps these for the rest, rather than DeploymentSettings' generic ones.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "planner": {"num_cpus": 0.1},
    "generator": {"num_cpus": 0.5, "max_ongoing_requests": 2},
    "renderer": {"num_cpus": 0.5, "max_ongoing_requests": 4},
    "compositor": {"num_cpus": 0.25, "max_ongoing_requests": 8},
    "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64, "max_queued_requests": -1},
}


def _stage_default(stage: str) -> DeploymentSettings:
    return DeploymentSettings(**STAGE_DEFAULTS[stage])


class ServeConfig(_Config):
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="model and stage settings")
    model_name: str = Field(default="shopreel-tiny", min_length=1, max_length=64, description="/v1/models id")
    planner: DeploymentSettings = Field(default_factory=lambda: _stage_default("planner"))
    generator: DeploymentSettings = Field(default_factory=lambda: _stage_default("generator"))
    renderer: DeploymentSettings = Field(default_factory=lambda: _stage_default("renderer"))
    compositor: DeploymentSettings = Field(default_factory=lambda: _stage_default("compositor"))
    ingress: DeploymentSettings = Field(default_factory=lambda: _stage_default("ingress"))
    jobs: JobSettings = Field(default_factory=JobSettings)
    render_in_flight: int = Field(
        default=2, ge=1, le=32, description="latent chunks of one video being decoded at once (across shots)"
    )
    shot_parallel: int = Field(
        default=1,
        ge=1,
        le=16,
        description="shots of one video denoised at once, one generator call each (spread over generator "
        "replicas); 1: shots in turn on one call",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="intra-op threads of each torch stage replica; None: the node's cores shared by the two "
        "torch stages (generator, renderer) that work at once (Ray would set 1 per fractional CPU)",
    )
    progress_interval_s: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="least time between progress reports a stage passes on (denoising steps to the "
        "compositor, progress to the ingress and the job record); each is a message; 0: every step",
    )
    warmup: bool = Field(default=True, description="run one tiny request through every stage before /readyz")
    events: list[SalesEvent] = Field(
        default_factory=list,
        max_length=256,
        description="sales events known in advance (more can be added at run time: POST /admin/events)",
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys, tenants and quotas")
    admin_key_env: str = Field(
        default="SHOPREEL_ADMIN_KEY",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="environment variable holding a bootstrap admin API key (besides stored admin keys)",
    )

    @field_validator("events")
    @classmethod
    def _unique_events(cls, events: list[SalesEvent]) -> list[SalesEvent]:
        names = [event.name for event in events]
        if len(names) != len(set(names)):
            raise ValueError("event names must be unique")
        return events

    def stage_options(self, stage: str) -> dict[str, Any]:
        """``Deployment.options`` for one stage; an autoscaled one gets the backlog/calendar policy."""
        settings: DeploymentSettings = getattr(self, stage)
        options = settings.deployment_options()
        scaling = settings.autoscaling
        if scaling is not None and scaling.policy == "backlog":
            options["autoscaling_config"]["policy"] = {
                "policy_function": "shopreel.serve.autoscaling:StagePolicy",
                "policy_kwargs": {
                    "stage": stage,
                    "backlog_per_replica": scaling.backlog_per_replica or scaling.target_ongoing_requests,
                    "events": [event.model_dump(mode="json") for event in self.events],
                    "jobs": self.jobs.model_dump(mode="json"),
                },
            }
        return options

    @model_validator(mode="before")
    @classmethod
    def _merge_stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for stage, defaults in STAGE_DEFAULTS.items():
                given = data.get(stage)
                if isinstance(given, dict):
                    data = {**data, stage: {**defaults, **given}}
        return data
