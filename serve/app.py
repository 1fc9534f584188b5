"""The HTTP ingress and ``build_app``: OpenAI-style video jobs, sync and streaming product videos.

Every video, whichever endpoint accepted it, is a job record in the job store (SQLite, or
PostgreSQL for a cluster) and ends as a file in the video store, so a streamed video can be
downloaded again and a job accepted before a restart is produced after it. The store is shared by
every ingress replica: it admits (stream slots, pending jobs) atomically before any model work, and
its queue is worked by every replica's workers, which claim jobs under leases they renew, so a job
whose replica or node died is produced by another. Requests are planned before they are accepted (a
bad brief costs no GPU time and gets a 400); production runs in the compositor deployment, which
drives generator and renderers and streams fMP4 fragments back here.

Errors are mapped to OpenAI's error body once, here: ``APIError`` from the wire-format module,
``ValueError`` from a stage (a client mistake the schema could not see) as 400, Serve's
back-pressure as 503 with ``Retry-After``, anything else as a 500 that is logged.
"""

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from shopreel.pipelines.presets import resolve_preset
from shopreel.pipelines.types import Campaign, ProductBrief, ShopperProfile, Storyboard

from . import stage_metrics as sm
from .config import ServeConfig
from .deployments import (
    CompositorDeployment,
    Fragment,
    GeneratorDeployment,
    PlannerDeployment,
    Produced,
    ProductionOrder,
    ProductionProgress,
    RendererDeployment,
    StageUnavailable,
    replica_lost,
)
from .metrics import CONTENT_TYPE, ServingMetrics
from .openai_api import (
    POLL_AFTER_HEADER,
    APIError,
    GenerationOptions,
    JobRequest,
    VideoCreateRequest,
    VideoListQuery,
    content_variant,
    deleted_object,
    list_page,
    request_to_brief,
    video_object,
)
from .store import (
    AdmissionKind,
    AdmissionRefused,
    Claim,
    JobRecord,
    ProductionKind,
    VideoStore,
    is_video_id,
    new_video_id,
)
from .store_url import open_job_store

logger = logging.getLogger("shopreel.serve")

MAX_JSON_BODY_BYTES = 16 * 1024 * 1024  # a brief with four 8 MB images is refused by the image limit
POLL_AFTER_MS = 500
VIDEO_ID_HEADER = "x-shopreel-video-id"
NUM_FRAMES_HEADER = "x-shopreel-num-frames"
MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/jpeg"}
RENDERER_STATS_TIMEOUT_S = 5.0  # /v1/models asks one renderer replica what it runs
STORE_GAUGES_PERIOD_S = 2.0  # how often an ingress replica samples the shared queue for its gauges

api = FastAPI(title="shopreel", description="Product briefs in, product videos out.", version="0.1")


class ProductVideoRequest(BaseModel):
    """``POST /v1/product-videos``: a structured brief; ``stream`` answers with fMP4 as it is made."""

    model_config = ConfigDict(extra="forbid")

    brief: ProductBrief
    profile: ShopperProfile | None = None
    campaign: Campaign | None = None
    stream: bool = Field(default=False, description="true: video/mp4 bytes now; false: a job to poll")
    model: str | None = Field(default=None, max_length=256)
    audio: Literal["bed", "none"] = Field(default="bed", description="generated music bed, or silence")
    num_inference_steps: int | None = Field(default=None, ge=1, le=100)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=20.0)


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@api.exception_handler(RequestValidationError)
async def _request_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
    return APIError.invalid(first.get("msg", "invalid request"), param or None).response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


# Serve pickles the FastAPI app when the class is decorated: what its methods call must exist by then.
# --- helpers -------------------------------------------------------------------------------------


def _check_body_size(request: Request) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_JSON_BODY_BYTES:
        raise APIError.too_large(f"request body is {length} bytes, more than {MAX_JSON_BODY_BYTES}")


async def _read_json(request: Request) -> Any:
    _check_body_size(request)
    raw = await request.body()
    if len(raw) > MAX_JSON_BODY_BYTES:
        raise APIError.too_large(f"request body is more than {MAX_JSON_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError.invalid(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def _seconds_text(duration_s: float) -> str:
    return f"{duration_s:g}" if duration_s != int(duration_s) else str(int(duration_s))


def _overloaded(exc: Exception, retry_after_s: int) -> APIError:
    return APIError.overloaded(
        f"a stage is at capacity: {type(exc).__name__}", retry_after_s, status_code=503
    )


def _failure_code(exc: BaseException, video_id: str) -> tuple[str, str]:
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


def _not_produced(record: JobRecord) -> APIError:
    """Why a sync or streaming request got no video now; a requeued one is still made, by id."""
    if record.status in ("queued", "in_progress"):
        return APIError(
            503,
            f"a stage replica was lost; video {record.id} is queued again: poll GET /v1/videos/{record.id}",
            code="stage_unavailable",
        )
    return _failure_error(record)


def _failure_error(record: JobRecord) -> APIError:
    error = record.error or {"code": "internal_error", "message": "video failed"}
    status = {"invalid_request": 400, "overloaded": 503, "stage_unavailable": 503}.get(error["code"], 500)
    return APIError(status, error["message"], code=error["code"])


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: ServeConfig,
        planner: DeploymentHandle,
        generator: DeploymentHandle,
        renderer: DeploymentHandle,
        compositor: DeploymentHandle,
    ) -> None:
        self.config = config
        self.planner, self.generator, self.renderer, self.compositor = (
            planner,
            generator,
            renderer,
            compositor,
        )
        self.preset = resolve_preset(config.pipeline.model.preset)
        self.jobs = open_job_store(config.jobs.store_url(), pool_size=config.jobs.store_pool_size)
        self.videos = VideoStore(config.jobs.videos_path())
        self.metrics = ServingMetrics()
        # Job-store-wide gauges through Ray's metrics export (seen from every node, unlike /metrics).
        self.cluster_metrics = sm.stage_metrics("ingress")
        # This replica's name on the leases it holds; a restarted replica is a new owner.
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"
        self.job_waiting: asyncio.Event | None = None
        self.productions: dict[str, asyncio.Task[None]] = {}
        self.ready = False
        self._background: list[asyncio.Task[None]] = []

    # --- lifecycle ------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        """Start job workers and the readiness probe on the replica's event loop (first call wins)."""
        if self.job_waiting is None:
            self.job_waiting = asyncio.Event()
            self._background = [
                asyncio.create_task(self._worker()) for _ in range(self.config.jobs.concurrency)
            ]
            self._background.append(asyncio.create_task(self._become_ready()))
            self._background.append(asyncio.create_task(self._report_store()))

    async def _become_ready(self) -> None:
        """Ready once every stage answers: their constructors loaded and warmed the models."""
        handles = (self.planner, self.generator, self.renderer, self.compositor)
        while not self.ready:
            try:
                await asyncio.gather(*(handle.ready.remote() for handle in handles))
                self.ready = True
            except Exception:  # noqa: BLE001 - a stage still starting; ask again
                logger.info("waiting for stages to become ready", exc_info=True)
                await asyncio.sleep(1.0)

    async def check_health(self) -> None:
        self._ensure_started()

    # --- health, models, metrics ----------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        self._ensure_started()
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        self._ensure_started()
        if not self.ready:
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        self._ensure_started()
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        # What one renderer replica actually runs (auto may have picked torch); the config if none answers.
        renderer: dict[str, Any] = {"requested": self.config.pipeline.render.backend}
        try:
            stats = await asyncio.wait_for(self.renderer.stats.remote(), RENDERER_STATS_TIMEOUT_S)
            renderer = {key: value for key, value in stats.items() if key != "active_streams"}
        except Exception as exc:  # a starting or dead replica must not break the model list
            renderer["error"] = f"renderer did not answer: {type(exc).__name__}"
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "shopreel",
                    "preset": self.preset.name,
                    "renderer": renderer,
                    "default_size": str(self.preset.default_size),
                    "default_fps": self.preset.default_fps,
                }
            ],
        }

    # --- OpenAI-style jobs ----------------------------------------------------------------------

    @api.post("/v1/videos")
    async def create_video(self, request: Request) -> JSONResponse:
        create = await self._read_create_request(request)
        job_request, model = self._job_from_prompt(create)
        record, _ = await self._accept(job_request, prompt=create.prompt, model=model, kind="job")
        return JSONResponse(video_object(record))

    @api.get("/v1/videos")
    async def list_videos(self, request: Request) -> dict[str, Any]:
        query = VideoListQuery.from_query(request.query_params)
        try:
            records, has_more = await asyncio.to_thread(
                self.jobs.list, after=query.after, limit=query.limit, order=query.order
            )
        except KeyError:
            raise APIError.invalid(f"no video with id {query.after!r} to list after", "after") from None
        return list_page(records, has_more)

    @api.get("/v1/videos/{video_id}")
    async def retrieve_video(self, video_id: str) -> JSONResponse:
        record = await self._record(video_id)
        body = video_object(record)
        body["shopreel"] = {
            "num_frames": record.num_frames,
            "timings": record.timings,
            "attempts": record.attempts,
        }
        headers = (
            {POLL_AFTER_HEADER: str(POLL_AFTER_MS)} if record.status in ("queued", "in_progress") else {}
        )
        return JSONResponse(body, headers=headers)

    @api.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str) -> dict[str, Any]:
        await self._record(video_id)
        production = self.productions.pop(video_id, None)
        if production is not None:
            production.cancel()
        # Another replica producing it sees its lease gone at the next renewal and stops.
        await asyncio.to_thread(self.jobs.delete, video_id)
        self.videos.delete(video_id)
        return deleted_object(video_id)

    @api.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str, variant: str | None = None) -> FileResponse:
        record = await self._record(video_id)
        kind = content_variant(variant)
        if record.status != "completed" or not self.videos.exists(video_id, kind):
            raise APIError(
                409 if record.status in ("queued", "in_progress") else 404,
                f"video {video_id} has no {kind} (status: {record.status})",
                param="video_id",
                code="video_not_ready" if record.status != "failed" else "video_failed",
            )
        return FileResponse(self.videos.path_for(video_id, kind), media_type=MEDIA_TYPES[kind])

    @api.post("/v1/videos/sync")
    async def create_video_sync(self, request: Request) -> Response:
        create = await self._read_create_request(request)
        job_request, model = self._job_from_prompt(create)
        record, storyboard = await self._accept(job_request, prompt=create.prompt, model=model, kind="sync")
        production = self._start_production(record, storyboard, job_request, listener=None)
        await asyncio.shield(production)
        final = await self._record(record.id)
        if final.status != "completed":
            raise _not_produced(final)
        return FileResponse(
            self.videos.path_for(record.id), media_type="video/mp4", headers={VIDEO_ID_HEADER: record.id}
        )

    # --- native product videos ------------------------------------------------------------------

    @api.post("/v1/product-videos")
    async def product_video(self, request: Request) -> Response:
        data = await _read_json(request)
        try:
            body = ProductVideoRequest.model_validate(data)
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None
        model = self._check_model(body.model)
        job_request = JobRequest(
            brief=body.brief,
            profile=body.profile,
            campaign=body.campaign,
            options=GenerationOptions(
                num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale
            ),
        )
        kind: ProductionKind = "stream" if body.stream else "job"
        record, storyboard = await self._accept(
            job_request, prompt=None, model=model, audio=body.audio, kind=kind
        )
        if not body.stream:
            return JSONResponse(video_object(record))
        listener: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._start_production(record, storyboard, job_request, listener=listener, audio=body.audio)

        # Headers wait for the first fragment, so a video that fails before any byte gets a real error
        # status; a failure after that aborts the response (no final chunk), which clients see as one.
        first = await listener.get()
        if first is None or isinstance(first, BaseException):
            raise _not_produced(await self._record(record.id))
        first_fragment: bytes = first

        async def fragments() -> AsyncIterator[bytes]:
            # If the client goes away the production goes on: the video stays downloadable by id.
            yield first_fragment
            while (item := await listener.get()) is not None:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"video {record.id} failed while streaming") from item
                yield item

        # The frame count lets any client tell a whole stream from one that broke off (Serve's proxy ends
        # a response cleanly when the replica's generator raises); the job record says what happened.
        return StreamingResponse(
            fragments(),
            media_type="video/mp4",
            headers={
                VIDEO_ID_HEADER: record.id,
                NUM_FRAMES_HEADER: str(storyboard.total_frames),
                "Cache-Control": "no-store",
            },
        )

    # --- accepting ------------------------------------------------------------------------------

    async def _read_create_request(self, request: Request) -> VideoCreateRequest:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data") or content_type.startswith(
            "application/x-www-form-urlencoded"
        ):
            _check_body_size(request)
            async with request.form() as form:
                return await VideoCreateRequest.from_multipart(form)
        return VideoCreateRequest.from_json(await _read_json(request))

    def _job_from_prompt(self, create: VideoCreateRequest) -> tuple[JobRequest, str]:
        model = self._check_model(create.model)
        brief, options = request_to_brief(create, default_fps=self.preset.default_fps)
        return JobRequest(brief=brief, options=options), model

    def _check_model(self, model: str | None) -> str:
        if model is not None and model != self.config.model_name:
            raise APIError(
                404,
                f"model {model!r} is not served here; GET /v1/models lists {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return self.config.model_name

    async def _admit(self, video_id: str, kind: ProductionKind) -> None:
        """Take a cluster-wide slot before any model work: 429 (queue) / 503 (streams) when full."""
        settings = self.config.jobs
        slot: AdmissionKind = "job" if kind == "job" else "stream"
        limit = settings.max_pending if slot == "job" else settings.max_streams
        try:
            await asyncio.to_thread(self.jobs.admit, video_id, slot, limit, settings.lease_s)
        except AdmissionRefused as exc:
            self.metrics.errors.labels(type="queue_full" if slot == "job" else "overloaded").inc()
            what = "videos are waiting" if slot == "job" else "videos are streaming"
            raise APIError.overloaded(
                f"{exc.count} {what}, the most this cluster takes at once",
                settings.retry_after_s,
                status_code=429 if slot == "job" else 503,
            ) from None

    async def _accept(
        self,
        job_request: JobRequest,
        *,
        prompt: str | None,
        model: str,
        kind: ProductionKind,
        audio: str = "bed",
    ) -> tuple[JobRecord, Storyboard]:
        """Admit, plan (a bad brief is a 400 before anything is stored), and record the video.

        A job joins the shared queue; a stream or sync video is recorded as started by this replica,
        under a lease, and keeps its stream slot until its production ends.
        """
        self._ensure_started()
        video_id = new_video_id()
        await self._admit(video_id, kind)
        try:
            started = time.perf_counter()
            try:
                storyboard = await self.planner.plan.remote(
                    job_request.brief, job_request.profile, job_request.campaign
                )
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise _overloaded(exc, self.config.jobs.retry_after_s) from None
            except ValueError as exc:  # the planner refused what the schema let through
                raise APIError.invalid(str(exc)) from None
            negative = job_request.options.negative_prompt
            if negative:
                shots = [s.model_copy(update={"negative_prompt": negative}) for s in storyboard.shots]
                storyboard = storyboard.model_copy(update={"shots": shots})
            understand_s = time.perf_counter() - started
            stored = {
                "job": job_request.model_dump(mode="json"),
                "storyboard": storyboard.model_dump(mode="json"),
                "audio": audio,
                "understand_s": understand_s,
            }
            record = JobRecord(
                id=video_id,
                kind=kind,
                model=model,
                prompt=prompt,
                seconds=_seconds_text(storyboard.duration_s),
                size=f"{storyboard.width}x{storyboard.height}",
                request=json.dumps(stored),
                num_frames=storyboard.total_frames,
            )
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
        return record, storyboard

    async def _record(self, video_id: str) -> JobRecord:
        record = await asyncio.to_thread(self.jobs.get, video_id) if is_video_id(video_id) else None
        if record is None:
            raise APIError.not_found(f"no video with id {video_id!r}", "video_id")
        return record

    # --- producing ------------------------------------------------------------------------------

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
            stored = json.loads(record.request)
            job_request = JobRequest.model_validate(stored["job"])
            storyboard = Storyboard.model_validate(stored["storyboard"])
            if claim.attempt > 1:
                logger.info("video %s: attempt %d (an earlier one was lost)", record.id, claim.attempt)
            production = self._start_production(
                record, storyboard, job_request, listener=None, audio=stored.get("audio", "bed")
            )
            with contextlib.suppress(asyncio.CancelledError):
                await production

    async def _report_store(self) -> None:
        """Queue gauges from the shared store, on a period (not per claim: workers poll often)."""
        while True:
            try:
                counts = await asyncio.to_thread(self.jobs.counts)
                self.metrics.queue_depth.set(counts["queued"])
                self.cluster_metrics.set(sm.JOBS_QUEUED, counts["queued"])
                self.cluster_metrics.set(sm.JOBS_IN_PROGRESS, counts["in_progress"])
                self.cluster_metrics.set(sm.STREAMS_ADMITTED, counts.get("admitted_stream", 0))  # absent: 0
            except Exception:  # noqa: BLE001 - a missed sample; the next one comes
                logger.warning("reading the job store's counts failed", exc_info=True)
            await asyncio.sleep(STORE_GAUGES_PERIOD_S)

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
                logger.info("video %s was deleted or taken over: stopping its production", video_id)
                production.cancel()
                return

    def _start_production(
        self,
        record: JobRecord,
        storyboard: Storyboard,
        job_request: JobRequest,
        *,
        listener: asyncio.Queue[bytes | BaseException | None] | None,
        audio: str = "bed",
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(self._produce(record, storyboard, job_request, listener, audio))
        self.productions[record.id] = task
        lease_keeper = asyncio.create_task(self._keep_lease(record.id, task))

        def finished(_: asyncio.Task[None]) -> None:
            self.productions.pop(record.id, None)
            lease_keeper.cancel()

        task.add_done_callback(finished)
        return task

    async def _produce(
        self,
        record: JobRecord,
        storyboard: Storyboard,
        job_request: JobRequest,
        listener: asyncio.Queue[bytes | BaseException | None] | None,
        audio: str,
    ) -> None:
        started = time.perf_counter()
        stored = json.loads(record.request)
        kind = record.kind
        self.metrics.in_flight.labels(kind=kind).inc()
        order = ProductionOrder(
            request_id=record.id,
            storyboard=storyboard,
            product_images=list(job_request.brief.images),
            seed=job_request.brief.seed,
            audio="none" if audio == "none" else "bed",
            num_inference_steps=job_request.options.num_inference_steps,
            guidance_scale=job_request.options.guidance_scale,
        )
        first_fragment_s: float | None = None
        first_fragment_at: float | None = None
        progress = 0
        stream = cast(DeploymentResponseGenerator, self.compositor.options(stream=True).produce.remote(order))
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
                    timings: dict[str, float | None] = {
                        "understand_s": stored.get("understand_s", 0.0),
                        **event.timings,
                        "first_fragment_s": first_fragment_s,
                        "total_s": time.perf_counter() - started + stored.get("understand_s", 0.0),
                        "first_fragment_at": first_fragment_at,
                        "last_shot_denoised_at": event.shot_denoised_at[-1]
                        if event.shot_denoised_at
                        else None,
                    }
                    now = int(time.time())
                    await self._update_owned(
                        record.id,
                        status="completed",
                        progress=100,
                        completed_at=now,
                        expires_at=now + self.config.jobs.video_ttl_s,
                        timings=timings,
                    )
                    self.metrics.observe_video(timings, event.compose.num_frames)
        except asyncio.CancelledError:
            self.metrics.videos.labels(outcome="cancelled").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - recorded on the job; the worker goes on
            code, message = _failure_code(exc, record.id)
            logger.warning("video %s failed (%s)", record.id, code, exc_info=True)
            self.metrics.errors.labels(type=code).inc()
            if code == "stage_unavailable" and record.attempts < self.config.jobs.max_attempts:
                # Same storyboard and seed, same video: hand it back to the queue for another try. A
                # stream's client sees the error; the video it asked for is still made, by id.
                self.metrics.videos.labels(outcome="retried").inc()
                await asyncio.to_thread(self.jobs.requeue, record.id, self.owner)
                assert self.job_waiting is not None
                self.job_waiting.set()
            else:
                self.metrics.videos.labels(outcome="failed").inc()
                await self._update_owned(record.id, status="failed", error={"code": code, "message": message})
            if listener is not None:
                listener.put_nowait(exc)
        finally:
            stream.cancel()  # no-op when the stream ended; stops the compositor when we were cancelled
            self.metrics.in_flight.labels(kind=kind).dec()
            if kind != "job":
                await asyncio.to_thread(self.jobs.release, record.id)
            if listener is not None:
                listener.put_nowait(None)

    async def _update_owned(self, video_id: str, **fields: Any) -> JobRecord | None:
        """A job update that lands only while this replica holds the job's lease (else ``None``)."""
        update = functools.partial(self.jobs.update, video_id, owner=self.owner, **fields)
        return await asyncio.to_thread(update)


def build_app(config: ServeConfig | None = None) -> serve.Application:
    """The whole cluster as one Serve application: four stages and the HTTP ingress."""
    config = config or ServeConfig()

    def deployment(cls: Any) -> Deployment:  # the decorators made these Deployments; mypy sees classes
        return cast(Deployment, cls)

    planner = deployment(PlannerDeployment).options(**config.planner.deployment_options()).bind(config)
    generator = deployment(GeneratorDeployment).options(**config.generator.deployment_options()).bind(config)
    renderer = deployment(RendererDeployment).options(**config.renderer.deployment_options()).bind(config)
    compositor = (
        deployment(CompositorDeployment)
        .options(**config.compositor.deployment_options())
        .bind(config, generator, renderer)
    )
    return (
        deployment(Ingress)
        .options(**config.ingress.deployment_options())
        .bind(config, planner, generator, renderer, compositor)
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for Serve config files (``import_path: shopreel.serve.app:app_builder``)."""
    return build_app(ServeConfig.model_validate(args or {}))
