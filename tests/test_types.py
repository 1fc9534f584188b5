import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError
from storyboards import make_storyboard

from shopreel.pipelines.types import (
    MAX_IMAGE_PIXELS,
    ProductBrief,
    Shot,
    ShotKind,
    VideoSize,
    describe_validation_error,
    latent_to_pixel_range,
)


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _error_fields(exc: ValidationError) -> list[str]:
    return describe_validation_error(exc, prefix="brief")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("title", "x" * 121, "brief.title"),
        ("title", "   ", "brief.title: must not be blank"),
        ("duration_s", 61, "brief.duration_s"),
        ("duration_s", 1, "brief.duration_s"),
        ("fps", 60, "brief.fps"),
        ("size", "100x64", "brief.size: width must be a multiple of 16"),
        ("size", "2048x64", "brief.size.width"),
        ("size", "big", "brief.size: size must look like"),
        ("selling_points", ["a"] * 9, "brief.selling_points"),
        ("selling_points", ["x" * 81], "brief.selling_points.0"),
        ("price", -1, "brief.price"),
        ("currency", "yuan", "brief.currency"),
        ("language", "fr", "brief.language"),
        ("seed", 2**32, "brief.seed"),
        ("attributes", {"k" * 41: "v"}, "brief.attributes"),
        ("images", [{"data": "not base64!"}], "brief.images.0.data: image data is not valid base64"),
        ("images", [{"data": base64.b64encode(b"not an image").decode()}], "not a readable"),
        ("unknown_field", 1, "brief.unknown_field"),
    ],
)
def test_brief_limits_name_the_field(field, value, expected):
    with pytest.raises(ValidationError) as info:
        ProductBrief.model_validate({"title": "Shoe", field: value})
    assert any(line.startswith(expected) or expected in line for line in _error_fields(info.value)), (
        _error_fields(info.value)
    )


def test_image_pixel_limit(monkeypatch):
    import shopreel.pipelines.types as types

    monkeypatch.setattr(types, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValidationError, match="more than 100"):
        ProductBrief.model_validate({"title": "Shoe", "images": [{"data": _png(20, 20)}]})
    assert MAX_IMAGE_PIXELS == 4096 * 4096


def test_valid_brief_and_image_roundtrip():
    brief = ProductBrief.model_validate(
        {"title": "Shoe", "size": "832x480", "images": [{"data": "data:image/png;base64," + _png(8, 6)}]}
    )
    assert brief.size == VideoSize(width=832, height=480)
    assert brief.images[0].to_pil().size == (8, 6)


def test_shot_frames_must_be_4k_plus_1():
    with pytest.raises(ValidationError, match="4k\\+1"):
        Shot(index=0, kind=ShotKind.hook, prompt="p", num_frames=16)


def test_storyboard_totals_and_checks():
    storyboard = make_storyboard(shot_frames=(9, 13, 17), crossfade=2)
    assert storyboard.total_frames == 9 + 13 + 17 - 2 - 2
    assert storyboard.duration_s == pytest.approx(35 / 8)
    with pytest.raises(ValidationError, match="index must be"):
        make_storyboard(shots=[storyboard.shots[1]])


def test_latent_to_pixel_range():
    assert latent_to_pixel_range(0, 1) == (0, 1)
    assert latent_to_pixel_range(0, 2) == (0, 5)
    assert latent_to_pixel_range(2, 5) == (5, 17)
