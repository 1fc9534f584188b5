"""Calibration data for quantised renderers: latents the generator really produces.

Static INT8 needs activation ranges of what the decoder will see in production, so calibration
latents come from the same planner and generator that serve traffic (product briefs planned into
shots, each shot denoised), never from random noise, whose statistics differ from a denoised
video's. Held-out latents for the fidelity check come from other seeds than calibration ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import GenerateConfig, PlannerConfig
from .generate import LatentGenerator
from .presets import LoadedModel
from .types import ProductBrief, VideoSize
from .understand import TemplatePlanner


@dataclass(frozen=True)
class CalibrationSet:
    """One latent clip ``[1, C, T, h, w]`` per planned shot, all of one spatial size."""

    calibration: list[torch.Tensor]
    held_out: list[torch.Tensor]

    @property
    def latent_hw(self) -> tuple[int, int]:
        clip = self.calibration[0]
        return clip.shape[3], clip.shape[4]


def shot_latents(
    model: LoadedModel,
    briefs: Sequence[ProductBrief],
    *,
    size: VideoSize,
    seeds: Sequence[int],
    num_inference_steps: int | None = None,
) -> list[torch.Tensor]:
    """Every shot of every brief, planned at ``size`` and denoised once per seed."""
    planner = TemplatePlanner(PlannerConfig())
    generator = LatentGenerator(model, GenerateConfig())
    clips: list[torch.Tensor] = []
    for brief_index, brief in enumerate(briefs):
        for seed in seeds:
            fps = brief.fps or model.preset.default_fps
            storyboard = planner.plan(brief.model_copy(update={"size": size, "seed": seed, "fps": fps}))
            chunks = generator.generate(
                storyboard,
                request_id=f"calibration-{brief_index}-{seed}",
                num_inference_steps=num_inference_steps,
            )
            per_shot: dict[int, list[torch.Tensor]] = {}
            for chunk in chunks:
                per_shot.setdefault(chunk.shot_index, []).append(torch.as_tensor(chunk.latents))
            clips.extend(torch.cat(parts, dim=2) for _, parts in sorted(per_shot.items()))
    return clips


def calibration_set(
    model: LoadedModel,
    briefs: Sequence[ProductBrief],
    *,
    size: VideoSize,
    calibration_seeds: Sequence[int] = (1, 2),
    held_out_seeds: Sequence[int] = (1001,),
    num_inference_steps: int | None = None,
) -> CalibrationSet:
    """Calibration and held-out shot latents from disjoint seeds."""
    if set(calibration_seeds) & set(held_out_seeds):
        raise ValueError("calibration and held-out seeds must differ")
    if not briefs:
        raise ValueError("calibration needs at least one product brief")

    def clips(seeds: Sequence[int]) -> list[torch.Tensor]:
        return shot_latents(model, briefs, size=size, seeds=seeds, num_inference_steps=num_inference_steps)

    return CalibrationSet(calibration=clips(calibration_seeds), held_out=clips(held_out_seeds))
