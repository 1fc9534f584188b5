"""understand: ProductBrief (+ ShopperProfile, Campaign) -> Storyboard.

Two planners share one frame allocator:

* ``TemplatePlanner`` (default) is deterministic: a hook shot (product reveal), one shot per key
  selling point (the shopper's interests first), and a price/call-to-action shot.
* ``LLMPlanner`` asks a local transformers causal LM for a JSON draft (shots, captions, prompts,
  camera moves, relative durations), validates it and turns it into a Storyboard with the same
  allocator. On any failure it logs the reason and returns the template storyboard.

Frame arithmetic: every shot has ``4k+1`` frames (Wan's causal temporal VAE), a crossfade overlaps
``transition_frames`` of two neighbouring shots, so the output has
``sum(num_frames) - sum(transition_frames)`` frames (``Storyboard.total_frames``). The allocator
picks the number of ``4``-frame steps that lands that sum within 2 frames of
``round(duration_s * fps)``.

Importing this module is cheap: torch and transformers are imported only when an LLM planner
first plans.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .compliance import CompliantPlanner, Planner
from .config import ComplianceConfig, PlannerConfig
from .embeddings import default_embedder
from .types import (
    MAX_CAPTION_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SHOT_FRAMES,
    MAX_SHOTS,
    MAX_STEPS,
    MAX_TOTAL_FRAMES,
    MAX_VARIANTS,
    STEP_MODES,
    CameraMove,
    Campaign,
    Language,
    ProductBrief,
    ShopperProfile,
    Shot,
    ShotKind,
    Storyboard,
    Transition,
    VideoMode,
    describe_validation_error,
)

logger = logging.getLogger(__name__)

TEMPORAL_FACTOR = 4  # Wan's VAE: one latent frame per 4 pixel frames, plus the first frame
GOOD_SHOT_FRAMES = 9  # shorter shots barely move; used only when nothing else fits
MIN_SHOT_FRAMES = 5
DEFAULT_ACCENT = "#FF4D1A"
BADGE_CHARS = 24  # Storyboard.badge_text's limit
PROMPT_ATTRIBUTES = 3  # attributes named in every prompt, so all shots show the same product

NEGATIVE_PROMPT = (
    "blurry, low quality, worst quality, jpeg artifacts, noisy, distorted, deformed product, "
    "warped shape, duplicate objects, extra parts, watermark, logo, text, subtitles, overexposed, "
    "underexposed, flickering, static frame, cluttered background"
)

CAMERA_PHRASES: dict[CameraMove, str] = {
    CameraMove.static: "static camera",
    CameraMove.push_in: "slow push-in camera",
    CameraMove.pull_out: "slow pull-out camera",
    CameraMove.pan_left: "smooth pan left",
    CameraMove.pan_right: "smooth pan right",
    CameraMove.orbit: "slow orbit around the product",
    CameraMove.tilt_up: "slow tilt up",
}

# Moves suited to each shot kind; the brief's seed picks the starting point of the rotation.
HOOK_MOVES = (CameraMove.push_in, CameraMove.orbit, CameraMove.tilt_up)
FEATURE_MOVES = (
    CameraMove.orbit,
    CameraMove.pan_right,
    CameraMove.tilt_up,
    CameraMove.pan_left,
    CameraMove.push_in,
)
CTA_MOVES = (CameraMove.pull_out, CameraMove.static, CameraMove.push_in)
STEP_MOVES = (CameraMove.static, CameraMove.push_in, CameraMove.tilt_up)  # steady: the viewer follows along

# What kind of video each mode's prompts ask the text-to-video model for, and what each shot shows.
GENRES: dict[VideoMode, str] = {
    "showcase": "Product commercial",
    "tutorial": "How-to video",
    "process": "Behind-the-scenes documentary",
}
STEP_FOCUS: dict[VideoMode, str] = {
    "tutorial": "hands demonstrating step {number}: {step}, clear close-up of the product in use",
    "process": "{step}, the {category} production and shipping process, workers and machines at work",
}
STEP_HOOK_FOCUS: dict[VideoMode, str] = {
    "tutorial": "the product laid out ready to use, opening shot",
    "process": "where the product begins, raw materials and the workshop, opening shot",
}

# Text we write ourselves, per language. User values are inserted verbatim.
TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "hook": "All-new {title}",
        "cta": "Shop now",
        "price": "Now only {price}",
        "attribute": "{key}: {value}",
        "aigc": "AI-generated",
        "tutorial_hook": "How to use {title}",
        "process_hook": "How {title} is made",
    },
    "zh": {
        "hook": "全新 {title}",
        "cta": "立即抢购",
        "price": "到手价 {price}",
        "attribute": "{key}：{value}",
        "aigc": "AI生成",
        "tutorial_hook": "{title} 使用教程",
        "process_hook": "{title} 诞生记",
    },
}
# Feature subjects for a brief with neither selling points nor attributes: (en, zh, prompt focus).
GENERIC_SUBJECTS = (
    ("Crafted in every detail", "匠心细节", "detail close-up of materials and finish"),
    ("Good from every angle", "多角度展示", "360-degree view of the product"),
    ("Made for everyday life", "日常好物", "the product in use in a bright lifestyle scene"),
)

CURRENCY_SYMBOLS = {"CNY": "¥", "USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "KRW": "₩"}
_STOPWORDS = frozenset({"the", "and", "for", "with", "you", "your", "are", "from"})


# --- Small text helpers -------------------------------------------------------------------------


def fit_caption(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    """Shorten text *we* composed to ``limit`` characters, ending in an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def format_price(price: Decimal, currency: str, language: Language = "en") -> str:
    """``¥199``, ``$19.99``, ``$1,299`` (en groups thousands), ``CHF 12.00`` for other codes."""
    symbol = CURRENCY_SYMBOLS.get(currency)
    if symbol is None:
        return f"{currency} {price:.2f}"
    grouping = "," if language == "en" else ""
    decimals = 0 if price == price.to_integral_value() else 2
    return f"{symbol}{price:{grouping}.{decimals}f}"


def _interest_matches(interest: str, text: str) -> bool:
    """Case-insensitive: the whole interest, or one of its words, occurs in the text."""
    needle, haystack = interest.casefold().strip(), text.casefold()
    if needle and needle in haystack:
        return True
    words = [w for w in re.findall(r"\w+", needle) if len(w) >= 3 and w not in _STOPWORDS]
    return any(word in haystack for word in words)


def rank_selling_points(
    points: Sequence[str],
    profile: ShopperProfile | None,
    language: Language = "en",
    config: PlannerConfig | None = None,
) -> list[str]:
    """The selling points the shopper cares about first; the others keep the merchant's order.

    By meaning where it can (``config.personalisation`` "embedding", an English brief, the model
    installed): points at least ``min_similarity`` close to an interest or the segment, closest first.
    Otherwise by words: how many interests a point touches.
    """
    if profile is None or not (profile.interests or profile.segment) or not points:
        return list(points)
    config = config or PlannerConfig()
    embedder = default_embedder() if config.personalisation == "embedding" and language == "en" else None
    if embedder is not None:
        wants = [*profile.interests, *([profile.segment] if profile.segment else [])]
        best = embedder.similarity(points, wants).max(axis=1)
        scores = [float(score) if score >= config.min_similarity else 0.0 for score in best]
    else:
        scores = [float(sum(_interest_matches(i, p) for i in profile.interests)) for p in points]
    return [points[i] for i in sorted(range(len(points)), key=lambda i: -scores[i])]


# --- Frame allocation (shared by both planners) ------------------------------------------------


def crossfade_frames(config: PlannerConfig, fps: int) -> int:
    """Frames one crossfade overlaps; 0 means cuts only."""
    return max(1, round(config.crossfade_s * fps)) if config.crossfade_s > 0 else 0


def _steps_above(frames: int) -> int:
    """Fewest 4-frame steps k with 4k+1 > frames (a shot must outlast the fades that touch it)."""
    return (frames - 1) // TEMPORAL_FACTOR + 1 if frames > 0 else 0


def allocate_frames(
    kinds: Sequence[ShotKind],
    weights: Sequence[float],
    fades: Sequence[int],
    target_frames: int,
    min_frames: int = GOOD_SHOT_FRAMES,
) -> list[int] | None:
    """Frames per shot (each 4k+1) whose output length is closest to ``target_frames``.

    ``fades[i]`` is the overlap of shot i with shot i+1 (the last is 0). Weights share out what
    remains above each shot's minimum; what rounding leaves goes to the hook/CTA shots. Returns
    None when the shots cannot fit (too short for ``min_frames`` or longer than MAX_SHOT_FRAMES).
    """
    count = len(kinds)
    max_steps = (MAX_SHOT_FRAMES - 1) // TEMPORAL_FACTOR
    # 1. Each shot's floor: min_frames, and longer than any crossfade into or out of it.
    lows = []
    for i in range(count):
        fade_in = fades[i - 1] if i else 0
        lows.append(max(_steps_above(min_frames - 1), _steps_above(max(fade_in, fades[i]))))
    # 2. Steps in total: output = 4*steps + count - sum(fades), rounded to the nearest; never
    #    past MAX_TOTAL_FRAMES (the rounding may overshoot a 60 s x 30 fps target by 2).
    overlap = sum(fades)
    steps = round((target_frames + overlap - count) / TEMPORAL_FACTOR)
    while steps > 0 and TEMPORAL_FACTOR * steps + count - overlap > MAX_TOTAL_FRAMES:
        steps -= 1
    if steps < sum(lows) or steps > count * max_steps or max(lows) > max_steps:
        return None
    # 3. Share what is left above the floors by weight, each shot capped at MAX_SHOT_FRAMES.
    spare = steps - sum(lows)
    total_weight = sum(weights)
    caps = [max_steps - low for low in lows]
    extra = [min(cap, int(spare * w / total_weight)) for cap, w in zip(caps, weights, strict=True)]
    # 4. Rounding leftovers (and anything a cap refused) go to hook/CTA first, then the others.
    left = spare - sum(extra)
    ends = [i for i, kind in enumerate(kinds) if kind in (ShotKind.hook, ShotKind.cta)]
    middle = [i for i, kind in enumerate(kinds) if kind not in (ShotKind.hook, ShotKind.cta)]
    for group in (ends, middle):
        while left and any(extra[i] < caps[i] for i in group):
            for i in group:
                if left and extra[i] < caps[i]:
                    extra[i] += 1
                    left -= 1
    return [TEMPORAL_FACTOR * (low + more) + 1 for low, more in zip(lows, extra, strict=True)]


# --- Shot plans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShotSpec:
    """A shot before frames are allocated."""

    kind: ShotKind
    prompt: str
    caption: str
    camera_move: CameraMove
    weight: float = 1.0
    crossfade: bool = True  # into the next shot, when the config and the frames allow
    step_number: int | None = None  # a step shot's number (tutorial and process videos)
    # Added to the brief's seed instead of the shot's index: a feature shot keeps the seed of its
    # subject wherever a shopper's ranking puts it, so variants of one brief share it (None: index).
    seed_offset: int | None = None


@dataclass(frozen=True)
class _Subject:
    """What a feature shot shows: its caption and the phrase its prompt focuses on."""

    caption: str
    focus: str
    order: int  # its place before any shopper ranking: seed and camera move follow it, not the rank


@dataclass(frozen=True)
class PlanContext:
    """Everything both planners derive from the inputs before choosing shots."""

    brief: ProductBrief
    width: int
    height: int
    fps: int
    target_frames: int
    style: str
    key_points: int  # the first `key_points` subjects are the (ranked) selling points
    subjects: tuple[_Subject, ...]  # feature subjects, most relevant first
    price_text: str | None
    cta_text: str
    badge_text: str | None
    accent_color: str
    aigc_label: str

    @property
    def texts(self) -> dict[str, str]:
        return TEXTS[self.brief.language]


def _require_size_fps(brief: ProductBrief) -> tuple[int, int, int]:
    if brief.size is None:
        raise ValueError("brief.size is not set: fill it (e.g. from the model preset) before planning")
    if brief.fps is None:
        raise ValueError("brief.fps is not set: fill it (e.g. from the model preset) before planning")
    return brief.size.width, brief.size.height, brief.fps


def _subjects(brief: ProductBrief, points: list[str]) -> tuple[_Subject, ...]:
    """Selling points, then attributes; generic angles when the brief has neither."""
    texts = TEXTS[brief.language]
    unranked = list(enumerate(brief.selling_points))
    subjects = []
    for point in points:  # ranked: each takes the first unused place of the same text in the brief
        place = next(i for i, (_, text) in enumerate(unranked) if text == point)
        subjects.append(_Subject(caption=point, focus=point, order=unranked.pop(place)[0]))
    for position, (key, value) in enumerate(brief.attributes.items(), start=len(points)):
        caption = fit_caption(texts["attribute"].format(key=key, value=value))
        subjects.append(
            _Subject(caption=caption, focus=f"detail close-up of the {key} {value}", order=position)
        )
    if not subjects:
        column = 1 if brief.language == "zh" else 0
        subjects = [
            _Subject(caption=item[column], focus=item[2], order=i) for i, item in enumerate(GENERIC_SUBJECTS)
        ]
    return tuple(subjects)


def _cta_text(language: Language, campaign: Campaign | None) -> str:
    """Call to action, e.g. "11.11 · 满300减50 · 立即抢购" (drops the event name if too long)."""
    action = TEXTS[language]["cta"]
    if campaign is None:
        return action
    parts = [campaign.name, campaign.discount_text, action]
    full = " · ".join(part for part in parts if part)
    if len(full) <= MAX_CAPTION_CHARS:
        return full
    return fit_caption(" · ".join(part for part in parts[1:] if part))


def shopper_language(brief: ProductBrief, profile: ShopperProfile | None) -> ProductBrief:
    """The brief in the shopper's language when the merchant did not name one (``language`` unset)."""
    if profile is None or profile.language is None or "language" in brief.model_fields_set:
        return brief
    return brief.model_copy(update={"language": profile.language})


def build_context(
    brief: ProductBrief,
    profile: ShopperProfile | None,
    campaign: Campaign | None,
    config: PlannerConfig | None = None,
) -> PlanContext:
    # 1. Size and fps decide every frame count, so they must be known now; the language is the brief's,
    #    else the shopper's.
    width, height, fps = _require_size_fps(brief)
    brief = shopper_language(brief, profile)
    # 2. The shopper's taste wins over the merchant's default style.
    style = profile.preferred_style if profile and profile.preferred_style else brief.style
    # 3. Selling points the shopper cares about come first (and survive a short duration).
    points = rank_selling_points(brief.selling_points, profile, brief.language, config)
    language = brief.language
    price_text = format_price(brief.price, brief.currency, language) if brief.price is not None else None
    badge = None
    if campaign is not None:
        badge = campaign.badge or fit_caption(campaign.name, BADGE_CHARS)
    return PlanContext(
        brief=brief,
        width=width,
        height=height,
        fps=fps,
        target_frames=round(brief.duration_s * fps),
        style=style.strip(),
        key_points=len(points),
        subjects=_subjects(brief, points),
        price_text=price_text,
        cta_text=_cta_text(language, campaign),
        badge_text=badge,
        accent_color=campaign.accent_color if campaign else DEFAULT_ACCENT,
        aigc_label=TEXTS[language]["aigc"],
    )


def _prompt(ctx: PlanContext, focus: str, move: CameraMove) -> str:
    """English text-to-video prompt; the same title/category/attributes keep shots consistent."""
    brief = ctx.brief
    attributes = [f"{key} {value}" for key, value in list(brief.attributes.items())[:PROMPT_ATTRIBUTES]]
    parts = [
        GENRES[brief.mode],
        brief.title,
        brief.category,
        *attributes,
        focus,
        ctx.style,
        CAMERA_PHRASES[move],
        "professional lighting, high detail",
    ]
    return ", ".join(part.strip() for part in parts if part.strip())


def _hook_spec(ctx: PlanContext) -> ShotSpec:
    move = HOOK_MOVES[ctx.brief.seed % len(HOOK_MOVES)]
    caption = fit_caption(ctx.texts["hook"].format(title=ctx.brief.title))
    return ShotSpec(ShotKind.hook, _prompt(ctx, "product reveal, hero shot", move), caption, move)


def _feature_spec(ctx: PlanContext, position: int) -> ShotSpec:
    # Past the end of the subjects, cycle again; each round shifts the camera move by one so a
    # repeated subject is filmed differently. The move and the seed follow the subject's unranked place
    # (equal to the position without a shopper), so every shopper's video films a subject alike.
    count = len(ctx.subjects)
    subject, round_ = ctx.subjects[position % count], position // count
    move = FEATURE_MOVES[(ctx.brief.seed + subject.order + round_) % len(FEATURE_MOVES)]
    prompt = _prompt(ctx, subject.focus, move)
    seed_offset = 1 + subject.order + round_ * count  # the hook is shot 0
    return ShotSpec(ShotKind.feature, prompt, subject.caption, move, seed_offset=seed_offset)


def _step_hook_spec(ctx: PlanContext) -> ShotSpec:
    """The opening shot of a tutorial or process video, titled for what follows."""
    mode = ctx.brief.mode
    move = STEP_MOVES[ctx.brief.seed % len(STEP_MOVES)]
    caption = fit_caption(ctx.texts[f"{mode}_hook"].format(title=ctx.brief.title))
    return ShotSpec(ShotKind.hook, _prompt(ctx, STEP_HOOK_FOCUS[mode], move), caption, move, crossfade=False)


def _step_spec(ctx: PlanContext, number: int, step: str) -> ShotSpec:
    """Step ``number`` (from 1): its text is the caption, its number goes in a badge."""
    brief = ctx.brief
    move = STEP_MOVES[(brief.seed + number) % len(STEP_MOVES)]
    focus = STEP_FOCUS[brief.mode].format(number=number, step=step, category=brief.category)
    # A cut between steps: a crossfade would show two steps' captions at once.
    return ShotSpec(ShotKind.step, _prompt(ctx, focus, move), step, move, crossfade=False, step_number=number)


def _cta_spec(ctx: PlanContext) -> ShotSpec:
    move = CTA_MOVES[ctx.brief.seed % len(CTA_MOVES)]
    texts = ctx.texts
    caption = texts["cta"] if ctx.price_text is None else texts["price"].format(price=ctx.price_text)
    focus = "final hero shot, clean background with space for the price"
    return ShotSpec(ShotKind.cta, _prompt(ctx, focus, move), fit_caption(caption), move)


def _fit_specs(
    specs: Sequence[ShotSpec], ctx: PlanContext, config: PlannerConfig, min_frames: int
) -> tuple[list[int], list[int]] | None:
    """Frames and fades for these shots: the requested crossfades if they fit, else all cuts."""
    fade = crossfade_frames(config, ctx.fps)
    kinds = [spec.kind for spec in specs]
    weights = [spec.weight for spec in specs]
    wanted = [fade if spec.crossfade else 0 for spec in specs[:-1]] + [0]
    for fades in (wanted, [0] * len(specs)):
        frames = allocate_frames(kinds, weights, fades, ctx.target_frames, min_frames)
        if frames is not None:
            return frames, fades
        if not any(wanted):
            break
    return None


def assemble_storyboard(
    ctx: PlanContext,
    specs: Sequence[ShotSpec],
    frames: Sequence[int],
    fades: Sequence[int],
    *,
    planner: str,
    cta_text: str | None = None,
) -> Storyboard:
    """Shots with their frames, fades and seeds, plus the overlay fields, validated."""
    shots = [
        Shot(
            index=index,
            kind=spec.kind,
            prompt=spec.prompt,
            negative_prompt=NEGATIVE_PROMPT,
            caption=spec.caption,
            num_frames=num_frames,
            camera_move=spec.camera_move,
            transition=Transition.crossfade if fade else Transition.cut,
            transition_frames=fade,
            seed=(ctx.brief.seed + (index if spec.seed_offset is None else spec.seed_offset)) % 2**32,
            step_number=spec.step_number,
        )
        for index, (spec, num_frames, fade) in enumerate(zip(specs, frames, fades, strict=True))
    ]
    return Storyboard(
        title=ctx.brief.title,
        language=ctx.brief.language,
        width=ctx.width,
        height=ctx.height,
        fps=ctx.fps,
        shots=shots,
        price_text=ctx.price_text,
        cta_text=cta_text or ctx.cta_text,
        badge_text=ctx.badge_text,
        accent_color=ctx.accent_color,
        aigc_label=ctx.aigc_label,
        planner=planner,
        mode=ctx.brief.mode,
        narration=ctx.brief.narration,
    )


# --- Template planner ---------------------------------------------------------------------------


class TemplatePlanner:
    """Deterministic: the same brief, profile, campaign and config give the same storyboard."""

    name = "template"

    def __init__(self, config: PlannerConfig = PlannerConfig()) -> None:
        self.config = config

    def plan(
        self,
        brief: ProductBrief,
        profile: ShopperProfile | None = None,
        campaign: Campaign | None = None,
    ) -> Storyboard:
        # 1. Everything the shots are written from (raises ValueError without size/fps).
        ctx = build_context(brief, profile, campaign, self.config)
        # 2. Try shot lists from the preferred one outwards: fewer shots for short videos, more
        #    for long ones; first with shots of >= 9 frames, then (tiny videos) >= 5.
        step_mode = brief.mode in STEP_MODES
        for min_frames in (GOOD_SHOT_FRAMES, MIN_SHOT_FRAMES):
            for specs in self._step_lists(ctx) if step_mode else self._shot_lists(ctx):
                fitted = _fit_specs(specs, ctx, self.config, min_frames)
                if fitted is not None:
                    # 3. Frames are settled: build and validate the storyboard.
                    return assemble_storyboard(ctx, specs, *fitted, planner=self.name)
        if step_mode:  # every step is needed: say how long the video must be
            needed = len(brief.steps) * MIN_SHOT_FRAMES / ctx.fps
            raise ValueError(
                f"{len(brief.steps)} steps do not fit {brief.duration_s:g} s at {ctx.fps} fps: each needs "
                f"at least {MIN_SHOT_FRAMES} frames, so give duration_s >= {needed:.1f} (or fewer steps)"
            )
        raise ValueError(
            f"cannot plan {brief.duration_s:g} s at {ctx.fps} fps ({ctx.target_frames} frames): "
            f"a video holds at most {MAX_SHOTS} shots of {MIN_SHOT_FRAMES}..{MAX_SHOT_FRAMES} frames"
        )

    def _step_lists(self, ctx: PlanContext) -> Iterator[list[ShotSpec]]:
        """Opening shot + every step (+ price and call to action for a process video); then without the
        opening, then without the closing shot. A step is never dropped: the numbering would lie."""
        steps = [_step_spec(ctx, number, step) for number, step in enumerate(ctx.brief.steps, start=1)]
        closing = [_cta_spec(ctx)] if ctx.brief.mode == "process" else []
        yield [_step_hook_spec(ctx), *steps, *closing]
        yield [*steps, *closing]
        if closing:
            yield steps

    def _shot_lists(self, ctx: PlanContext) -> Iterator[list[ShotSpec]]:
        """Hook + features + CTA; then fewer features, hook + CTA, hook alone; then more features."""
        hook, cta = _hook_spec(ctx), _cta_spec(ctx)
        key_features = min(self.config.max_feature_shots, ctx.key_points)
        features = [_feature_spec(ctx, position) for position in range(MAX_SHOTS - 2)]
        for count in range(key_features, -1, -1):
            yield [hook, *features[:count], cta]
        yield [hook]
        for count in range(key_features + 1, MAX_SHOTS - 1):
            yield [hook, *features[:count], cta]


# --- LLM planner --------------------------------------------------------------------------------


class DraftShot(BaseModel):
    """One shot as the LLM proposes it; unknown keys are ignored, bad values rejected."""

    model_config = ConfigDict(extra="ignore")

    kind: ShotKind
    caption: str = Field(default="", max_length=MAX_CAPTION_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    camera_move: CameraMove = CameraMove.static
    transition: Transition = Transition.cut
    weight: float = Field(default=1.0, gt=0, le=10, allow_inf_nan=False)
    step_number: int | None = Field(default=None, ge=1, le=MAX_STEPS)

    @field_validator("kind", "camera_move", "transition", mode="before")
    @classmethod
    def _normalise_enum(cls, value: object) -> object:
        # "Push-In" and "push in" mean push_in: models vary the spelling of enum values.
        if isinstance(value, str):
            return re.sub(r"[\s-]+", "_", value.strip().lower())
        return value


class StoryboardDraft(BaseModel):
    """The JSON the LLM is asked for."""

    model_config = ConfigDict(extra="ignore")

    shots: list[DraftShot] = Field(min_length=1, max_length=MAX_SHOTS)
    cta_text: str = Field(default="", max_length=MAX_CAPTION_CHARS)


DRAFT_SCHEMA = (
    '{"shots": [{"kind": "hook|feature|step|cta", "caption": str, "prompt": str, '
    '"camera_move": "' + "|".join(move.value for move in CameraMove) + '", '
    '"transition": "cut|crossfade", "weight": number, "step_number": int (step shots only)}], '
    '"cta_text": str}'
)


def _first_json_object(text: str) -> dict[str, Any]:
    """The first ``{...}`` in the text that parses as a JSON object (fences and chatter around)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("no JSON object in the model output")


def parse_llm_draft(text: str) -> StoryboardDraft:
    """Extract and validate the draft; ValueError says what is wrong."""
    value = _first_json_object(text)
    try:
        return StoryboardDraft.model_validate(value)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ValueError("draft does not match the schema: " + "; ".join(problems[:2]) + more) from None


def draft_to_storyboard(
    draft: StoryboardDraft,
    brief: ProductBrief,
    profile: ShopperProfile | None,
    campaign: Campaign | None,
    config: PlannerConfig,
) -> Storyboard:
    """The draft's shots with frames from the shared allocator; ValueError when they cannot fit."""
    # 1. Overlay fields (price, badge, label) come from the inputs, not from the model.
    ctx = build_context(brief, profile, campaign, config)
    numbers = [shot.step_number for shot in draft.shots if shot.kind == ShotKind.step]
    if numbers != list(range(1, len(brief.steps) + 1)):
        # A how-to video that skips, repeats or invents a step is worse than the template's.
        raise ValueError(f"draft has step shots {numbers}, the brief {len(brief.steps)} steps")
    specs = [
        ShotSpec(
            kind=shot.kind,
            prompt=shot.prompt.strip(),
            caption=shot.caption.strip(),
            camera_move=shot.camera_move,
            weight=shot.weight,
            crossfade=shot.transition == Transition.crossfade and shot.kind != ShotKind.step,
            step_number=shot.step_number if shot.kind == ShotKind.step else None,
        )
        for shot in draft.shots
    ]
    # 2. Weights -> frames with the template planner's allocator.
    for min_frames in (GOOD_SHOT_FRAMES, MIN_SHOT_FRAMES):
        fitted = _fit_specs(specs, ctx, config, min_frames)
        if fitted is not None:
            break
    else:
        raise ValueError(f"{len(specs)} shots do not fit {ctx.target_frames} frames")
    # 3. Keep the campaign's discount in the call to action even if the model dropped it.
    cta_text = draft.cta_text.strip()
    if campaign is not None and campaign.discount_text and campaign.discount_text not in cta_text:
        cta_text = ""
    return assemble_storyboard(ctx, specs, *fitted, planner="llm", cta_text=cta_text or None)


def _short_reason(exc: BaseException, limit: int = 160) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = message if isinstance(exc, ValueError) and message else f"{type(exc).__name__}: {message}"
    return fit_caption(reason.rstrip(": "), limit)


class LLMPlanner:
    """A local causal LM writes the draft; the template planner covers every failure."""

    name = "llm"

    def __init__(self, config: PlannerConfig, *, device: str = "cpu") -> None:
        if config.llm_path is None:
            raise ValueError("planner kind 'llm' needs llm_path: a local transformers causal-LM directory")
        path = Path(config.llm_path).expanduser()
        if not path.is_dir():
            raise ValueError(f"llm_path {str(path)!r} is not a directory (a local causal-LM checkpoint)")
        self.config = config
        self.path = path
        self.device = device
        self.template = TemplatePlanner(config)
        self._lock = threading.Lock()  # one load, one generation at a time
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_error: str | None = None

    def plan(
        self,
        brief: ProductBrief,
        profile: ShopperProfile | None = None,
        campaign: Campaign | None = None,
    ) -> Storyboard:
        # 1. The template storyboard first: it checks the inputs (a user error is raised, not
        #    hidden behind a fallback) and is the answer whenever the model fails.
        brief = shopper_language(brief, profile)
        fallback = self.template.plan(brief, profile, campaign)
        try:
            # 2. Ask the model, 3. parse its JSON, 4. allocate frames exactly as the template does.
            messages = self._messages(brief, profile, campaign, len(fallback.shots))
            text = self._generate(messages)
            draft = parse_llm_draft(text)
            return draft_to_storyboard(draft, brief, profile, campaign, self.config)
        except Exception as exc:  # any failure of the optional planner falls back, logged
            reason = _short_reason(exc)
            logger.warning("LLM planner fell back to the template planner: %s", reason)
            return fallback.model_copy(update={"planner": f"template (llm fallback: {reason})"})

    def _messages(
        self,
        brief: ProductBrief,
        profile: ShopperProfile | None,
        campaign: Campaign | None,
        shot_count: int,
    ) -> list[dict[str, str]]:
        """System rules + the inputs as JSON; ``shot_count`` (the template's) suits the duration."""
        language = "Simplified Chinese" if brief.language == "zh" else "English"
        if brief.mode in STEP_MODES:
            what = "a how-to video" if brief.mode == "tutorial" else "how the product is made and shipped"
            closing = ", then one cta shot last" if brief.mode == "process" else ""
            layout = (
                f"{what}: one hook shot, then exactly one step shot per entry of brief.steps, in order, "
                f"with step_number 1 to {len(brief.steps)} and the step as its caption{closing}"
            )
        elif shot_count == 1:
            layout = "exactly one hook shot (product reveal)"
        else:
            layout = (
                f"{shot_count} shots: one hook shot (product reveal), feature shots for the most "
                "relevant selling points, and one cta shot last"
            )
        system = (
            "You plan storyboards for short e-commerce product videos. Reply with ONE JSON object "
            f"and nothing else, matching this schema: {DRAFT_SCHEMA}. Plan {layout}. Captions in "
            f"{language}, at most {MAX_CAPTION_CHARS} characters. Prompts in English: a vivid visual "
            "description for a text-to-video model. weight is the shot's relative duration."
        )
        if profile is not None:
            # Rewording for the shopper is the LLM's to do; the shopper's data stays out of the captions.
            system += (
                " Word the captions so they speak to this shopper's interests, without naming the shopper, "
                "their segment or their interests, and without claims the brief does not make."
            )
        inputs: dict[str, Any] = {
            "brief": brief.model_dump(mode="json", exclude={"images", "size", "fps", "seed"}),
        }
        if profile is not None:
            inputs["shopper"] = profile.model_dump(mode="json", exclude_none=True)
        if campaign is not None:
            inputs["campaign"] = campaign.model_dump(mode="json", exclude_none=True)
        user = json.dumps(inputs, ensure_ascii=False)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _load(self) -> tuple[Any, Any]:
        """Tokenizer and model, loaded once, from local files only."""
        if self._load_error is not None:
            raise RuntimeError(self._load_error)  # don't retry a broken checkpoint on every call
        if self._model is None:
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                model: Any = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True)
                model = model.to(self.device).eval()
            except Exception as exc:
                self._load_error = f"cannot load the LLM from {self.path}: {_short_reason(exc, 100)}"
                raise RuntimeError(self._load_error) from exc
            self._tokenizer, self._model = tokenizer, model
        return self._tokenizer, self._model

    def _generate(self, messages: list[dict[str, str]]) -> str:
        """Greedy decoding of the model's reply to the messages."""
        import torch

        with self._lock:
            tokenizer, model = self._load()
            # Chat models expect their own template; a base model gets a plain prompt.
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            else:
                text = "\n\n".join(message["content"] for message in messages) + "\n\nJSON:\n"
                encoded = tokenizer(text, return_tensors="pt")
            encoded = {key: value.to(self.device) for key, value in encoded.items()}
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            with torch.inference_mode():
                output = model.generate(
                    **encoded,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            prompt_length = encoded["input_ids"].shape[1]
            return str(tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True))


# --- Variants -----------------------------------------------------------------------------------


def shot_identity(storyboard: Storyboard, shot: Shot) -> tuple[object, ...]:
    """What decides a shot's latents besides the model and the request's steps/guidance (the same
    for every variant of one request): the shot cache's key without the model."""
    return (
        storyboard.width,
        storyboard.height,
        shot.prompt,
        shot.negative_prompt,
        shot.seed,
        shot.num_frames,
    )


def mark_shared_shots(storyboards: Sequence[Storyboard]) -> list[Storyboard]:
    """The storyboards with ``Shot.shared`` set on each shot that two or more of them hold."""
    holders = Counter(
        identity for board in storyboards for identity in {shot_identity(board, s) for s in board.shots}
    )
    return [
        board.model_copy(
            update={
                "shots": [
                    shot.model_copy(update={"shared": holders[shot_identity(board, shot)] > 1})
                    for shot in board.shots
                ]
            }
        )
        for board in storyboards
    ]


def variant_leaders(storyboards: Sequence[Storyboard]) -> list[int | None]:
    """For each variant, the first earlier one holding a shot it shares: it is made after that one, to
    take the shots from the caches (None: it waits for nobody)."""
    held = [{shot_identity(board, shot) for shot in board.shots if shot.shared} for board in storyboards]
    return [next((j for j in range(i) if held[i] & held[j]), None) for i in range(len(storyboards))]


def plan_variants(
    planner: Planner,
    brief: ProductBrief,
    profiles: Sequence[ShopperProfile | None],
    campaign: Campaign | None = None,
) -> list[Storyboard]:
    """One storyboard per shopper profile (or segment) for one product, its shared shots marked.

    The hook, the product's features and the price shot look the same for every shopper (same prompt,
    seed and frames); what a shopper changes is which features come first, the captions' language and
    wording, and a preferred style (which changes every prompt, so nothing is shared then).
    """
    if not 1 <= len(profiles) <= MAX_VARIANTS:
        raise ValueError(f"profiles must name 1..{MAX_VARIANTS} shoppers, got {len(profiles)}")
    return mark_shared_shots([planner.plan(brief, profile, campaign) for profile in profiles])


def build_planner(config: PlannerConfig, compliance: ComplianceConfig | None = None) -> CompliantPlanner:
    """The planner the config names, behind the advertising-rule checks."""
    inner = LLMPlanner(config) if config.kind == "llm" else TemplatePlanner(config)
    return CompliantPlanner(inner, compliance or ComplianceConfig())
