"""Video jobs, apart from HTTP: admission, planning, the shared queue's workers, and productions.

Every video, whichever endpoint accepted it, is a job record in the job store (SQLite, or
PostgreSQL for a cluster) and ends as a file in the video store, so a streamed video can be
downloaded again and a job accepted before a restart is produced after it. The store is shared by
every ingress replica: it admits (stream slots, pending jobs) atomically before any model work, and
its queue is worked by every replica's workers, which claim jobs under leases they renew, so a job
whose replica or node died is produced by another. Requests are planned before they are accepted (a
bad brief costs no GPU time and gets a 400); production runs in the compositor deployment, which
drives generator and renderers and streams fMP4 fragments back here.

``JobService`` is that logic for one ingress replica; the ingress routes parse requests and call it.
What a production needs travels inside the process as a typed ``ProductionRequest``; it becomes
JSON only where it leaves the process, in the job record (``JobRecord.request``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn, TypeAlias, cast

from pydantic import BaseModel, ValidationError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from shopreel.pipelines.produce import Fragment, Produced, ProductionOrder, ProductionProgress
from shopreel.pipelines.types import SpeedProfileName, Storyboard
from shopreel.pipelines.understand import variant_leaders

from .auth import ANONYMOUS, Principal
from .autoscaling import EVENTS_REFRESH_S
from .config import SalesEvent, ServeConfig
from .metrics import ServingMetrics
from .protocol import APIError, AudioChoice, JobRequest, overloaded
from .stage_clients import StageUnavailable, replica_lost
from .store import (
    AdmissionKind,
    AdmissionRefused,
    Claim,
    JobPriority,
    JobRecord,
    JobStore,
    ProductionKind,
    QuotaExceeded,
    VideoStore,
    new_video_id,
)

logger = logging.getLogger("shopreel.serve")

MAX_RETRY_AFTER_S = 600.0  # a predicted wait longer than this is no longer a useful hint
STORE_GAUGES_PERIOD_S = 2.0  # how often an ingress replica samples the shared queue for its gauges
DRAIN_RATE_TTL_S = 2.0  # a refusal's Retry-After reuses a drain rate read this recently
EXPIRY_BATCH = 200  # videos one sweep deletes at most (the next sweep takes the rest)

# A streaming request's end of a production: fMP4 fragments, then None; an exception if it failed.
FragmentListener: TypeAlias = asyncio.Queue[bytes | BaseException | None]


class ProductionRequest(BaseModel):
    """What producing one planned video needs, made once when the video is accepted.

    A job record stores it as JSON (``JobRecord.request``) so that any replica, after any restart,
    can produce the video; its keys are the stored format, so renaming a field breaks existing stores.
    """

    job: JobRequest
    storyboard: Storyboard
    audio: AudioChoice = "bed"
    understand_s: float = 0.0  # planning time, counted into the video's total

    @classmethod
    def from_record(cls, record: JobRecord) -> ProductionRequest:
        return cls.model_validate_json(record.request)

    def to_record_json(self) -> str:
        return self.model_dump_json()

    def order(self, video_id: str) -> ProductionOrder:
        """The compositor's order for this video (the same one on every attempt: same seed, same video)."""
        brief, options = self.job.brief, self.job.options
        return ProductionOrder(
            request_id=video_id,
            storyboard=self.storyboard,
            product_images=list(brief.images),
            seed=brief.seed,
            audio=self.audio,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            speed_profile=options.speed_profile,
            step_cache=options.step_cache,
        )


def failure_code(exc: BaseException, video_id: str) -> tuple[str, str]:
    """Job error codes and client-safe messages: the client's mistake, capacity, a lost stage, or ours.

    Messages never carry Ray internals (actor ids, node addresses, tracebacks): those go to the log,
    which the video id in the message finds.
    """
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the stage's own exception
    if isinstance(cause, ValueError):
        return "invalid_request", str(cause)
    if isinstance(cause, BackPressureError):
        return "overloaded", "a stage of the cluster is at capacity; retry later"
    if replica_lost(cause) or isinstance(cause, StageUnavailable):  # idempotent: it is produced again
        return "stage_unavailable", f"a stage replica was lost while producing video {video_id}; retry later"
    return "internal_error", f"video {video_id} could not be produced (internal error; see the server log)"


def planner_refusal(exc: ValueError) -> APIError:
    """A brief the planner refused: 400; an advertising-rule refusal names its first field and says so."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps the planner replica's own exception
    findings = getattr(cause, "findings", None)
    message = str(cause)
    if findings:
        return APIError.invalid(message, findings[0].field, code="content_policy_violation")
    return APIError.invalid(message)


QUOTA_MESSAGES = {
    "max_jobs": "jobs queued or running",
    "max_streams": "videos streaming",
    "videos_per_minute": "videos in the last minute",
    "max_stored_bytes": "bytes of videos stored",
}


def quota_refusal(exc: QuotaExceeded, default_retry_after_s: float) -> APIError:
    """A tenant's quota answer: 429 with ``Retry-After`` (when the quota frees, where the store knows)."""
    retry_after_s = exc.retry_after_s if exc.retry_after_s is not None else default_retry_after_s
    message = f"quota {exc.quota}: {exc.used} {QUOTA_MESSAGES[exc.quota]}, your tenant's limit is {exc.limit}"
    if exc.quota == "max_stored_bytes":
        message += "; delete videos (DELETE /v1/videos/{id}) or wait for them to expire"
    code = "insufficient_quota" if exc.quota == "max_stored_bytes" else "rate_limit_exceeded"
    return APIError.overloaded(message, max(1.0, retry_after_s), status_code=429, code=code)


@dataclass(frozen=True)
class Full:
    """A refusal by the store: what the 429/503 says, and until when this replica repeats it."""

    slot: AdmissionKind
    count: int  # slots held when the store refused
    retry_after_s: float
    until: float  # time.monotonic()


def _slot_of(kind: ProductionKind) -> AdmissionKind:
    """Jobs take a pending-queue slot; streams and sync videos a stream slot."""
    return "job" if kind == "job" else "stream"


def _class_of(kind: ProductionKind, priority: JobPriority) -> str:
    """Admission class, highest first: stream (interactive), sync, job, bulk."""
    return "bulk" if kind == "job" and priority == "bulk" else kind


def _seconds_text(duration_s: float) -> str:
    return f"{duration_s:g}" if duration_s != int(duration_s) else str(int(duration_s))


def peak_speed_profile(events: list[SalesEvent], now: datetime) -> SpeedProfileName | None:
    """The speed profile of the first event at its peak now that names one, if any."""
    for event in events:
        if event.speed_profile is not None and event.peaks_at(now):
            return event.speed_profile
    return None


def _with_speed_profile(job_request: JobRequest, profile: SpeedProfileName | None) -> JobRequest:
    """A sales event's speed profile where the request names none (the request's own wins)."""
    if profile is None or job_request.options.speed_profile is not None:
        return job_request
    options = dataclasses.replace(job_request.options, speed_profile=profile)
    return job_request.model_copy(update={"options": options})


def _with_tenant_policy(job_request: JobRequest, principal: Principal) -> JobRequest:
    """The tenant's compliance policy where the brief names none (the request's own policy wins)."""
    policy = principal.quotas.compliance
    if job_request.brief.compliance is not None or policy is None:
        return job_request
    return job_request.model_copy(
        update={"brief": job_request.brief.model_copy(update={"compliance": policy})}
    )


def _production(
    job_request: JobRequest, storyboard: Storyboard, audio: AudioChoice, understand_s: float
) -> ProductionRequest:
    negative = job_request.options.negative_prompt
    if negative:
        shots = [shot.model_copy(update={"negative_prompt": negative}) for shot in storyboard.shots]
        storyboard = storyboard.model_copy(update={"shots": shots})
    return ProductionRequest(job=job_request, storyboard=storyboard, audio=audio, understand_s=understand_s)


def _new_record(
    video_id: str,
    production: ProductionRequest,
    kind: ProductionKind,
    model: str,
    prompt: str | None,
    priority: JobPriority,
    principal: Principal,
) -> JobRecord:
    storyboard = production.storyboard
    return JobRecord(
        id=video_id,
        kind=kind,
        model=model,
        prompt=prompt,
        seconds=_seconds_text(storyboard.duration_s),
        size=f"{storyboard.width}x{storyboard.height}",
        request=production.to_record_json(),
        num_frames=storyboard.total_frames,
        priority=priority,
        tenant=principal.tenant,
    )


class JobService:
    """The jobs of one ingress replica: accepts videos, works the shared queue, runs productions.

    Background work (queue workers, store gauges) runs on the event loop of the first ``start``.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        planner: DeploymentHandle,
        compositor: DeploymentHandle,
        jobs: JobStore,
        videos: VideoStore,
        metrics: ServingMetrics,
        running_generators: Callable[[], int] | None = None,
    ) -> None:
        """``running_generators`` reads how many generator replicas run (with
        ``jobs.streams_per_generator_replica``, the stream limit follows it)."""
        self.config = config
        self.planner = planner
        self.compositor = compositor
        self.jobs = jobs
        self.videos = videos
        self.metrics = metrics
        self.running_generators = running_generators
        self.generator_replicas: int | None = None  # last read; None: not followed, or not read yet
        metrics.limits(config.jobs.max_pending, config.jobs.stream_limit())
        # This replica's name on the leases it holds; a restarted replica is a new owner.
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"
        self.job_waiting: asyncio.Event | None = None
        self.productions: dict[str, asyncio.Task[None]] = {}
        # Productions whose end (completed or failed) is in the job record: their lease no longer
        # renews, and that is no reason to stop them while they finish (release slots, end streams).
        self.recorded: set[str] = set()
        self._stored_events: list[SalesEvent] = []  # run-time sales events, as last read
        self._events_read_at = -math.inf
        # Slot kinds the store refused lately, remembered for ``jobs.refusal_memory_s``.
        self._full: dict[str, Full] = {}  # by admission class
        # Recent drain rate per slot kind and when it was read: a burst of refusals reads it once.
        self._drain_rates: dict[AdmissionKind, tuple[float, float]] = {}
        self._background: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the queue's workers and the store gauges on the running event loop (first call wins)."""
        if self.job_waiting is None:
            self.job_waiting = asyncio.Event()
            self._background = [
                asyncio.create_task(self._worker()) for _ in range(self.config.jobs.concurrency)
            ]
            self._background.append(asyncio.create_task(self._report_store()))
            self._background.append(asyncio.create_task(self._sweep_periodically()))
            if self.running_generators is not None and self.config.jobs.streams_per_generator_replica:
                self._background.append(asyncio.create_task(self._follow_capacity()))

    # --- accepting ------------------------------------------------------------------------------

    async def accept(
        self,
        job_request: JobRequest,
        *,
        prompt: str | None,
        model: str,
        kind: ProductionKind,
        principal: Principal = ANONYMOUS,
        audio: AudioChoice = "bed",
        priority: JobPriority = "normal",
    ) -> tuple[JobRecord, ProductionRequest]:
        """Admit, plan (a bad brief is a 400 before anything is stored), and record the video as the
        principal's tenant's (under the tenant's quotas).

        A job joins the shared queue; a stream or sync video is recorded as started by this replica,
        under a lease, and keeps its stream slot until its production ends.
        """
        self.start()
        video_id = new_video_id()
        if priority == "bulk" and kind != "job":
            raise APIError.invalid("priority 'bulk' is for jobs (stream: false)", "priority")
        await self._admit(video_id, kind, priority, principal)
        try:
            started = time.perf_counter()
            job_request = _with_tenant_policy(job_request, principal)
            job_request = _with_speed_profile(job_request, await self._peak_speed_profile())
            storyboard = await self._planned(
                self.planner.plan.remote(job_request.brief, job_request.profile, job_request.campaign)
            )
            production = _production(job_request, storyboard, audio, time.perf_counter() - started)
            record = _new_record(video_id, production, kind, model, prompt, priority, principal)
            if kind == "job":
                record = await asyncio.to_thread(self.jobs.enqueue, record)
                assert self.job_waiting is not None
                self.job_waiting.set()  # wake a worker here; other replicas find it at their next poll
            else:
                lease_s = self.config.jobs.lease_s
                record = await asyncio.to_thread(self.jobs.start, record, self.owner, lease_s)
        except BaseException:
            await asyncio.to_thread(self.jobs.release, video_id)
            raise
        return record, production

    async def accept_variants(
        self,
        job_requests: list[JobRequest],
        *,
        model: str,
        principal: Principal = ANONYMOUS,
        audio: AudioChoice = "bed",
        priority: JobPriority = "normal",
    ) -> list[tuple[JobRecord, ProductionRequest]]:
        """Jobs for the variants of one product (one brief and campaign, a profile each), all or none.

        The planner marks the shots variants share; a variant with shared shots waits in the queue
        (``JobRecord.wait_for``) for the first variant that has one of them, so that each shared shot
        is denoised and decoded once and the others take it from the shot and frame caches.
        """
        self.start()
        video_ids = [new_video_id() for _ in job_requests]
        admitted: list[str] = []
        try:
            for video_id in video_ids:
                await self._admit(video_id, "job", priority, principal)
                admitted.append(video_id)
            started = time.perf_counter()
            profile = await self._peak_speed_profile()
            requests = [
                _with_speed_profile(_with_tenant_policy(request, principal), profile)
                for request in job_requests
            ]
            first = requests[0]
            profiles = [request.profile for request in requests]
            storyboards = await self._planned(
                self.planner.plan_variants.remote(first.brief, profiles, first.campaign)
            )
            understand_s = (time.perf_counter() - started) / len(requests)
            productions = [
                _production(request, storyboard, audio, understand_s)
                for request, storyboard in zip(requests, storyboards, strict=True)
            ]
            records = [
                _new_record(video_id, production, "job", model, None, priority, principal).model_copy(
                    update={"wait_for": None if leader is None else video_ids[leader]}
                )
                for video_id, production, leader in zip(
                    video_ids, productions, variant_leaders(storyboards), strict=True
                )
            ]
            records = await asyncio.to_thread(self.jobs.enqueue_many, records)
        except BaseException:
            for video_id in admitted:
                await asyncio.to_thread(self.jobs.release, video_id)
            raise
        assert self.job_waiting is not None
        self.job_waiting.set()
        return list(zip(records, productions, strict=True))

    async def _planned(self, planning: Any) -> Any:
        """The planner's answer; its refusals as API errors."""
        try:
            return await planning
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise overloaded(exc, self.config.jobs.retry_after_s) from None
        except ValueError as exc:  # the planner refused what the schema let through
            raise planner_refusal(exc) from None

    def refuse_if_full(self, kind: ProductionKind, priority: JobPriority = "normal") -> None:
        """Raise the 429/503 at once if the store refused this kind of slot moments ago.

        Only a refusal is remembered, never a grant: admitting stays the store's atomic decision. A
        slot freed elsewhere meanwhile is missed for at most ``jobs.refusal_memory_s``, the price of
        answering a burst's refusals without a store round trip each.
        """
        admission_class = _class_of(kind, priority)
        remembered = self._full.get(admission_class)
        if remembered is not None:
            if time.monotonic() < remembered.until:
                self._refuse(remembered)
            del self._full[admission_class]

    def _slot_freed(self, slot: AdmissionKind) -> None:
        # This replica freed one: ask the store again, for every class taking this kind of slot.
        for admission_class in ("job", "bulk") if slot == "job" else ("stream", "sync"):
            self._full.pop(admission_class, None)

    def _refuse(self, full: Full) -> NoReturn:
        self.metrics.refused("queue_full" if full.slot == "job" else "overloaded")
        what = "videos are waiting" if full.slot == "job" else "videos are streaming"
        raise APIError.overloaded(
            f"{full.count} {what}, the most this cluster takes at once",
            full.retry_after_s,
            status_code=429 if full.slot == "job" else 503,
        )

    def _retry_after(self, slot: AdmissionKind, waiting: int) -> float:
        """Seconds until ``waiting`` videos of this kind finish at the rate they finished lately.

        A constant would send every refused client of a burst back at the same moment, into the
        same full limit; the measured drain rate spreads them over when slots really free up.
        """
        settings = self.config.jobs
        rate, read_at = self._drain_rates.get(slot, (0.0, -DRAIN_RATE_TTL_S))
        if time.monotonic() - read_at >= DRAIN_RATE_TTL_S:
            try:
                rate = self.jobs.drain_rate(slot, settings.drain_window_s)
            except Exception:  # noqa: BLE001 - a refusal must not fail on its hint
                logger.warning("reading the drain rate failed", exc_info=True)
                rate = 0.0
            else:
                self._drain_rates[slot] = (rate, time.monotonic())
        if rate <= 0:
            return float(settings.retry_after_s)  # nothing finished lately: no rate to go by
        return min(MAX_RETRY_AFTER_S, max(1.0, waiting / rate))

    async def _peak_speed_profile(self) -> SpeedProfileName | None:
        """The speed profile a sales event at its peak gives videos that name none (events from the
        config, and from the job store re-read at most every ``EVENTS_REFRESH_S``)."""
        if time.monotonic() - self._events_read_at >= EVENTS_REFRESH_S:
            self._events_read_at = time.monotonic()
            try:
                self._stored_events = await asyncio.to_thread(self.jobs.events)
            except Exception:  # noqa: BLE001 - videos go on with the events known so far
                logger.warning("reading sales events failed", exc_info=True)
        return peak_speed_profile([*self.config.events, *self._stored_events], datetime.now(timezone.utc))

    async def _admit(
        self, video_id: str, kind: ProductionKind, priority: JobPriority, principal: Principal
    ) -> None:
        """Take a cluster-wide slot before any model work: 429 (queue) / 503 (streams) when full, 429
        when the tenant is past one of its own quotas.

        Classes share their kind's slots under different limits (``JobSettings.limit_of``), so as the
        slots fill, bulk jobs are refused before normal ones and sync requests before streams.
        """
        self.refuse_if_full(kind, priority)
        settings = self.config.jobs
        slot, admission_class = _slot_of(kind), _class_of(kind, priority)
        limit = settings.limit_of(admission_class, self.generator_replicas)
        admit = functools.partial(self.jobs.admit, tenant=principal.tenant, quotas=principal.quotas)
        try:
            await asyncio.to_thread(admit, video_id, slot, limit, settings.lease_s)
        except QuotaExceeded as exc:
            self.metrics.refused("quota_exceeded")
            raise quota_refusal(exc, settings.retry_after_s) from None
        except AdmissionRefused as exc:
            # This request waits for every video over the limit, and then one more, to finish.
            retry_after_s = await asyncio.to_thread(self._retry_after, slot, exc.count - limit + 1)
            full = Full(slot, exc.count, retry_after_s, time.monotonic() + settings.refusal_memory_s)
            if settings.refusal_memory_s > 0:
                self._full[admission_class] = full
            self._refuse(full)

    async def _follow_capacity(self) -> None:
        """Keep the stream limit at what the running generator replicas take."""
        assert self.running_generators is not None
        settings = self.config.jobs
        while True:
            try:
                running = await asyncio.to_thread(self.running_generators)
            except Exception:  # noqa: BLE001 - keep the last figure; the next read may work
                logger.warning("reading the running generator replicas failed", exc_info=True)
            else:
                if running != self.generator_replicas:
                    logger.info(
                        "generator replicas running: %d, stream limit %d",
                        running,
                        settings.stream_limit(running),
                    )
                    self.generator_replicas = running
                    self._slot_freed("stream")  # a remembered refusal was against the old limit
                    self.metrics.limits(settings.max_pending, settings.stream_limit(running))
            await asyncio.sleep(settings.capacity_poll_s)

    async def delete(self, video_id: str) -> None:
        """Forget a video: stop its production if this replica runs it, drop its record and files."""
        production = self.productions.pop(video_id, None)
        if production is not None:
            production.cancel()
        # Another replica producing it sees its lease gone at the next renewal and stops.
        await asyncio.to_thread(self.jobs.delete, video_id)
        self.videos.delete(video_id)

    # --- the shared queue -----------------------------------------------------------------------

    async def _worker(self) -> None:
        """Claim jobs from the shared queue (any replica's) and produce them, one at a time."""
        settings = self.config.jobs
        assert self.job_waiting is not None
        while True:
            try:
                claim: Claim | None = await asyncio.to_thread(
                    self.jobs.claim,
                    self.owner,
                    lease_s=settings.lease_s,
                    max_running=settings.max_running,
                    max_attempts=settings.max_attempts,
                )
            except Exception:  # noqa: BLE001 - the store is briefly unreachable: keep the worker alive
                logger.warning("claiming a job failed; retrying", exc_info=True)
                claim = None
            if claim is None:
                self.job_waiting.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.job_waiting.wait(), settings.poll_interval_s)
                continue
            record = claim.record
            self._slot_freed("job")  # the claim moved a job out of the pending queue
            if claim.attempt > 1:
                logger.info("video %s: attempt %d (an earlier one was lost)", record.id, claim.attempt)
            try:
                production = ProductionRequest.from_record(record)
            except ValidationError:
                # Written by an incompatible release, or damaged: no attempt can produce it.
                logger.error(
                    "video %s: its stored request is unreadable; failing it", record.id, exc_info=True
                )
                message = f"video {record.id} could not be produced (its stored request is unreadable)"
                await self._update_owned(
                    record.id, status="failed", error={"code": "internal_error", "message": message}
                )
                continue
            with contextlib.suppress(asyncio.CancelledError):
                await self.start_production(record, production)

    async def _report_store(self) -> None:
        """Queue gauges from the shared store, on a period (not per claim: workers poll often)."""
        while True:
            try:
                self.metrics.store_counts(await asyncio.to_thread(self.jobs.counts))
            except Exception:  # noqa: BLE001 - a missed sample; the next one comes
                logger.warning("reading the job store's counts failed", exc_info=True)
            await asyncio.sleep(STORE_GAUGES_PERIOD_S)

    # --- expiry ---------------------------------------------------------------------------------

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.jobs.expiry_sweep_s)
            try:
                await self.sweep_expired()
            except Exception:  # noqa: BLE001 - the store is briefly unreachable: sweep next time
                logger.warning("deleting expired videos failed", exc_info=True)

    async def sweep_expired(self) -> int:
        """Delete videos past their expiry, files first: a crash halfway leaves a record the next sweep
        finds, never files nothing points at. Every replica sweeps; deleting twice is harmless and a
        video is counted by the replica whose delete removed its record."""
        settings = self.config.jobs
        expired = await asyncio.to_thread(self.jobs.expired, EXPIRY_BATCH, settings.video_ttl_s)
        deleted, freed = 0, 0
        for video_id, size in expired:  # finished videos only: no production of theirs runs
            await asyncio.to_thread(self.videos.delete, video_id)
            if await asyncio.to_thread(self.jobs.delete, video_id):
                deleted, freed = deleted + 1, freed + size
        if deleted:
            logger.info("expiry: deleted %d videos (%d bytes)", deleted, freed)
            self.metrics.expired(deleted, freed)
        return deleted

    # --- producing ------------------------------------------------------------------------------

    def start_production(
        self,
        record: JobRecord,
        production: ProductionRequest,
        *,
        listener: FragmentListener | None = None,
    ) -> asyncio.Task[None]:
        """Produce an accepted video in a task that holds its lease; ``listener`` gets its fragments."""
        task = asyncio.create_task(self._produce(record, production, listener))
        self.productions[record.id] = task
        lease_keeper = asyncio.create_task(self._keep_lease(record.id, task))

        def finished(_: asyncio.Task[None]) -> None:
            self.productions.pop(record.id, None)
            self.recorded.discard(record.id)
            lease_keeper.cancel()
            if self.job_waiting is not None:  # jobs waiting for this one (variants) may be claimed now
                self.job_waiting.set()

        task.add_done_callback(finished)
        return task

    async def _keep_lease(self, video_id: str, production: asyncio.Task[None]) -> None:
        """Renew the production's lease (and stream slot); stop it if the job was deleted or taken over."""
        lease_s = self.config.jobs.lease_s
        while not production.done():
            await asyncio.sleep(lease_s / 3)
            try:
                held = await asyncio.to_thread(self.jobs.renew, video_id, self.owner, lease_s)
            except Exception:  # noqa: BLE001 - try again before the lease runs out
                logger.warning("renewing the lease of %s failed", video_id, exc_info=True)
                continue
            if not held:
                if video_id in self.recorded:  # it ended a moment ago and is finishing
                    return
                logger.info("video %s was deleted or taken over: stopping its production", video_id)
                production.cancel()
                return

    async def _produce(
        self, record: JobRecord, production: ProductionRequest, listener: FragmentListener | None
    ) -> None:
        """Consume the compositor's events into the video store and the job record."""
        started = time.perf_counter()
        kind = record.kind
        self.metrics.production_started(kind)
        outcome = "cancelled"  # what the metrics count when it ends, unless it gets further
        error_code: str | None = None
        first_fragment_s: float | None = None
        first_fragment_at: float | None = None
        progress = 0
        stream = cast(
            DeploymentResponseGenerator,
            self.compositor.options(stream=True).produce.remote(production.order(record.id)),
        )
        try:
            async for event in stream:
                if isinstance(event, Fragment):
                    if first_fragment_s is None:
                        first_fragment_s, first_fragment_at = time.perf_counter() - started, time.time()
                    if listener is not None:
                        listener.put_nowait(event.data)
                elif isinstance(event, ProductionProgress):
                    if event.percent > progress:
                        progress = event.percent
                        if await self._update_owned(record.id, progress=progress) is None:
                            raise asyncio.CancelledError  # deleted or taken over while producing
                elif isinstance(event, Produced):
                    with self.videos.open_writer(record.id, "thumbnail") as file:
                        file.write(event.thumbnail)
                    with self.videos.open_writer(record.id, "video") as file:
                        file.write(event.mp4)
                    # Planning happened here, not in the compositor: its time and the end-to-end
                    # times are this replica's, measured from when the video was accepted.
                    timings: dict[str, float | None] = {
                        **event.timings.as_dict(),
                        "understand_s": production.understand_s,
                        "first_fragment_s": first_fragment_s,
                        "total_s": time.perf_counter() - started + production.understand_s,
                        "first_fragment_at": first_fragment_at,
                        "last_shot_denoised_at": event.shot_denoised_at[-1]
                        if event.shot_denoised_at
                        else None,
                    }
                    now = int(time.time())
                    quality = None if event.quality is None else event.quality.model_dump(mode="json")
                    landed = await self._update_owned(
                        record.id,
                        quality=quality,
                        stored_bytes=len(event.mp4) + len(event.thumbnail),
                        status="completed",
                        progress=100,
                        completed_at=now,
                        expires_at=now + self.config.jobs.video_ttl_s,
                        timings=timings,
                    )
                    if landed is not None:
                        self.recorded.add(record.id)
                    self.metrics.observe_video(timings, event.compose.num_frames)
                    if event.quality is not None:
                        self.metrics.observe_quality(event.quality.flags)
                    outcome = "completed"
            if outcome != "completed":  # the compositor ends every stream with the video or an error
                raise RuntimeError(f"the compositor's stream for {record.id} ended without a video")
        except Exception as exc:  # noqa: BLE001 - recorded on the job; the worker goes on
            code, message = failure_code(exc, record.id)
            logger.warning("video %s failed (%s)", record.id, code, exc_info=True)
            error_code = code
            if code == "stage_unavailable" and record.attempts < self.config.jobs.max_attempts:
                # Same storyboard and seed, same video: hand it back to the queue for another try. A
                # stream's client sees the error; the video it asked for is still made, by id.
                outcome = "retried"
                await asyncio.to_thread(self.jobs.requeue, record.id, self.owner)
                assert self.job_waiting is not None
                self.job_waiting.set()
            else:
                outcome = "failed"
                failed = await self._update_owned(
                    record.id, status="failed", error={"code": code, "message": message}
                )
                if failed is not None:
                    self.recorded.add(record.id)
            if listener is not None:
                listener.put_nowait(exc)
        finally:
            stream.cancel()  # no-op when the stream ended; stops the compositor when we were cancelled
            self.metrics.production_ended(kind, outcome, error_code)
            if kind != "job":
                await asyncio.to_thread(self.jobs.release, record.id)
                self._slot_freed("stream")
            if listener is not None:
                listener.put_nowait(None)

    async def _update_owned(self, video_id: str, **fields: Any) -> JobRecord | None:
        """A job update that lands only while this replica holds the job's lease (else ``None``)."""
        update = functools.partial(self.jobs.update, video_id, owner=self.owner, **fields)
        return await asyncio.to_thread(update)
