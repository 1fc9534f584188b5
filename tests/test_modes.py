"""Video modes: tutorial (numbered how-to steps) and process (how it is made and shipped), planned by the
template and the LLM planner's schema, checked by the advertising rules, and drawn into the video: the
decoded frames carry each step's number."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from pydantic import ValidationError

from shopreel.pipelines.compliance import ComplianceError
from shopreel.pipelines.config import GenerateConfig, PipelineConfig, PlannerConfig
from shopreel.pipelines.overlays import OverlayPainter
from shopreel.pipelines.pipeline import ProductVideoPipeline
from shopreel.pipelines.types import ProductBrief, ShotKind, Storyboard, Transition
from shopreel.pipelines.understand import (
    LLMPlanner,
    TemplatePlanner,
    build_planner,
    draft_to_storyboard,
    parse_llm_draft,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TUTORIAL = {
    "title": "Trail bottle",
    "category": "water bottle",
    "mode": "tutorial",
    "steps": ["Unscrew the lid", "Rinse with warm water", "Dry it upside down"],
    "size": "128x128",
    "fps": 8,
    "duration_s": 6,
}
PROCESS_ZH = {
    "title": "保温杯",
    "category": "水杯",
    "language": "zh",
    "mode": "process",
    "steps": ["精选不锈钢", "激光焊接", "真空检测", "打包发货"],
    "price": "89",
    "size": "128x128",
    "fps": 8,
    "duration_s": 8,
}


def _brief(fields: dict, **overrides) -> ProductBrief:
    return ProductBrief.model_validate({**fields, **overrides})


def _steps(storyboard: Storyboard) -> list[tuple[int | None, str]]:
    return [(shot.step_number, shot.caption) for shot in storyboard.shots if shot.kind == ShotKind.step]


# --- planning ------------------------------------------------------------------------------------


def test_a_tutorial_is_an_opening_shot_then_one_numbered_shot_per_step():
    storyboard = TemplatePlanner().plan(_brief(TUTORIAL))
    assert storyboard.mode == "tutorial"
    assert [shot.kind for shot in storyboard.shots] == [ShotKind.hook] + [ShotKind.step] * 3
    assert storyboard.shots[0].caption == "How to use Trail bottle"
    assert _steps(storyboard) == [
        (1, "Unscrew the lid"),
        (2, "Rinse with warm water"),
        (3, "Dry it upside down"),
    ]
    # Cuts only: a crossfade would show two steps' captions at once.
    assert all(shot.transition == Transition.cut for shot in storyboard.shots)
    assert all(shot.prompt.startswith("How-to video") for shot in storyboard.shots)
    assert "hands demonstrating step 2: Rinse with warm water" in storyboard.shots[2].prompt
    assert TemplatePlanner().plan(_brief(TUTORIAL)) == storyboard  # deterministic


def test_a_process_video_ends_with_the_price_and_speaks_the_briefs_language():
    storyboard = TemplatePlanner().plan(_brief(PROCESS_ZH))
    assert [shot.kind for shot in storyboard.shots] == [ShotKind.hook] + [ShotKind.step] * 4 + [ShotKind.cta]
    assert storyboard.shots[0].caption == "保温杯 诞生记"
    assert _steps(storyboard) == list(enumerate(PROCESS_ZH["steps"], start=1))
    assert storyboard.shots[-1].caption == "到手价 ¥89" and storyboard.aigc_label == "AI生成"
    assert storyboard.shots[1].prompt.startswith("Behind-the-scenes documentary")


def test_no_step_is_dropped_for_a_short_video_and_an_impossible_one_says_how_long_it_must_be():
    short = TemplatePlanner().plan(_brief(PROCESS_ZH, duration_s=3))
    assert _steps(short) == list(enumerate(PROCESS_ZH["steps"], start=1))  # opening/closing went first
    ten = [f"Step text {n}" for n in range(10)]
    with pytest.raises(ValueError, match=r"10 steps do not fit 2 s at 8 fps.*duration_s >= 6\.2"):
        TemplatePlanner().plan(_brief(TUTORIAL, steps=ten, duration_s=2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": []}, "mode 'tutorial' needs steps"),
        ({"mode": "showcase"}, "steps are for mode 'tutorial' or 'process'"),
        ({"steps": ["Rinse", "  "]}, "step 2 must not be blank"),
        ({"steps": [f"s{n}" for n in range(11)]}, "at most 10 items"),
        ({"mode": "unboxing"}, "'showcase', 'tutorial' or 'process'"),
    ],
)
def test_bad_modes_and_steps_are_refused_naming_the_problem(overrides, message):
    with pytest.raises(ValidationError, match=message):
        _brief(TUTORIAL, **overrides)


def test_steps_go_through_the_advertising_rules():
    claims = ["Rinse with the best soap", "治疗 your aches", "Dry it"]
    rewritten = build_planner(PlannerConfig()).plan(_brief(TUTORIAL, steps=claims, compliance="rewrite"))
    assert _steps(rewritten) == [(1, "Rinse with a great soap"), (2, "your aches"), (3, "Dry it")]
    assert {(f.field, f.term) for f in rewritten.compliance} >= {
        ("brief.steps[0]", "the best"),
        ("brief.steps[1]", "治疗"),
    }
    with pytest.raises(ComplianceError) as refused:
        build_planner(PlannerConfig()).plan(_brief(TUTORIAL, steps=claims, compliance="reject"))
    assert [f.field for f in refused.value.findings] == ["brief.steps[0]", "brief.steps[1]"]
    # A step that is nothing but a claim cannot be dropped (the numbers would lie): refused.
    with pytest.raises(ComplianceError, match=r"brief\.steps\[1\]: '第一'"):
        build_planner(PlannerConfig()).plan(_brief(TUTORIAL, steps=["Rinse", "第一"], compliance="rewrite"))


def test_the_llm_schema_carries_steps_and_a_draft_that_skips_one_falls_back():
    brief = _brief(TUTORIAL)
    shots = [{"kind": "hook", "caption": "Clean it right", "prompt": "a bottle on a sink"}] + [
        {"kind": "step", "step_number": n, "caption": f"Step {n}", "prompt": f"hands, step {n}"}
        for n in (1, 2, 3)
    ]
    draft = parse_llm_draft(json.dumps({"shots": shots}))
    storyboard = draft_to_storyboard(draft, brief, None, None, PlannerConfig())
    assert storyboard.planner == "llm" and _steps(storyboard) == [(1, "Step 1"), (2, "Step 2"), (3, "Step 3")]
    skipped = parse_llm_draft(json.dumps({"shots": shots[:2] + shots[3:]}))
    with pytest.raises(ValueError, match=r"step shots \[1, 3\], the brief 3 steps"):
        draft_to_storyboard(skipped, brief, None, None, PlannerConfig())


def test_the_llm_planner_asks_for_the_steps_and_falls_back_to_the_template(tmp_path, monkeypatch, caplog):
    planner = LLMPlanner(PlannerConfig(kind="llm", llm_path=tmp_path))
    asked: list[str] = []

    def reply(messages):
        asked.append(messages[0]["content"])
        return json.dumps({"shots": [{"kind": "hook", "caption": "x", "prompt": "y"}]})  # no steps

    monkeypatch.setattr(planner, "_generate", reply)
    with caplog.at_level(logging.WARNING, logger="shopreel.pipelines.understand"):
        storyboard = planner.plan(_brief(TUTORIAL))
    assert "one step shot per entry of brief.steps" in asked[0] and "step_number 1 to 3" in asked[0]
    assert storyboard.planner.startswith("template (llm fallback: draft has step shots [], the brief 3 steps")
    assert _steps(storyboard) == _steps(TemplatePlanner().plan(_brief(TUTORIAL)))


@pytest.mark.parametrize("name", ["brief_tutorial.json", "brief_process_zh.json"])
def test_the_example_briefs_plan(name):
    brief = ProductBrief.model_validate(
        {**json.loads((EXAMPLES / name).read_text()), "size": "128x128", "fps": 8}
    )
    storyboard = build_planner(PlannerConfig()).plan(brief)
    assert _steps(storyboard) == list(enumerate(brief.steps, start=1)) and storyboard.mode == brief.mode


# --- the video: each step's number is in its frames ----------------------------------------------


def _decoded(mp4: Path) -> np.ndarray:
    with av.open(io.BytesIO(mp4.read_bytes())) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("fields", [TUTORIAL, PROCESS_ZH], ids=["tutorial", "process"])
def test_the_decoded_video_shows_each_steps_number(tiny_model, tmp_path, fields):
    pipeline = ProductVideoPipeline(
        PipelineConfig(generate=GenerateConfig(num_inference_steps=2)), model=tiny_model
    )
    brief = _brief(fields, size="160x160")
    result = pipeline.run(brief, output_path=tmp_path / "steps.mp4", audio="none")
    storyboard = result.storyboard
    frames = _decoded(tmp_path / "steps.mp4")
    assert len(frames) == storyboard.total_frames

    painter = OverlayPainter(storyboard, [], None)
    left, top, right, bottom = painter.step_badge_box()
    step_shots = [shot for shot in storyboard.shots if shot.kind == ShotKind.step]
    # What the badge looks like for each number: opaque pixels, the same whatever the model drew below.
    looks, opaque = {}, None
    for number in range(1, len(step_shots) + 1):
        overlay = painter.shot_overlay(step_shots[0].model_copy(update={"step_number": number}))
        on_black = np.zeros((1, storyboard.height, storyboard.width, 3), np.uint8)
        on_white = np.full_like(on_black, 255)
        overlay.apply(on_black)
        overlay.apply(on_white)
        looks[number] = on_black[0, top:bottom, left:right].astype(np.float32)
        # Pixels the badge covers whatever is below it (the disc, not the box's corners).
        covered = (on_black == on_white).all(axis=-1)[0, top:bottom, left:right]
        opaque = covered if opaque is None else opaque & covered
    assert opaque is not None and opaque.mean() > 0.6
    stack = np.stack(list(looks.values()))
    digits = opaque & (stack.max(axis=0) != stack.min(axis=0)).any(axis=-1)  # where the numbers differ
    assert digits.sum() > 20

    start, read = 0, []
    for shot in storyboard.shots:
        middle = frames[start + shot.num_frames // 2, top:bottom, left:right].astype(np.float32)
        errors = {number: float(np.abs(middle - look)[digits].mean()) for number, look in looks.items()}
        best, runner_up = sorted(errors, key=errors.__getitem__)[:2]
        read.append((shot.step_number, best, round(errors[best], 1), round(errors[runner_up], 1)))
        start += shot.num_frames - shot.transition_frames
    # Each step shot's badge matches its own number best, and closely; the other shots have none.
    steps = [row for row in read if row[0] is not None]
    others = [row for row in read if row[0] is None]
    assert len(steps) == len(brief.steps) and len(read) == len(storyboard.shots), read
    assert [best for _, best, _, _ in steps] == [number for number, _, _, _ in steps], read
    assert all(error < 0.6 * other for _, _, error, other in steps), read  # told apart with a margin
    assert min(error for _, _, error, _ in others) > 3 * max(error for _, _, error, _ in steps), read
