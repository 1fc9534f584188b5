"""The HTTP ingress and ``build_app``: OpenAI-style video jobs, sync and streaming product videos.

The ``Ingress`` deployment's routes parse requests with the wire format (``protocol.py``) and hand
videos to its ``JobService`` (``jobs.py``), which admits, plans, queues and produces them; this
module holds no job logic. ``build_app`` binds the four stages and the ingress into one Serve app.

Errors reach clients as OpenAI's error body through this module's handlers: ``APIError``, raised by
the wire format and the job service (a planner's ``ValueError`` as 400, Serve's back-pressure as 503
with ``Retry-After``), and FastAPI's own validation and HTTP errors; anything else is a 500 that is
logged.
"""

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ReplicaState
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shopreel.pipelines.presets import resolve_preset

from .auth import AUTH_OFF_WARNING, Authenticator, AuthError, KeyRole, Principal, new_key
from .config import TENANT_PATTERN, SalesEvent, ServeConfig, TenantQuotas
from .deployments import CompositorDeployment, GeneratorDeployment, PlannerDeployment, RendererDeployment
from .jobs import FragmentListener, JobService
from .metrics import CONTENT_TYPE, ServingMetrics
from .openapi import install as install_openapi
from .protocol import (
    NUM_FRAMES_HEADER,
    POLL_AFTER_HEADER,
    POLL_AFTER_MS,
    VIDEO_ID_HEADER,
    APIError,
    JobRequest,
    ProductVideoRequest,
    ProductVideoVariantsRequest,
    VideoCreateRequest,
    VideoListQuery,
    check_body_size,
    content_variant,
    deleted_object,
    list_page,
    not_produced,
    read_json,
    request_to_brief,
    video_object,
)
from .store import VARIANT_MEDIA_TYPES, JobRecord, ProductionKind, VideoStore, is_video_id
from .store_url import open_job_store

logger = logging.getLogger("shopreel.serve")

RENDERER_STATS_TIMEOUT_S = 5.0  # /v1/models asks one renderer replica what it runs


class ServerTiming:
    """ASGI middleware: ``Server-Timing: ingress;dur=<ms>`` on every response.

    The time from the request reaching this replica to its response headers: what the ingress itself
    spent (admission, planning, for a stream the first fragment). Set against a client's latency it
    shows how long the request waited in front of the replica (the HTTP proxy, a busy CPU).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                spent_ms = (time.perf_counter() - started) * 1000
                headers = [
                    *message.get("headers", []),
                    (b"server-timing", f"ingress;dur={spent_ms:.1f}".encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


api = FastAPI(title="shopreel", description="Product briefs in, product videos out.", version="0.1")
api.add_middleware(ServerTiming)


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@api.exception_handler(AuthError)
async def _auth_error(_request: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return APIError(exc.status, exc.message, code=exc.code, headers=headers).response()


@api.exception_handler(RequestValidationError)
async def _request_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
    return APIError.invalid(first.get("msg", "invalid request"), param or None).response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug answers an OpenAI-style 500 whose id finds the traceback in the server log, not the trace."""
    error_id = f"err_{uuid.uuid4().hex[:16]}"
    logger.error("%s %s failed (%s)", request.method, request.url.path, error_id, exc_info=exc)
    return APIError(
        500, f"internal error; the server log has it under {error_id}", code="internal_error"
    ).response()


class NewKeyRequest(BaseModel):
    """``POST /admin/keys``."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN)
    role: KeyRole = "user"
    label: str | None = Field(default=None, max_length=200)


def _compliance_findings(record: JobRecord) -> list[dict[str, Any]]:
    """What the advertising-rule checks rewrote in the video's brief and storyboard."""
    try:
        return list(json.loads(record.request)["storyboard"].get("compliance", []))
    except (ValueError, KeyError, TypeError, AttributeError):  # a record from before the checks
        return []


def _speed_profile(record: JobRecord) -> str | None:
    """The speed profile the video was asked for (by the request or a sales event); None: the server's."""
    try:
        return json.loads(record.request)["job"]["options"].get("speed_profile")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _expired(record: JobRecord) -> bool:
    """Past ``expires_at``: answered as gone before the sweeper has deleted it."""
    return record.expires_at is not None and record.expires_at <= time.time()


def running_generator_replicas() -> int:
    """Generator replicas of this application that are running, as Serve's controller reports them."""
    app_name = serve.get_replica_context().app_name
    status = serve.status().applications[app_name].deployments.get("generator")
    return 0 if status is None else status.replica_states.get(ReplicaState.RUNNING, 0)


# /openapi.json: every route with its bodies and answers (the routes parse bodies themselves). Built on
# the first request, from the routes as Serve left them; installed before Serve freezes the app below.
install_openapi(api)

# --- the merchant preview page (serve/static/) --------------------------------------------------------
# Public HTML/JS/CSS, no build step; the API calls the page makes carry the key its user types. Plain
# routes on the app (no replica state, so they work without Ray too) and left out of /openapi.json,
# which describes the API. Only the named files are served.
PREVIEW_DIR = Path(__file__).with_name("static")
PREVIEW_FILES = {
    "index.html": "text/html; charset=utf-8",
    "preview.js": "text/javascript; charset=utf-8",
    "preview.css": "text/css; charset=utf-8",
}


@api.get("/", include_in_schema=False)
async def preview_page() -> FileResponse:
    return await preview_asset("index.html")


@api.get("/static/{name}", include_in_schema=False)
async def preview_asset(name: str) -> FileResponse:
    if name not in PREVIEW_FILES:
        raise APIError.not_found(f"no static file {name!r}", "name")
    return FileResponse(
        PREVIEW_DIR / name, media_type=PREVIEW_FILES[name], headers={"Cache-Control": "no-cache"}
    )


# Serve pickles the FastAPI app when the class is decorated: what its methods call must exist by then.
@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """The HTTP routes of one ingress replica; its ``JobService`` does the job work."""

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
        self.auth = Authenticator(config.auth, self.jobs, config.admin_key_env)
        if not config.auth.enabled:
            logger.warning(AUTH_OFF_WARNING)
        self.service = JobService(
            config,
            planner=planner,
            compositor=compositor,
            jobs=self.jobs,
            videos=self.videos,
            metrics=self.metrics,
            running_generators=running_generator_replicas,
        )
        self.ready = False
        self._readiness: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        """Start job workers and the readiness probe on the replica's event loop (first call wins)."""
        self.service.start()
        if self._readiness is None:
            self._readiness = asyncio.create_task(self._become_ready())

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
    async def models(self, request: Request) -> dict[str, Any]:
        await self._principal(request)
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
        principal = await self._principal(request)
        self.service.refuse_if_full("job")  # a burst's refusals cost no body parsing either
        create = await self._read_create_request(request)
        job_request, model = self._job_from_prompt(create)
        self._ensure_started()
        record, _ = await self.service.accept(
            job_request, prompt=create.prompt, model=model, kind="job", principal=principal
        )
        return JSONResponse(video_object(record))

    @api.get("/v1/videos")
    async def list_videos(self, request: Request) -> dict[str, Any]:
        principal = await self._principal(request)
        query = VideoListQuery.from_query(request.query_params)
        try:
            records, has_more = await asyncio.to_thread(
                self.jobs.list,
                after=query.after,
                limit=query.limit,
                order=query.order,
                tenant=principal.tenant,
            )
        except KeyError:
            raise APIError.invalid(f"no video with id {query.after!r} to list after", "after") from None
        return list_page(records, has_more)

    @api.get("/v1/videos/{video_id}")
    async def retrieve_video(self, request: Request, video_id: str) -> JSONResponse:
        record = await self._record(video_id, await self._principal(request))
        body = video_object(record)
        body["shopreel"] = {
            "num_frames": record.num_frames,
            "timings": record.timings,
            "attempts": record.attempts,
            "compliance": _compliance_findings(record),
            "quality": record.quality,
            "speed_profile": _speed_profile(record) or self.config.pipeline.generate.speed_profile,
        }
        headers = (
            {POLL_AFTER_HEADER: str(POLL_AFTER_MS)} if record.status in ("queued", "in_progress") else {}
        )
        return JSONResponse(body, headers=headers)

    @api.delete("/v1/videos/{video_id}")
    async def delete_video(self, request: Request, video_id: str) -> dict[str, Any]:
        await self._record(video_id, await self._principal(request))
        await self.service.delete(video_id)
        return deleted_object(video_id)

    @api.get("/v1/videos/{video_id}/content")
    async def video_content(
        self, request: Request, video_id: str, variant: str | None = None
    ) -> FileResponse:
        record = await self._record(video_id, await self._principal(request))
        kind = content_variant(variant)
        if record.status != "completed" or not self.videos.exists(video_id, kind):
            raise APIError(
                409 if record.status in ("queued", "in_progress") else 404,
                f"video {video_id} has no {kind} (status: {record.status})",
                param="video_id",
                code="video_not_ready" if record.status != "failed" else "video_failed",
            )
        return FileResponse(self.videos.path_for(video_id, kind), media_type=VARIANT_MEDIA_TYPES[kind])

    @api.post("/v1/videos/sync")
    async def create_video_sync(self, request: Request) -> Response:
        principal = await self._principal(request)
        self.service.refuse_if_full("sync")
        create = await self._read_create_request(request)
        job_request, model = self._job_from_prompt(create)
        self._ensure_started()
        record, production = await self.service.accept(
            job_request, prompt=create.prompt, model=model, kind="sync", principal=principal
        )
        task = self.service.start_production(record, production)
        try:
            # Shielded: a client that goes away does not stop the production; the video stays by id.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # this request was cancelled, not the production
            # The production was stopped (the video was deleted or taken over): its record answers.
        final = await self._record(record.id, principal)
        if final.status != "completed":
            raise not_produced(final)
        return FileResponse(
            self.videos.path_for(record.id), media_type="video/mp4", headers={VIDEO_ID_HEADER: record.id}
        )

    # --- native product videos ------------------------------------------------------------------

    @api.post("/v1/product-videos")
    async def product_video(self, request: Request) -> Response:
        principal = await self._principal(request)
        data = await read_json(request)
        # Refused before validating the brief: the cheapest refusal is the one that reads least.
        if isinstance(data, dict):
            kind: ProductionKind = "stream" if data.get("stream") is True else "job"
            self.service.refuse_if_full(kind, "bulk" if data.get("priority") == "bulk" else "normal")
        body = ProductVideoRequest.from_json(data)
        model = self._check_model(body.model)
        kind = "stream" if body.stream else "job"
        self._ensure_started()
        record, production = await self.service.accept(
            body.job_request(),
            prompt=None,
            model=model,
            audio=body.audio,
            kind=kind,
            priority=body.priority,
            principal=principal,
        )
        if not body.stream:
            return JSONResponse(video_object(record))
        listener: FragmentListener = asyncio.Queue()
        self.service.start_production(record, production, listener=listener)

        # Headers wait for the first fragment, so a video that fails before any byte gets a real error
        # status; a failure after that aborts the response (no final chunk), which clients see as one.
        first = await listener.get()
        if first is None or isinstance(first, BaseException):
            raise not_produced(await self._record(record.id, principal))
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
                NUM_FRAMES_HEADER: str(production.storyboard.total_frames),
                "Cache-Control": "no-store",
            },
        )

    @api.post("/v1/product-videos/variants")
    async def product_video_variants(self, request: Request) -> dict[str, Any]:
        """A job per shopper profile for one product; the shots they share are made once."""
        principal = await self._principal(request)
        data = await read_json(request)
        if isinstance(data, dict):
            self.service.refuse_if_full("job", "bulk" if data.get("priority") == "bulk" else "normal")
        body = ProductVideoVariantsRequest.from_json(data)
        model = self._check_model(body.model)
        self._ensure_started()
        accepted = await self.service.accept_variants(
            body.job_requests(), model=model, audio=body.audio, priority=body.priority, principal=principal
        )
        data_out = []
        for index, (record, production) in enumerate(accepted):
            shots = production.storyboard.shots
            video = video_object(record)
            video["shopreel"] = {
                "variant": index,
                "shared_shots": [shot.index for shot in shots if shot.shared],
                "waits_for": record.wait_for,
            }
            data_out.append(video)
        return {"object": "list", "data": data_out}

    # --- admin: the sales-event calendar --------------------------------------------------------

    @api.get("/admin/events")
    async def list_events(self, request: Request) -> dict[str, Any]:
        await self._admin(request)
        stored = await asyncio.to_thread(self.jobs.events)
        now = datetime.now(timezone.utc)
        listed = [(event, "config") for event in self.config.events] + [(event, "admin") for event in stored]
        return {
            "object": "list",
            "data": [
                {
                    **event.model_dump(mode="json"),
                    "source": source,
                    "raising_floors": event.raises_floors_at(now),
                }
                for event, source in listed
            ],
        }

    @api.post("/admin/events")
    async def put_event(self, request: Request) -> dict[str, Any]:
        """Add (or replace, by name) a sales event; the autoscalers see it within a few seconds."""
        await self._admin(request)
        try:
            event = SalesEvent.model_validate(await read_json(request))
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None
        self._refuse_config_event(event.name)
        await asyncio.to_thread(self.jobs.put_event, event)
        logger.info("admin: sales event %s set (%s to %s)", event.name, event.start, event.end)
        return {**event.model_dump(mode="json"), "source": "admin"}

    @api.delete("/admin/events/{name}")
    async def delete_event(self, request: Request, name: str) -> dict[str, Any]:
        await self._admin(request)
        self._refuse_config_event(name)
        if not await asyncio.to_thread(self.jobs.delete_event, name):
            raise APIError.not_found(f"no sales event named {name!r}", "name")
        logger.info("admin: sales event %s deleted", name)
        return {"name": name, "deleted": True}

    # --- admin: API keys and tenants' quotas -----------------------------------------------------

    @api.get("/admin/keys")
    async def list_keys(self, request: Request, tenant: str | None = None) -> dict[str, Any]:
        await self._admin(request)
        keys = await asyncio.to_thread(self.jobs.api_keys, tenant)
        return {"object": "list", "data": [key.model_dump(mode="json") for key in keys]}

    @api.post("/admin/keys")
    async def create_key(self, request: Request) -> dict[str, Any]:
        """Create a key for a tenant; the answer carries the key, which is never shown again."""
        await self._admin(request)
        try:
            wanted = NewKeyRequest.model_validate(await read_json(request))
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None
        created = new_key(wanted.tenant, wanted.role, wanted.label)
        await asyncio.to_thread(self.jobs.create_key, created.record, created.secret_sha256)
        logger.info("admin: key %s (%s) created for tenant %s", created.record.id, wanted.role, wanted.tenant)
        return {**created.record.model_dump(mode="json"), "key": created.secret}

    @api.delete("/admin/keys/{key_id}")
    async def revoke_key(self, request: Request, key_id: str) -> dict[str, Any]:
        await self._admin(request)
        revoked = await asyncio.to_thread(self.jobs.revoke_key, key_id)
        if revoked is None:
            raise APIError.not_found(f"no API key {key_id!r}", "key_id")
        logger.info("admin: key %s revoked", key_id)
        return {"id": key_id, "revoked": True}

    @api.get("/admin/tenants")
    async def list_tenants(self, request: Request) -> dict[str, Any]:
        await self._admin(request)
        tenants = await asyncio.to_thread(self.jobs.tenants)
        return {
            "object": "list",
            "default_quotas": self.config.auth.default_quotas.model_dump(),
            "data": [{"name": name, "quotas": quotas.model_dump()} for name, quotas in tenants],
        }

    @api.put("/admin/tenants/{name}")
    async def set_tenant(self, request: Request, name: str) -> dict[str, Any]:
        """Set a tenant's own quotas (every replica applies them within ``auth.key_cache_s``)."""
        await self._admin(request)
        if re.fullmatch(TENANT_PATTERN, name) is None:
            raise APIError.invalid(f"tenant {name!r}: 1-64 of a-z 0-9 . _ -", "name")
        try:
            quotas = TenantQuotas.model_validate(await read_json(request))
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None
        await asyncio.to_thread(self.jobs.set_tenant_quotas, name, quotas)
        logger.info("admin: tenant %s quotas: %s", name, quotas.describe())
        return {"name": name, "quotas": quotas.model_dump()}

    @api.delete("/admin/tenants/{name}")
    async def clear_tenant(self, request: Request, name: str) -> dict[str, Any]:
        await self._admin(request)
        await asyncio.to_thread(self.jobs.set_tenant_quotas, name, None)
        return {"name": name, "quotas": self.config.auth.default_quotas.model_dump(), "default": True}

    # --- who is asking --------------------------------------------------------------------------

    async def _principal(self, request: Request) -> Principal:
        """The request's tenant (401 without a valid key while authentication is on)."""
        return await self._identify(self.auth.principal, request)

    async def _admin(self, request: Request) -> Principal:
        return await self._identify(self.auth.admin, request)

    async def _identify(self, check: Callable[[str | None], Principal], request: Request) -> Principal:
        try:  # off the event loop: a cache miss reads the store
            return await asyncio.to_thread(check, request.headers.get("authorization"))
        except AuthError:
            self.metrics.refused("unauthorized")
            raise

    def _refuse_config_event(self, name: str) -> None:
        if any(event.name == name for event in self.config.events):
            raise APIError(
                409,
                f"sales event {name!r} is defined in the server's config; change it there",
                code="conflict",
            )

    # --- parsing --------------------------------------------------------------------------------

    async def _read_create_request(self, request: Request) -> VideoCreateRequest:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data") or content_type.startswith(
            "application/x-www-form-urlencoded"
        ):
            check_body_size(request)
            async with request.form() as form:
                return await VideoCreateRequest.from_multipart(form)
        return VideoCreateRequest.from_json(await read_json(request))

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

    async def _record(self, video_id: str, principal: Principal) -> JobRecord:
        """The principal's video; another tenant's answers 404 as if it did not exist."""
        record = await asyncio.to_thread(self.jobs.get, video_id) if is_video_id(video_id) else None
        if record is None or record.tenant != principal.tenant or _expired(record):
            raise APIError.not_found(f"no video with id {video_id!r}", "video_id")
        return record


def build_app(config: ServeConfig | None = None) -> serve.Application:
    """The whole cluster as one Serve application: four stages and the HTTP ingress."""
    config = config or ServeConfig()

    def deployment(cls: Any) -> Deployment:  # the decorators made these Deployments; mypy sees classes
        return cast(Deployment, cls)

    planner = deployment(PlannerDeployment).options(**config.stage_options("planner")).bind(config)
    generator = deployment(GeneratorDeployment).options(**config.stage_options("generator")).bind(config)
    renderer = deployment(RendererDeployment).options(**config.stage_options("renderer")).bind(config)
    compositor = (
        deployment(CompositorDeployment)
        .options(**config.stage_options("compositor"))
        .bind(config, generator, renderer)
    )
    return (
        deployment(Ingress)
        .options(**config.stage_options("ingress"))
        .bind(config, planner, generator, renderer, compositor)
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for Serve config files (``import_path: shopreel.serve.app:app_builder``)."""
    return build_app(ServeConfig.model_validate(args or {}))
