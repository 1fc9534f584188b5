"""ProductVideoPipeline: the four stages chained in one process.

This is what the CLI runs and the baseline the serving cluster is benchmarked against. Stages
stream into each other exactly as they do across Ray Serve deployments: every LatentChunk is
rendered as soon as the generator yields it, and every FrameChunk goes straight to the compositor,
whose fMP4 bytes go to ``on_fragment`` while later shots are still denoising.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .compose import ComposeResult, Compositor
from .config import PipelineConfig
from .generate import LatentGenerator
from .presets import LoadedModel, load_model
from .render import StreamingRenderer
from .types import Campaign, ProductBrief, ShopperProfile, StageTimings, Storyboard
from .understand import build_planner


@dataclass(frozen=True)
class Progress:
    """One step of work done: ``stage`` is 'denoise' (steps) or 'frames' (frames composed)."""

    stage: Literal["denoise", "frames"]
    done: int
    total: int


ProgressCallback = Callable[[Progress], None]
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

    @property
    def frames_per_s(self) -> float:
        return self.compose.num_frames / self.timings.total_s if self.timings.total_s else 0.0


class ProductVideoPipeline:
    """brief -> storyboard -> latents -> frames -> MP4, in process."""

    def __init__(self, config: PipelineConfig | None = None, *, model: LoadedModel | None = None) -> None:
        self.config = config or PipelineConfig()
        self.model = model or load_model(self.config.model)
        self.planner = build_planner(self.config.planner)
        self.generator = LatentGenerator(self.model, self.config.generate)
        self.renderer = StreamingRenderer(self.model.vae, self.model.device, self.config.render)
        self.compositor = Compositor(self.config.compose)

    def with_preset_defaults(self, brief: ProductBrief) -> ProductBrief:
        """Fill size/fps the brief left open with the model preset's defaults."""
        preset = self.model.preset
        return brief.model_copy(
            update={"size": brief.size or preset.default_size, "fps": brief.fps or preset.default_fps}
        )

    def plan(
        self, brief: ProductBrief, profile: ShopperProfile | None = None, campaign: Campaign | None = None
    ) -> Storyboard:
        return self.planner.plan(self.with_preset_defaults(brief), profile, campaign)

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
    ) -> VideoResult:
        started = time.perf_counter()
        storyboard = self.plan(brief, profile, campaign)
        understand_s = time.perf_counter() - started
        return self.render_storyboard(
            storyboard,
            product_images=[image.to_pil() for image in brief.images],
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
        )

    def render_storyboard(
        self,
        storyboard: Storyboard,
        *,
        product_images: list | None = None,
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
    ) -> VideoResult:
        """Generate, render and compose a planned storyboard."""
        started = time.perf_counter() if started is None else started
        request_id = request_id or uuid.uuid4().hex
        steps = self.generator.settings(num_inference_steps).num_inference_steps
        timings = StageTimings(understand_s=understand_s)
        total_steps = steps * len(storyboard.shots)
        fragment_count = 0
        per_shot_denoise_s: list[float] = []

        # 1. Check everything before any model work, so bad input costs nothing.
        self.generator.check_inputs(storyboard, num_inference_steps)
        session = self.compositor.open(
            storyboard, request_id=request_id, product_images=product_images or [], audio=audio, seed=seed
        )

        def emit(fragments: list[bytes]) -> None:
            nonlocal fragment_count
            for fragment in fragments:
                if timings.first_fragment_s is None:
                    timings.first_fragment_s = time.perf_counter() - started
                fragment_count += 1
                if on_fragment is not None:
                    on_fragment(fragment)

        def on_step(shot_index: int, step: int, _steps: int) -> None:
            if on_progress is not None:
                on_progress(Progress("denoise", shot_index * steps + step, total_steps))

        try:
            # 2. Stream: each latent chunk is decoded and composed as soon as it exists.
            frames_done = 0
            chunks = self.generator.generate(
                storyboard, request_id=request_id, num_inference_steps=num_inference_steps, on_step=on_step
            )
            for latent_chunk in chunks:
                denoise_s = latent_chunk.timings.get("denoise_s", 0.0)
                if latent_chunk.chunk_index == 0:
                    per_shot_denoise_s.append(denoise_s)
                timings.generate_s += denoise_s
                frame_chunk = self.renderer.render(latent_chunk)
                timings.render_s += frame_chunk.timings["decode_s"]
                emit(session.push(frame_chunk))
                frames_done += len(frame_chunk.frames)
                if on_progress is not None:
                    on_progress(Progress("frames", frames_done, sum(s.num_frames for s in storyboard.shots)))
            # 3. Flush the encoder; write the download MP4 and thumbnail atomically.
            tail, result = session.finish(mp4_path=output_path, thumbnail_path=thumbnail_path)
            emit(tail)
        except BaseException:
            session.close()
            self.renderer.release(request_id)
            raise
        timings.compose_s = result.encode_s
        timings.total_s = time.perf_counter() - started
        return VideoResult(
            request_id=request_id,
            storyboard=storyboard,
            compose=result,
            timings=timings,
            num_inference_steps=steps,
            fragment_count=fragment_count,
            per_shot_denoise_s=per_shot_denoise_s,
        )
