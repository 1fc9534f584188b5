"""RGB uint8 -> planar YUV 4:2:0, the way FFmpeg's swscale makes what libx264's ``yuv420p`` eats.

The arithmetic follows libswscale 9 (FFmpeg 8, as bundled with PyAV 18) for an untagged rgb24
frame -> yuv420p at the default ``SWS_BILINEAR`` flags, i.e. what the encoder does when it is
handed RGB:

- BT.601 limited range (Y in [16, 235], U/V in [16, 240]) with swscale's 15-bit coefficients;
- luma rounded to 1/64 steps, then to whole steps;
- chroma from the *sum* of each horizontal pixel pair (rounded to 1/64 steps), then a vertical
  2:1 bilinear filter with taps (1, 3, 3, 1) / 8 over luma rows 2j-1 .. 2j+2 (edges repeated):
  chroma sits between the two luma rows, not on a plain 2x2 box average;
- x86-64 SIMD vertical filter (``ff_yuv2yuvX``): each tap truncated on its own, then +5 and >> 3.
  The first chroma row merges its repeated edge taps into one; the last uses swscale's C code.

Measured on x86-64 (AVX2; an AMD EPYC and an Intel Xeon) against ``VideoFrame.from_ndarray(rgb,
format="rgb24").reformat(format="yuv420p")``: identical planes (max difference 0) on noise,
gradients and solid colours for every even size from 8 rows up (8x2 to 1280x720 tried), so
libx264 gets the same input and writes the same bytes. Elsewhere (swscale's C or NEON vertical
filter) middle chroma rows may differ by 1. Below 8 rows swscale shortens its vertical filter (to
at most height - 2 taps) and this module does not follow: chroma of 2-6 row frames differs by up
to ~80 (luma still equal).
A plain 2x2 box average, for comparison, is up to 24 off on noise-like frames (the tiny preset's).

Speed: on the CPU swscale's SIMD code is faster than this NumPy version (one Xeon core, per
frame: 0.43 vs 0.50 ms at 256x256, 2.1 vs 5.8 ms at 832x480), and feeding the compositor's encoder
these planes instead of RGB made its encoding 1.05-1.3x slower on 2 cores (up to 2.1x on 16), with
identical output bytes. So RGB frames on the CPU are best left to the encoder's own conversion;
this module is the reference of the fused GPU kernel (``triton_postprocess``) and gives swscale's
planes where FFmpeg is not the one converting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SHIFT = 15


def _fixed(coefficient: float) -> int:
    """A coefficient in swscale's 15-bit fixed point, rounded as libswscale/utils.c does."""
    return int(coefficient * (1 << _SHIFT) + 0.5)


# BT.601: Kr = 0.299, Kb = 0.114, scaled to 219 luma / 224 chroma steps (limited range).
RY, GY, BY = _fixed(0.299 * 219 / 255), _fixed(0.587 * 219 / 255), _fixed(0.114 * 219 / 255)
RU, GU, BU = -_fixed(0.169 * 224 / 255), -_fixed(0.331 * 224 / 255), _fixed(0.500 * 224 / 255)
RV, GV, BV = _fixed(0.500 * 224 / 255), -_fixed(0.419 * 224 / 255), -_fixed(0.081 * 224 / 255)
# Y = (RY*r + GY*g + BY*b + Y_OFFSET) >> 15: black level 16, then the rounding of swscale's two
# stages (to 1/64 steps: + 1 << 8 before >> 9; to whole steps: + 32 before >> 6, i.e. 32 << 9).
Y_OFFSET = (16 << _SHIFT) + (1 << 8) + (32 << 9)
# Chroma of a pixel pair, in 1/64 steps: (RU*(r0+r1) + ... + C_OFFSET) >> 10, with the 128 offset
# counted twice (a sum of two pixels) and + 1 << 9 rounding.
C_OFFSET = (256 << _SHIFT) + (1 << 9)

# One pixel pair (r0, g0, b0, r1, g1, b1) -> (Y even, Y odd, U pair, V pair) before offsets.
_PAIR_MATRIX = np.array(
    [
        [RY, GY, BY, 0, 0, 0],
        [0, 0, 0, RY, GY, BY],
        [RU, GU, BU, RU, GU, BU],
        [RV, GV, BV, RV, GV, BV],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Yuv420Frames:
    """Planar YUV 4:2:0 frames (BT.601 limited range), the layout of FFmpeg's ``yuv420p``."""

    y: np.ndarray  # uint8 [T, H, W]
    u: np.ndarray  # uint8 [T, H/2, W/2]
    v: np.ndarray  # uint8 [T, H/2, W/2]

    @property
    def num_frames(self) -> int:
        return int(self.y.shape[0])

    @property
    def height(self) -> int:
        return int(self.y.shape[1])

    @property
    def width(self) -> int:
        return int(self.y.shape[2])

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Y, U and V planes of frame ``index``."""
        return self.y[index], self.u[index], self.v[index]


def check_yuv420_size(height: int, width: int) -> None:
    """4:2:0 halves both dimensions: refuse odd (or empty) sizes instead of cropping silently."""
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ValueError(f"YUV 4:2:0 needs an even width and height of at least 2, got {width}x{height}")


def rgb_to_yuv420(frames: np.ndarray) -> Yuv420Frames:
    """``uint8 [T, H, W, 3]`` RGB -> YUV 4:2:0 planes, equal to swscale's rgb24 -> yuv420p (module doc).

    NumPy on the CPU, in float32: every intermediate is an integer of magnitude below 2**24
    (matrix-product partial sums at most 510 * 28785 ~ 1.47e7, offset chroma sums at most
    510 * BU + C_OFFSET ~ 1.57e7), and float32 arithmetic on those is exact in any order, BLAS
    included. That lets one matrix product do the colour matrix, faster than int32 passes.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        dtype = getattr(frames, "dtype", None)
        raise ValueError(f"frames must be a uint8 numpy array, got a {type(frames).__name__} of {dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
    count, height, width, _ = frames.shape
    check_yuv420_size(height, width)
    out = Yuv420Frames(
        y=np.empty((count, height, width), np.uint8),
        u=np.empty((count, height // 2, width // 2), np.uint8),
        v=np.empty((count, height // 2, width // 2), np.uint8),
    )
    # Frame by frame: a whole chunk's float32 temporaries would fall out of the CPU caches.
    for index, frame in enumerate(frames):
        _convert_frame(np.ascontiguousarray(frame), out, index)
    return out


def _convert_frame(frame: np.ndarray, out: Yuv420Frames, index: int) -> None:
    height, width, _ = frame.shape
    pairs = frame.reshape(-1, 6).astype(np.float32)
    mixed = _PAIR_MATRIX @ pairs.T  # [4, H*W/2], exact integers
    # 1. Luma. Values are positive, so the uint8 cast truncates exactly like swscale's >> 15.
    luma = mixed[:2]
    luma += Y_OFFSET
    luma *= 2.0**-_SHIFT
    y_pairs = out.y[index].reshape(-1, 2)
    y_pairs[:, 0] = luma[0]
    y_pairs[:, 1] = luma[1]
    # 2. Chroma per luma row, in 1/64 steps (swscale's 14-bit intermediate).
    chroma = mixed[2:].reshape(2, height, width // 2)
    chroma += C_OFFSET
    chroma *= 2.0**-10
    np.floor(chroma, out=chroma)
    # 3. Vertical (1, 3, 3, 1) / 8 filter, each tap truncated to whole steps * 8 as the SIMD code does.
    one = np.floor(chroma * 2.0**-6)
    three = np.floor(chroma * (3 * 2.0**-6))
    rows = np.empty((2, height // 2, width // 2), np.float32)
    middle = rows[:, 1:-1]
    np.add(one[:, 1:-3:2], three[:, 2:-2:2], out=middle)
    middle += three[:, 3:-1:2]
    middle += one[:, 4::2]
    if height >= 4:  # the first row's repeated edge taps form a single tap of weight 4
        rows[:, 0] = np.floor(chroma[:, 0] * 2.0**-4) + three[:, 1] + one[:, 2]
    rows[:, :-1] += 5
    rows[:, :-1] *= 0.125
    # The last row goes through swscale's C filter: one rounding of the exact weighted sum.
    rows[:, -1] = chroma[:, max(height - 3, 0)] + 3 * chroma[:, height - 2] + 4 * chroma[:, height - 1] + 256
    rows[:, -1] *= 2.0**-9
    out.u[index] = rows[0]
    out.v[index] = rows[1]


__all__ = ["Yuv420Frames", "check_yuv420_size", "rgb_to_yuv420"]
