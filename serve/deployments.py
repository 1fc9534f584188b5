"""One Ray Serve deployment per stage, each a thin wrapper around its stage from ``pipelines/``.

Streaming between stages. Serve refuses to pass a streaming handle result into another
deployment, so one replica must iterate the generator's stream and forward each chunk. That
orchestrator is the compositor: a video's muxer state has to live on one replica for the whole
request anyway, so the replica that composes a video is the one that drives it. It runs the one
production driver (``pipelines.produce``) with the generator and renderer deployments as its ports
(``stage_clients``: routing a shot's chunks to the replica holding its decoder cache, resending
history, retrying lost replicas) and yields the driver's events (progress, fMP4 fragments, the
finished video) upward to the ingress while later shots are still denoising.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from shopreel.pipelines.compose import Compositor
from shopreel.pipelines.embeddings import default_embedder
from shopreel.pipelines.generate import LatentGenerator
from shopreel.pipelines.narration import check_engine
from shopreel.pipelines.presets import load_model, load_vae, resolve_preset
from shopreel.pipelines.produce import (
    DenoiseStep,
    Fragment,
    LocalLatentSource,
    Produced,
    ProductionEvent,
    ProductionOrder,
    produce,
    stream_from_thread,
)
from shopreel.pipelines.render import StreamingRenderer
from shopreel.pipelines.shot_cache import ShotCacheStats
from shopreel.pipelines.types import (
    Campaign,
    FrameChunk,
    LatentChunk,
    ProductBrief,
    ShopperProfile,
    Shot,
    ShotKind,
    SpeedProfileName,
    StepCacheMethod,
    Storyboard,
)
from shopreel.pipelines.understand import build_planner, plan_variants

from . import stage_metrics as sm
from .autoscaling import PENDING_SHOTS
from .config import ServeConfig
from .stage_clients import (
    NeedHistory,
    RemoteFrameRenderer,
    RemoteLatentSource,
    RetryPolicy,
    routing_keys_held,
)

logger = logging.getLogger("shopreel.serve")

# A renderer replica forgets the cache of a shot nobody has sent a chunk for in this long.
RENDER_STATE_IDLE_S = 300.0
MAX_IDLE_SHOT_LOCKS = 1024


def torch_threads(config: ServeConfig) -> int:
    """Intra-op threads of a torch stage replica: configured, else half the node's cores.

    Ray would set OMP_NUM_THREADS from a replica's num_cpus (1 for fractions). Every core would
    oversubscribe: once the first shot is decoded, the generator and the renderer on a node compute at
    the same time, and two full thread pools on the same cores ran each stage slower than half as many.
    """
    import os

    return config.torch_threads or max(1, (os.cpu_count() or 1) // 2)


def _set_torch_threads(config: ServeConfig) -> None:
    import torch

    torch.set_num_threads(torch_threads(config))


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
        self.planner = build_planner(config.pipeline.planner, config.pipeline.compliance)
        self.narration = config.pipeline.compose.narration

    async def plan(
        self, brief: ProductBrief, profile: ShopperProfile | None = None, campaign: Campaign | None = None
    ) -> Storyboard:
        if brief.narration:  # the compositors run the same image: no engine here, none there
            check_engine(self.narration)
        # An LLM planner computes for seconds: keep the replica's event loop free meanwhile.
        return await asyncio.to_thread(self.planner.plan, self._sized(brief), profile, campaign)

    async def plan_variants(
        self, brief: ProductBrief, profiles: list[ShopperProfile | None], campaign: Campaign | None = None
    ) -> list[Storyboard]:
        """A storyboard per shopper, the shots they share marked (``Shot.shared``)."""
        if brief.narration:
            check_engine(self.narration)
        return await asyncio.to_thread(plan_variants, self.planner, self._sized(brief), profiles, campaign)

    def _sized(self, brief: ProductBrief) -> ProductBrief:
        """Size and fps the brief left open: the preset's."""
        return brief.model_copy(
            update={
                "size": brief.size or self.preset.default_size,
                "fps": brief.fps or self.preset.default_fps,
            }
        )

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        pass


# --- generator -----------------------------------------------------------------------------------


@serve.deployment(name="generator")
class GeneratorDeployment:
    """generate: storyboard -> stream of LatentChunks (numpy latents) and denoising steps."""

    def __init__(self, config: ServeConfig) -> None:
        _set_torch_threads(config)
        self.model = load_model(config.pipeline.model)
        self.generator = LatentGenerator(self.model, config.pipeline.generate)
        self.progress_interval_s = config.progress_interval_s
        self._cache_seen = ShotCacheStats()  # what the metrics have counted of the shot cache so far
        self.executor = ThreadPoolExecutor(
            max_workers=config.generator.max_ongoing_requests, thread_name_prefix="denoise"
        )
        self.stage_metrics = sm.stage_metrics("generator")
        self.stage_metrics.set(sm.GENERATE_ACTIVE, 0)  # the series exists before the first video
        self.pending_shots = 0
        self.stage_metrics.set(sm.GENERATOR_PENDING_SHOTS, 0)
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
        end_shot: int | None = None,
        speed_profile: SpeedProfileName | None = None,
        step_cache: StepCacheMethod | None = None,
    ) -> AsyncIterator[list[LatentChunk] | DenoiseStep]:
        """Denoise in a worker thread; hand its steps, and each shot's chunks as one message, to the
        caller as they happen.

        ``start_shot`` > 0 resumes a video whose earlier shots another (lost) replica already sent;
        ``end_shot`` stops before that shot (one shot of a video denoised shot-parallel).
        """
        order = ProductionOrder(
            request_id=request_id,
            storyboard=storyboard,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            speed_profile=speed_profile,
            step_cache=step_cache,
        )
        source = LocalLatentSource(
            self.generator,
            self.executor,
            prepare=self._to_numpy,
            start_shot=start_shot,
            end_shot=end_shot,
            step_interval_s=self.progress_interval_s,
        )
        # This stream's share of the autoscaling backlog.
        pending = (len(storyboard.shots) if end_shot is None else end_shot) - start_shot
        self._pending_shots(pending)
        self.stage_metrics.add(sm.GENERATE_ACTIVE, 1)
        try:
            async for item in source.shots(order):
                if not isinstance(item, DenoiseStep):
                    pending -= 1
                    self._pending_shots(-1)
                yield item
        finally:
            self._pending_shots(-pending)
            self.stage_metrics.add(sm.GENERATE_ACTIVE, -1)

    def _report_shot_cache(self) -> None:
        """The shot cache's hits, misses and bytes since the last report (one generator thread at a time
        per shot; counters only grow)."""
        cache = self.generator.cache
        if cache is None:
            return
        stats, seen = cache.stats, self._cache_seen
        self.stage_metrics.inc(sm.SHOT_CACHE_HITS, stats.memory_hits - seen.memory_hits, tier="memory")
        self.stage_metrics.inc(sm.SHOT_CACHE_HITS, stats.disk_hits - seen.disk_hits, tier="disk")
        self.stage_metrics.inc(sm.SHOT_CACHE_MISSES, stats.misses - seen.misses)
        self.stage_metrics.set(sm.SHOT_CACHE_BYTES, stats.memory_bytes, tier="memory")
        self.stage_metrics.set(sm.SHOT_CACHE_BYTES, stats.disk_bytes, tier="disk")
        self._cache_seen = replace(stats)

    def _pending_shots(self, delta: int) -> None:
        self.pending_shots += delta
        self.stage_metrics.set(sm.GENERATOR_PENDING_SHOTS, self.pending_shots)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What Ray Serve hands the autoscaling policy (``serve/autoscaling.py``) for this replica."""
        return {PENDING_SHOTS: float(self.pending_shots)}

    def _to_numpy(self, chunk: LatentChunk) -> LatentChunk:
        """On the denoising thread: count the shot, and make the latents a numpy array to travel."""
        if chunk.chunk_index == 0 and not chunk.timings.get("cached"):  # its first chunk: its denoise time
            self.stage_metrics.observe(sm.DENOISE_SECONDS, chunk.timings.get("denoise_s", 0.0))
            self.stage_metrics.inc(sm.SHOTS_DENOISED)
        if chunk.chunk_index == 0:
            self._report_shot_cache()
        return replace(chunk, latents=chunk.latents.float().cpu().numpy())  # type: ignore[attr-defined]

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
        async with contextlib.aclosing(self.render_chunks([chunk], history)) as answers:
            async for answer in answers:
                return answer
        raise RuntimeError("render_chunks answered nothing")  # it answers every call

    async def render_chunks(
        self, chunks: list[LatentChunk], history: np.ndarray | None = None
    ) -> AsyncGenerator[FrameChunk | NeedHistory, None]:
        """Decode consecutive chunks of one shot, streaming each one's frames as soon as they exist.

        One call per run of a shot's chunks instead of one round trip per chunk, and one decoding job:
        the worker thread goes on to the next chunk while the previous one's frames are being sent.
        ``history`` (the shot's latents before the first chunk) rebuilds a missing cache; without it,
        a replica that lacks the shot's state answers ``NeedHistory`` and ends the stream.
        """
        key = serve.get_multiplexed_model_id()
        if key:
            await self._hold_shot(key)
        self.renderer.evict_idle(RENDER_STATE_IDLE_S)
        first = chunks[0]
        shot = (first.request_id, first.shot_index)
        # One call per shot at a time: a retry of a chunk whose first call is still decoding here (its
        # caller lost contact, not the replica) must see the state that call leaves, not race it.
        lock = self._shot_locks.setdefault(shot, asyncio.Lock())
        try:
            async with lock:
                expected = self.renderer.next_latent(*shot)
                rebuild_from = None
                if first.latent_start == 0 and expected != 0:  # the shot's first chunk again: start over
                    self.renderer.release(*shot)
                elif first.latent_start != expected:
                    if history is None or history.shape[2] != first.latent_start:
                        yield NeedHistory(next_latent=expected)
                        return
                    rebuild_from = history
                async for frames in self._decode_in_turn(chunks, rebuild_from):
                    yield self._count(frames)
        finally:
            self.stage_metrics.set(sm.CAUSAL_CACHES, self.renderer.active_streams)
            if chunks[-1].is_last and not lock.locked():
                self._shot_locks.pop(shot, None)
            if len(self._shot_locks) > MAX_IDLE_SHOT_LOCKS:  # shots of abandoned requests
                for stale in [k for k, held in self._shot_locks.items() if not held.locked()]:
                    del self._shot_locks[stale]

    def _decode_in_turn(
        self, chunks: list[LatentChunk], rebuild_from: np.ndarray | None
    ) -> AsyncIterator[FrameChunk]:
        """Decode ``chunks`` in one executor job, handing each one's frames over as it is done."""

        def work(emit: Callable[[FrameChunk], None], stop: threading.Event) -> None:
            if rebuild_from is not None:
                self._rebuild(chunks[0], rebuild_from)
            for chunk in chunks:
                if stop.is_set():  # the caller went away: leave the cache after a whole chunk
                    return
                emit(self._render(chunk))

        return stream_from_thread(work, self.executor)

    def _count(self, frames: FrameChunk) -> FrameChunk:
        """Record a delivered chunk (not warm-up, not a rebuild's history pass)."""
        self.stage_metrics.observe(sm.DECODE_SECONDS, frames.timings.get("decode_s", 0.0))
        self.stage_metrics.inc(sm.CHUNKS_DECODED)
        return frames

    def _render(self, chunk: LatentChunk) -> FrameChunk:
        latents = self.torch.from_numpy(np.asarray(chunk.latents))
        return self.renderer.render(replace(chunk, latents=latents))

    def _rebuild(self, chunk: LatentChunk, history: np.ndarray) -> None:
        """Rebuild the shot's causal cache from its latents before ``chunk`` (their frames went out)."""
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
        self._render(prefix)

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
        if config.warmup and config.pipeline.quality.enabled:
            default_embedder()  # caption relevance's model: loaded now, not on the first viewer's video

    async def produce(self, order: ProductionOrder) -> AsyncIterator[ProductionEvent]:
        """Drive one video; the finished one carries its files' bytes (they are on this node only)."""
        workdir = Path(tempfile.mkdtemp(prefix="shopreel-compose-"))
        mp4_path, thumbnail_path = workdir / "video.mp4", workdir / "thumbnail.jpg"
        source = RemoteLatentSource(self.generator, self.retry, self.config.shot_parallel)
        renderer = RemoteFrameRenderer(
            self.renderer, self.retry, order.request_id, self.config.render_in_flight
        )
        started = time.perf_counter()
        events = produce(
            order,
            source,
            renderer,
            self.compositor,
            mp4_path=mp4_path,
            thumbnail_path=thumbnail_path,
            started=started,
            progress_interval_s=self.config.progress_interval_s,
            quality=self.config.pipeline.quality,
        )
        first_fragment = True
        self.stage_metrics.add(sm.VIDEOS_IN_FLIGHT, 1)
        try:
            async for event in events:
                if first_fragment and isinstance(event, Fragment):
                    first_fragment = False
                    self.stage_metrics.observe(sm.FIRST_FRAGMENT_SECONDS, time.perf_counter() - started)
                elif isinstance(event, Produced):
                    self.stage_metrics.observe(sm.COMPOSE_SECONDS, event.compose.encode_s)
                    event.mp4 = mp4_path.read_bytes()
                    event.thumbnail = thumbnail_path.read_bytes() if event.compose.thumbnail_path else b""
                yield event
        finally:
            await events.aclose()
            # What this video survived, failed or not (the counters skip zeros).
            self.stage_metrics.add(sm.VIDEOS_IN_FLIGHT, -1)
            self.stage_metrics.inc(sm.RENDER_RETRIES, renderer.retries)
            self.stage_metrics.inc(sm.GENERATOR_RESTARTS, source.restarts)
            shutil.rmtree(workdir, ignore_errors=True)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, int | None]:
        """Routing state this replica's renderer handle still holds: none once its videos are done."""
        return {"renderer_routing_keys": routing_keys_held(self.renderer)}

    def check_health(self) -> None:
        pass
