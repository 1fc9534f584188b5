"""Triton kernels: decoder output -> uint8 RGB, and decoder output -> YUV 4:2:0, each in one pass.

Imported only where ``triton`` is installed (``postprocess`` dispatches here for CUDA tensors).
Each kernel reads the float video once and does in registers what the reference does in several
passes over memory: ``to_uint8_frames``' scale/clamp/round, the layout change, and for YUV the
swscale-exact colour matrix and 4:2:0 filter of ``yuv420.rgb_to_yuv420``, so only the 1.5 bytes
per pixel of YUV (instead of 3 of RGB, or 12 of float) cross to the host.

Testing: ``tests/test_kernels.py::test_triton_matches_reference`` (marked ``gpu``; it skips without
CUDA and Triton, so CI does not cover this file) checks both kernels bit-identical to the reference
for fp32/bf16/fp16, two memory layouts, 2x2 to 480x832 and a partial last block; it passed on an
NVIDIA H100 (Triton 3.6, PyTorch 2.11).
Measured there on [1, 3, 81, 480, 832] bf16: YUV kernel 0.15 ms, RGB kernel 0.18 ms, against
2.0 ms for ``to_uint8_frames``' PyTorch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import yuv420

_RY, _GY, _BY = tl.constexpr(yuv420.RY), tl.constexpr(yuv420.GY), tl.constexpr(yuv420.BY)
_RU, _GU, _BU = tl.constexpr(yuv420.RU), tl.constexpr(yuv420.GU), tl.constexpr(yuv420.BU)
_RV, _GV, _BV = tl.constexpr(yuv420.RV), tl.constexpr(yuv420.GV), tl.constexpr(yuv420.BV)
_Y_OFFSET, _C_OFFSET = tl.constexpr(yuv420.Y_OFFSET), tl.constexpr(yuv420.C_OFFSET)
_BLOCK = 256


@triton.jit
def _level(x):
    # to_uint8_frames in float32: x/2 + 0.5 (x * 0.5 is exact, so an FMA changes nothing), clamp,
    # * 255, round half to even like torch.round.
    v = x.to(tl.float32) * 0.5 + 0.5
    v = tl.minimum(tl.maximum(v, 0.0), 1.0)
    return libdevice.rint(v * 255.0).to(tl.int32)


@triton.jit
def _rgb_kernel(video, out, height, width, stride_c, stride_t, stride_h, stride_w, BLOCK: tl.constexpr):
    # One program: BLOCK pixels of one row of one frame; grid (frames * height, cdiv(width, BLOCK)).
    row = tl.program_id(0).to(tl.int64)
    t = row // height
    h = row % height
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    src = video + t * stride_t + h * stride_h + cols * stride_w
    dst = out + (row * width + cols) * 3
    for channel in tl.static_range(3):
        value = _level(tl.load(src + channel * stride_c, mask=mask))
        tl.store(dst + channel, value.to(tl.uint8), mask=mask)


@triton.jit
def _pair(video, t, h, cols, mask, stride_c, stride_t, stride_h, stride_w):
    # The pixel pair (2 * cols, 2 * cols + 1) of row h: six 0..255 levels.
    src = video + t * stride_t + h * stride_h + (2 * cols) * stride_w
    r0 = _level(tl.load(src, mask=mask))
    g0 = _level(tl.load(src + stride_c, mask=mask))
    b0 = _level(tl.load(src + 2 * stride_c, mask=mask))
    r1 = _level(tl.load(src + stride_w, mask=mask))
    g1 = _level(tl.load(src + stride_w + stride_c, mask=mask))
    b1 = _level(tl.load(src + stride_w + 2 * stride_c, mask=mask))
    return r0, g0, b0, r1, g1, b1


@triton.jit
def _chroma(r0, g0, b0, r1, g1, b1):
    # U and V of a pixel pair in 1/64 steps (yuv420.C_OFFSET).
    r, g, b = r0 + r1, g0 + g1, b0 + b1
    u = (_RU * r + _GU * g + _BU * b + _C_OFFSET) >> 10
    v = (_RV * r + _GV * g + _BV * b + _C_OFFSET) >> 10
    return u, v


@triton.jit
def _store_luma(frame_y, h, width, cols, mask, r0, g0, b0, r1, g1, b1):
    # Y of the pixel pair (2 * cols, 2 * cols + 1) of row h.
    dst = frame_y + h * width + 2 * cols
    tl.store(dst, ((_RY * r0 + _GY * g0 + _BY * b0 + _Y_OFFSET) >> 15).to(tl.uint8), mask=mask)
    tl.store(dst + 1, ((_RY * r1 + _GY * g1 + _BY * b1 + _Y_OFFSET) >> 15).to(tl.uint8), mask=mask)


@triton.jit
def _vertical(above, top, bottom, below, first, last):
    # yuv420's vertical (1, 3, 3, 1) / 8 filter for one chroma row (rows 2j-1 .. 2j+2, clamped):
    # SIMD form (taps truncated one by one; the first row's repeated taps merged), C form last.
    middle = ((above >> 6) + ((3 * top) >> 6) + ((3 * bottom) >> 6) + (below >> 6) + 5) >> 3
    head = (((4 * top) >> 6) + ((3 * bottom) >> 6) + (below >> 6) + 5) >> 3
    tail = (above + 3 * top + 3 * bottom + below + 256) >> 9
    return tl.where(last, tail, tl.where(first, head, middle))


@triton.jit
def _yuv420_kernel(
    video, y_out, u_out, v_out, height, width, stride_c, stride_t, stride_h, stride_w, BLOCK: tl.constexpr
):
    # One program: BLOCK chroma samples of chroma row j of frame t, i.e. 2 * BLOCK luma columns of
    # luma rows 2j and 2j+1, plus rows 2j-1 and 2j+2 that the vertical filter reads.
    # Grid (frames * height / 2, cdiv(width / 2, BLOCK)).
    half_h = height // 2
    half_w = width // 2
    row = tl.program_id(0).to(tl.int64)
    t = row // half_h
    j = row % half_h
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < half_w
    top = 2 * j
    above = tl.maximum(top - 1, 0)
    below = tl.minimum(top + 2, height - 1)

    r0, g0, b0, r1, g1, b1 = _pair(video, t, top, cols, mask, stride_c, stride_t, stride_h, stride_w)
    frame_y = y_out + t * height * width
    _store_luma(frame_y, top, width, cols, mask, r0, g0, b0, r1, g1, b1)
    u_top, v_top = _chroma(r0, g0, b0, r1, g1, b1)

    r0, g0, b0, r1, g1, b1 = _pair(video, t, top + 1, cols, mask, stride_c, stride_t, stride_h, stride_w)
    _store_luma(frame_y, top + 1, width, cols, mask, r0, g0, b0, r1, g1, b1)
    u_bottom, v_bottom = _chroma(r0, g0, b0, r1, g1, b1)

    r0, g0, b0, r1, g1, b1 = _pair(video, t, above, cols, mask, stride_c, stride_t, stride_h, stride_w)
    u_above, v_above = _chroma(r0, g0, b0, r1, g1, b1)
    r0, g0, b0, r1, g1, b1 = _pair(video, t, below, cols, mask, stride_c, stride_t, stride_h, stride_w)
    u_below, v_below = _chroma(r0, g0, b0, r1, g1, b1)

    first = j == 0
    last = j == half_h - 1
    dst = row * half_w + cols
    tl.store(u_out + dst, _vertical(u_above, u_top, u_bottom, u_below, first, last).to(tl.uint8), mask=mask)
    tl.store(v_out + dst, _vertical(v_above, v_top, v_bottom, v_below, first, last).to(tl.uint8), mask=mask)


def rgb(video: torch.Tensor) -> torch.Tensor:
    """``[1, 3, T, H, W]`` float CUDA tensor -> ``uint8 [T, H, W, 3]`` on the same device."""
    _, _, frames, height, width = video.shape
    out = torch.empty((frames, height, width, 3), dtype=torch.uint8, device=video.device)
    grid = (frames * height, triton.cdiv(width, _BLOCK))
    with torch.cuda.device(video.device):
        _rgb_kernel[grid](video, out, height, width, *video.stride()[1:], BLOCK=_BLOCK)
    return out


def yuv420_planes(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[1, 3, T, H, W]`` float CUDA tensor (even H, W) -> Y ``[T, H, W]``, U, V ``[T, H/2, W/2]``."""
    _, _, frames, height, width = video.shape
    y = torch.empty((frames, height, width), dtype=torch.uint8, device=video.device)
    u = torch.empty((frames, height // 2, width // 2), dtype=torch.uint8, device=video.device)
    v = torch.empty_like(u)
    grid = (frames * (height // 2), triton.cdiv(width // 2, _BLOCK))
    with torch.cuda.device(video.device):
        _yuv420_kernel[grid](video, y, u, v, height, width, *video.stride()[1:], BLOCK=_BLOCK)
    return y, u, v
