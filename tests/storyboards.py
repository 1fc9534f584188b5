"""Test helpers shared by several test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations


def make_storyboard(shot_frames=(9, 13), width=64, height=64, fps=8, crossfade=0, seed=0, **overrides):
    """A small valid storyboard built directly from the types (no planner involved); ``seed`` varies the
    shots' seeds and prompts, for several different videos of one shape."""
    from shopreel.pipelines.types import Shot, ShotKind, Storyboard, Transition

    shots = []
    for index, frames in enumerate(shot_frames):
        last = index == len(shot_frames) - 1
        kind = ShotKind.hook if index == 0 else (ShotKind.cta if last else ShotKind.feature)
        fade = 0 if last else crossfade
        shots.append(
            Shot(
                index=index,
                kind=kind,
                prompt=f"product shot {index}, studio light" + (f", take {seed}" if seed else ""),
                caption=f"caption {index}",
                num_frames=frames,
                transition=Transition.crossfade if fade else Transition.cut,
                transition_frames=fade,
                seed=index + 1000 * seed,
            )
        )
    fields = dict(
        title="Test product",
        language="en",
        width=width,
        height=height,
        fps=fps,
        shots=shots,
        price_text="¥99",
        cta_text="Shop now",
        aigc_label="AI-generated",
    )
    fields.update(overrides)
    return Storyboard(**fields)
