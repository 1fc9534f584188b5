"""Ad-law compliance before any model work: absolute and medical claims, prohibited goods.

China's Advertising Law (Art. 9, 17, 28) forbids absolute claims (最/第一/国家级/顶级 ...), efficacy or
medical claims for ordinary goods, and advertising some goods at all; platforms apply the same rules
to English listings (no "best", "#1", "cures"). ``CompliantPlanner`` wraps any planner:

1. the merchant's brief (title, selling points, attribute values, steps) is checked under the request's
   policy: ``reject`` raises ``ComplianceError`` (a ``ValueError``: HTTP 400) naming every offending
   term and field; ``rewrite`` replaces each term by a compliant wording (or drops it) and records it;
2. prohibited goods (category or title) are refused under either policy: no wording makes them legal;
3. the storyboard the planner wrote (captions, call to action, badge: an LLM's output included) is
   checked the same way and always rewritten, since the merchant did not write it.

Every finding, rewritten or not, is kept in ``Storyboard.compliance`` (the job object shows it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

from .config import ComplianceConfig
from .types import Campaign, ComplianceFinding, ProductBrief, ShopperProfile, Storyboard

Rule = Literal["absolute_claim", "medical_claim", "prohibited_goods"]

# term -> compliant wording ("" drops it). Chinese terms match inside words; English ones as words.
ZH_ABSOLUTE: dict[str, str] = {
    "国家级": "",
    "世界级": "",
    "顶级": "高品质",
    "顶尖": "优质",
    "第一": "",
    "唯一": "",
    "首个": "",
    "首选": "推荐",
    "独家": "",
    "极致": "出色",
    "万能": "多用途",
    "史上": "",
    "全网": "",
    "绝对": "",
    "百分之百": "",
}
ZH_SUPERLATIVE = re.compile(r"最([\u4e00-\u9fff])?")  # 最好, 最佳, 最低价 ...: any 最-compound
ZH_SUPERLATIVE_REWRITES = {"最好": "很好", "最佳": "优质", "最新": "全新", "最大": "超大", "最强": "强劲"}
ZH_MEDICAL: dict[str, str] = dict.fromkeys(
    ("药到病除", "治疗", "治愈", "疗效", "根治", "消炎", "抗癌", "防癌", "降血压", "降血糖", "减肥"), ""
)
EN_ABSOLUTE: dict[str, str] = {
    "world's first": "new",
    "world-class": "high-quality",
    "number one": "",
    "no. 1": "",
    "#1": "",
    "the best": "a great",
    "best": "great",
    "the only": "a",
    "unbeatable": "great",
    "ultimate": "premium",
    "perfect": "great",
    "guaranteed": "",
    "100%": "",
}
EN_MEDICAL: dict[str, str] = dict.fromkeys(
    ("clinically proven", "anti-cancer", "cures", "cure", "cured", "heals", "heal"), ""
)
PROHIBITED_GOODS = (
    "tobacco", "cigarette", "cigarettes", "e-cigarette", "e-cigarettes", "vape", "vapes",
    "prescription drug", "prescription drugs", "firearm", "firearms", "gun", "guns", "ammunition",
    "explosive", "explosives",
    "烟草", "香烟", "卷烟", "电子烟", "处方药", "枪支", "弹药", "爆炸物", "管制刀具",
)  # fmt: skip


class ComplianceError(ValueError):
    """The brief breaks the rules under the ``reject`` policy (or names prohibited goods)."""

    def __init__(self, findings: list[ComplianceFinding]) -> None:
        self.findings = findings
        listed = "; ".join(f"{f.field}: {f.term!r} ({f.rule.replace('_', ' ')})" for f in findings)
        super().__init__(f"the brief does not comply with advertising rules: {listed}")

    def __reduce__(self) -> tuple[type[ComplianceError], tuple[list[ComplianceFinding]]]:
        return ComplianceError, (self.findings,)  # crosses from the planner replica with its findings


def _word(term: str) -> str:
    """An English term as a whole word ('#1' and '100%' too), also inside Chinese text ('采用100%纯棉')."""
    return rf"(?<![A-Za-z0-9#]){re.escape(term)}(?![A-Za-z0-9%])"


@dataclass(frozen=True)
class Rules:
    """The compiled term lists: each pattern with its rule and a function giving its rewrite."""

    patterns: tuple[tuple[re.Pattern[str], Rule, dict[str, str]], ...]
    prohibited: re.Pattern[str]

    @classmethod
    def from_config(cls, config: ComplianceConfig) -> Rules:
        def alternation(terms: dict[str, str], english: bool) -> re.Pattern[str]:
            ordered = sorted(terms, key=len, reverse=True)  # longest first: "the best" before "best"
            parts = [_word(term) if english else re.escape(term) for term in ordered]
            return re.compile("|".join(parts), re.IGNORECASE)

        extra = dict.fromkeys(config.extra_banned_terms, "")
        patterns = (
            (ZH_SUPERLATIVE, "absolute_claim", ZH_SUPERLATIVE_REWRITES),
            (alternation({**ZH_ABSOLUTE, **extra}, english=False), "absolute_claim", ZH_ABSOLUTE),
            (alternation(ZH_MEDICAL, english=False), "medical_claim", ZH_MEDICAL),
            (alternation(EN_ABSOLUTE, english=True), "absolute_claim", EN_ABSOLUTE),
            (alternation(EN_MEDICAL, english=True), "medical_claim", EN_MEDICAL),
        )
        goods = [*PROHIBITED_GOODS, *config.extra_prohibited_goods]
        prohibited = re.compile(
            "|".join(re.escape(g) if not g.isascii() else _word(g) for g in goods), re.IGNORECASE
        )
        return cls(patterns, prohibited)  # type: ignore[arg-type]

    def review(self, text: str, field: str, rewrite: bool) -> tuple[str, list[ComplianceFinding]]:
        """``text`` with each offending term rewritten (when ``rewrite``), and what was found."""
        findings: list[ComplianceFinding] = []
        for pattern, rule, rewrites in self.patterns:

            def replace(
                match: re.Match[str],
                rule: Rule = rule,
                rewrites: dict[str, str] = rewrites,
                superlative: bool = pattern is ZH_SUPERLATIVE,
            ) -> str:
                term = match.group(0)
                wording = rewrites.get(term.lower(), rewrites.get(term, ""))
                if superlative and term not in rewrites:
                    wording = "很" + term[1:]  # any other 最X: 很X
                findings.append(ComplianceFinding(field=field, term=term, rule=rule, replacement=wording))
                return wording if rewrite else term

            text = pattern.sub(replace, text)
        return re.sub(r"\s{2,}", " ", text).strip(" ,，、") if rewrite else text, findings


class Planner(Protocol):
    def plan(
        self, brief: ProductBrief, profile: ShopperProfile | None = None, campaign: Campaign | None = None
    ) -> Storyboard: ...


class CompliantPlanner:
    """Checks the brief before planning and the storyboard after it (see the module doc)."""

    def __init__(self, inner: Planner, config: ComplianceConfig) -> None:
        self.inner = inner
        self.config = config
        self.rules = Rules.from_config(config)

    def plan(
        self, brief: ProductBrief, profile: ShopperProfile | None = None, campaign: Campaign | None = None
    ) -> Storyboard:
        if not self.config.enabled:
            return self.inner.plan(brief, profile, campaign)
        brief, findings = self.review_brief(brief)
        storyboard = self.inner.plan(brief, profile, campaign)
        storyboard, written = self.review_storyboard(storyboard)
        return storyboard.model_copy(update={"compliance": findings + written})

    def review_brief(self, brief: ProductBrief) -> tuple[ProductBrief, list[ComplianceFinding]]:
        """The brief as it may be advertised, and what was changed; raises ``ComplianceError``."""
        goods = [
            ComplianceFinding(field=f"brief.{name}", term=match.group(0), rule="prohibited_goods")
            for name, text in (("category", brief.category), ("title", brief.title))
            if (match := self.rules.prohibited.search(text)) is not None
        ]
        if goods:
            raise ComplianceError(goods)
        rewrite = (brief.compliance or self.config.default_policy) == "rewrite"
        findings: list[ComplianceFinding] = []
        title, found = self.rules.review(brief.title, "brief.title", rewrite)
        findings += found
        points: list[str] = []
        for position, point in enumerate(brief.selling_points):
            text, found = self.rules.review(point, f"brief.selling_points[{position}]", rewrite)
            if any(f.rule == "medical_claim" for f in found):
                # No wording makes an efficacy claim safe ("治疗失眠" minus 治疗 still promises sleep).
                found = [f.model_copy(update={"replacement": ""}) for f in found]
                text = ""
            findings += found
            if text:  # a point that was nothing but a claim is dropped
                points.append(text)
        attributes: dict[str, str] = {}
        for key, value in brief.attributes.items():
            text, found = self.rules.review(value, f"brief.attributes.{key}", rewrite)
            findings += found
            if text:
                attributes[key] = text
        steps: list[str] = []
        emptied: list[ComplianceFinding] = []
        for position, step in enumerate(brief.steps):
            text, found = self.rules.review(step, f"brief.steps[{position}]", rewrite)
            findings += found
            steps.append(text)
            if not text:  # a step cannot be dropped: the numbering would lie
                emptied += found
        if findings and not rewrite:
            raise ComplianceError(findings)
        if not findings:
            return brief, []
        if not title:
            raise ComplianceError([f for f in findings if f.field == "brief.title"])  # nothing left to show
        if emptied:
            raise ComplianceError(emptied)
        update = {"title": title, "selling_points": points, "attributes": attributes, "steps": steps}
        return brief.model_copy(update=update), findings

    def review_storyboard(self, storyboard: Storyboard) -> tuple[Storyboard, list[ComplianceFinding]]:
        """Visible texts the planner wrote, always rewritten (the merchant did not write them)."""
        findings: list[ComplianceFinding] = []
        shots = []
        for shot in storyboard.shots:
            caption, found = self.rules.review(shot.caption, f"storyboard.shots[{shot.index}].caption", True)
            findings += found
            shots.append(shot.model_copy(update={"caption": caption}) if found else shot)
        cta, found = self.rules.review(storyboard.cta_text, "storyboard.cta_text", True)
        findings += found
        badge = storyboard.badge_text
        if badge:
            badge, found = self.rules.review(badge, "storyboard.badge_text", True)
            findings += found
        if not findings:
            return storyboard, []
        update = {"shots": shots, "cta_text": cta, "badge_text": badge or None}
        return storyboard.model_copy(update=update), findings
