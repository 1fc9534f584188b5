"""Advertising-law checks: reject and rewrite on Chinese and English briefs, prohibited goods, and the
planner's own output (an LLM's captions) rewritten before any model work."""

from __future__ import annotations

import pickle
from decimal import Decimal

import pytest

from shopreel.pipelines.compliance import ComplianceError, CompliantPlanner, Rules
from shopreel.pipelines.config import ComplianceConfig, PlannerConfig
from shopreel.pipelines.types import ProductBrief, Storyboard, VideoSize
from shopreel.pipelines.understand import TemplatePlanner, build_planner

SIZE = {"size": VideoSize(width=128, height=128), "fps": 8}
ZH = {
    "title": "最好的保温杯",
    "category": "水杯",
    "selling_points": ["国家级工艺，保温12小时", "治疗失眠", "防漏杯盖"],
    "attributes": {"容量": "500毫升"},
    "price": Decimal("89"),
    "language": "zh",
}
EN = {
    "title": "The best thermo mug",
    "selling_points": ["#1 choice of baristas", "Cures cold hands", "Leak-proof lid"],
    "attributes": {"finish": "100% stainless steel"},
    "language": "en",
}


def _brief(fields: dict, **overrides) -> ProductBrief:
    return ProductBrief(**{**fields, **SIZE, **overrides})


def _visible_texts(storyboard: Storyboard) -> list[str]:
    return [shot.caption for shot in storyboard.shots] + [storyboard.cta_text, storyboard.badge_text or ""]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            ZH,
            [
                ("brief.title", "最好", "absolute_claim"),
                ("brief.selling_points[0]", "国家级", "absolute_claim"),
                ("brief.selling_points[1]", "治疗", "medical_claim"),
            ],
        ),
        (
            EN,
            [
                ("brief.title", "The best", "absolute_claim"),
                ("brief.selling_points[0]", "#1", "absolute_claim"),
                ("brief.selling_points[1]", "Cures", "medical_claim"),
                ("brief.attributes.finish", "100%", "absolute_claim"),
            ],
        ),
    ],
    ids=["zh", "en"],
)
def test_reject_names_every_term_and_field(fields, expected):
    planner = build_planner(PlannerConfig())
    with pytest.raises(ComplianceError) as refused:
        planner.plan(_brief(fields))
    assert [(f.field, f.term, f.rule) for f in refused.value.findings] == expected
    assert isinstance(refused.value, ValueError)  # the API answers it as a 400
    assert pickle.loads(pickle.dumps(refused.value)).findings == refused.value.findings  # Ray ships it
    for field, term, _ in expected:
        assert f"{field}: {term!r}" in str(refused.value)


def test_rewrite_plans_a_compliant_video_and_reports_what_changed():
    storyboard = build_planner(PlannerConfig()).plan(_brief(ZH, compliance="rewrite"))
    assert storyboard.title == "很好的保温杯"
    texts = " ".join(_visible_texts(storyboard))
    for term in ("最", "国家级", "治疗", "失眠"):  # a medical claim takes its whole point with it
        assert term not in texts, term
    assert "工艺，保温12小时" in texts and "防漏杯盖" in texts
    found = {(f.field, f.term, f.replacement) for f in storyboard.compliance}
    assert found == {
        ("brief.title", "最好", "很好"),
        ("brief.selling_points[0]", "国家级", ""),
        ("brief.selling_points[1]", "治疗", ""),
    }

    english = build_planner(PlannerConfig()).plan(_brief(EN, compliance="rewrite"))
    assert english.title == "a great thermo mug"
    texts = " ".join(_visible_texts(english)).lower()
    assert not any(term in texts for term in ("best", "#1", "cure", "100%"))
    assert "leak-proof lid" in texts


def test_the_server_default_policy_applies_when_the_brief_names_none():
    rewrite = build_planner(PlannerConfig(), ComplianceConfig(default_policy="rewrite"))
    assert rewrite.plan(_brief(EN)).compliance  # rewritten, not refused
    with pytest.raises(ComplianceError):
        rewrite.plan(_brief(EN, compliance="reject"))  # the request's own policy wins
    off = build_planner(PlannerConfig(), ComplianceConfig(enabled=False))
    assert off.plan(_brief(EN)).title == "The best thermo mug"


@pytest.mark.parametrize(
    "overrides",
    [{"category": "电子烟"}, {"title": "Menthol cigarettes, carton"}, {"category": "firearms"}],
)
def test_prohibited_goods_are_refused_under_either_policy(overrides):
    for policy in ("reject", "rewrite"):
        with pytest.raises(ComplianceError, match="prohibited goods"):
            build_planner(PlannerConfig()).plan(_brief(EN, compliance=policy, **overrides))


def test_ordinary_words_are_not_claims():
    rules = Rules.from_config(ComplianceConfig())
    for text in ("Dog treats with chicken", "Bestow a gift", "Gunmetal grey finish", "Healthy snacks 2x"):
        assert rules.review(text, "t", rewrite=False)[1] == [], text
    assert rules.review("best", "t", rewrite=False)[1][0].term == "best"
    assert rules.review("采用100%纯棉", "t", rewrite=True)[0] == "采用纯棉"  # English terms in Chinese text
    extra = Rules.from_config(
        ComplianceConfig(extra_banned_terms=["爆款"], extra_prohibited_goods=["fireworks"])
    )
    assert extra.review("年度爆款", "t", rewrite=True)[0] == "年度"
    assert extra.prohibited.search("Fireworks kit") is not None


class _Writes:
    """A planner whose output carries claims, as an LLM's might (the merchant's brief has none)."""

    def plan(self, brief, profile=None, campaign=None):
        storyboard = TemplatePlanner().plan(brief, profile, campaign)
        shots = [shot.model_copy(update={"caption": "全网最低价，第一品牌"}) for shot in storyboard.shots]
        return storyboard.model_copy(update={"shots": shots, "cta_text": "The ultimate deal"})


def test_what_the_planner_writes_is_rewritten_even_under_reject():
    planner = CompliantPlanner(_Writes(), ComplianceConfig())
    storyboard = planner.plan(_brief({"title": "Thermo Mug", "language": "en"}, compliance="reject"))
    assert all(shot.caption == "很低价，品牌" for shot in storyboard.shots)
    assert storyboard.cta_text == "The premium deal"
    fields = {f.field for f in storyboard.compliance}
    assert "storyboard.shots[0].caption" in fields and "storyboard.cta_text" in fields
    Storyboard.model_validate(storyboard.model_dump())  # still a valid storyboard
