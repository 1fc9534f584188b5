"""Procedural product clips with ground-truth labels: the training data of the ``mini`` model.

Each clip is a product-like silhouette (bottle, box, shoe, mug, phone) in a named colour on a studio
background, filmed with one of the planner's camera moves under a slowly changing key light. It is
drawn with Pillow at twice the output size and downsampled (anti-aliased edges), from a seed alone:
the same ``ClipSpec`` always gives the same uint8 frames, so the dataset needs no storage and the
tests can check it is deterministic. Captions come from English and Chinese templates that name the
object, colour, camera move and background; the camera phrases are the planner's own, so the model
learns the words the storyboard stage writes.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..pipelines.types import CameraMove
from ..pipelines.understand import CAMERA_PHRASES

OBJECTS: tuple[str, ...] = ("bottle", "box", "shoe", "mug", "phone")
# sRGB of each named colour, far apart in hue or lightness so that a dominant colour is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "orange": (240, 130, 24),
    "yellow": (236, 206, 30),
    "green": (40, 160, 64),
    "blue": (36, 84, 214),
    "purple": (128, 52, 178),
    "pink": (240, 128, 178),
    "white": (244, 244, 240),
    "black": (26, 26, 28),
}
CAMERAS: tuple[CameraMove, ...] = tuple(CameraMove)
# name -> (top colour, bottom colour); equal colours are a plain backdrop.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((236, 236, 236), (236, 236, 236)),
    "grey": ((132, 132, 136), (132, 132, 136)),
    "dark": ((38, 38, 44), (38, 38, 44)),
    "beige": ((226, 210, 180), (226, 210, 180)),
    "gradient": ((206, 210, 218), (92, 96, 106)),
}
# A colour that would vanish into a backdrop is never drawn on it.
LOW_CONTRAST: frozenset[tuple[str, str]] = frozenset(
    {("white", "white"), ("white", "beige"), ("black", "dark"), ("yellow", "beige")}
)

OBJECT_WORDS = {
    "en": {
        "bottle": ("bottle", "water bottle", "perfume bottle"),
        "box": ("box", "gift box", "package"),
        "shoe": ("shoe", "sneaker", "running shoe"),
        "mug": ("mug", "cup", "coffee mug"),
        "phone": ("phone", "smartphone", "mobile phone"),
    },
    "zh": {
        "bottle": ("瓶子", "水瓶", "香水瓶"),
        "box": ("盒子", "礼盒", "包装盒"),
        "shoe": ("鞋", "运动鞋", "跑鞋"),
        "mug": ("杯子", "马克杯", "水杯"),
        "phone": ("手机", "智能手机"),
    },
}
COLOUR_WORDS = {
    "en": {name: (name,) for name in COLOURS},
    "zh": {
        "red": ("红色",),
        "orange": ("橙色",),
        "yellow": ("黄色",),
        "green": ("绿色",),
        "blue": ("蓝色",),
        "purple": ("紫色",),
        "pink": ("粉色",),
        "white": ("白色",),
        "black": ("黑色",),
    },
}
CAMERA_WORDS = {
    "en": {
        CameraMove.static: (CAMERA_PHRASES[CameraMove.static], "the camera stays still", "locked-off shot"),
        CameraMove.push_in: (CAMERA_PHRASES[CameraMove.push_in], "the camera zooms in", "zoom in"),
        CameraMove.pull_out: (CAMERA_PHRASES[CameraMove.pull_out], "the camera zooms out", "zoom out"),
        CameraMove.pan_left: (CAMERA_PHRASES[CameraMove.pan_left], "the camera pans left", "pan left"),
        CameraMove.pan_right: (CAMERA_PHRASES[CameraMove.pan_right], "the camera pans right", "pan right"),
        CameraMove.orbit: (CAMERA_PHRASES[CameraMove.orbit], "the camera orbits the product", "orbit shot"),
        CameraMove.tilt_up: (CAMERA_PHRASES[CameraMove.tilt_up], "the camera tilts up", "tilt up"),
    },
    "zh": {
        CameraMove.static: ("固定镜头",),
        CameraMove.push_in: ("镜头推近", "镜头慢慢推进"),
        CameraMove.pull_out: ("镜头拉远",),
        CameraMove.pan_left: ("镜头向左平移",),
        CameraMove.pan_right: ("镜头向右平移",),
        CameraMove.orbit: ("环绕拍摄", "镜头环绕产品"),
        CameraMove.tilt_up: ("镜头上摇",),
    },
}
BACKGROUND_WORDS = {
    "en": {
        "white": ("white studio background", "clean white background"),
        "grey": ("grey studio background", "neutral grey backdrop"),
        "dark": ("dark studio background", "black backdrop"),
        "beige": ("beige backdrop", "warm beige background"),
        "gradient": ("gradient studio background", "soft gradient backdrop"),
    },
    "zh": {
        "white": ("白色影棚背景", "纯白背景"),
        "grey": ("灰色影棚背景",),
        "dark": ("深色影棚背景", "黑色背景"),
        "beige": ("米色背景",),
        "gradient": ("渐变影棚背景",),
    },
}
TEMPLATES = {
    "en": (
        "a {colour} {object}, {camera}, {background}",
        "{colour} {object} on a {background}, {camera}",
        "Product commercial, {colour} {object}, {background}, {camera}, professional lighting, high detail",
        "close-up of a {colour} {object}, {camera}, {background}",
    ),
    "zh": (
        "{colour}{object}，{camera}，{background}",
        "{background}前的{colour}{object}，{camera}",
        "产品广告，{colour}的{object}，{background}，{camera}",
    ),
}


@dataclass(frozen=True)
class ClipSpec:
    """Everything one clip is drawn from; the labels are the classifier's targets."""

    object: str
    colour: str
    camera: CameraMove
    background: str
    seed: int


@dataclass(frozen=True)
class ClipShape:
    """Output size of the renderer: frames, height and width in pixels."""

    frames: int = 17
    size: int = 64


def all_combinations() -> list[tuple[str, str, CameraMove]]:
    """Every (object, colour, camera move) the renderer can draw."""
    return list(product(OBJECTS, COLOURS, CAMERAS))


def is_held_out(obj: str, colour: str, camera: CameraMove, fraction: float = 0.15) -> bool:
    """Whether a combination is kept out of training (a stable hash, so train and eval agree)."""
    digest = hashlib.sha256(f"{obj}|{colour}|{camera.value}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def sample_spec(rng: random.Random, held_out: bool) -> ClipSpec:
    """A random clip from the training (held_out=False) or the evaluation (True) combinations."""
    while True:
        obj, colour, camera = rng.choice(OBJECTS), rng.choice(list(COLOURS)), rng.choice(CAMERAS)
        if is_held_out(obj, colour, camera) != held_out:
            continue
        background = rng.choice([name for name in BACKGROUNDS if (colour, name) not in LOW_CONTRAST])
        return ClipSpec(obj, colour, camera, background, rng.randrange(2**31))


def caption(spec: ClipSpec, rng: random.Random, language: str | None = None) -> str:
    """A caption naming the clip's object, colour, camera move and background (en or zh)."""
    language = language or rng.choice(("en", "en", "zh"))
    template = rng.choice(TEMPLATES[language])
    return template.format(
        colour=rng.choice(COLOUR_WORDS[language][spec.colour]),
        object=rng.choice(OBJECT_WORDS[language][spec.object]),
        camera=rng.choice(CAMERA_WORDS[language][spec.camera]),
        background=rng.choice(BACKGROUND_WORDS[language][spec.background]),
    )


# --- drawing --------------------------------------------------------------------------------------


def _silhouette(obj: str, canvas: int, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """(mask, detail) of the object centred on a square canvas; detail marks darker parts (0-255)."""
    mask = Image.new("L", (canvas, canvas), 0)
    detail = Image.new("L", (canvas, canvas), 0)
    draw, mark = ImageDraw.Draw(mask), ImageDraw.Draw(detail)
    c = canvas / 2
    jitter = 1.0 + rng.uniform(-0.08, 0.08)

    def box(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    u = canvas / 100  # one percent of the canvas
    if obj == "bottle":
        w, h = 24 * u * jitter, 44 * u
        draw.rounded_rectangle(box(c, c + 8 * u, w, h), radius=7 * u, fill=255)
        draw.rounded_rectangle(box(c, c - 18 * u, w * 0.45, 14 * u), radius=3 * u, fill=255)
        draw.rectangle(box(c, c - 27 * u, w * 0.5, 7 * u), fill=255)
        mark.rectangle(box(c, c - 27 * u, w * 0.5, 7 * u), fill=170)  # cap
        mark.rectangle(box(c, c + 8 * u, w, 12 * u), fill=70)  # label band
    elif obj == "box":
        w, h = 40 * u * jitter, 30 * u
        draw.rectangle(box(c - 3 * u, c + 6 * u, w, h), fill=255)
        top = [
            (c - 3 * u - w / 2, c + 6 * u - h / 2),
            (c - 3 * u + w / 2, c + 6 * u - h / 2),
            (c + 7 * u + w / 2, c - 4 * u - h / 2),
            (c + 7 * u - w / 2, c - 4 * u - h / 2),
        ]
        side = [
            (c - 3 * u + w / 2, c + 6 * u - h / 2),
            (c + 7 * u + w / 2, c - 4 * u - h / 2),
            (c + 7 * u + w / 2, c - 4 * u + h / 2),
            (c - 3 * u + w / 2, c + 6 * u + h / 2),
        ]
        draw.polygon(top, fill=255)
        draw.polygon(side, fill=255)
        mark.polygon(side, fill=110)  # the side face is in shadow
        mark.line([(c - 3 * u, c + 6 * u - h / 2), (c - 3 * u, c + 6 * u + h / 2)], fill=60, width=int(2 * u))
    elif obj == "shoe":
        w = 50 * u * jitter
        left, right, base = c - w / 2, c + w / 2, c + 12 * u
        upper = [
            (left, base),
            (left + 2 * u, base - 14 * u),
            (left + 16 * u, base - 22 * u),
            (left + 24 * u, base - 14 * u),
            (right - 8 * u, base - 8 * u),
            (right, base - 2 * u),
            (right, base),
        ]
        draw.polygon(upper, fill=255)
        draw.rounded_rectangle((left - u, base - 2 * u, right + u, base + 5 * u), radius=2 * u, fill=255)
        mark.rounded_rectangle(
            (left - u, base - 2 * u, right + u, base + 5 * u), radius=2 * u, fill=200
        )  # sole
        mark.line([(left + 8 * u, base - 12 * u), (left + 26 * u, base - 6 * u)], fill=90, width=int(2 * u))
    elif obj == "mug":
        w, h = 30 * u * jitter, 34 * u
        body = box(c - 5 * u, c + 4 * u, w, h)
        draw.rounded_rectangle(body, radius=3 * u, fill=255)
        handle = (body[2] - 4 * u, c - 6 * u, body[2] + 12 * u, c + 14 * u)
        draw.ellipse(handle, outline=255, width=int(5 * u))
        draw.ellipse((body[0], body[1] - 3 * u, body[2], body[1] + 3 * u), fill=255)
        mark.ellipse((body[0] + u, body[1] - 2 * u, body[2] - u, body[1] + 2 * u), fill=150)  # opening
    elif obj == "phone":
        w, h = 26 * u * jitter, 50 * u
        draw.rounded_rectangle(box(c, c, w, h), radius=5 * u, fill=255)
        cam = box(c - w / 2 + 7 * u, c - h / 2 + 8 * u, 9 * u, 11 * u)
        mark.rounded_rectangle(cam, radius=2 * u, fill=190)  # camera bump
    else:
        raise ValueError(f"unknown object {obj!r}; known: {', '.join(OBJECTS)}")
    return mask, detail


def _background(name: str, size: int, offset: float) -> np.ndarray:
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[name])
    rows = np.clip(np.linspace(0, 1, size, dtype=np.float32) + offset, 0, 1)[:, None, None]
    return np.broadcast_to(top + (bottom - top) * rows, (size, size, 3)).copy()


def _camera(move: CameraMove, t: float) -> tuple[float, float, float, float]:
    """(scale, x offset, y offset, horizontal squeeze) at clip time t in [0, 1]; offsets in canvases."""
    if move is CameraMove.push_in:
        return 0.8 + 0.65 * t, 0.0, 0.0, 1.0
    if move is CameraMove.pull_out:
        return 1.45 - 0.65 * t, 0.0, 0.0, 1.0
    if move is CameraMove.pan_left:  # the camera turns left: the product slides right across the frame
        return 1.0, -0.26 + 0.52 * t, 0.0, 1.0
    if move is CameraMove.pan_right:
        return 1.0, 0.26 - 0.52 * t, 0.0, 1.0
    if move is CameraMove.tilt_up:  # the camera tilts up: the product sinks in the frame
        return 1.0, 0.0, -0.24 + 0.48 * t, 1.0
    if move is CameraMove.orbit:  # a turntable: the silhouette narrows and widens, the highlight sweeps
        return 1.0, 0.0, 0.0, 0.45 + 0.55 * abs(math.cos(math.pi * t))
    return 1.0, 0.0, 0.0, 1.0


def render_clip(spec: ClipSpec, shape: ClipShape = ClipShape()) -> np.ndarray:
    """The clip as uint8 frames, shape (frames, size, size, 3); a pure function of ``spec``."""
    rng = random.Random(spec.seed)
    canvas = shape.size * 2  # drawn at twice the size, downsampled for anti-aliasing
    mask, detail = _silhouette(spec.object, canvas, rng)
    base = np.array(COLOURS[spec.colour], dtype=np.float32)
    # Dark and light products keep some shading contrast; a light from the left or right.
    light_side = rng.choice((-1.0, 1.0))
    light_start, light_end = rng.uniform(0.85, 1.05), rng.uniform(0.85, 1.05)
    base_shift = (rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.06))
    mask_blur = mask.filter(ImageFilter.GaussianBlur(canvas / 160))
    frames = np.empty((shape.frames, shape.size, shape.size, 3), dtype=np.uint8)
    columns = np.linspace(-1.0, 1.0, canvas, dtype=np.float32)[None, :]
    for index in range(shape.frames):
        t = index / max(1, shape.frames - 1)
        scale, dx, dy, squeeze = _camera(spec.camera, t)
        dx += base_shift[0]
        dy += base_shift[1]
        # Inverse affine map (output pixel -> source pixel) about the canvas centre.
        sx, sy = scale * squeeze, scale
        cx = cy = canvas / 2
        coeffs = (
            1 / sx,
            0.0,
            cx - (cx + dx * canvas) / sx,
            0.0,
            1 / sy,
            cy - (cy + dy * canvas) / sy,
        )
        m = (
            np.asarray(
                mask_blur.transform(mask.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR),
                dtype=np.float32,
            )[..., None]
            / 255
        )
        d = (
            np.asarray(
                detail.transform(mask.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR),
                dtype=np.float32,
            )[..., None]
            / 255
        )
        # Key light: brighter on one side; orbit sweeps the highlight across the product.
        sweep = (2 * t - 1) if spec.camera is CameraMove.orbit else 0.0
        light = light_start + (light_end - light_start) * t
        shade = light * (1.0 + 0.22 * light_side * np.clip(columns - sweep, -1, 1))[..., None]
        body = base * shade
        # Details: darker for light products, lighter for dark ones, so they stay visible.
        tone = 255.0 if base.mean() < 60 else 0.0
        body = body * (1 - 0.45 * d) + tone * 0.45 * d
        ground = _background(spec.background, canvas, dy * 0.5 if spec.camera is CameraMove.tilt_up else 0.0)
        shadow = (
            np.asarray(
                mask_blur.transform(
                    mask.size,
                    Image.Transform.AFFINE,
                    (coeffs[0], 0, coeffs[2] - 2, 0, coeffs[4], coeffs[5] - canvas * 0.03),
                    Image.Resampling.BILINEAR,
                ).filter(ImageFilter.GaussianBlur(canvas / 40)),
                dtype=np.float32,
            )[..., None]
            / 255
        )
        ground = ground * (1 - 0.25 * shadow)
        frame = ground * (1 - m) + np.clip(body, 0, 255) * m
        image = Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8))
        frames[index] = np.asarray(image.resize((shape.size, shape.size), Image.Resampling.BOX))
    return frames


def dominant_colour(frames: np.ndarray) -> str:
    """The named colour closest to the frames' most saturated-or-extreme pixels, ignoring the border.

    The background is estimated from the frame border and pixels near it are dropped; what is left
    is the product, whose median colour is matched to the nearest named colour.
    """
    rgb = frames.reshape(-1, frames.shape[-3], frames.shape[-2], 3).astype(np.float32)
    border = np.concatenate([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], axis=1).reshape(-1, 3)
    backdrop = np.median(border, axis=0)
    pixels = rgb.reshape(-1, 3)
    distance = np.linalg.norm(pixels - backdrop, axis=1)
    product_pixels = pixels[distance > 60]
    if len(product_pixels) < max(16, pixels.shape[0] // 200):
        product_pixels = pixels[np.argsort(distance)[-max(16, pixels.shape[0] // 50) :]]
    centre = np.median(product_pixels, axis=0)
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - centre, axis=1)))]
