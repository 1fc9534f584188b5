"""The HTTP wire format: request bodies, prompt -> brief, response objects, errors as clients see them.

Two APIs share it: OpenAI's ``/v1/videos`` and shopreel's own ``/v1/product-videos`` (a structured
brief, optionally streamed). Nothing here knows Ray Serve, the stages or the job queue: the ingress
(``app.py``) parses with these types and the job service (``jobs.py``) answers with them.

Shapes follow the openai SDK's ``videos`` resource (``openai.types.Video``, ``VideoDeleteResponse``,
``SyncConversationCursorPage``). The SDK's ``create`` always posts ``multipart/form-data``, with or
without a file, so extension parameters sent through ``extra_body`` arrive as form strings. The SDK
types ``seconds``/``size`` as Sora's few literals; any value inside shopreel's limits is accepted here,
because SGLang and vLLM-Omni clients send other sizes and lengths.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..pipelines.types import (
    MAX_DURATION_S,
    MAX_FPS,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_BYTES,
    MAX_INFERENCE_STEPS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SELLING_POINT_CHARS,
    MAX_SELLING_POINTS,
    MAX_TITLE_CHARS,
    MAX_TOTAL_FRAMES,
    MAX_VARIANTS,
    MIN_DURATION_S,
    MIN_FPS,
    Campaign,
    Language,
    ProductBrief,
    ProductImage,
    ShopperProfile,
    SpeedProfileName,
    StepCacheMethod,
    VideoSize,
    describe_validation_error,
)
from .store import MAX_LIST_LIMIT, VIDEO_ID_PATTERN, JobRecord, ListOrder, VideoVariant

DEFAULT_SECONDS = 4.0  # OpenAI's default clip length
DEFAULT_LIST_LIMIT = 20
MAX_MODEL_CHARS = 256
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024  # a brief with four 8 MB images is refused by the image limit
MAX_JSON_DEPTH = 32  # our deepest request nests 5 levels; deeper is abuse (and Python's parser recurses)
# The SDK's ``videos.poll`` waits this many milliseconds between retrieves when a response carries it.
POLL_AFTER_HEADER = "openai-poll-after-ms"
POLL_AFTER_MS = 500
VIDEO_ID_HEADER = "x-shopreel-video-id"
# Lets a client tell a whole stream from one that broke off (Serve's proxy ends both cleanly).
NUM_FRAMES_HEADER = "x-shopreel-num-frames"

AudioChoice = Literal["bed", "none"]


class APIError(Exception):
    """An error the HTTP boundary sends as OpenAI's error body; the SDK picks its exception by status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _default_error_type(status_code)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def too_large(cls, message: str, param: str | None = None) -> APIError:
        return cls(413, message, param=param, code="payload_too_large")

    @classmethod
    def not_found(cls, message: str, param: str | None = None) -> APIError:
        return cls(404, message, param=param, code="not_found")

    @classmethod
    def overloaded(
        cls,
        message: str,
        retry_after_s: float,
        status_code: Literal[429, 503] = 503,
        code: str = "queue_full",
    ) -> APIError:
        """A full queue or quota. The SDK retries 429/503 after ``retry-after-ms`` (else ``Retry-After``)."""
        headers = {
            "Retry-After": str(max(1, math.ceil(retry_after_s))),
            "retry-after-ms": str(round(retry_after_s * 1000)),
        }
        return cls(status_code, message, code=code, headers=headers)

    @classmethod
    def from_validation_error(cls, exc: ValidationError, prefix: str = "") -> APIError:
        """400 naming every bad field; ``param`` is the first one's path (``prefix.field.sub``)."""
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "") or None
        code = _VALIDATION_CODES.get(first["type"], "invalid_value")
        return cls.invalid("; ".join(describe_validation_error(exc, prefix)), param, code)


def _default_error_type(status_code: int) -> str:
    if status_code == 404:
        return "not_found_error"
    if status_code == 429:
        return "rate_limit_error"
    return "server_error" if status_code >= 500 else "invalid_request_error"


SPEED_PROFILE_DOC = (
    "quality, balanced or fast: steps, scheduler and step cache (None: a sales event's, else the server's)"
)
STEP_CACHE_DOC = (
    "none, first_block, mag, taylorseer, pab or sea: a step cache for this video (None: the profile's); "
    "refused when it misses the server's fidelity floor"
)

_VALIDATION_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


class VideoCreateRequest(BaseModel):
    """``POST /v1/videos``: OpenAI's parameters plus the extensions SGLang/vLLM-Omni clients send."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_CHARS)
    seconds: float | None = Field(
        default=None, ge=MIN_DURATION_S, le=MAX_DURATION_S, description="OpenAI sends a string, e.g. '4'"
    )
    size: VideoSize | None = Field(default=None, description="'WIDTHxHEIGHT'; None: the model's default")
    input_reference: bytes | None = Field(
        default=None, max_length=MAX_IMAGE_BYTES, description="a product image (PNG/JPEG/WebP)"
    )
    num_frames: int | None = Field(default=None, ge=1, le=MAX_TOTAL_FRAMES, description="instead of seconds")
    fps: int | None = Field(default=None, ge=MIN_FPS, le=MAX_FPS)
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_INFERENCE_STEPS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE_SCALE)
    speed_profile: SpeedProfileName | None = Field(default=None, description=SPEED_PROFILE_DOC)
    step_cache: StepCacheMethod | None = Field(default=None, description=STEP_CACHE_DOC)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @classmethod
    def from_json(cls, data: object) -> VideoCreateRequest:
        """From a JSON body; ``input_reference`` is OpenAI's ``{"image_url": "data:image/..;base64,.."}``."""
        if not isinstance(data, dict):
            raise APIError.invalid("the request body must be a JSON object")
        values = dict(data)
        if values.get("input_reference") is not None:
            values["input_reference"] = _reference_object_bytes(values["input_reference"])
        return cls._validated(values)

    @classmethod
    def from_form(cls, fields: Mapping[str, str], input_reference: bytes | None = None) -> VideoCreateRequest:
        """From multipart text fields (numbers arrive as strings and are parsed, never rounded) + the file.

        ``input_reference[image_url]`` fields (the SDK's form encoding of the object form) are accepted too.
        """
        values: dict[str, object] = {}
        reference: dict[str, str] = {}
        for key, value in fields.items():
            match = _REFERENCE_SUBFIELD.fullmatch(key)
            if match is not None:
                reference[match.group(1)] = value
            elif key == "input_reference":
                raise APIError.invalid("input_reference must be an uploaded image file", key)
            else:
                values[key] = value
        if reference:
            if input_reference is not None:
                raise APIError.invalid(
                    "give input_reference as a file or as an object, not both", "input_reference"
                )
            input_reference = _reference_object_bytes(reference)
        if input_reference is not None:
            values["input_reference"] = _check_image_size(input_reference)
        return cls._validated(values)

    @classmethod
    async def from_multipart(cls, form: FormData) -> VideoCreateRequest:
        """From a parsed multipart form (``await request.form()``), reading at most one image's bytes."""
        fields: dict[str, str] = {}
        upload: bytes | None = None
        for key, value in form.multi_items():
            if key in fields or (key == "input_reference" and upload is not None):
                raise APIError.invalid(f"{key} is given more than once", key)
            if isinstance(value, str):
                fields[key] = value
            elif key == "input_reference":
                upload = _check_image_size(await value.read(MAX_IMAGE_BYTES + 1))
            else:
                raise APIError.invalid(f"{key} must be a text field, not a file", key)
        return cls.from_form(fields, upload)

    @classmethod
    def _validated(cls, values: Mapping[str, object]) -> VideoCreateRequest:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None


_REFERENCE_SUBFIELD = re.compile(r"input_reference\[(\w+)\]")


def _check_image_size(raw: bytes) -> bytes:
    if len(raw) > MAX_IMAGE_BYTES:
        raise APIError.too_large(f"input_reference is larger than {MAX_IMAGE_BYTES} bytes", "input_reference")
    return raw


def _reference_object_bytes(value: object) -> bytes:
    """The image in OpenAI's ``{"image_url": ...}`` reference; only data URLs (the server fetches no URLs)."""
    if not isinstance(value, Mapping):
        raise APIError.invalid("input_reference must be an object with an image_url", "input_reference")
    for key in value:
        if key != "image_url":
            code = "unsupported_parameter" if key == "file_id" else "unknown_parameter"
            raise APIError.invalid(
                f"input_reference.{key} is not supported: upload the image or send image_url as a data URL",
                f"input_reference.{key}",
                code,
            )
    url = value.get("image_url")
    header, _, payload = url.partition(",") if isinstance(url, str) else ("", "", "")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise APIError.invalid(
            "input_reference.image_url must be a data URL (data:image/png;base64,...)",
            "input_reference.image_url",
        )
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:  # refuse before decoding anything huge
        raise APIError.too_large(f"input_reference is larger than {MAX_IMAGE_BYTES} bytes", "input_reference")
    try:
        return _check_image_size(base64.b64decode(payload, validate=True))
    except binascii.Error:
        raise APIError.invalid(
            "input_reference.image_url is not valid base64", "input_reference.image_url"
        ) from None


@dataclass(frozen=True)
class GenerationOptions:
    """Sampler settings a request may override; ``None`` keeps the model preset's default."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    speed_profile: SpeedProfileName | None = None
    step_cache: StepCacheMethod | None = None


class JobRequest(BaseModel):
    """What a client asked for, from either API; a job record keeps it so a restarted app can run it again."""

    model_config = ConfigDict(extra="forbid")

    brief: ProductBrief
    profile: ShopperProfile | None = None
    campaign: Campaign | None = None
    options: GenerationOptions = Field(default_factory=GenerationOptions)


class _ProductVideoFields(BaseModel):
    """What both product-video routes take besides their shoppers: the brief and the sampler's options."""

    model_config = ConfigDict(extra="forbid")

    brief: ProductBrief
    campaign: Campaign | None = None
    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    audio: AudioChoice = Field(default="bed", description="generated music bed, or silence")
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE_SCALE)
    speed_profile: SpeedProfileName | None = Field(default=None, description=SPEED_PROFILE_DOC)
    step_cache: StepCacheMethod | None = Field(default=None, description=STEP_CACHE_DOC)
    priority: Literal["normal", "bulk"] = Field(
        default="normal",
        description="bulk (catalog pre-generation, jobs only): produced after normal jobs, refused first",
    )

    @classmethod
    def from_json(cls: type[_ProductRequest], data: object) -> _ProductRequest:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None

    def _job_request(self, profile: ShopperProfile | None) -> JobRequest:
        options = GenerationOptions(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            speed_profile=self.speed_profile,
            step_cache=self.step_cache,
        )
        return JobRequest(brief=self.brief, profile=profile, campaign=self.campaign, options=options)


_ProductRequest = TypeVar("_ProductRequest", bound=_ProductVideoFields)


class ProductVideoRequest(_ProductVideoFields):
    """``POST /v1/product-videos``: a structured brief; ``stream`` answers with fMP4 as it is made."""

    profile: ShopperProfile | None = None
    stream: bool = Field(default=False, description="true: video/mp4 bytes now; false: a job to poll")

    def job_request(self) -> JobRequest:
        return self._job_request(self.profile)


class ProductVideoVariantsRequest(_ProductVideoFields):
    """``POST /v1/product-videos/variants``: one brief, a video job per shopper profile (or segment).

    The shots the videos share (hook, product, price) are generated and rendered once: the first job
    makes them, the others wait for it and take them from the caches.
    """

    profiles: list[ShopperProfile] = Field(
        min_length=1, max_length=MAX_VARIANTS, description="one video each, in this order"
    )

    def job_requests(self) -> list[JobRequest]:
        return [self._job_request(profile) for profile in self.profiles]


# --- JSON bodies ---------------------------------------------------------------------------------


def check_body_size(request: Request) -> None:
    """413 from the declared length, before any of the body is read."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_JSON_BODY_BYTES:
        raise APIError.too_large(f"request body is {length} bytes, more than {MAX_JSON_BODY_BYTES}")


async def read_json(request: Request) -> Any:
    """The parsed JSON body; 413 when too large (declared or not), 400 when it is not JSON."""
    check_body_size(request)
    raw = await request.body()
    if len(raw) > MAX_JSON_BODY_BYTES:
        raise APIError.too_large(f"request body is more than {MAX_JSON_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError.invalid(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # the C parser stops at the interpreter's recursion limit: never a 500
        raise _too_deep() from None
    if json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise _too_deep()
    return data


def _too_deep() -> APIError:
    return APIError.invalid(f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def json_depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests lists and objects, counted without recursion and up to ``limit`` + 1."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            pending.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# Sentence ends: ASCII ones only before whitespace ("3.5 mm" stays whole); CJK ones and line breaks anywhere.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|[。！？；;\n]+")
_EDGE_CHARS = " \t\r\n.!?。！？,，、;；:：…"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def request_to_brief(req: VideoCreateRequest, default_fps: int) -> tuple[ProductBrief, GenerationOptions]:
    """A plain prompt as a one-product brief: first sentence -> title, later sentences -> selling points.

    The title and selling points are shortened to the brief's limits (with "…") and sentences past
    ``MAX_SELLING_POINTS`` are not used: the planner needs short texts, and the job keeps the whole prompt.
    """
    # 1. Title and selling points from the prompt's sentences.
    sentences = [piece.strip(_EDGE_CHARS) for piece in _SENTENCE_BREAK.split(req.prompt)]
    sentences = [sentence for sentence in sentences if sentence]
    if not sentences:
        raise APIError.invalid("prompt has no words to make a video from", "prompt")
    language: Language = "zh" if _CJK.search(req.prompt) else "en"

    # 2. Duration from seconds, or from num_frames at the request's fps.
    fps = req.fps or default_fps
    duration_s = _duration_s(req, fps)

    # 3. The reference image is the product photo.
    images = [] if req.input_reference is None else [_product_image(req.input_reference)]

    brief = ProductBrief(
        title=_clip(sentences[0], MAX_TITLE_CHARS),
        selling_points=[_clip(s, MAX_SELLING_POINT_CHARS) for s in sentences[1 : 1 + MAX_SELLING_POINTS]],
        language=language,
        duration_s=duration_s,
        size=req.size,
        fps=fps,
        seed=req.seed or 0,
        images=images,
    )
    options = GenerationOptions(
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        negative_prompt=req.negative_prompt,
        speed_profile=req.speed_profile,
        step_cache=req.step_cache,
    )
    return brief, options


def _duration_s(req: VideoCreateRequest, fps: int) -> float:
    if req.num_frames is None:
        return req.seconds if req.seconds is not None else DEFAULT_SECONDS
    if req.seconds is not None and req.num_frames != round(req.seconds * fps):
        raise APIError.invalid(
            f"num_frames {req.num_frames} does not match seconds {req.seconds:g} at {fps} fps: "
            "give one of them",
            "num_frames",
        )
    duration_s = req.num_frames / fps
    if not MIN_DURATION_S <= duration_s <= MAX_DURATION_S:
        raise APIError.invalid(
            f"num_frames {req.num_frames} at {fps} fps is {duration_s:.2f} s; "
            f"videos are {MIN_DURATION_S:g} to {MAX_DURATION_S:g} s",
            "num_frames",
        )
    return duration_s


def _product_image(raw: bytes) -> ProductImage:
    try:
        return ProductImage(data=base64.b64encode(raw).decode("ascii"))
    except ValidationError as exc:
        message = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise APIError.invalid(f"input_reference: {message}", "input_reference") from None


def _clip(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, ending on a word boundary when one is near, marked with "…"."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    head, space, _ = cut.rpartition(" ")
    if space and len(head) >= limit // 2:
        cut = head
    return cut.rstrip(_EDGE_CHARS) + "…"


class VideoListQuery(BaseModel):
    """``GET /v1/videos`` query: cursor pagination as the SDK's ``SyncConversationCursorPage`` drives it."""

    model_config = ConfigDict(extra="forbid")

    after: str | None = Field(
        default=None, pattern=f"^{VIDEO_ID_PATTERN}$", description="last id of the previous page"
    )
    limit: int = Field(default=DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT)
    order: ListOrder = "desc"

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> VideoListQuery:
        try:
            return cls.model_validate(dict(params))
        except ValidationError as exc:
            raise APIError.from_validation_error(exc) from None


def content_variant(value: str | None) -> VideoVariant:
    """``GET /v1/videos/{id}/content?variant=``; the SDK's third variant, "spritesheet", is not made here."""
    if value is None or value == "video":
        return "video"
    if value == "thumbnail":
        return "thumbnail"
    raise APIError.invalid(f"variant must be 'video' or 'thumbnail', got {value!r}", "variant")


def video_object(record: JobRecord) -> dict[str, Any]:
    """The job as the SDK's ``Video``: exactly its fields."""
    return {
        "id": record.id,
        "object": "video",
        "created_at": record.created_at,
        "status": record.status,
        "model": record.model,
        "progress": record.progress,
        "seconds": record.seconds,
        "size": record.size,
        "completed_at": record.completed_at,
        "expires_at": record.expires_at,
        "error": None if record.error is None else dict(record.error),
        "remixed_from_video_id": None,
        "prompt": record.prompt,
    }


def list_page(records: Sequence[JobRecord], has_more: bool) -> dict[str, Any]:
    """A list page; the SDK asks for the next page with ``after=last_id`` until ``has_more`` is false."""
    return {
        "object": "list",
        "data": [video_object(record) for record in records],
        "first_id": records[0].id if records else None,
        "last_id": records[-1].id if records else None,
        "has_more": has_more,
    }


def deleted_object(video_id: str) -> dict[str, Any]:
    """The SDK's ``VideoDeleteResponse``."""
    return {"id": video_id, "object": "video.deleted", "deleted": True}


# --- why a video was not made, as clients see it -------------------------------------------------

# A job's error code -> the HTTP status a sync or streaming request answers it with.
_FAILURE_STATUS = {"invalid_request": 400, "overloaded": 503, "stage_unavailable": 503}


def overloaded(exc: Exception, retry_after_s: float) -> APIError:
    """A stage refused work (Serve's back-pressure, or no replica): 503 with ``Retry-After``."""
    return APIError.overloaded(
        f"a stage is at capacity: {type(exc).__name__}", retry_after_s, status_code=503
    )


def not_produced(record: JobRecord) -> APIError:
    """Why a sync or streaming request got no video now; a requeued one is still made, by id."""
    if record.status in ("queued", "in_progress"):
        return APIError(
            503,
            f"a stage replica was lost; video {record.id} is queued again: poll GET /v1/videos/{record.id}",
            code="stage_unavailable",
        )
    return failure_error(record)


def failure_error(record: JobRecord) -> APIError:
    """A failed job's recorded error as the error a request answers with."""
    error = record.error or {"code": "internal_error", "message": "video failed"}
    return APIError(_FAILURE_STATUS.get(error["code"], 500), error["message"], code=error["code"])
