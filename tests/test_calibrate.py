"""Calibration latents come from the planner and generator, one clip per planned shot."""

import json
from pathlib import Path

import pytest
import torch

from shopreel.pipelines.calibrate import calibration_set, shot_latents
from shopreel.pipelines.types import ProductBrief, VideoSize

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _brief() -> ProductBrief:
    data = json.loads((EXAMPLES / "brief_en.json").read_text())
    data.pop("images")
    return ProductBrief.model_validate({**data, "duration_s": 2})


def test_one_clip_per_planned_shot_from_the_generator(tiny_model):
    size = VideoSize(width=64, height=64)
    clips = shot_latents(tiny_model, [_brief()], size=size, seeds=[3], num_inference_steps=1)
    assert clips and all(clip.shape[:2] == (1, 16) and clip.shape[3:] == (8, 8) for clip in clips)
    assert all(clip.shape[2] >= 2 for clip in clips)
    again = shot_latents(tiny_model, [_brief()], size=size, seeds=[3], num_inference_steps=1)
    other = shot_latents(tiny_model, [_brief()], size=size, seeds=[4], num_inference_steps=1)
    assert all(torch.equal(a, b) for a, b in zip(clips, again, strict=True))  # seeded
    assert not torch.equal(clips[0], other[0])
    assert clips[0].std() > 0.1  # denoised latents, not zeros


def test_held_out_seeds_must_differ(tiny_model):
    with pytest.raises(ValueError, match="must differ"):
        calibration_set(
            tiny_model,
            [_brief()],
            size=VideoSize(width=64, height=64),
            calibration_seeds=[1],
            held_out_seeds=[1],
        )
    with pytest.raises(ValueError, match="at least one product brief"):
        calibration_set(tiny_model, [], size=VideoSize(width=64, height=64))
