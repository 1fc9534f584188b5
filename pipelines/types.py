"""Typed values that cross a stage boundary.

Inputs a user writes (``ProductBrief``, ``ShopperProfile``, ``Campaign``) are pydantic models with
hard limits: a value outside a limit is rejected with an error naming the field, never rounded or
dropped. Values passed between stages (``LatentChunk``, ``FrameChunk``) are plain dataclasses
carrying tensors/arrays, so they cross process boundaries without list/base64 conversion.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# --- Hard limits (one place; the API and the CLI report them by name) ------------------------------
MAX_TITLE_CHARS = 120
MAX_VARIANTS = 16  # shopper profiles (or segments) one variant fan-out may name
MAX_INFERENCE_STEPS = 100  # denoising steps a request, a config or a preset may ask for
MAX_GUIDANCE_SCALE = 20.0  # classifier-free guidance a request, a config or a preset may ask for
# Named speed/fidelity trades a request, a config or a sales event may pick (pipelines/speed.py).
SpeedProfileName = Literal["quality", "balanced", "fast"]
# Step caches on the denoiser (pipelines/step_cache.py).
StepCacheMethod = Literal["none", "first_block", "mag", "taylorseer", "pab", "sea"]
MAX_CATEGORY_CHARS = 60
MAX_ATTRIBUTES = 20
MAX_ATTRIBUTE_KEY_CHARS = 40
MAX_ATTRIBUTE_VALUE_CHARS = 120
MAX_SELLING_POINTS = 8
MAX_SELLING_POINT_CHARS = 80
MAX_STYLE_CHARS = 60
MAX_CAPTION_CHARS = 80
MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MIN_DURATION_S = 2.0
MAX_DURATION_S = 60.0
MIN_SIDE = 64
MAX_SIDE = 1280
SIDE_MULTIPLE = 16  # VAE spatial factor 8 x transformer patch 2
MIN_FPS = 4
MAX_FPS = 30
MAX_SHOTS = 12
MAX_SHOT_FRAMES = 161  # 4k+1; twice Wan 2.1's trained clip length
MAX_TOTAL_FRAMES = 1801
MAX_PRICE = Decimal("1000000000")
MAX_INTERESTS = 10
MAX_STEPS = 10  # a how-to or process video: one shot per step, plus an opening shot and a closing one
MAX_SEED = 2**32 - 1

Language = Literal["zh", "en"]
# showcase: the product and its selling points; tutorial: numbered how-to steps (customer service);
# process: numbered steps of how it is made, checked and shipped. A shopper profile personalises and a
# campaign themes any of them.
VideoMode = Literal["showcase", "tutorial", "process"]
STEP_MODES = ("tutorial", "process")


class CameraMove(str, Enum):
    static = "static"
    push_in = "push_in"
    pull_out = "pull_out"
    pan_left = "pan_left"
    pan_right = "pan_right"
    orbit = "orbit"
    tilt_up = "tilt_up"


class Transition(str, Enum):
    """How a shot hands over to the next one."""

    cut = "cut"
    crossfade = "crossfade"


class ShotKind(str, Enum):
    hook = "hook"
    feature = "feature"
    step = "step"  # one numbered step of a tutorial or process video
    cta = "cta"


class VideoSize(BaseModel):
    """Output size in pixels; parsed from ``"WxH"`` (the OpenAI ``size`` form) or ``{"width", "height"}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)

    @model_validator(mode="before")
    @classmethod
    def _parse_string(cls, value: object) -> object:
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", value)
            if match is None:
                raise ValueError(f"size must look like 'WIDTHxHEIGHT' (e.g. '832x480'), got {value!r}")
            return {"width": int(match.group(1)), "height": int(match.group(2))}
        return value

    @model_validator(mode="after")
    def _check_multiple(self) -> VideoSize:
        for name in ("width", "height"):
            if getattr(self, name) % SIDE_MULTIPLE:
                raise ValueError(f"{name} must be a multiple of {SIDE_MULTIPLE}, got {getattr(self, name)}")
        return self

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


class ProductImage(BaseModel):
    """A product photo, base64 or a ``data:image/...;base64,`` URL. Checked for bytes and pixels."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1, description="base64-encoded PNG/JPEG/WebP, or a data URL")

    @field_validator("data")
    @classmethod
    def _check_image(cls, value: str) -> str:
        raw = _decode_base64_image(value)
        _open_checked_image(raw)
        return value

    def to_bytes(self) -> bytes:
        return _decode_base64_image(self.data)

    def to_pil(self):  # -> PIL.Image.Image (RGBA)
        return _open_checked_image(self.to_bytes()).convert("RGBA")


def _decode_base64_image(value: str) -> bytes:
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    # base64 inflates by 4/3: refuse before decoding anything huge.
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise ValueError(f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("image data is not valid base64") from exc


def _open_checked_image(raw: bytes):
    from PIL import Image

    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception as exc:  # Pillow raises several types for garbage input
        raise ValueError("image data is not a readable PNG/JPEG/WebP image") from exc
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image has {image.width}x{image.height} pixels, more than {MAX_IMAGE_PIXELS}")
    image.load()
    return image


ShortText = Annotated[str, Field(min_length=1, max_length=MAX_SELLING_POINT_CHARS)]


class ProductBrief(BaseModel):
    """What a merchant tells us about one product. ``size``/``fps`` default to the model preset's."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)
    category: str = Field(default="product", min_length=1, max_length=MAX_CATEGORY_CHARS)
    attributes: dict[str, str] = Field(default_factory=dict, max_length=MAX_ATTRIBUTES)
    selling_points: list[ShortText] = Field(default_factory=list, max_length=MAX_SELLING_POINTS)
    price: Decimal | None = Field(default=None, ge=0, le=MAX_PRICE, decimal_places=2)
    currency: str = Field(default="CNY", pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    images: list[ProductImage] = Field(default_factory=list, max_length=MAX_IMAGES)
    language: Language = "en"
    duration_s: float = Field(default=8.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    size: VideoSize | None = None
    fps: int | None = Field(default=None, ge=MIN_FPS, le=MAX_FPS)
    style: str = Field(default="clean studio", min_length=1, max_length=MAX_STYLE_CHARS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    compliance: Literal["reject", "rewrite"] | None = Field(
        default=None,
        description="absolute/medical claims in the brief: refuse it (400 naming them) or rewrite them; "
        "None: the server's pipeline.compliance.default_policy",
    )
    mode: VideoMode = Field(
        default="showcase",
        description="showcase (selling points), tutorial (numbered how-to steps) or process (numbered "
        "steps of making and shipping it)",
    )
    steps: list[ShortText] = Field(
        default_factory=list,
        max_length=MAX_STEPS,
        description="tutorial/process: the steps in order, one shot each (e.g. 'Unscrew the lid')",
    )
    narration: bool = Field(
        default=False,
        description="speak each shot's caption (offline text-to-speech), the music lowered under the voice",
    )

    @field_validator("title", "category", "style")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_not_blank(cls, value: list[str]) -> list[str]:
        for position, step in enumerate(value):
            if not step.strip():
                raise ValueError(f"step {position + 1} must not be blank")
        return value

    @model_validator(mode="after")
    def _steps_fit_mode(self) -> ProductBrief:
        if self.mode in STEP_MODES and not self.steps:
            raise ValueError(f"mode {self.mode!r} needs steps: the instructions, one per shot, in order")
        if self.mode not in STEP_MODES and self.steps:
            raise ValueError(f"steps are for mode 'tutorial' or 'process', not {self.mode!r}")
        return self

    @field_validator("attributes")
    @classmethod
    def _check_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key.strip() or len(key) > MAX_ATTRIBUTE_KEY_CHARS:
                raise ValueError(f"attribute name {key!r} must be 1..{MAX_ATTRIBUTE_KEY_CHARS} characters")
            if len(item) > MAX_ATTRIBUTE_VALUE_CHARS:
                raise ValueError(f"attribute {key!r} is longer than {MAX_ATTRIBUTE_VALUE_CHARS} characters")
        return value


class ShopperProfile(BaseModel):
    """Who will watch: used to order selling points and pick a style; never stored with the video."""

    model_config = ConfigDict(extra="forbid")

    segment: str | None = Field(default=None, max_length=60, description="e.g. 'new parent', 'runner'")
    interests: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=list, max_length=MAX_INTERESTS
    )
    preferred_style: str | None = Field(default=None, max_length=MAX_STYLE_CHARS)
    language: Language | None = None


class Campaign(BaseModel):
    """A sales event (11.11, 618, Black Friday): a badge on every shot and an event call to action."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=40, description="e.g. '11.11', '618', 'Black Friday'")
    discount_text: str | None = Field(default=None, max_length=40, description="e.g. '满300减50'")
    badge: str | None = Field(default=None, max_length=24, description="short text in the corner badge")
    accent_color: str = Field(default="#FF4D1A", pattern=r"^#[0-9A-Fa-f]{6}$")


class ComplianceFinding(BaseModel):
    """A term the advertising rules forbid, where it was, and what replaced it (``""``: dropped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(description="e.g. brief.selling_points[1], storyboard.shots[2].caption")
    term: str
    rule: Literal["absolute_claim", "medical_claim", "prohibited_goods"]
    replacement: str | None = None


class Shot(BaseModel):
    """One continuous clip the video model generates; frames are 4k+1 (Wan's temporal VAE)."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, lt=MAX_SHOTS)
    kind: ShotKind
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    caption: str = Field(default="", max_length=MAX_CAPTION_CHARS)
    num_frames: int = Field(ge=5, le=MAX_SHOT_FRAMES)
    camera_move: CameraMove = CameraMove.static
    transition: Transition = Field(default=Transition.cut, description="into the next shot")
    transition_frames: int = Field(default=0, ge=0, le=32, description="overlap with the next shot")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    step_number: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="a step shot's number, drawn in a badge"
    )
    shared: bool = Field(
        default=False,
        description="the same shot (prompt, seed, frames) is in other variants: generated and rendered once",
    )

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, value: int) -> int:
        if (value - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (5, 9, 13, ...), got {value}")
        return value

    @model_validator(mode="after")
    def _check_transition(self) -> Shot:
        if self.transition == Transition.cut and self.transition_frames:
            raise ValueError("transition_frames must be 0 for a cut")
        if self.transition == Transition.crossfade and not 1 <= self.transition_frames < self.num_frames:
            raise ValueError("a crossfade needs 1 <= transition_frames < num_frames")
        return self

    @model_validator(mode="after")
    def _step_number_on_steps(self) -> Shot:
        if (self.kind == ShotKind.step) != (self.step_number is not None):
            raise ValueError("a step shot needs step_number, and only a step shot has one")
        return self

    @property
    def num_latent_frames(self) -> int:
        return (self.num_frames - 1) // 4 + 1


class Storyboard(BaseModel):
    """The plan for one video: every number the later stages and the output file must match."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(max_length=MAX_TITLE_CHARS)
    language: Language
    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    fps: int = Field(ge=MIN_FPS, le=MAX_FPS)
    shots: list[Shot] = Field(min_length=1, max_length=MAX_SHOTS)
    price_text: str | None = Field(default=None, max_length=MAX_CAPTION_CHARS)
    cta_text: str = Field(default="", max_length=MAX_CAPTION_CHARS)
    badge_text: str | None = Field(default=None, max_length=24)
    accent_color: str = Field(default="#FF4D1A", pattern=r"^#[0-9A-Fa-f]{6}$")
    aigc_label: str = Field(min_length=1, max_length=40, description="visible AI-generated-content label")
    planner: str = Field(default="template", description="which planner wrote it")
    mode: VideoMode = Field(default="showcase", description="the brief's mode")
    narration: bool = Field(default=False, description="captions are spoken (pipelines/narration.py)")
    compliance: list[ComplianceFinding] = Field(
        default_factory=list, description="advertising-rule findings, rewritten before planning or after"
    )

    @model_validator(mode="after")
    def _check_shots(self) -> Storyboard:
        for position, shot in enumerate(self.shots):
            if shot.index != position:
                raise ValueError(f"shots[{position}].index must be {position}, got {shot.index}")
        last = self.shots[-1]
        if last.transition != Transition.cut:
            raise ValueError("the last shot has no next shot to transition into: use 'cut'")
        for shot, nxt in zip(self.shots, self.shots[1:], strict=False):
            if shot.transition_frames >= nxt.num_frames:
                raise ValueError(f"shots[{shot.index}].transition_frames must be < the next shot's frames")
        if self.total_frames > MAX_TOTAL_FRAMES:
            raise ValueError(f"storyboard has {self.total_frames} frames, more than {MAX_TOTAL_FRAMES}")
        numbers = [shot.step_number for shot in self.shots if shot.step_number is not None]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"step shots must be numbered 1, 2, ... in order, got {numbers}")
        if numbers and self.mode not in STEP_MODES:
            raise ValueError(f"step shots belong to a tutorial or process video, not {self.mode!r}")
        return self

    @property
    def total_frames(self) -> int:
        """Frames in the output video: crossfades overlap the shots they join."""
        return sum(s.num_frames for s in self.shots) - sum(s.transition_frames for s in self.shots)

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps


# --- Values passed between stages ---------------------------------------------------------------


def latent_to_pixel_range(latent_start: int, latent_end: int, temporal_factor: int = 4) -> tuple[int, int]:
    """Pixel frames decoded from latent frames [start, end) by a causal VAE: 1 for latent 0, 4 after."""

    def frames_before(latent_index: int) -> int:
        return 0 if latent_index == 0 else 1 + temporal_factor * (latent_index - 1)

    return frames_before(latent_start), frames_before(latent_end)


@dataclass
class LatentChunk:
    """Denoised latent frames [latent_start, latent_end) of one shot, as the generator emits them.

    ``latents`` is ``[1, C, T, h, w]`` in the model's *normalised* latent space (what the diffusers
    pipeline returns with ``output_type="latent"``); the renderer de-normalises before decoding.
    """

    request_id: str
    shot_index: int
    chunk_index: int
    latent_start: int
    latent_end: int
    latents: object  # torch.Tensor; typed loosely so importing this module never imports torch
    is_last: bool  # last chunk of this shot
    is_last_shot: bool
    timings: dict[str, float] = field(default_factory=dict)
    # The shot's content address (pipelines/shot_cache.py) when its frames may be reused: the renderer
    # keeps them under it. None: decode every time.
    cache_key: str | None = None

    @property
    def frame_range(self) -> tuple[int, int]:
        return latent_to_pixel_range(self.latent_start, self.latent_end)


@dataclass
class FrameChunk:
    """Decoded RGB frames [frame_start, frame_end) of one shot: ``uint8 [T, H, W, 3]``."""

    request_id: str
    shot_index: int
    chunk_index: int
    frame_start: int
    frame_end: int
    frames: np.ndarray
    is_last: bool
    is_last_shot: bool
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(
                f"frames must be uint8 [T, H, W, 3], got {self.frames.dtype} {self.frames.shape}"
            )
        if self.frames.shape[0] != self.frame_end - self.frame_start:
            raise ValueError("frame_end - frame_start must equal the number of frames")


@dataclass
class StageTimings:
    """Seconds spent per stage for one video (summed over shots/chunks), and the retries it survived."""

    understand_s: float = 0.0
    generate_s: float = 0.0
    render_s: float = 0.0
    compose_s: float = 0.0
    quality_s: float = 0.0  # scoring the finished video (pipelines/quality.py)
    first_fragment_s: float | None = None  # from request start
    total_s: float = 0.0
    render_retries: int = 0  # chunks rendered again after their renderer replica was lost
    generate_restarts: int = 0  # generator streams re-issued after their replica was lost

    def as_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


def describe_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``field.path: message`` line per pydantic error, for CLI messages and API error bodies."""
    lines = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    return lines
