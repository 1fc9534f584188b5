"""Graphic overlays for product videos: captions, price/CTA, campaign badge, product picture, AIGC label.

Each shot's overlay is drawn once with Pillow into an RGBA layer the size of the frame, then
alpha-blended onto every frame of that shot in integer arithmetic. Chinese renders with Noto Sans
CJK (face index 2 of the PyPI ``noto-cjk-sans-otc`` collection is Simplified Chinese and also has
Latin glyphs), so one font covers both languages.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .types import Shot, ShotKind, Storyboard

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

NOTO_SC_FACE_INDEX = 2
WHITE = (255, 255, 255, 255)
CAPTION_BAND = (0, 0, 0, 150)
LABEL_BOX = (0, 0, 0, 130)
MAX_CAPTION_LINES = 2


@dataclass(frozen=True)
class Overlay:
    """A premultiplied RGBA layer cropped to where it draws anything: ``rgb``/``alpha`` cover ``box``."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    rgb: np.ndarray  # uint16 [h, w, 3], colour already multiplied by alpha
    alpha: np.ndarray  # uint16 [h, w, 1], 0..255

    @classmethod
    def from_image(cls, layer: Image.Image) -> Overlay | None:
        rgba = np.asarray(layer.convert("RGBA"))
        alpha = rgba[..., 3]
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        if not rows.size:
            return None
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = rgba[top:bottom, left:right].astype(np.uint16)
        a = crop[..., 3:4]
        return cls(box=(int(left), int(top), int(right), int(bottom)), rgb=crop[..., :3] * a, alpha=a)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Blend onto uint8 ``[T, H, W, 3]`` frames in place: out = (src*(255-a) + rgb*a) / 255, rounded."""
        left, top, right, bottom = self.box
        region = frames[:, top:bottom, left:right].astype(np.uint16)
        blended = (region * (255 - self.alpha) + self.rgb + 127) // 255
        frames[:, top:bottom, left:right] = blended.astype(np.uint8)
        return frames


def default_font_path() -> Path:
    import noto_cjk_sans_otc

    return Path(noto_cjk_sans_otc.FONT_PATH)


@lru_cache(maxsize=64)
def load_font(path: str, size: int, index: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(path, size=size, index=index)


@dataclass(frozen=True)
class _CaptionLayout:
    font: ImageFont.FreeTypeFont
    lines: list[str]
    line_height: int
    band_top: int  # the band runs from here to the frame's bottom edge


class OverlayPainter:
    """Draws the overlay of each shot of a storyboard; sizes scale with the frame height."""

    def __init__(self, storyboard: Storyboard, product_images: list[Image.Image], font_path: Path | None):
        if font_path is None:
            self.font_path, self.font_index = str(default_font_path()), NOTO_SC_FACE_INDEX
        else:
            if not font_path.is_file():
                raise ValueError(f"font file not found: {font_path}")
            self.font_path, self.font_index = str(font_path), 0
        self.storyboard = storyboard
        self.product_images = product_images
        self.width, self.height = storyboard.width, storyboard.height
        self.margin = max(2, round(self.height * 0.025))

    def font(self, fraction_of_height: float, minimum: int = 8) -> ImageFont.FreeTypeFont:
        size = max(minimum, round(self.height * fraction_of_height))
        return load_font(self.font_path, size, self.font_index)

    def shot_overlay(self, shot: Shot) -> Overlay | None:
        from PIL import Image, ImageDraw

        layer = Image.new("RGBA", (self.width, self.height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        label_bottom = self._draw_aigc_label(draw)
        if self.storyboard.badge_text:
            self._draw_badge(draw, self.storyboard.badge_text)
        if shot.step_number is not None:
            self._draw_step_number(draw, shot.step_number)
        caption_top = self._draw_caption(draw, shot.caption) if shot.caption else self.height
        if self.product_images and shot.kind != ShotKind.hook:
            picture = self.product_images[shot.index % len(self.product_images)]
            self._paste_product_picture(layer, picture, top=label_bottom + self.margin)
            draw = ImageDraw.Draw(layer)
        if shot.kind == ShotKind.cta:
            self._draw_price_and_cta(draw, bottom=caption_top - self.margin)
        return Overlay.from_image(layer)

    # --- pieces -------------------------------------------------------------------------------

    def _draw_aigc_label(self, draw: ImageDraw.ImageDraw) -> int:
        """The visible AI-generated-content label, top right on every frame; returns its bottom edge."""
        font = self.font(0.045)
        text = self.storyboard.aigc_label
        left, top, right, bottom = _text_box(draw, text, font)
        pad = max(1, int(font.size) // 4)
        x1 = self.width - self.margin
        x0 = max(0, x1 - (right - left) - 2 * pad)
        y0 = self.margin
        y1 = y0 + (bottom - top) + 2 * pad
        draw.rounded_rectangle((x0, y0, x1, y1), radius=pad, fill=LABEL_BOX)
        draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=WHITE)
        return y1

    def _draw_badge(self, draw: ImageDraw.ImageDraw, text: str) -> None:
        x0, y0, x1, y1, font, pad = self._badge_layout(draw, text)
        left, top, _, _ = _text_box(draw, text, font)
        draw.rounded_rectangle((x0, y0, x1, y1), radius=pad, fill=_hex_rgba(self.storyboard.accent_color))
        draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=WHITE)

    def _badge_layout(
        self, draw: ImageDraw.ImageDraw, text: str
    ) -> tuple[int, int, int, int, ImageFont.FreeTypeFont, int]:
        """The campaign badge's box (top left), font and padding."""
        font = self.font(0.055)
        left, top, right, bottom = _text_box(draw, text, font)
        pad = max(1, int(font.size) // 4)
        x0 = y0 = self.margin
        return x0, y0, x0 + (right - left) + 2 * pad, y0 + (bottom - top) + 2 * pad, font, pad

    def step_badge_box(self) -> tuple[int, int, int, int]:
        """Where a step shot's number is drawn: a disc at the left, below the campaign badge if any."""
        from PIL import Image, ImageDraw

        top = self.margin
        if self.storyboard.badge_text:
            draw = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
            top = self._badge_layout(draw, self.storyboard.badge_text)[3] + self.margin
        side = max(12, round(self.height * 0.16))
        return self.margin, top, self.margin + side, top + side

    def _draw_step_number(self, draw: ImageDraw.ImageDraw, number: int) -> None:
        """The step's number, white on an accent disc: what a viewer follows a how-to video by."""
        x0, y0, x1, y1 = self.step_badge_box()
        draw.ellipse((x0, y0, x1, y1), fill=_hex_rgba(self.storyboard.accent_color))
        text = str(number)
        font = self.font(0.1)
        left, top, right, bottom = _text_box(draw, text, font)
        x = x0 + (x1 - x0 - (right - left)) // 2 - left
        y = y0 + (y1 - y0 - (bottom - top)) // 2 - top
        draw.text((x, y), text, font=font, fill=WHITE)

    def caption_box(self, shot: Shot) -> tuple[int, int, int, int] | None:
        """Where ``shot``'s caption band is drawn (left, top, right, bottom; pixels, end exclusive).

        None when the shot has no caption. The same layout as the drawing (``_caption_layout``), so
        quality checks (pipelines/quality.py) measure exactly the band the viewer sees.
        """
        if not shot.caption:
            return None
        from PIL import Image, ImageDraw

        # textlength depends on the draw's mode: measure on an RGBA canvas, like the overlay layer.
        draw = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
        band_top = self._caption_layout(draw, shot.caption).band_top
        return 0, max(0, band_top), self.width, self.height

    def _caption_layout(self, draw: ImageDraw.ImageDraw, text: str) -> _CaptionLayout:
        """Font, wrapped lines and band of a caption: the largest size that fits in two lines."""
        max_width = int(self.width * 0.92)
        for fraction in (0.07, 0.06, 0.05):
            font = self.font(fraction)
            lines = wrap_text(draw, text, font, max_width, self.storyboard.language)
            if len(lines) <= MAX_CAPTION_LINES:
                break
        lines = lines[:MAX_CAPTION_LINES]
        line_height = int(font.size) + max(1, int(font.size) // 5)
        band_height = line_height * len(lines) + 2 * self.margin
        band_top = self.height - band_height
        return _CaptionLayout(font=font, lines=lines, line_height=line_height, band_top=band_top)

    def _draw_caption(self, draw: ImageDraw.ImageDraw, text: str) -> int:
        """Caption centred in a translucent band at the bottom; returns the band's top edge."""
        layout = self._caption_layout(draw, text)
        font, band_top = layout.font, layout.band_top
        draw.rectangle((0, band_top, self.width, self.height), fill=CAPTION_BAND)
        y = band_top + self.margin
        for line in layout.lines:
            left, _, right, _ = _text_box(draw, line, font)
            x = (self.width - (right - left)) // 2 - left
            draw.text((x, y), line, font=font, fill=WHITE)
            y += layout.line_height
        return band_top

    def _draw_price_and_cta(self, draw: ImageDraw.ImageDraw, bottom: int) -> None:
        accent = _hex_rgba(self.storyboard.accent_color)
        y = bottom
        if self.storyboard.cta_text:
            font = self.font(0.06)
            y = self._centred_pill(
                draw, self.storyboard.cta_text, font, bottom=y, fill=(255, 255, 255, 235), text_fill=accent
            )
            y -= self.margin
        if self.storyboard.price_text:
            self._centred_pill(
                draw,
                self.storyboard.price_text,
                self.font(0.12, minimum=10),
                bottom=y,
                fill=accent,
                text_fill=WHITE,
            )

    def _centred_pill(
        self,
        draw: ImageDraw.ImageDraw,
        text: str,
        font: ImageFont.FreeTypeFont,
        *,
        bottom: int,
        fill: tuple[int, ...],
        text_fill: tuple[int, ...],
    ) -> int:
        """Text in a rounded box centred horizontally, ending at ``bottom``; returns the box's top."""
        left, top, right, text_bottom = _text_box(draw, text, font)
        pad = max(1, int(font.size) // 4)
        box_w = min(self.width, (right - left) + 2 * pad)
        box_h = (text_bottom - top) + 2 * pad
        x0 = (self.width - box_w) // 2
        y0 = max(0, bottom - box_h)
        draw.rounded_rectangle((x0, y0, x0 + box_w, y0 + box_h), radius=pad, fill=fill)
        draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=text_fill)
        return y0

    def _paste_product_picture(self, layer: Image.Image, picture: Image.Image, top: int) -> None:
        """The merchant's own product photo, picture-in-picture at the right edge, with a white frame."""
        from PIL import Image

        side = max(8, round(min(self.width, self.height) * 0.28))
        border = max(1, side // 24)
        thumb = picture.convert("RGBA")
        thumb.thumbnail((side - 2 * border, side - 2 * border), Image.Resampling.LANCZOS)
        framed = Image.new("RGBA", (thumb.width + 2 * border, thumb.height + 2 * border), WHITE)
        framed.alpha_composite(thumb, (border, border))
        x = self.width - self.margin - framed.width
        top = min(top, self.height - framed.height)
        layer.alpha_composite(framed, (max(0, x), max(0, top)))


def wrap_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, max_width: int, language: str
) -> list[str]:
    """Greedy line breaking: between words for English, between characters for Chinese."""
    units = list(text) if language == "zh" else text.split()
    joiner = "" if language == "zh" else " "
    lines: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current}{joiner}{unit}" if current else unit
        if current and draw.textlength(candidate, font=font) > max_width:
            lines.append(current)
            current = unit
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _text_box(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont
) -> tuple[int, int, int, int]:
    """Pixel bounds of ``text`` drawn at the origin (Pillow reports floats for some fonts)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(left), int(top), int(right), int(bottom)


def _hex_rgba(color: str, alpha: int = 255) -> tuple[int, int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16), alpha
