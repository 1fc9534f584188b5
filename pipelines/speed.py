"""Speed profiles: how many denoising steps, which scheduler and which step cache a request gets.

A profile is a named trade of speed for fidelity that the API, the config and the sales-event
calendar pick by name (``fast`` during an event's peak). Steps are a share of the model's default
(30 for a Wan 2.1 checkpoint: quality 30, balanced 20, fast 12); a request's own
``num_inference_steps`` wins over the profile's count. The scheduler is one of Wan's flow-matching
solvers, built from the checkpoint's own scheduler config so that its ``flow_shift`` (3.0 at 480p,
5.0 at 720p) carries over. A profile's step cache still passes the fidelity gate (step_cache.py).

| profile  | steps     | scheduler                      | step cache                    |
|----------|-----------|--------------------------------|-------------------------------|
| quality  | 100%      | the checkpoint's (UniPC for Wan) | the config's (default none) |
| balanced | 67%       | UniPC, 2nd order (bh2)         | first_block, threshold 0.05   |
| fast     | 40%, >= 2 | DPM-Solver++ 2M                | first_block, threshold 0.08   |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .types import SpeedProfileName, StepCacheMethod

SchedulerName = Literal["default", "unipc", "dpm++", "euler"]


@dataclass(frozen=True)
class SpeedProfile:
    name: SpeedProfileName
    description: str
    step_fraction: float  # of the model's (or config's) default steps
    min_steps: int
    scheduler: SchedulerName
    step_cache: StepCacheMethod | None  # None: the config's method
    step_cache_overrides: tuple[tuple[str, float], ...] = ()  # StepCacheConfig fields the profile sets

    def steps(self, default_steps: int) -> int:
        """The profile's step count for a model whose default is ``default_steps`` (never more)."""
        return min(default_steps, max(self.min_steps, round(default_steps * self.step_fraction)))


SPEED_PROFILES: dict[str, SpeedProfile] = {
    profile.name: profile
    for profile in (
        SpeedProfile(
            "quality",
            "the model's default steps and scheduler; step cache as configured (default none)",
            step_fraction=1.0,
            min_steps=1,
            scheduler="default",
            step_cache=None,
        ),
        SpeedProfile(
            "balanced",
            "two thirds of the steps (UniPC), FirstBlockCache at 0.05",
            step_fraction=0.67,
            min_steps=2,
            scheduler="unipc",
            step_cache="first_block",
            step_cache_overrides=(("first_block_threshold", 0.05),),
        ),
        SpeedProfile(
            "fast",
            "40% of the steps (DPM-Solver++ 2M), FirstBlockCache at 0.08: sales-event peaks",
            step_fraction=0.4,
            min_steps=2,
            scheduler="dpm++",
            step_cache="first_block",
            step_cache_overrides=(("first_block_threshold", 0.08),),
        ),
    )
}


def speed_profile(name: str) -> SpeedProfile:
    try:
        return SPEED_PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown speed profile {name!r}; profiles are {', '.join(SPEED_PROFILES)}"
        ) from None


def build_scheduler(name: SchedulerName, base: Any) -> Any:
    """A flow-matching scheduler for Wan, keeping ``base``'s flow shift and training timesteps.

    ``default`` returns ``base`` itself (the checkpoint's own scheduler, UniPC for Wan 2.1).
    """
    if name == "default":
        return base
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    config = dict(base.config)
    shift = float(config.get("flow_shift") or config.get("shift") or 3.0)
    train_steps = int(config.get("num_train_timesteps", 1000))
    if name == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=train_steps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
        )
    if name == "dpm++":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=train_steps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=train_steps, shift=shift)
    raise ValueError(f"unknown scheduler {name!r}")
