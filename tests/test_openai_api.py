import asyncio
import base64
import email.parser
import io
import json

import httpx2
import openai
import pytest
from openai.types import Video, VideoDeleteResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from shopreel.pipelines.types import MAX_IMAGE_BYTES, MAX_SELLING_POINT_CHARS, MAX_TITLE_CHARS, ProductBrief
from shopreel.serve.protocol import (
    POLL_AFTER_HEADER,
    APIError,
    GenerationOptions,
    JobRequest,
    VideoCreateRequest,
    VideoListQuery,
    content_variant,
    deleted_object,
    list_page,
    request_to_brief,
    video_object,
)
from shopreel.serve.store import JobRecord, SqliteJobStore, new_video_id

# The SDK marks its video methods deprecated (Sora's shutdown date); the wire format is what we test.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

FPS = 16


def _png(width: int = 32, height: int = 32, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(**overrides) -> JobRecord:
    values = {
        "model": "shopreel-tiny",
        "prompt": "A red shoe.",
        "seconds": "4",
        "size": "832x480",
        "request": "{}",
    }
    return JobRecord(**{**values, **overrides})


def _api_error(call, *args) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args)
    return info.value


# --- Response objects, validated by the SDK's own types ------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"status": "in_progress", "progress": 35},
        {"status": "completed", "progress": 100, "completed_at": 1_700_000_100, "expires_at": 1_700_086_500},
        {"status": "failed", "error": {"code": "generation_failed", "message": "out of memory"}},
        {"prompt": None, "seconds": "2.5"},
    ],
)
def test_video_object_is_the_sdks_video(overrides):
    record = _record(created_at=1_700_000_000, size="720x1280", **overrides)
    body = video_object(record)
    assert set(body) == set(Video.model_fields)
    video = Video.model_validate(json.loads(json.dumps(body)))
    assert video.id == record.id and video.object == "video" and video.status == record.status
    assert video.seconds == record.seconds and video.size == record.size and video.progress == record.progress
    if record.error is not None:
        assert video.error.code == "generation_failed" and video.error.message == "out of memory"


def test_sdk_client_accepts_sizes_outside_its_literals():
    """``Video.size`` is typed as Sora's four sizes, but the client builds responses without validating."""
    record = _record(size="832x480", seconds="2.5")
    with pytest.raises(ValidationError):
        Video.model_validate(video_object(record))
    video = _serve(lambda request: (200, video_object(record), {})).videos.retrieve(record.id)
    assert (video.size, video.seconds) == ("832x480", "2.5")


def test_deleted_object_is_the_sdks_delete_response():
    video_id = new_video_id()
    deleted = VideoDeleteResponse.model_validate(deleted_object(video_id))
    assert (deleted.id, deleted.deleted, deleted.object) == (video_id, True, "video.deleted")


def _serve(handler) -> openai.OpenAI:
    """An SDK client whose HTTP calls go to ``handler(request) -> (status, body, headers)``."""

    def transport(request: httpx2.Request) -> httpx2.Response:
        status, body, headers = handler(request)
        return httpx2.Response(status, json=body, headers=headers)

    http_client = httpx2.Client(transport=httpx2.MockTransport(transport))
    return openai.OpenAI(
        api_key="test", base_url="http://shopreel/v1", http_client=http_client, max_retries=1
    )


def test_sdk_pages_through_list(tmp_path):
    with SqliteJobStore(tmp_path / "jobs.sqlite3") as jobs:
        ids = [jobs.create(_record(created_at=100 + i)).id for i in range(5)]
        queries = []

        def handler(request):
            query = VideoListQuery.from_query(dict(request.url.params))
            queries.append(dict(request.url.params))
            records, has_more = jobs.list(query.after, query.limit, query.order)
            return 200, list_page(records, has_more), {}

        client = _serve(handler)
        listed = [video.id for video in client.videos.list(limit=2, order="asc")]
        assert listed == ids
        assert queries == [
            {"limit": "2", "order": "asc"},
            {"limit": "2", "order": "asc", "after": ids[1]},
            {"limit": "2", "order": "asc", "after": ids[3]},
        ]
        assert [video.id for video in client.videos.list()] == ids[::-1]


def _parse_multipart(request: httpx2.Request) -> tuple[dict[str, str], bytes | None]:
    """Split the SDK's multipart body into text fields and the uploaded file (stdlib parser)."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(head + request.read())
    fields, upload = {}, None
    for part in message.get_payload():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is None:
            fields[name] = part.get_payload(decode=True).decode()
        else:
            upload = part.get_payload(decode=True)
    return fields, upload


def test_sdk_create_poll_delete_round_trip():
    """What the SDK sends on create (always multipart), how it polls, and how it reads errors."""
    state: dict[str, JobRecord] = {}
    polls = []

    def handler(request):
        if request.method == "POST":
            assert request.headers["content-type"].startswith("multipart/form-data")
            fields, upload = _parse_multipart(request)
            req = VideoCreateRequest.from_form(fields, upload)
            brief, options = request_to_brief(req, default_fps=FPS)
            assert options.num_inference_steps == 4 and brief.seed == 7 and len(brief.images) == 1
            record = _record(prompt=req.prompt, seconds=f"{brief.duration_s:g}", size=str(req.size))
            state[record.id] = record
            return 200, video_object(record), {}
        video_id = request.url.path.rsplit("/", 1)[-1]
        if video_id not in state:
            error = APIError.not_found(f"no video {video_id!r}", "video_id")
            return error.status_code, error.body(), error.headers
        if request.method == "DELETE":
            del state[video_id]
            return 200, deleted_object(video_id), {}
        polls.append(request.headers.get("x-stainless-poll-helper"))
        record = state[video_id]
        if record.progress < 100:
            state[video_id] = record = record.model_copy(
                update={"status": "in_progress", "progress": record.progress + 50}
            )
        else:
            state[video_id] = record = record.model_copy(update={"status": "completed", "completed_at": 1})
        return 200, video_object(record), {POLL_AFTER_HEADER: "1"}

    client = _serve(handler)
    video = client.videos.create_and_poll(
        prompt="Trail shoe. Grips wet rock.",
        seconds="4",
        size="832x480",
        input_reference=("shoe.png", _png(), "image/png"),
        extra_body={"num_inference_steps": 4, "seed": 7},
    )
    assert video.status == "completed" and video.progress == 100 and video.seconds == "4"
    assert polls == ["true"] * 3
    assert client.videos.delete(video.id).deleted is True
    with pytest.raises(openai.NotFoundError) as info:
        client.videos.retrieve(video.id)
    assert info.value.body == {
        "message": f"no video {video.id!r}",
        "type": "not_found_error",
        "param": "video_id",
        "code": "not_found",
    }


def test_sdk_retries_a_full_queue_after_retry_after():
    calls = []

    def handler(request):
        calls.append(request.headers.get("x-stainless-retry-count"))
        if len(calls) == 1:
            error = APIError.overloaded("the job queue is full", retry_after_s=0.01, status_code=429)
            return error.status_code, error.body(), error.headers
        return 200, video_object(_record()), {}

    assert _serve(handler).videos.create(prompt="A red shoe.").status == "queued"
    assert calls == ["0", "1"]


# --- Request parsing -------------------------------------------------------------------------------


def test_form_values_are_parsed_from_strings():
    req = VideoCreateRequest.from_form(
        {
            "prompt": "A red shoe.",
            "model": "shopreel-tiny",
            "seconds": "4",
            "size": "832x480",
            "num_frames": "64",
            "fps": "16",
            "num_inference_steps": "8",
            "seed": "42",
            "negative_prompt": "blurry",
            "guidance_scale": "4.5",
        },
        _png(),
    )
    assert (req.seconds, req.num_frames, req.fps, req.num_inference_steps, req.seed) == (4.0, 64, 16, 8, 42)
    assert req.guidance_scale == 4.5 and str(req.size) == "832x480" and req.input_reference == _png()


def test_multipart_form_reads_the_upload():
    form = FormData(
        [
            ("prompt", "A red shoe."),
            ("seconds", "8"),
            ("input_reference", UploadFile(io.BytesIO(_png()), filename="a.png")),
        ]
    )
    req = asyncio.run(VideoCreateRequest.from_multipart(form))
    assert req.seconds == 8.0 and req.input_reference == _png()


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([("prompt", "a"), ("prompt", "b")], "prompt"),
        ([("prompt", "a"), ("seed", UploadFile(io.BytesIO(b"1")))], "seed"),
        ([("prompt", "a"), ("input_reference", "data:image/png;base64,AAAA")], "input_reference"),
    ],
)
def test_multipart_form_shape_errors(items, param):
    error = _api_error(lambda: asyncio.run(VideoCreateRequest.from_multipart(FormData(items))))
    assert (error.status_code, error.param) == (400, param)


def test_oversized_upload_is_413_without_reading_it_all():
    upload = UploadFile(io.BytesIO(b"\0" * (MAX_IMAGE_BYTES + 10)), filename="big.png")
    form = FormData([("prompt", "A red shoe."), ("input_reference", upload)])
    error = _api_error(lambda: asyncio.run(VideoCreateRequest.from_multipart(form)))
    assert (error.status_code, error.param, error.code) == (413, "input_reference", "payload_too_large")
    assert upload.file.tell() == MAX_IMAGE_BYTES + 1


def test_json_body_with_a_data_url_reference():
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    req = VideoCreateRequest.from_json(
        {"prompt": "A red shoe.", "seconds": 4, "input_reference": {"image_url": data_url}}
    )
    assert req.input_reference == _png() and req.seconds == 4.0
    form_req = VideoCreateRequest.from_form({"prompt": "A red shoe.", "input_reference[image_url]": data_url})
    assert form_req.input_reference == _png()


@pytest.mark.parametrize(
    ("reference", "status", "param"),
    [
        ({"image_url": "https://example.com/a.png"}, 400, "input_reference.image_url"),
        ({"image_url": "data:image/png;base64,not base64!"}, 400, "input_reference.image_url"),
        ({"file_id": "file_123"}, 400, "input_reference.file_id"),
        ("data:image/png;base64,AAAA", 400, "input_reference"),
        (
            {"image_url": "data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)},
            413,
            "input_reference",
        ),
    ],
)
def test_json_reference_errors(reference, status, param):
    error = _api_error(VideoCreateRequest.from_json, {"prompt": "x", "input_reference": reference})
    assert (error.status_code, error.param) == (status, param)


def test_json_body_must_be_an_object():
    assert _api_error(VideoCreateRequest.from_json, ["prompt"]).status_code == 400


# --- Limits: every violation is a typed APIError naming the parameter ----------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": "x" * 2001}, "prompt", "invalid_value"),
        ({"prompt": "   "}, "prompt", "invalid_value"),
        ({"seconds": "61"}, "seconds", "invalid_value"),
        ({"seconds": "1"}, "seconds", "invalid_value"),
        ({"seconds": "four"}, "seconds", "invalid_value"),
        ({"size": "100x64"}, "size", "invalid_value"),
        ({"size": "2048x480"}, "size.width", "invalid_value"),
        ({"size": "big"}, "size", "invalid_value"),
        ({"num_inference_steps": "0"}, "num_inference_steps", "invalid_value"),
        ({"num_inference_steps": "101"}, "num_inference_steps", "invalid_value"),
        ({"num_frames": "33.5"}, "num_frames", "invalid_value"),
        ({"num_frames": "1802"}, "num_frames", "invalid_value"),
        ({"fps": "60"}, "fps", "invalid_value"),
        ({"seed": "-1"}, "seed", "invalid_value"),
        ({"seed": str(2**32)}, "seed", "invalid_value"),
        ({"guidance_scale": "21"}, "guidance_scale", "invalid_value"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt", "invalid_value"),
        ({"model": ""}, "model", "invalid_value"),
        ({"width": "832"}, "width", "unknown_parameter"),
    ],
)
def test_request_limits(fields, param, code):
    values = {"prompt": "A red shoe.", **fields} if fields else {}
    error = _api_error(VideoCreateRequest.from_form, values)
    assert (error.status_code, error.type, error.param, error.code) == (
        400,
        "invalid_request_error",
        param,
        code,
    )
    assert error.message.startswith(f"{param}:")


@pytest.mark.parametrize(
    ("fields", "param", "status"),
    [
        ({"num_frames": "16"}, "num_frames", 400),  # 1 s at 16 fps: shorter than a video can be
        ({"num_frames": "1000", "fps": "16"}, "num_frames", 400),  # 62.5 s
        ({"num_frames": "65", "seconds": "8"}, "num_frames", 400),  # 8 s at 16 fps is 128 frames
        ({"prompt": "?!..."}, "prompt", 400),
    ],
)
def test_brief_limits(fields, param, status):
    req = VideoCreateRequest.from_form({"prompt": "A red shoe.", **fields})
    error = _api_error(request_to_brief, req, FPS)
    assert (error.status_code, error.param) == (status, param)


@pytest.mark.parametrize(
    ("image", "message"),
    [(b"not an image", "not a readable"), (_png(4097, 4096, mode="1"), "pixels")],
)
def test_bad_reference_images(image, message):
    req = VideoCreateRequest.from_form({"prompt": "A red shoe."}, image)
    error = _api_error(request_to_brief, req, FPS)
    assert (error.status_code, error.param) == (400, "input_reference") and message in error.message


def test_oversized_form_image_is_413():
    error = _api_error(VideoCreateRequest.from_form, {"prompt": "x"}, b"\0" * (MAX_IMAGE_BYTES + 1))
    assert (error.status_code, error.type, error.param) == (413, "invalid_request_error", "input_reference")


# --- Prompt -> brief ---------------------------------------------------------------------------------


def test_english_prompt_becomes_a_brief():
    req = VideoCreateRequest.from_form(
        {
            "prompt": "Aero trail shoe with a 3.5 mm lug! Grips wet rock.  Weighs 240 g?\nRecycled mesh",
            "size": "480x832",
            "seed": "9",
            "num_inference_steps": "6",
            "guidance_scale": "3",
            "negative_prompt": "blurry",
        },
        _png(),
    )
    brief, options = request_to_brief(req, default_fps=FPS)
    assert brief.title == "Aero trail shoe with a 3.5 mm lug"
    assert brief.selling_points == ["Grips wet rock", "Weighs 240 g", "Recycled mesh"]
    assert brief.language == "en" and brief.duration_s == 4.0 and brief.fps == FPS
    assert str(brief.size) == "480x832" and brief.seed == 9
    assert brief.images[0].to_bytes() == _png()
    assert options == GenerationOptions(num_inference_steps=6, guidance_scale=3.0, negative_prompt="blurry")


def test_chinese_prompt_becomes_a_brief():
    req = VideoCreateRequest.from_form({"prompt": "轻量跑鞋。透气网面；缓震中底！", "seconds": "6"})
    brief, options = request_to_brief(req, default_fps=FPS)
    assert (brief.title, brief.selling_points) == ("轻量跑鞋", ["透气网面", "缓震中底"])
    assert brief.language == "zh" and brief.duration_s == 6.0 and brief.size is None and brief.images == []
    assert options == GenerationOptions()


def test_duration_from_num_frames():
    req = VideoCreateRequest.from_form({"prompt": "A red shoe.", "num_frames": "60", "fps": "24"})
    brief, _ = request_to_brief(req, default_fps=FPS)
    assert (brief.duration_s, brief.fps) == (2.5, 24)
    matching = VideoCreateRequest.from_form({"prompt": "A red shoe.", "num_frames": "64", "seconds": "4"})
    assert request_to_brief(matching, default_fps=FPS)[0].duration_s == 4.0


def test_long_prompts_are_shortened_to_the_brief_limits():
    title = "word " * 60
    points = [f"point {i} " + "x" * 100 for i in range(12)]
    req = VideoCreateRequest.from_form({"prompt": ". ".join([title, *points])})
    brief, _ = request_to_brief(req, default_fps=FPS)
    assert len(brief.title) <= MAX_TITLE_CHARS and brief.title.endswith("word…")
    assert len(brief.selling_points) == 8
    assert all(len(p) <= MAX_SELLING_POINT_CHARS and p.endswith("…") for p in brief.selling_points)
    assert brief.selling_points[0].startswith("point 0 ")


def test_job_request_round_trips_through_json():
    req = VideoCreateRequest.from_form({"prompt": "A red shoe. Light.", "num_inference_steps": "3"}, _png())
    brief, options = request_to_brief(req, default_fps=FPS)
    job = JobRequest(brief=brief, options=options)
    again = JobRequest.model_validate_json(job.model_dump_json())
    assert again == job and isinstance(again.brief, ProductBrief) and again.options.num_inference_steps == 3


# --- Errors, list query, content variant -------------------------------------------------------------


def test_error_body_and_response():
    error = APIError.invalid("size: bad", "size")
    assert error.body() == {
        "error": {
            "message": "size: bad",
            "type": "invalid_request_error",
            "param": "size",
            "code": "invalid_value",
        }
    }
    full = APIError.overloaded("the job queue is full", retry_after_s=2.5)
    response = full.response()
    assert response.status_code == 503 and json.loads(response.body)["error"]["type"] == "server_error"
    assert response.headers["retry-after"] == "3"
    assert response.headers["retry-after-ms"] == "2500"
    assert APIError.overloaded("busy", 1, status_code=429).type == "rate_limit_error"
    assert APIError.not_found("no video").type == "not_found_error"


def test_validation_error_prefix():
    with pytest.raises(ValidationError) as info:
        ProductBrief(title="")
    error = APIError.from_validation_error(info.value, prefix="brief")
    assert (error.status_code, error.param) == (400, "brief.title")
    assert error.message.startswith("brief.title:")


def test_list_query():
    assert VideoListQuery.from_query({}) == VideoListQuery(after=None, limit=20, order="desc")
    after = new_video_id()
    query = VideoListQuery.from_query({"after": after, "limit": "100", "order": "asc"})
    assert (query.after, query.limit, query.order) == (after, 100, "asc")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "../x"}, "after"),
        ({"before": new_video_id()}, "before"),
    ],
)
def test_list_query_errors(params, param):
    error = _api_error(VideoListQuery.from_query, params)
    assert (error.status_code, error.param) == (400, param)


def test_content_variant():
    assert content_variant(None) == "video"
    assert content_variant("video") == "video"
    assert content_variant("thumbnail") == "thumbnail"
    error = _api_error(content_variant, "spritesheet")
    assert (error.status_code, error.param) == (400, "variant")
