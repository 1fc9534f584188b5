"""ProductVideoPipeline: the four stages chained in one process.

This is what the CLI runs and the baseline the serving cluster is benchmarked against. Stages
stream into each other exactly as they do across Ray Serve deployments: every LatentChunk is
rendered as soon as the generator yields it, and every FrameChunk goes straight to the compositor,
whose fMP4 bytes go to ``on_fragment`` while later shots are still denoising.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .compose import ComposeResult, Compositor
from .config import PipelineConfig
from .generate import LatentGenerator
from .narration import check_engine
from .presets import LoadedModel, load_model
from .produce import (
    Fragment,
    LocalFrameRenderer,
    LocalLatentSource,
    Produced,
    ProductionOrder,
    ProductionProgress,
    produce,
)
from .quality import QualityReport
from .render import StreamingRenderer
from .types import (
    Campaign,
    ProductBrief,
    ProductImage,
    ShopperProfile,
    SpeedProfileName,
    StageTimings,
    StepCacheMethod,
    Storyboard,
)
from .understand import build_planner, plan_variants, variant_leaders

ProgressCallback = Callable[[ProductionProgress], None]
FragmentCallback = Callable[[bytes], None]


@dataclass
class VideoResult:
    request_id: str
    storyboard: Storyboard
    compose: ComposeResult
    timings: StageTimings
    num_inference_steps: int
    fragment_count: int = 0
    per_shot_denoise_s: list[float] = field(default_factory=list)
    quality: QualityReport | None = None  # None: scoring off (or no file written)

    @property
    def frames_per_s(self) -> float:
        return self.compose.num_frames / self.timings.total_s if self.timings.total_s else 0.0


class ProductVideoPipeline:
    """brief -> storyboard -> latents -> frames -> MP4, in process."""

    def __init__(self, config: PipelineConfig | None = None, *, model: LoadedModel | None = None) -> None:
        self.config = config or PipelineConfig()
        self.model = model or load_model(self.config.model)
        self.planner = build_planner(self.config.planner, self.config.compliance)
        self.generator = LatentGenerator(self.model, self.config.generate)
        self.renderer = StreamingRenderer(self.model.vae, self.model.device, self.config.render)
        self.compositor = Compositor(self.config.compose)
        # The renderer's causal caches stay on one thread, across videos.
        self._render_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    def with_preset_defaults(self, brief: ProductBrief) -> ProductBrief:
        """Fill size/fps the brief left open with the model preset's defaults."""
        preset = self.model.preset
        return brief.model_copy(
            update={"size": brief.size or preset.default_size, "fps": brief.fps or preset.default_fps}
        )

    def plan(
        self, brief: ProductBrief, profile: ShopperProfile | None = None, campaign: Campaign | None = None
    ) -> Storyboard:
        if brief.narration:  # before any work: a missing engine is the request's error
            check_engine(self.config.compose.narration)
        return self.planner.plan(self.with_preset_defaults(brief), profile, campaign)

    def plan_variants(
        self,
        brief: ProductBrief,
        profiles: list[ShopperProfile | None],
        campaign: Campaign | None = None,
    ) -> list[Storyboard]:
        """One storyboard per shopper, the shots they share marked (``Shot.shared``)."""
        if brief.narration:
            check_engine(self.config.compose.narration)
        return plan_variants(self.planner, self.with_preset_defaults(brief), profiles, campaign)

    def run_variants(
        self,
        brief: ProductBrief,
        profiles: list[ShopperProfile | None],
        campaign: Campaign | None = None,
        *,
        output_dir: Path,
        audio: Literal["bed", "none"] | Path = "bed",
        num_inference_steps: int | None = None,
        concurrency: int = 2,
        on_variant: Callable[[int, VideoResult], None] | None = None,
    ) -> list[VideoResult]:
        """A video per shopper profile, ``variant-<i>.mp4`` (+ ``.jpg``) in ``output_dir``.

        Shared shots are denoised and decoded for the first variant that has them and taken from the
        shot and frame caches by the others (``generate.shot_cache.shared_shots`` and
        ``render.frame_cache_bytes``); captions, overlays and audio are composed per variant. Up to
        ``concurrency`` variants are made at once, each after the one it takes shots from (as the
        cluster's job workers do): what is left per variant is composing, which one thread cannot
        spread over the cores.
        """
        if not 1 <= concurrency <= 16:
            raise ValueError(f"concurrency must be in 1..16, got {concurrency}")
        started = time.perf_counter()
        storyboards = self.plan_variants(brief, profiles, campaign)
        understand_s = (time.perf_counter() - started) / len(storyboards)
        output_dir.mkdir(parents=True, exist_ok=True)
        leaders = variant_leaders(storyboards)
        made: list[Future[VideoResult]] = []

        def make(index: int) -> VideoResult:
            leader = leaders[index]
            if leader is not None:  # submitted earlier, so already running or done: no deadlock
                made[leader].exception()  # its shots are cached now (or it failed: then make them here)
            result = self.render_storyboard(
                storyboards[index],
                product_images=list(brief.images),
                seed=brief.seed,
                output_path=output_dir / f"variant-{index}.mp4",
                thumbnail_path=output_dir / f"variant-{index}.jpg",
                audio=audio,
                num_inference_steps=num_inference_steps,
                understand_s=understand_s,
            )
            if on_variant is not None:
                on_variant(index, result)
            return result

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="variant") as pool:
            for index in range(len(storyboards)):  # a leader's future is in the list before its followers run
                made.append(pool.submit(make, index))
        return [future.result() for future in made]

    def run(
        self,
        brief: ProductBrief,
        profile: ShopperProfile | None = None,
        campaign: Campaign | None = None,
        *,
        output_path: Path | None,
        thumbnail_path: Path | None = None,
        audio: Literal["bed", "none"] | Path = "bed",
        num_inference_steps: int | None = None,
        request_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        on_fragment: FragmentCallback | None = None,
        speed_profile: SpeedProfileName | None = None,
        step_cache: StepCacheMethod | None = None,
    ) -> VideoResult:
        started = time.perf_counter()
        storyboard = self.plan(brief, profile, campaign)
        understand_s = time.perf_counter() - started
        return self.render_storyboard(
            storyboard,
            product_images=list(brief.images),
            seed=brief.seed,
            output_path=output_path,
            thumbnail_path=thumbnail_path,
            audio=audio,
            num_inference_steps=num_inference_steps,
            request_id=request_id,
            on_progress=on_progress,
            on_fragment=on_fragment,
            started=started,
            understand_s=understand_s,
            speed_profile=speed_profile,
            step_cache=step_cache,
        )

    def render_storyboard(
        self,
        storyboard: Storyboard,
        *,
        product_images: list[ProductImage] | None = None,
        seed: int = 0,
        output_path: Path | None,
        thumbnail_path: Path | None = None,
        audio: Literal["bed", "none"] | Path = "bed",
        num_inference_steps: int | None = None,
        request_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        on_fragment: FragmentCallback | None = None,
        started: float | None = None,
        understand_s: float = 0.0,
        speed_profile: SpeedProfileName | None = None,
        step_cache: StepCacheMethod | None = None,
    ) -> VideoResult:
        """Generate, render and compose a planned storyboard (the production driver on local stages)."""
        started = time.perf_counter() if started is None else started
        # 1. Check everything before any model work, so bad input costs nothing; a step cache this
        #    call asks for is measured by the fidelity gate now (refused below its floor).
        self.generator.check_inputs(storyboard, num_inference_steps)
        settings = self.generator.gated(
            self.generator.settings(num_inference_steps, None, speed_profile, step_cache)
        )
        order = ProductionOrder(
            request_id=request_id or uuid.uuid4().hex,
            storyboard=storyboard,
            product_images=product_images or [],
            seed=seed,
            audio=audio,
            num_inference_steps=num_inference_steps,
            speed_profile=speed_profile,
            step_cache=step_cache,
        )

        # 2. Drive the production on this process's stages, handing fragments and progress to the
        #    callbacks as they come.
        async def drive() -> Produced:
            events = produce(
                order,
                LocalLatentSource(self.generator),
                LocalFrameRenderer(self.renderer, self._render_thread),
                self.compositor,
                mp4_path=output_path,
                thumbnail_path=thumbnail_path,
                started=started,
                understand_s=understand_s,
                quality=self.config.quality,
            )
            async for event in events:
                if isinstance(event, Produced):
                    return event
                if isinstance(event, Fragment):
                    if on_fragment is not None:
                        on_fragment(event.data)
                elif on_progress is not None:
                    on_progress(event)
            raise RuntimeError("the production ended without a video")  # produce() always ends with one

        produced = asyncio.run(drive())

        # 3. The video and where its time went.
        return VideoResult(
            request_id=order.request_id,
            storyboard=storyboard,
            compose=produced.compose,
            timings=produced.timings,
            num_inference_steps=settings.num_inference_steps,
            fragment_count=produced.fragment_count,
            per_shot_denoise_s=produced.shot_denoise_s,
            quality=produced.quality,
        )
