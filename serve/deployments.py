"""One Ray Serve deployment per stage, each a thin wrapper around its stage from ``pipelines/``.

Streaming between stages. Serve refuses to pass a streaming handle result into another
deployment, so one replica must iterate the generator's stream and forward each chunk. That
orchestrator is the compositor: a video's muxer state has to live on one replica for the whole
request anyway, so the replica that composes a video is the one that drives it. It consumes the
generator's stream of ``LatentChunk``s, sends each chunk to a renderer replica as it arrives
(several in flight across shots, at most ``render_in_flight``), restores order, composes, and
yields fMP4 fragments upward to the ingress while later shots are still denoising.

Renderer state. The causal decoder cache of a shot lives on the renderer replica that decoded its
previous chunk, so all chunks of a shot are routed with the same ``multiplexed_model_id``
(Serve routes such calls to the replica that already "holds" that id). Routing affinity is best
effort (a busy or restarted replica can lose it), so the cache is treated as a cache: a replica
without the shot's state answers ``NeedHistory`` and the orchestrator resends the chunk with the
shot's earlier latents (a few MB even at 480p), from which the replica rebuilds the state. Frames
are identical either way; only the retry costs time.

Replica loss inside a request. A stage replica can die while a video is being made (OOM kill, node
loss, a crash). The compositor retries the lost call instead of failing the video: a lost chunk is
rendered again on another replica together with the shot's earlier latents (the ``NeedHistory``
path), and a lost generator stream is re-issued from the first shot not fully received (shots are
seeded one by one, so the re-run gives the same latents; chunks that already arrived are dropped).
Frames equal those of a run without the fault. Retries are bounded (``RetryPolicy``); when they are
spent the video fails with ``StageUnavailable``, whose message carries no Ray internals.

Tensors cross replicas as numpy arrays (Ray's zero-copy path), never as lists or base64.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from shopreel.pipelines.compose import ComposeResult, Compositor
from shopreel.pipelines.generate import LatentGenerator
from shopreel.pipelines.presets import load_model, load_vae, resolve_preset
from shopreel.pipelines.render import StreamingRenderer
from shopreel.pipelines.types import (
    Campaign,
    FrameChunk,
    LatentChunk,
    ProductBrief,
    ProductImage,
    ShopperProfile,
    Shot,
    ShotKind,
    Storyboard,
)
from shopreel.pipelines.understand import build_planner

from . import stage_metrics as sm
from .config import ServeConfig

logger = logging.getLogger("shopreel.serve")

# A renderer replica forgets the cache of a shot nobody has sent a chunk for in this long.
RENDER_STATE_IDLE_S = 300.0
MAX_IDLE_SHOT_LOCKS = 1024


# --- replica loss inside a request ---------------------------------------------------------------


class StageUnavailable(RuntimeError):
    """A stage's replicas kept dying during one video and the retries are spent.

    The message is meant for clients (no Ray internals); the Ray error it was raised from is chained
    and logged by the compositor.
    """

    def __init__(self, stage: str, attempts: int) -> None:
        plural = "" if attempts == 1 else "s"
        super().__init__(f"{stage} replicas kept failing ({attempts} attempt{plural}); try again later")
        self.stage = stage
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses replicas pickled: rebuild from our own arguments, not from the formatted message.
        return (type(self), (self.stage, self.attempts))


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the compositor retries a stage call whose replica died, before ``StageUnavailable``.

    Serve needs a few seconds to replace the only replica of a stage; a retried call waits in Serve's
    queue for the replacement, so the budget bounds the time between the first and the last failure.
    """

    attempts: int = 5  # consecutive failures of one call (one chunk, or the stream without progress)
    budget_s: float = 30.0  # ... or this long since the first of them
    backoff_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # wait before retry n (last one repeats)
    generator_restarts: int = 4  # stream re-issues per video, however much progress each made

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.generator_restarts < 0:
            raise ValueError("RetryPolicy needs attempts >= 1 and generator_restarts >= 0")
        if self.budget_s < 0 or any(delay < 0 for delay in self.backoff_s):
            raise ValueError("RetryPolicy budget_s and backoff_s must not be negative")


# A replica's process or node went away (or none was reachable): the call's input was fine.
_LOST_REPLICA_ERRORS: tuple[type[BaseException], ...] = (
    RayActorError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
    DeploymentUnavailableError,
)


def replica_lost(exc: BaseException) -> bool:
    """Whether a stage call failed because its replica died (or none was reachable), not its input."""
    if isinstance(exc, RayTaskError):
        # A call chained through another deployment reports the dead actor as the task's cause.
        return isinstance(exc.cause, RayActorError)
    return isinstance(exc, _LOST_REPLICA_ERRORS)


class _Failures:
    """Consecutive replica losses of one stage call: waits before the next attempt or gives up."""

    def __init__(self, stage: str, policy: RetryPolicy, request_id: str) -> None:
        self.stage = stage
        self.policy = policy
        self.request_id = request_id
        self.count = 0
        self.first_at = 0.0

    def reset(self) -> None:
        """The call made progress: later losses start a new streak."""
        self.count = 0

    async def wait_or_give_up(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self.count == 0:
            self.first_at = now
        self.count += 1
        policy = self.policy
        delay = policy.backoff_s[min(self.count, len(policy.backoff_s)) - 1] if policy.backoff_s else 0.0
        if self.count >= policy.attempts or now + delay - self.first_at > policy.budget_s:
            logger.error(
                "request %s: %s replica lost (%s), giving up after %d attempts",
                self.request_id,
                self.stage,
                what,
                self.count,
                exc_info=exc,
            )
            raise StageUnavailable(self.stage, self.count) from exc
        logger.warning(
            "request %s: %s replica lost (%s), retry %d in %.2f s",
            self.request_id,
            self.stage,
            what,
            self.count,
            delay,
            exc_info=exc,
        )
        await asyncio.sleep(delay)


class ChunkLedger:
    """Which latent chunks of one video arrived, so a re-issued generator stream resumes cleanly.

    The generator emits shots in order and a shot's chunks in order, so what arrived is a prefix: all
    chunks of shots before ``resume_shot`` and the first few chunks of that shot. A stream re-issued
    from ``resume_shot`` sends those few again; ``accept`` tells them apart from new ones.
    """

    def __init__(self, num_shots: int) -> None:
        if num_shots < 1:
            raise ValueError(f"num_shots must be >= 1, got {num_shots}")
        self.num_shots = num_shots
        self.resume_shot = 0  # the first shot not fully received
        self._chunks_of_resume_shot = 0

    @property
    def complete(self) -> bool:
        return self.resume_shot == self.num_shots

    def accept(self, chunk: LatentChunk) -> bool:
        """True for a chunk not seen yet; False for one an earlier stream already delivered."""
        shot, index = chunk.shot_index, chunk.chunk_index
        if shot < self.resume_shot or (shot == self.resume_shot and index < self._chunks_of_resume_shot):
            return False
        if shot != self.resume_shot or index != self._chunks_of_resume_shot:
            # Anything else would leave a hole the causal renderer cannot decode across.
            raise RuntimeError(
                f"generator sent shot {shot} chunk {index}, expected shot {self.resume_shot} chunk "
                f"{self._chunks_of_resume_shot}"
            )
        if chunk.is_last:
            self.resume_shot += 1
            self._chunks_of_resume_shot = 0
        else:
            self._chunks_of_resume_shot += 1
        return True


# --- messages between deployments ----------------------------------------------------------------


@dataclass(frozen=True)
class DenoiseProgress:
    shot_index: int
    step: int
    steps: int


@dataclass(frozen=True)
class NeedHistory:
    """A renderer replica has no (or another) causal state for this shot: resend with history."""

    next_latent: int


@dataclass(frozen=True)
class ProductionOrder:
    """Everything the compositor needs to produce one planned video."""

    request_id: str
    storyboard: Storyboard
    product_images: list[ProductImage] = field(default_factory=list)
    seed: int = 0
    audio: Literal["bed", "none"] = "bed"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class ProductionProgress:
    denoise_steps_done: int
    denoise_steps_total: int
    frames_done: int
    frames_total: int

    @property
    def percent(self) -> int:
        done = self.denoise_steps_done / max(1, self.denoise_steps_total) * 0.5
        done += self.frames_done / max(1, self.frames_total) * 0.5
        return min(99, int(done * 100))


@dataclass(frozen=True)
class Fragment:
    data: bytes


@dataclass(frozen=True)
class Produced:
    """The end of a production: the download files and what each stage spent."""

    compose: ComposeResult  # its paths are on the compositor's node: the bytes below are what travel
    mp4: bytes
    thumbnail: bytes
    timings: dict[str, float]
    shot_denoised_at: list[float]  # wall clock (time.time) when each shot's latents were ready


def _set_torch_threads(config: ServeConfig) -> None:
    """Ray sets OMP_NUM_THREADS from a replica's num_cpus (1 for fractions): undo that unless configured."""
    import os

    import torch

    torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)


def warmup_storyboard(width: int = 64, height: int = 64, fps: int = 8) -> Storyboard:
    shot = Shot(index=0, kind=ShotKind.hook, prompt="warm-up", caption="warm-up", num_frames=5)
    return Storyboard(
        title="warm-up",
        language="en",
        width=width,
        height=height,
        fps=fps,
        shots=[shot],
        aigc_label="AI-generated",
    )


# --- planner -------------------------------------------------------------------------------------


@serve.deployment(name="planner")
class PlannerDeployment:
    """understand: brief -> storyboard (template planner, or a local LLM when configured)."""

    def __init__(self, config: ServeConfig) -> None:
        self.preset = resolve_preset(config.pipeline.model.preset)
        self.planner = build_planner(config.pipeline.planner)

    async def plan(
        self, brief: ProductBrief, profile: ShopperProfile | None = None, campaign: Campaign | None = None
    ) -> Storyboard:
        brief = brief.model_copy(
            update={
                "size": brief.size or self.preset.default_size,
                "fps": brief.fps or self.preset.default_fps,
            }
        )
        # An LLM planner computes for seconds: keep the replica's event loop free meanwhile.
        return await asyncio.to_thread(self.planner.plan, brief, profile, campaign)

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        pass


# --- generator -----------------------------------------------------------------------------------


class _Cancelled(Exception):
    pass


@serve.deployment(name="generator")
class GeneratorDeployment:
    """generate: storyboard -> stream of LatentChunks (numpy latents) and denoising progress."""

    def __init__(self, config: ServeConfig) -> None:
        _set_torch_threads(config)
        self.model = load_model(config.pipeline.model)
        self.generator = LatentGenerator(self.model, config.pipeline.generate)
        self.executor = ThreadPoolExecutor(
            max_workers=config.generator.max_ongoing_requests, thread_name_prefix="denoise"
        )
        self.stage_metrics = sm.stage_metrics("generator")
        self.stage_metrics.set(sm.GENERATE_ACTIVE, 0)  # the series exists before the first video
        if config.warmup:
            for _ in self.generator.generate(warmup_storyboard(), request_id="warmup", num_inference_steps=1):
                pass

    async def generate(
        self,
        storyboard: Storyboard,
        request_id: str,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        start_shot: int = 0,
    ) -> AsyncIterator[LatentChunk | DenoiseProgress]:
        """Denoise in a worker thread; hand its chunks and step events to the caller as they happen.

        ``start_shot`` > 0 resumes a video whose earlier shots another (lost) replica already sent.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        end = object()

        def on_step(shot_index: int, step: int, steps: int) -> None:
            if cancelled.is_set():
                raise _Cancelled  # stops diffusers' loop between steps
            loop.call_soon_threadsafe(events.put_nowait, DenoiseProgress(shot_index, step, steps))

        def work() -> None:
            try:
                chunks: Iterator[LatentChunk] = self.generator.generate(
                    storyboard,
                    request_id=request_id,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    on_step=on_step,
                    start_shot=start_shot,
                )
                for chunk in chunks:
                    if chunk.chunk_index == 0:  # a shot's first chunk carries its denoise time
                        self.stage_metrics.observe(sm.DENOISE_SECONDS, chunk.timings.get("denoise_s", 0.0))
                        self.stage_metrics.inc(sm.SHOTS_DENOISED)
                    latents = chunk.latents.float().cpu().numpy()  # type: ignore[attr-defined]
                    timings = {**chunk.timings, "denoised_at": time.time()}
                    loop.call_soon_threadsafe(
                        events.put_nowait, replace(chunk, latents=latents, timings=timings)
                    )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's task below
                loop.call_soon_threadsafe(events.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, end)

        worker = loop.run_in_executor(self.executor, work)
        self.stage_metrics.add(sm.GENERATE_ACTIVE, 1)
        try:
            while (item := await events.get()) is not end:
                if isinstance(item, BaseException):
                    if isinstance(item, _Cancelled):
                        return
                    raise item
                yield item
        finally:
            cancelled.set()
            try:
                await asyncio.shield(worker)
            finally:
                self.stage_metrics.add(sm.GENERATE_ACTIVE, -1)

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        pass


# --- renderer ------------------------------------------------------------------------------------


@serve.deployment(name="renderer")
class RendererDeployment:
    """render: LatentChunk -> FrameChunk with a causal decoder cache per (request, shot)."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        self.torch = torch
        _set_torch_threads(config)
        vae, device = load_vae(config.pipeline.model)
        self.renderer = StreamingRenderer(vae, device, config.pipeline.render)
        self._shot_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.executor = ThreadPoolExecutor(
            max_workers=config.renderer.max_ongoing_requests, thread_name_prefix="decode"
        )
        self.stage_metrics = sm.stage_metrics("renderer")
        self.stage_metrics.set(sm.CAUSAL_CACHES, 0)
        if config.warmup:
            # Past the first two latent frames an optimised backend exports/loads its graph for this
            # size and checks it against torch: done here, not on the first viewer's request.
            size = resolve_preset(config.pipeline.model.preset).default_size
            scale = vae.config.scale_factor_spatial
            latents = np.random.default_rng(0).standard_normal(
                (1, vae.config.z_dim, 3, size.height // scale, size.width // scale), dtype=np.float32
            )
            self._render(LatentChunk("warmup", 0, 0, 0, 3, latents, is_last=True, is_last_shot=True))
        logger.info("renderer: %s", self.renderer.describe())

    @serve.multiplexed(max_num_models_per_replica=256)
    async def _hold_shot(self, key: str) -> str:
        # Registering the key is what makes Serve route the shot's later chunks to this replica.
        return key

    async def render(self, chunk: LatentChunk, history: np.ndarray | None = None) -> FrameChunk | NeedHistory:
        """Decode one chunk; ``history`` (the shot's latents before it) rebuilds a missing cache."""
        key = serve.get_multiplexed_model_id()
        if key:
            await self._hold_shot(key)
        self.renderer.evict_idle(RENDER_STATE_IDLE_S)
        shot = (chunk.request_id, chunk.shot_index)
        # One call per shot at a time: a retry of a chunk whose first call is still decoding here (its
        # caller lost contact, not the replica) must see the state that call leaves, not race it.
        lock = self._shot_locks.setdefault(shot, asyncio.Lock())
        loop = asyncio.get_running_loop()
        try:
            async with lock:
                expected = self.renderer.next_latent(*shot)
                if chunk.latent_start == expected:
                    return self._count(await loop.run_in_executor(self.executor, self._render, chunk))
                if chunk.latent_start == 0:  # the shot's first chunk again: start the shot over
                    self.renderer.release(*shot)
                    return self._count(await loop.run_in_executor(self.executor, self._render, chunk))
                if history is None or history.shape[2] != chunk.latent_start:
                    return NeedHistory(next_latent=expected)
                return self._count(
                    await loop.run_in_executor(self.executor, self._rebuild_and_render, chunk, history)
                )
        finally:
            self.stage_metrics.set(sm.CAUSAL_CACHES, self.renderer.active_streams)
            if chunk.is_last and not lock.locked():
                self._shot_locks.pop(shot, None)
            if len(self._shot_locks) > MAX_IDLE_SHOT_LOCKS:  # shots of abandoned requests
                for stale in [k for k, held in self._shot_locks.items() if not held.locked()]:
                    del self._shot_locks[stale]

    def _count(self, frames: FrameChunk) -> FrameChunk:
        """Record a delivered chunk (not warm-up, not a rebuild's history pass)."""
        self.stage_metrics.observe(sm.DECODE_SECONDS, frames.timings.get("decode_s", 0.0))
        self.stage_metrics.inc(sm.CHUNKS_DECODED)
        return frames

    def _render(self, chunk: LatentChunk) -> FrameChunk:
        latents = self.torch.from_numpy(np.asarray(chunk.latents))
        return self.renderer.render(replace(chunk, latents=latents))

    def _rebuild_and_render(self, chunk: LatentChunk, history: np.ndarray) -> FrameChunk:
        self.stage_metrics.inc(sm.HISTORY_REBUILDS)
        self.renderer.release(chunk.request_id, chunk.shot_index)
        prefix = LatentChunk(
            chunk.request_id,
            chunk.shot_index,
            0,
            0,
            chunk.latent_start,
            history,
            is_last=False,
            is_last_shot=False,
        )
        self._render(prefix)  # frames already delivered once; only the cache is wanted
        return self._render(chunk)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, Any]:
        return {"active_streams": self.renderer.active_streams, **self.renderer.describe()}

    def check_health(self) -> None:
        pass


# --- compositor (and per-request orchestrator) ---------------------------------------------------


@serve.deployment(name="compositor")
class CompositorDeployment:
    """compose: drives one video through generator and renderers, yields fMP4 fragments as they exist."""

    def __init__(
        self,
        config: ServeConfig,
        generator: DeploymentHandle,
        renderer: DeploymentHandle,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.config = config
        self.compositor = Compositor(config.pipeline.compose)
        self.generator = generator
        self.renderer = renderer
        self.retry = retry or RetryPolicy()
        self.stage_metrics = sm.stage_metrics("compositor")
        self.stage_metrics.set(sm.VIDEOS_IN_FLIGHT, 0)

    async def produce(
        self, order: ProductionOrder
    ) -> AsyncIterator[ProductionProgress | Fragment | Produced]:
        storyboard = order.storyboard
        request_id = order.request_id
        started = time.perf_counter()
        session = await asyncio.to_thread(
            self.compositor.open,
            storyboard,
            request_id=request_id,
            product_images=[image.to_pil() for image in order.product_images],
            audio=order.audio,
            seed=order.seed,
        )
        workdir = Path(tempfile.mkdtemp(prefix="shopreel-compose-"))
        in_flight = asyncio.Semaphore(self.config.render_in_flight)
        # A shot's latents so far (one array per chunk, by chunk index): what a renderer replica without
        # the shot's causal cache rebuilds it from. Dropped once the shot's last chunk is rendered.
        history: dict[int, list[np.ndarray]] = {}
        last_task_of_shot: dict[int, asyncio.Task[FrameChunk]] = {}
        render_tasks: list[asyncio.Task[FrameChunk]] = []
        ordered: asyncio.Queue[Any] = asyncio.Queue()
        end = object()
        # Recovery counters ride along with the timings, so a job record shows what a video survived.
        timings = {
            "generate_s": 0.0,
            "render_s": 0.0,
            "compose_s": 0.0,
            "render_retries": 0.0,
            "generate_restarts": 0.0,
        }
        shot_denoised_at: list[float] = []

        async def render_chunk(handle: DeploymentHandle, chunk: LatentChunk, resend: bool) -> FrameChunk:
            def earlier() -> np.ndarray:
                return np.concatenate(history[chunk.shot_index], axis=2)[:, :, : chunk.latent_start]

            # After a lost replica the shot's cache is gone for sure: send the history at once.
            with_history = resend and chunk.latent_start > 0
            result = await handle.render.remote(chunk, earlier() if with_history else None)
            if isinstance(result, NeedHistory):
                resent = earlier()
                logger.info(
                    "request %s shot %d: renderer lost its cache, resending %d latent frames",
                    request_id,
                    chunk.shot_index,
                    resent.shape[2],
                )
                result = await handle.render.remote(chunk, resent)
            if not isinstance(result, FrameChunk):
                raise RuntimeError(
                    f"renderer answered {type(result).__name__} for shot {chunk.shot_index} chunk "
                    f"{chunk.chunk_index} although its history was sent"
                )
            return result

        async def render_one(chunk: LatentChunk, previous: asyncio.Task[FrameChunk] | None) -> FrameChunk:
            if previous is not None:
                await previous  # a shot's cache needs its chunks in order
            handle = self.renderer.options(multiplexed_model_id=f"{request_id}:{chunk.shot_index}")
            failures = _Failures("renderer", self.retry, request_id)
            while True:
                try:
                    async with in_flight:
                        result = await render_chunk(handle, chunk, resend=failures.count > 0)
                    break
                except Exception as exc:
                    if not replica_lost(exc):
                        raise
                    # Not holding a render slot while waiting: other shots' chunks may go meanwhile.
                    await failures.wait_or_give_up(exc, f"shot {chunk.shot_index} chunk {chunk.chunk_index}")
                    timings["render_retries"] += 1
            if chunk.is_last:
                history.pop(chunk.shot_index, None)  # only now: a retry of this chunk still needs it
            return result

        def received(chunk: LatentChunk) -> None:
            timings["generate_s"] += chunk.timings.get("denoise_s", 0.0)
            if chunk.chunk_index == 0:
                shot_denoised_at.append(chunk.timings.get("denoised_at", time.time()))
            history.setdefault(chunk.shot_index, []).append(np.asarray(chunk.latents))

        def check_resent(chunk: LatentChunk) -> None:
            """A chunk a re-issued stream sent again: rendered already, it must equal the first copy."""
            kept = history.get(chunk.shot_index)
            if kept is not None and not np.array_equal(kept[chunk.chunk_index], np.asarray(chunk.latents)):
                # Seeded denoising is deterministic on one device type; keep the first copy (its frames
                # are out already), so this shot may show a seam at the chunk boundary.
                logger.warning(
                    "request %s shot %d chunk %d: re-generated latents differ from the first run",
                    request_id,
                    chunk.shot_index,
                    chunk.chunk_index,
                )

        async def feed() -> None:
            """Generator stream -> render tasks, queued in output order; a lost stream is re-issued."""
            try:
                ledger = ChunkLedger(len(storyboard.shots))
                failures = _Failures("generator", self.retry, request_id)
                restarts = 0
                while not ledger.complete:
                    stream: DeploymentResponseGenerator = self.generator.options(stream=True).generate.remote(  # type: ignore[assignment]
                        storyboard,
                        request_id,
                        order.num_inference_steps,
                        order.guidance_scale,
                        start_shot=ledger.resume_shot,
                    )
                    try:
                        async for item in stream:
                            if isinstance(item, DenoiseProgress):
                                await ordered.put(item)
                                continue
                            if not ledger.accept(item):
                                check_resent(item)
                                continue
                            failures.reset()
                            received(item)
                            task = asyncio.create_task(
                                render_one(item, last_task_of_shot.get(item.shot_index))
                            )
                            last_task_of_shot[item.shot_index] = task
                            render_tasks.append(task)
                            await ordered.put(task)
                    except Exception as exc:
                        stream.cancel()
                        if not replica_lost(exc):
                            raise
                        if ledger.complete:
                            break  # lost after its last chunk: nothing is missing
                        restarts += 1
                        if restarts > self.retry.generator_restarts:
                            logger.error(
                                "request %s: generator replica lost %d times, giving up",
                                request_id,
                                restarts,
                                exc_info=exc,
                            )
                            raise StageUnavailable("generator", restarts) from exc
                        await failures.wait_or_give_up(exc, f"stream from shot {ledger.resume_shot}")
                        timings["generate_restarts"] += 1
                        continue
                    if not ledger.complete:
                        raise RuntimeError(
                            f"generator stream ended before shot {ledger.resume_shot} was complete"
                        )
                await ordered.put(end)
            except Exception as exc:  # noqa: BLE001 - handed to the consuming loop, which raises it
                await ordered.put(exc)

        feeder = asyncio.create_task(feed())
        steps_total = 0
        steps_done = [0] * len(storyboard.shots)
        frames_done = 0
        frames_total = sum(shot.num_frames for shot in storyboard.shots)
        first_fragment = True

        def fragment(data: bytes) -> Fragment:
            nonlocal first_fragment
            if first_fragment:
                first_fragment = False
                self.stage_metrics.observe(sm.FIRST_FRAGMENT_SECONDS, time.perf_counter() - started)
            return Fragment(data)

        try:
            self.stage_metrics.add(sm.VIDEOS_IN_FLIGHT, 1)
            while (item := await ordered.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DenoiseProgress):
                    steps_total = item.steps * len(storyboard.shots)
                    steps_done[item.shot_index] = item.step
                else:
                    frame_chunk: FrameChunk = await item
                    timings["render_s"] += frame_chunk.timings.get("decode_s", 0.0)
                    for data in await asyncio.to_thread(session.push, frame_chunk):
                        yield fragment(data)
                    frames_done += frame_chunk.frames.shape[0]
                yield ProductionProgress(sum(steps_done), steps_total, frames_done, frames_total)
            mp4_path, thumbnail_path = workdir / "video.mp4", workdir / "thumbnail.jpg"
            tail, result = await asyncio.to_thread(session.finish, mp4_path, thumbnail_path)
            for data in tail:
                yield fragment(data)
            timings["compose_s"] = result.encode_s
            self.stage_metrics.observe(sm.COMPOSE_SECONDS, result.encode_s)
            yield Produced(
                compose=result,
                mp4=mp4_path.read_bytes(),
                thumbnail=thumbnail_path.read_bytes() if result.thumbnail_path else b"",
                timings=timings,
                shot_denoised_at=shot_denoised_at,
            )
        finally:
            # What this video survived, failed or not (the counters skip zeros).
            self.stage_metrics.add(sm.VIDEOS_IN_FLIGHT, -1)
            self.stage_metrics.inc(sm.RENDER_RETRIES, timings["render_retries"])
            self.stage_metrics.inc(sm.GENERATOR_RESTARTS, timings["generate_restarts"])
            feeder.cancel()
            for task in render_tasks:
                task.cancel()
            session.close()
            shutil.rmtree(workdir, ignore_errors=True)

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        pass
