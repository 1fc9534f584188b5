"""The production driver: a planned storyboard -> latents -> frames -> fMP4, wherever the stages run.

There is one production loop. It takes its two model stages as ports: a ``LatentSource`` (a stream
of latent chunks and denoising steps) and a ``FrameRenderer`` (one latent chunk -> frames). The
in-process pipeline passes ``LocalLatentSource``/``LocalFrameRenderer`` around its own models; the
cluster's compositor passes adapters around Serve handles, which keep their own recovery (a lost
renderer replica's chunk resent with the shot's history, a lost generator stream re-issued from the
first unfinished shot). The driver itself knows nothing of replicas.

Each chunk is rendered as soon as it exists (a shot's chunks in order, since the causal decoder's
cache needs them so; shots overlap), frames are composed in storyboard order, and every fMP4
fragment is emitted while later shots are still denoising. Events: ``ProductionProgress``,
``Fragment``, and a final ``Produced`` with ``StageTimings``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from .compose import ComposeResult, CompositionSession, Compositor
from .config import QualityConfig
from .embeddings import default_embedder
from .generate import LatentGenerator
from .quality import QualityReport, caption_regions, caption_relevance, score_file, with_caption_relevance
from .render import StreamingRenderer
from .types import (
    FrameChunk,
    LatentChunk,
    ProductImage,
    SpeedProfileName,
    StageTimings,
    StepCacheMethod,
    Storyboard,
)

logger = logging.getLogger(__name__)

# --- what a production is asked for, and what it emits -------------------------------------------


@dataclass(frozen=True)
class ProductionOrder:
    """Everything needed to produce one planned video (it crosses replicas: plain data only)."""

    request_id: str
    storyboard: Storyboard
    product_images: list[ProductImage] = field(default_factory=list)
    seed: int = 0
    audio: Literal["bed", "none"] | Path = "bed"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    speed_profile: SpeedProfileName | None = None  # None: the generator config's
    step_cache: StepCacheMethod | None = None  # None: the speed profile's


@dataclass(frozen=True)
class DenoiseStep:
    """A latent source finished denoising step ``step`` of ``steps`` for shot ``shot_index``."""

    shot_index: int
    step: int
    steps: int


@dataclass(frozen=True)
class ProductionProgress:
    denoise_steps_done: int
    denoise_steps_total: int
    frames_done: int
    frames_total: int

    @property
    def percent(self) -> int:
        """0-99 while producing: half for denoising, half for frames (100 is for the finished video)."""
        done = self.denoise_steps_done / max(1, self.denoise_steps_total) * 0.5
        done += self.frames_done / max(1, self.frames_total) * 0.5
        return min(99, int(done * 100))


@dataclass(frozen=True)
class Fragment:
    """fMP4 bytes, in order: the first carries the init segment."""

    data: bytes


@dataclass
class Produced:
    """The end of a production: the composed video and what each stage spent."""

    compose: ComposeResult
    timings: StageTimings
    shot_denoise_s: list[float]  # seconds each shot took to denoise
    shot_denoised_at: list[float]  # wall clock (time.time) when each shot's latents arrived
    fragment_count: int
    quality: QualityReport | None = None  # None: scoring is off, or it failed (logged)
    # Filled by a compositor replica: its files are on its own node, the bytes are what travel.
    mp4: bytes = b""
    thumbnail: bytes = b""


ProductionEvent = ProductionProgress | Fragment | Produced


# --- ports ---------------------------------------------------------------------------------------


class LatentSource(Protocol):
    """The generate stage for one video: its latent chunks in order, with denoising steps between."""

    restarts: int  # streams re-issued after a lost replica (0 where nothing can be lost)

    def stream(self, order: ProductionOrder) -> AsyncIterator[LatentChunk | DenoiseStep]: ...


class FrameRenderer(Protocol):
    """The render stage for one video: one call per chunk, shots overlapping.

    A shot's chunks are handed over in order as soon as they exist, each before the previous one's
    frames are back: the renderer keeps a shot's order (its causal decoder cache needs it).
    """

    retries: int  # chunk calls repeated after a lost replica

    async def render(self, chunk: LatentChunk) -> FrameChunk: ...

    def release(self, request_id: str) -> None:
        """Forget the video's decoder state (it failed or was cancelled)."""


# --- in-process ports ----------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised from the step callback to stop diffusers' loop between steps."""


class LocalLatentSource:
    """A ``LatentGenerator`` in a worker thread, its chunks handed to the event loop as they exist.

    ``prepare`` runs on each chunk in the worker thread (a replica turns latents into numpy there).
    ``step_interval_s``: a denoising step is reported only this long after the last one reported (a
    shot's last step always is); each report is a message when the source is a replica. Closing the
    stream stops denoising at the next step.
    """

    restarts = 0

    def __init__(
        self,
        generator: LatentGenerator,
        executor: Executor | None = None,
        *,
        prepare: Callable[[LatentChunk], LatentChunk] | None = None,
        start_shot: int = 0,
        end_shot: int | None = None,
        step_interval_s: float = 0.0,
    ) -> None:
        self.generator = generator
        self.executor = executor
        self.prepare = prepare
        self.start_shot = start_shot
        self.end_shot = end_shot
        self.step_interval_s = step_interval_s

    async def stream(self, order: ProductionOrder) -> AsyncIterator[LatentChunk | DenoiseStep]:
        async for item in self.shots(order):
            if isinstance(item, DenoiseStep):
                yield item
            else:
                for chunk in item:
                    yield chunk

    async def shots(self, order: ProductionOrder) -> AsyncIterator[list[LatentChunk] | DenoiseStep]:
        """Denoising steps, and each shot's chunks as one list.

        The generator denoises a whole shot before slicing it into chunks, so a shot's chunks exist
        together: a replica sends them as one message, and the compositor hands them to one renderer
        call.
        """

        def work(emit: Callable[[list[LatentChunk] | DenoiseStep], None], stop: threading.Event) -> None:
            reported_at = -math.inf

            def on_step(shot_index: int, step: int, steps: int) -> None:
                nonlocal reported_at
                if stop.is_set():
                    raise _Cancelled
                now = time.monotonic()
                if step == steps or now - reported_at >= self.step_interval_s:
                    reported_at = now
                    emit(DenoiseStep(shot_index, step, steps))

            chunks: Iterator[LatentChunk] = self.generator.generate(
                order.storyboard,
                request_id=order.request_id,
                num_inference_steps=order.num_inference_steps,
                guidance_scale=order.guidance_scale,
                speed_profile=order.speed_profile,
                step_cache=order.step_cache,
                on_step=on_step,
                start_shot=self.start_shot,
                end_shot=self.end_shot,
            )
            shot: list[LatentChunk] = []
            for chunk in chunks:
                chunk.timings["denoised_at"] = time.time()
                shot.append(self.prepare(chunk) if self.prepare else chunk)
                if chunk.is_last:
                    emit(shot)
                    shot = []

        async for item in stream_from_thread(work, self.executor):
            yield item


T = TypeVar("T")


async def stream_from_thread(
    work: Callable[[Callable[[T], None], threading.Event], None], executor: Executor | None = None
) -> AsyncGenerator[T, None]:
    """Run ``work(emit, stop)`` on ``executor``; yield what it emits as it emits it; raise what it raises.

    The one bridge from a model's worker thread to an event loop. Closing the iterator sets ``stop``
    (``work`` checks it between units of work) and waits for ``work`` to return, so the caller's
    state is whole again when the iterator is closed.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def emit(item: T) -> None:
        loop.call_soon_threadsafe(items.put_nowait, (item, None))

    def run() -> None:
        try:
            work(emit, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming task below
            loop.call_soon_threadsafe(items.put_nowait, (end, exc))
        else:
            loop.call_soon_threadsafe(items.put_nowait, (end, None))

    job = loop.run_in_executor(executor, run)
    try:
        while True:
            item, error = await items.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        await asyncio.shield(job)


class LocalFrameRenderer:
    """A ``StreamingRenderer`` on one worker thread (its causal caches are not shared across threads)."""

    retries = 0

    def __init__(self, renderer: StreamingRenderer, executor: Executor | None = None) -> None:
        self.renderer = renderer
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    async def render(self, chunk: LatentChunk) -> FrameChunk:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.renderer.render, chunk)

    def release(self, request_id: str) -> None:
        self.renderer.release(request_id)


# --- the driver ----------------------------------------------------------------------------------


def score_video(
    path: Path, storyboard: Storyboard, font_path: Path | None, config: QualityConfig
) -> QualityReport | None:
    """The finished file's quality report; None (logged) if scoring fails: the video itself is fine."""
    try:
        report = score_file(path, captions=caption_regions(storyboard, font_path=font_path), config=config)
        relevance = caption_relevance(storyboard, default_embedder() if storyboard.language == "en" else None)
        return with_caption_relevance(report, relevance, config)
    except Exception:  # noqa: BLE001 - a measurement must never fail a finished video
        logger.warning("scoring %s failed", path, exc_info=True)
        return None


async def produce(
    order: ProductionOrder,
    source: LatentSource,
    renderer: FrameRenderer,
    compositor: Compositor,
    *,
    mp4_path: Path | None,
    thumbnail_path: Path | None = None,
    started: float | None = None,
    understand_s: float = 0.0,
    progress_interval_s: float = 0.0,
    quality: QualityConfig | None = None,
) -> AsyncGenerator[ProductionEvent, None]:
    """Produce one video: progress and fragments as they happen, then ``Produced``.

    ``started`` (``time.perf_counter``) is when the request began, for first-fragment and total times.
    ``progress_interval_s``: least time between two ``ProductionProgress`` events (each is a message,
    and a job record write, when the driver runs on a replica); fragments are never held back.
    ``quality``: score the finished file (``pipelines/quality.py``) after its last fragment is out.
    """
    started = time.perf_counter() if started is None else started
    storyboard = order.storyboard
    timings = StageTimings(understand_s=understand_s)
    shot_denoise_s: list[float] = []
    shot_denoised_at: list[float] = []
    # Output order: a step event, or the task rendering the next chunk (in storyboard order).
    ordered: asyncio.Queue[Any] = asyncio.Queue()
    end = object()
    render_tasks: list[asyncio.Task[FrameChunk]] = []

    async def feed() -> None:
        try:
            async for item in source.stream(order):
                if isinstance(item, DenoiseStep):
                    await ordered.put(item)
                    continue
                timings.generate_s += item.timings.get("denoise_s", 0.0)
                if item.chunk_index == 0:  # a shot's first chunk carries its denoise time
                    shot_denoise_s.append(item.timings.get("denoise_s", 0.0))
                    shot_denoised_at.append(item.timings.get("denoised_at", time.time()))
                # Handed over at once, in the shot's order: the renderer keeps that order.
                task = asyncio.create_task(renderer.render(item))
                render_tasks.append(task)
                await ordered.put(task)
            await ordered.put(end)
        except Exception as exc:  # noqa: BLE001 - handed to the consuming loop, which raises it
            await ordered.put(exc)

    steps_done = [0] * len(storyboard.shots)
    steps_total = 0
    frames_done = 0
    fragment_count = 0
    progress_reported_at = -math.inf

    def fragment(data: bytes) -> Fragment:
        nonlocal fragment_count
        if timings.first_fragment_s is None:
            timings.first_fragment_s = time.perf_counter() - started
        fragment_count += 1
        return Fragment(data)

    # Denoising starts first; the muxer, overlays and audio bed are set up while the first shot denoises.
    feeder = asyncio.create_task(feed())
    finished = False
    session: CompositionSession | None = None
    try:
        session = await asyncio.to_thread(
            compositor.open,
            storyboard,
            request_id=order.request_id,
            product_images=[image.to_pil() for image in order.product_images],
            audio=order.audio,
            seed=order.seed,
        )
        while (item := await ordered.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, DenoiseStep):
                steps_total = item.steps * len(storyboard.shots)
                steps_done[item.shot_index] = item.step
            else:
                frame_chunk: FrameChunk = await item
                timings.render_s += frame_chunk.timings.get("decode_s", 0.0)
                for data in await asyncio.to_thread(session.push, frame_chunk):
                    yield fragment(data)
                frames_done += frame_chunk.frames.shape[0]
            if time.monotonic() - progress_reported_at >= progress_interval_s:
                progress_reported_at = time.monotonic()
                yield ProductionProgress(sum(steps_done), steps_total, frames_done, storyboard.total_frames)
        tail, result = await asyncio.to_thread(session.finish, mp4_path, thumbnail_path)
        finished = True
        for data in tail:
            yield fragment(data)
        report = None
        if quality is not None and quality.enabled and mp4_path is not None:
            scored_at = time.perf_counter()
            font_path = compositor.config.font_path
            report = await asyncio.to_thread(score_video, mp4_path, session.canvas, font_path, quality)
            timings.quality_s = time.perf_counter() - scored_at
        timings.compose_s = result.encode_s
        timings.render_retries = renderer.retries
        timings.generate_restarts = source.restarts
        timings.total_s = time.perf_counter() - started
        yield Produced(result, timings, shot_denoise_s, shot_denoised_at, fragment_count, report)
    finally:
        feeder.cancel()
        for task in render_tasks:
            task.cancel()
        # Let cancelled work unwind (the source stops its denoising thread) before state is dropped.
        await asyncio.gather(feeder, *render_tasks, return_exceptions=True)
        if not finished:
            if session is not None:
                session.close()
            renderer.release(order.request_id)
