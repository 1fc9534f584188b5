"""understand: template planner, frame allocation, LLM draft parsing and the LLM planner's fallback."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from shopreel.pipelines.config import PlannerConfig
from shopreel.pipelines.types import (
    MAX_CAPTION_CHARS,
    MAX_SHOT_FRAMES,
    MAX_SHOTS,
    CameraMove,
    Campaign,
    ProductBrief,
    ShopperProfile,
    ShotKind,
    Storyboard,
    Transition,
)
from shopreel.pipelines.understand import (
    LLMPlanner,
    StoryboardDraft,
    TemplatePlanner,
    allocate_frames,
    build_planner,
    draft_to_storyboard,
    format_price,
    parse_llm_draft,
)

CJK = re.compile(r"[\u4e00-\u9fff]")

EN_POINTS = [
    "Breathable mesh keeps feet cool",
    "Responsive foam cushions every stride",
    "Grippy outsole for wet roads",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing here may reach a model hub: the LLM is built and saved locally.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def make_brief(**overrides: object) -> ProductBrief:
    fields: dict[str, object] = dict(
        title="AeroRun Lightweight Running Shoe",
        category="running shoes",
        attributes={"upper": "engineered mesh", "weight": "210 g", "drop": "8 mm"},
        selling_points=EN_POINTS,
        price=Decimal("599.00"),
        currency="CNY",
        language="en",
        duration_s=6,
        size="128x128",
        fps=16,
        style="bright studio, clean white background",
        seed=42,
    )
    fields.update(overrides)
    return ProductBrief.model_validate(fields)


def make_zh_brief(**overrides: object) -> ProductBrief:
    fields: dict[str, object] = dict(
        title="轻羽跑鞋 AeroRun",
        category="跑步鞋",
        attributes={"鞋面": "工程网布", "重量": "210克"},
        selling_points=["透气网面，清爽一整天", "回弹中底，步步轻盈", "防滑大底，雨天也稳"],
        price=Decimal("199"),
        language="zh",
    )
    fields.update(overrides)
    return make_brief(**fields)


def revalidate(storyboard: Storyboard) -> Storyboard:
    return Storyboard.model_validate(storyboard.model_dump())


# --- Template planner ---------------------------------------------------------------------------


def test_template_is_deterministic() -> None:
    brief = make_brief()
    profile = ShopperProfile(interests=["rain"], preferred_style="neon night")
    campaign = Campaign(name="11.11", discount_text="满300减50")
    first = TemplatePlanner().plan(brief, profile, campaign)
    second = TemplatePlanner().plan(brief.model_copy(deep=True), profile, campaign)
    assert first.model_dump() == second.model_dump()
    assert first.planner == "template"


def test_template_shot_structure() -> None:
    brief = make_brief()
    sb = revalidate(TemplatePlanner().plan(brief))
    assert [s.kind for s in sb.shots] == [ShotKind.hook] + [ShotKind.feature] * 3 + [ShotKind.cta]
    assert [s.caption for s in sb.shots[1:4]] == EN_POINTS
    assert [s.seed for s in sb.shots] == [42, 43, 44, 45, 46]
    assert (sb.title, sb.language, sb.width, sb.height, sb.fps) == (brief.title, "en", 128, 128, 16)
    fade = max(1, round(PlannerConfig().crossfade_s * 16))
    assert [s.transition_frames for s in sb.shots] == [fade] * 4 + [0]
    assert sb.shots[-1].transition == Transition.cut
    for shot in sb.shots:
        assert (shot.num_frames - 1) % 4 == 0 and 9 <= shot.num_frames <= MAX_SHOT_FRAMES
        assert shot.prompt.startswith("Product commercial, AeroRun Lightweight Running Shoe, running shoes")
        assert "bright studio" in shot.prompt and shot.negative_prompt
    assert EN_POINTS[2] in sb.shots[3].prompt
    # Neighbouring shots are filmed with different camera moves.
    moves = [s.camera_move for s in sb.shots]
    assert all(a != b for a, b in zip(moves, moves[1:], strict=False))
    assert abs(sb.total_frames - 96) <= 4


def test_max_feature_shots_limits_features() -> None:
    sb = TemplatePlanner(PlannerConfig(max_feature_shots=1)).plan(make_brief())
    assert [s.kind for s in sb.shots] == [ShotKind.hook, ShotKind.feature, ShotKind.cta]
    assert sb.shots[1].caption == EN_POINTS[0]


def test_seed_wraps_around() -> None:
    sb = TemplatePlanner().plan(make_brief(seed=2**32 - 2))
    assert [s.seed for s in sb.shots[:3]] == [2**32 - 2, 2**32 - 1, 0]


def test_zh_captions_and_labels() -> None:
    sb = revalidate(TemplatePlanner().plan(make_zh_brief()))
    assert sb.language == "zh" and sb.aigc_label == "AI生成"
    assert all(CJK.search(s.caption) for s in sb.shots)
    assert sb.shots[0].caption == "全新 轻羽跑鞋 AeroRun"
    assert sb.shots[-1].caption == "到手价 ¥199"
    assert sb.price_text == "¥199"
    assert sb.cta_text == "立即抢购"


def test_en_captions_and_labels() -> None:
    sb = TemplatePlanner().plan(make_brief())
    assert sb.aigc_label == "AI-generated"
    assert not any(CJK.search(s.caption) for s in sb.shots)
    assert sb.shots[0].caption == "All-new AeroRun Lightweight Running Shoe"
    assert sb.shots[-1].caption == "Now only ¥599"
    assert sb.cta_text == "Shop now"
    assert sb.badge_text is None and sb.accent_color == "#FF4D1A"


def test_template_captions_are_shortened_but_user_values_are_not() -> None:
    title = "Ultra " + "x" * 110
    sb = TemplatePlanner().plan(make_brief(title=title))
    hook = sb.shots[0].caption
    assert len(hook) == MAX_CAPTION_CHARS and hook.endswith("…")
    assert sb.title == title
    assert title in sb.shots[0].prompt


@pytest.mark.parametrize(
    ("price", "currency", "language", "expected"),
    [
        ("199", "CNY", "zh", "¥199"),
        ("199.50", "CNY", "zh", "¥199.50"),
        ("19.99", "USD", "en", "$19.99"),
        ("1299", "USD", "en", "$1,299"),
        ("1299", "CNY", "zh", "¥1299"),
        ("49", "EUR", "en", "€49"),
        ("12.5", "GBP", "en", "£12.50"),
        ("3000", "JPY", "en", "¥3,000"),
        ("15000", "KRW", "en", "₩15,000"),
        ("12", "CHF", "en", "CHF 12.00"),
    ],
)
def test_format_price(price: str, currency: str, language: str, expected: str) -> None:
    assert format_price(Decimal(price), currency, language) == expected  # type: ignore[arg-type]


def test_price_text_in_storyboard() -> None:
    assert TemplatePlanner().plan(make_brief(price=Decimal("19.99"), currency="USD")).price_text == "$19.99"
    no_price = TemplatePlanner().plan(make_brief(price=None))
    assert no_price.price_text is None and no_price.shots[-1].caption == "Shop now"


def test_campaign_badge_discount_and_accent() -> None:
    campaign = Campaign(name="11.11", discount_text="满300减50", badge="双11", accent_color="#FF2D55")
    sb = TemplatePlanner().plan(make_zh_brief(), campaign=campaign)
    assert sb.cta_text == "11.11 · 满300减50 · 立即抢购"
    assert (sb.badge_text, sb.accent_color) == ("双11", "#FF2D55")
    en = TemplatePlanner().plan(make_brief(), campaign=Campaign(name="Black Friday"))
    assert en.badge_text == "Black Friday" and en.cta_text == "Black Friday · Shop now"
    long_name = Campaign(name="N" * 40, discount_text="D" * 40)
    sb = revalidate(TemplatePlanner().plan(make_brief(), campaign=long_name))
    assert sb.badge_text is not None and len(sb.badge_text) <= 24
    assert sb.cta_text == "D" * 40 + " · Shop now"


def test_profile_reorders_selling_points_and_overrides_style() -> None:
    profile = ShopperProfile(interests=["Rain", "GRIP"], preferred_style="moody city night")
    sb = TemplatePlanner().plan(make_brief(), profile)
    captions = [s.caption for s in sb.shots if s.kind == ShotKind.feature]
    assert captions == [EN_POINTS[2], EN_POINTS[0], EN_POINTS[1]]
    assert all("moody city night" in s.prompt and "bright studio" not in s.prompt for s in sb.shots)
    # With one feature shot the most relevant selling point is the one that stays.
    one = TemplatePlanner(PlannerConfig(max_feature_shots=1)).plan(make_brief(), profile)
    assert one.shots[1].caption == EN_POINTS[2]
    # Word matches count too; no match keeps the brief's order.
    words = TemplatePlanner().plan(make_brief(), ShopperProfile(interests=["foam pillows"]))
    assert words.shots[1].caption == EN_POINTS[1]
    same = TemplatePlanner().plan(make_brief(), ShopperProfile(interests=["golf"]))
    assert [s.caption for s in same.shots[1:4]] == EN_POINTS


def test_no_selling_points_gives_hook_and_cta() -> None:
    sb = revalidate(TemplatePlanner().plan(make_brief(selling_points=[])))
    assert [s.kind for s in sb.shots] == [ShotKind.hook, ShotKind.cta]


def test_short_durations_drop_feature_shots() -> None:
    planner = TemplatePlanner()
    counts = [len(planner.plan(make_brief(duration_s=2, fps=fps)).shots) for fps in (4, 8, 12, 16)]
    assert counts[0] == 1 and counts[-1] == 5
    assert counts == sorted(counts)
    single = planner.plan(make_brief(duration_s=2, fps=4))
    assert single.shots[0].kind == ShotKind.hook and single.shots[0].transition == Transition.cut


def test_long_durations_add_feature_shots() -> None:
    sb = revalidate(TemplatePlanner().plan(make_brief(duration_s=60, fps=30)))
    assert 5 < len(sb.shots) <= MAX_SHOTS
    assert abs(sb.total_frames - 1800) <= 4
    kinds = [s.kind for s in sb.shots]
    assert kinds[0] == ShotKind.hook and kinds[-1] == ShotKind.cta
    features = [(s.caption, s.camera_move) for s in sb.shots if s.kind == ShotKind.feature]
    assert len(set(features)) == len(features)  # a repeated subject gets another camera move


def test_crossfade_settings() -> None:
    cuts = TemplatePlanner(PlannerConfig(crossfade_s=0)).plan(make_brief())
    assert all(s.transition == Transition.cut and s.transition_frames == 0 for s in cuts.shots)
    long_fades = TemplatePlanner(PlannerConfig(crossfade_s=1.0)).plan(make_brief(duration_s=20, fps=30))
    assert [s.transition_frames for s in long_fades.shots[:-1]] == [30] * (len(long_fades.shots) - 1)
    # A crossfade that does not fit becomes a cut rather than an invalid shot.
    tight = revalidate(TemplatePlanner(PlannerConfig(crossfade_s=1.0)).plan(make_brief(duration_s=2, fps=30)))
    assert abs(tight.total_frames - 60) <= 4


def test_brief_without_size_or_fps_is_rejected() -> None:
    with pytest.raises(ValueError, match="brief.size"):
        TemplatePlanner().plan(make_brief(size=None))
    with pytest.raises(ValueError, match="brief.fps"):
        TemplatePlanner().plan(make_brief(fps=None))


@pytest.mark.parametrize(
    "config",
    [PlannerConfig(), PlannerConfig(crossfade_s=1.0), PlannerConfig(crossfade_s=0, max_feature_shots=0)],
    ids=["default", "crossfade-1s", "cuts-no-features"],
)
def test_duration_grid(config: PlannerConfig) -> None:
    planner = TemplatePlanner(config)
    brief = make_brief(attributes={})
    for duration in [*range(2, 61), 2.5, 7.3, 59.9]:
        for fps in range(4, 31):
            sb = planner.plan(brief.model_copy(update={"duration_s": float(duration), "fps": fps}))
            target = round(duration * fps)
            assert abs(sb.total_frames - target) <= 4, (duration, fps, sb.total_frames)
            for shot in sb.shots:
                assert (shot.num_frames - 1) % 4 == 0 and shot.num_frames <= MAX_SHOT_FRAMES
                assert shot.num_frames >= (9 if len(sb.shots) > 1 else 5), (duration, fps)
            revalidate(sb)


def test_allocate_frames_reports_impossible_fits() -> None:
    kinds = [ShotKind.hook, ShotKind.feature, ShotKind.cta]
    assert allocate_frames(kinds, [1, 1, 1], [0, 0, 0], target_frames=12) is None
    assert allocate_frames(kinds, [1, 1, 1], [0, 0, 0], target_frames=1000) is None
    frames = allocate_frames(kinds, [1, 3, 1], [4, 4, 0], target_frames=100)
    assert frames is not None and sum(frames) - 8 in range(98, 103)
    assert frames[1] > frames[0] and frames[1] > frames[2]


# --- parse_llm_draft ----------------------------------------------------------------------------

VALID_DRAFT = {
    "shots": [
        {
            "kind": "hook",
            "caption": "Meet AeroRun",
            "prompt": "a running shoe rises into view",
            "camera_move": "orbit",
            "transition": "crossfade",
            "weight": 1,
        },
        {
            "kind": "feature",
            "caption": "Grip on wet roads",
            "prompt": "shoe splashing through a puddle at night",
            "camera_move": "Pan-Left",
            "transition": "cut",
            "weight": 2.5,
        },
        {
            "kind": "cta",
            "caption": "Yours for ¥599",
            "prompt": "shoe on a pedestal, space for text",
            "camera_move": "pull_out",
            "transition": "cut",
            "weight": 1,
        },
    ],
    "cta_text": "Run now",
}


def test_parse_valid_draft() -> None:
    draft = parse_llm_draft(json.dumps(VALID_DRAFT))
    assert [s.kind for s in draft.shots] == [ShotKind.hook, ShotKind.feature, ShotKind.cta]
    assert draft.shots[1].camera_move == CameraMove.pan_left
    assert draft.cta_text == "Run now"


def test_parse_draft_in_fence_with_chatter() -> None:
    text = f"Sure! Here is {{the plan}}:\n```json\n{json.dumps(VALID_DRAFT, indent=2)}\n```\nEnjoy."
    assert parse_llm_draft(text) == StoryboardDraft.model_validate(VALID_DRAFT)


@pytest.mark.parametrize("text", ["", "no json here", '{"shots": [', "[1, 2, 3]"])
def test_parse_invalid_json(text: str) -> None:
    with pytest.raises(ValueError, match="no JSON object"):
        parse_llm_draft(text)


@pytest.mark.parametrize(
    "draft",
    [
        {"shots": []},
        {"cta_text": "x"},
        {"shots": [{"kind": "intro", "prompt": "p"}]},
        {"shots": [{"kind": "hook", "prompt": "p", "camera_move": "zoom"}]},
        {"shots": [{"kind": "hook", "prompt": "p", "weight": -1}]},
        {"shots": [{"kind": "hook", "prompt": "p", "caption": "c" * 200}]},
        {"shots": [{"kind": "hook", "prompt": "p"}] * (MAX_SHOTS + 1)},
    ],
)
def test_parse_schema_violation(draft: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="does not match the schema"):
        parse_llm_draft(json.dumps(draft))


def test_draft_to_storyboard() -> None:
    brief = make_brief()
    draft = parse_llm_draft(json.dumps(VALID_DRAFT))
    sb = revalidate(draft_to_storyboard(draft, brief, None, None, PlannerConfig()))
    assert sb.planner == "llm"
    assert [s.caption for s in sb.shots] == [s["caption"] for s in VALID_DRAFT["shots"]]  # type: ignore[index]
    assert [s.camera_move for s in sb.shots] == [CameraMove.orbit, CameraMove.pan_left, CameraMove.pull_out]
    assert [s.transition for s in sb.shots] == [Transition.crossfade, Transition.cut, Transition.cut]
    assert sb.shots[1].num_frames > sb.shots[0].num_frames  # weight 2.5 vs 1
    assert abs(sb.total_frames - 96) <= 4
    assert (sb.cta_text, sb.price_text) == ("Run now", "¥599")
    # The campaign's discount survives a model that forgot it.
    campaign = Campaign(name="11.11", discount_text="满300减50")
    assert "满300减50" in draft_to_storyboard(draft, brief, None, campaign, PlannerConfig()).cta_text


def test_draft_with_too_many_shots_for_the_duration() -> None:
    draft = StoryboardDraft.model_validate({"shots": [{"kind": "feature", "prompt": "p"}] * MAX_SHOTS})
    with pytest.raises(ValueError, match="do not fit"):
        draft_to_storyboard(draft, make_brief(duration_s=2, fps=8), None, None, PlannerConfig())


# --- LLM planner ------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _save_tiny_lm(directory: Path, chat_template: str | None) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on a few strings, offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [json.dumps(VALID_DRAFT), "product video storyboard hook feature cta", "全新 立即抢购 到手价"]
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    tokenizer.save_pretrained(directory)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "plain": _save_tiny_lm(tmp_path_factory.mktemp("tiny-lm-plain"), None),
        "chat": _save_tiny_lm(tmp_path_factory.mktemp("tiny-lm-chat"), CHAT_TEMPLATE),
    }


def _llm_config(path: Path) -> PlannerConfig:
    return PlannerConfig(kind="llm", llm_path=path, max_new_tokens=32)


@pytest.mark.parametrize("variant", ["plain", "chat"])
def test_llm_planner_falls_back_on_garbage(
    tiny_lm_dirs: dict[str, Path], variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = _llm_config(tiny_lm_dirs[variant])
    planner = build_planner(config)
    assert isinstance(planner.inner, LLMPlanner)  # behind the advertising-rule checks
    brief, campaign = make_zh_brief(), Campaign(name="618", discount_text="满200减20")
    with caplog.at_level(logging.WARNING, logger="shopreel.pipelines.understand"):
        sb = planner.plan(brief, None, campaign)
    assert sb.planner.startswith("template (llm fallback: ")
    assert any("fell back to the template planner" in r.getMessage() for r in caplog.records)
    expected = TemplatePlanner(config).plan(brief, None, campaign)
    assert sb.model_dump(exclude={"planner"}) == expected.model_dump(exclude={"planner"})
    revalidate(sb)


def test_llm_planner_uses_a_valid_draft(
    tiny_lm_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    planner = LLMPlanner(_llm_config(tiny_lm_dirs["chat"]))
    reply = f"Here you go:\n```json\n{json.dumps(VALID_DRAFT)}\n```"
    monkeypatch.setattr(planner, "_generate", lambda messages: reply)
    sb = revalidate(planner.plan(make_brief()))
    assert sb.planner == "llm"
    assert [s.caption for s in sb.shots] == ["Meet AeroRun", "Grip on wet roads", "Yours for ¥599"]


def test_llm_planner_reports_a_broken_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    planner = LLMPlanner(_llm_config(tmp_path))  # an empty directory: nothing to load
    with caplog.at_level(logging.WARNING, logger="shopreel.pipelines.understand"):
        first = planner.plan(make_brief())
        second = planner.plan(make_brief())
    assert "cannot load the LLM" in first.planner and first.planner == second.planner
    assert len(caplog.records) == 2


def test_llm_planner_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llm_path"):
        LLMPlanner(PlannerConfig(kind="llm"))
    with pytest.raises(ValueError, match="not a directory"):
        LLMPlanner(PlannerConfig(kind="llm", llm_path=tmp_path / "missing"))
    assert isinstance(build_planner(PlannerConfig()).inner, TemplatePlanner)


def test_llm_planner_still_rejects_user_errors(tiny_lm_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="brief.fps"):
        LLMPlanner(_llm_config(tiny_lm_dirs["plain"])).plan(make_brief(fps=None))


def test_import_is_cheap() -> None:
    code = (
        "import sys, shopreel.pipelines.understand as u; "
        "u.TemplatePlanner(); "
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
