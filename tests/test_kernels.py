"""kernels: decoder output -> uint8 RGB / YUV 4:2:0, against to_uint8_frames and FFmpeg's swscale."""

from __future__ import annotations

import io
import itertools
import platform
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from shopreel.kernels.postprocess import (
    decoder_output_to_rgb,
    decoder_output_to_yuv420,
    to_uint8_frames,
    triton_available,
)
from shopreel.kernels.yuv420 import Yuv420Frames, rgb_to_yuv420

# On x86-64 the chroma rounding follows swscale's SIMD vertical filter bit for bit (measured: max
# difference 0); swscale's C/NEON filter elsewhere rounds middle chroma rows at most 1 differently.
X86_64 = platform.machine().lower() in {"x86_64", "amd64"}
CHROMA_TOLERANCE = 0 if X86_64 else 1


def swscale_yuv420(rgb: np.ndarray) -> list[np.ndarray]:
    """What libx264 gets when handed RGB: PyAV's (FFmpeg swscale's) rgb24 -> yuv420p."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
    return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes]


def sample_frames(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise (like the tiny preset's frames), a gradient, and the 8 corners of the RGB cube."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), (xx + 2 * yy) % 256], -1)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    corners = [np.full((height, width, 3), c, np.uint8) for c in itertools.product((0, 255), repeat=3)]
    return np.stack([noise, gradient.astype(np.uint8), *corners])


def decoder_video(frames: int, height: int, width: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Decoder-like output: values in [-1, 1] with some overshoot that the clamp has to catch."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((1, 3, frames, height, width), generator=generator) * 2.4 - 1.2).to(dtype)


def yuv420_video_frame(planes: Yuv420Frames, index: int) -> av.VideoFrame:
    """Fill a yuv420p frame's planes directly (rows padded to FFmpeg's line size)."""
    frame = av.VideoFrame(planes.width, planes.height, "yuv420p")
    for plane, data in zip(frame.planes, planes.frame(index), strict=True):
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
        rows[:, : plane.width] = data
    return frame


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def assert_same_planes(got: Yuv420Frames, want: Yuv420Frames) -> None:
    for name in ("y", "u", "v"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize(("height", "width"), [(8, 2), (16, 16), (64, 96), (256, 256), (480, 832)])
def test_yuv420_matches_swscale(height, width):
    frames = sample_frames(height, width)
    planes = rgb_to_yuv420(frames)
    assert planes.y.shape == (len(frames), height, width)
    assert planes.u.shape == planes.v.shape == (len(frames), height // 2, width // 2)
    for index, rgb in enumerate(frames):
        (y, u, v), (sws_y, sws_u, sws_v) = planes.frame(index), swscale_yuv420(rgb)
        assert np.array_equal(y, sws_y)
        assert max_diff(u, sws_u) <= CHROMA_TOLERANCE
        assert max_diff(v, sws_v) <= CHROMA_TOLERANCE


def test_limited_range_levels():
    planes = rgb_to_yuv420(sample_frames(16, 16)[2:])  # black, blue, green, cyan, red, magenta, yellow, white
    assert planes.y[0, 0, 0] == 16 and planes.y[-1, 0, 0] == 235
    assert (planes.u[0, 0, 0], planes.v[0, 0, 0]) == (128, 128)
    assert planes.u.min() == 16 and planes.u.max() == 240 and planes.v.min() == 16 and planes.v.max() == 240


def test_frames_under_8_rows_keep_luma_exact():
    # swscale shortens its chroma filter below 8 rows (documented in yuv420); luma is unaffected.
    frames = sample_frames(2, 6)
    planes = rgb_to_yuv420(frames)
    assert planes.u.shape == (len(frames), 1, 3)
    for index, rgb in enumerate(frames):
        assert np.array_equal(planes.y[index], swscale_yuv420(rgb)[0])


@pytest.mark.skipif(not X86_64, reason="bit-exact chroma (hence identical H.264) is an x86-64 property")
def test_yuv420_planes_encode_to_the_same_h264_as_rgb():
    frames = sample_frames(64, 80)[:2].repeat(4, axis=0)  # chroma rows of 40 bytes pad to 48
    planes = rgb_to_yuv420(frames)

    def encode(video_frames) -> bytes:
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="h264") as container:
            stream = container.add_stream("libx264", rate=8, options={"preset": "ultrafast", "crf": "23"})
            stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
            for pts, frame in enumerate(video_frames):
                frame.pts, frame.time_base = pts, Fraction(1, 8)
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return buffer.getvalue()

    yuv_frames = [yuv420_video_frame(planes, i) for i in range(len(frames))]
    assert yuv_frames[0].planes[1].line_size > yuv_frames[0].planes[1].width  # padded rows are handled
    assert encode(yuv_frames) == encode([av.VideoFrame.from_ndarray(f, format="rgb24") for f in frames])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decoder_output_reference_equals_to_uint8_frames(dtype):
    video = decoder_video(3, 16, 24, dtype)
    expected = to_uint8_frames(video)
    assert np.array_equal(decoder_output_to_rgb(video), expected)
    assert_same_planes(decoder_output_to_yuv420(video), rgb_to_yuv420(expected))


def test_decoder_output_layout_does_not_matter():
    video = decoder_video(4, 16, 32)
    strided = video.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)[:, :, ::2]
    planes = decoder_output_to_yuv420(strided)
    assert np.array_equal(planes.y, rgb_to_yuv420(to_uint8_frames(video[:, :, ::2])).y)


def test_an_empty_chunk_gives_empty_planes():
    planes = rgb_to_yuv420(np.empty((0, 64, 96, 3), np.uint8))
    assert isinstance(planes, Yuv420Frames)
    assert (planes.num_frames, planes.height, planes.width) == (0, 64, 96)
    assert planes.u.shape == (0, 32, 48)


@pytest.mark.parametrize(("height", "width"), [(63, 96), (64, 95), (1, 2), (0, 0)])
def test_odd_or_empty_sizes_are_refused(height, width):
    with pytest.raises(ValueError, match="even width and height"):
        rgb_to_yuv420(np.zeros((1, height, width, 3), np.uint8))
    with pytest.raises(ValueError, match="even width and height"):
        decoder_output_to_yuv420(torch.zeros((1, 3, 1, height, width)))


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((1, 8, 8, 3), np.float32), "uint8 numpy array"),
        (torch.zeros((1, 8, 8, 3), dtype=torch.uint8), "uint8 numpy array"),
        (np.zeros((8, 8, 3), np.uint8), r"\[T, H, W, 3\]"),
        (np.zeros((1, 8, 8, 4), np.uint8), r"\[T, H, W, 3\]"),
    ],
)
def test_rgb_to_yuv420_refuses_other_dtypes_and_shapes(frames, message):
    with pytest.raises(ValueError, match=message):
        rgb_to_yuv420(frames)


@pytest.mark.parametrize(
    ("video", "message"),
    [
        (torch.zeros((2, 3, 1, 8, 8)), r"\[1, 3, T, H, W\]"),
        (torch.zeros((1, 4, 1, 8, 8)), r"\[1, 3, T, H, W\]"),
        (torch.zeros((1, 3, 8, 8)), r"\[1, 3, T, H, W\]"),
        (torch.zeros((1, 3, 1, 8, 8), dtype=torch.uint8), "floating-point"),
        (np.zeros((1, 3, 1, 8, 8), np.float32), "torch.Tensor"),
    ],
)
def test_decoder_output_refuses_other_dtypes_and_shapes(video, message):
    for convert in (decoder_output_to_rgb, decoder_output_to_yuv420):
        with pytest.raises(ValueError, match=message):
            convert(video)


def test_backend_checks():
    video = decoder_video(1, 8, 8)
    with pytest.raises(ValueError, match="backend must be"):
        decoder_output_to_yuv420(video, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        decoder_output_to_yuv420(video, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not triton_available(), reason="needs the triton package")
@pytest.mark.parametrize(
    ("frames", "height", "width", "dtype"),
    [
        (5, 64, 96, torch.float32),
        (3, 480, 832, torch.bfloat16),
        (2, 8, 1030, torch.float16),  # a partial last block
        (1, 2, 2, torch.float32),  # one chroma row: first and last at once
    ],
)
def test_triton_matches_reference(frames, height, width, dtype):
    video = decoder_video(frames, height, width, dtype, seed=height)
    strided = video.transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    want = decoder_output_to_yuv420(video, backend="reference")
    for cuda_video in (video.cuda(), strided.cuda()):
        assert np.array_equal(decoder_output_to_rgb(cuda_video), to_uint8_frames(video))
        assert_same_planes(decoder_output_to_yuv420(cuda_video), want)  # "auto": Triton for CUDA
