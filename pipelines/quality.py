"""quality: measure a finished product video and flag it against ``QualityConfig`` thresholds.

Pure numpy (PyAV only to decode a file); no model, no Ray. ``score_frames`` scores frames in memory,
``score_file`` decodes an MP4 and feeds the same analysis in batches (memory stays bounded by a
batch, whatever the video's length), ``caption_regions`` says where a storyboard's caption bands
are in the output video. Every number below is defined exactly, so two reports compare.

Picture (on luma Y' = 0.2126 R' + 0.7152 G' + 0.0722 B' of the gamma-encoded 0..1 values, after
box-downscaling by an integer factor so the longer side is at most ``analysis_side``):

- ``flicker``: d[t] = |m[t+1] - 2 m[t] + m[t-1]| of the per-frame mean luma m; the median of d over
  each run of 5 consecutive values, averaged over the video. A smooth fade or pan has d ~ 0; a
  frame-to-frame brightness flip of size a gives 2a; a cut (an isolated step) is ignored by the median.
- ``ssim_mean`` / ``ssim_min``: SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
  K2 0.03, L 1, "valid" positions only) of each frame with the next, averaged over the frame; the
  mean and the minimum over the video. A cut or crossfade is a legitimate drop of the minimum, so
  only the mean is flagged.
- ``black_fraction``: share of frames with at least 75% of their pixels at luma <= 0.10 (FFmpeg
  ``blackdetect``'s pixel threshold; its 98% picture ratio is lowered because shopreel's overlays stay
  visible on a black picture: AIGC label, badge, caption, price/CTA pills and product photo cover 4-24%
  of an 832x480, 480x832 or 320x192 frame).
- ``frozen_run_s``: the longest run of consecutive frames whose mean absolute luma difference from the
  previous frame is <= 0.001 (FFmpeg ``freezedetect``'s -60 dB), as frames in the run / fps; 0 when
  no two consecutive frames look identical.
- ``caption_contrast``: WCAG 2.x contrast ratio (L1 + 0.05) / (L2 + 0.05) of caption text on its band.
  In each caption region's box, on up to 5 evenly spaced full-size frames: split the pixels into two
  classes by Otsu's threshold on 8-bit luma, take each class's median WCAG relative luminance (sRGB
  linearised; medians, so anti-aliased edges do not dilute the text), the ratio per frame, the
  median over the region's frames, and the minimum over regions. None without regions.

Sound (float samples ``[channels, samples]``, nominally -1..1):

- ``loudness_lufs``: ITU-R BS.1770-4 integrated loudness: K-weighting (the standard's two biquads,
  derived for any sample rate as libebur128 does), 400 ms blocks every 100 ms, absolute gate -70
  LUFS, relative gate -10 LU; every channel weighted 1.0 (mono/stereo; no surround weights). Audio
  shorter than one block is measured as one block. None without audio, and None for silence (no
  block above the absolute gate), which is flagged ``silent``.
- ``clipped_fraction``: share of all samples with |x| >= 0.999. None without audio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

from .config import QualityConfig
from .overlays import OverlayPainter
from .types import ShotKind, Storyboard

# Picture
LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)  # BT.709 luma of gamma-encoded R'G'B'
BLACK_LUMA = 0.10  # a pixel this dark or darker is black (blackdetect's pix_th)
BLACK_PIXEL_RATIO = 0.75  # share of black pixels that makes a black frame (overlays cover up to 24%)
FROZEN_MAFD = 0.001  # mean |luma difference| at or under which two frames look identical
FLICKER_WINDOW = 5  # the median over this many second differences ignores a cut (two outliers)
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03
CAPTION_SAMPLES = 5  # frames per caption region measured for contrast
BATCH_FRAMES = 16  # frames analysed at once (bounds memory for long videos)
# Sound
CLIP_LEVEL = 0.999
GATE_BLOCK_S, GATE_HOP_S = 0.4, 0.1
ABSOLUTE_GATE_LUFS, RELATIVE_GATE_LU = -70.0, -10.0
LOUDNESS_OFFSET = -0.691  # BS.1770: cancels the K-filter's gain at 997 Hz

FLAGS = (
    "flicker",
    "low_ssim",
    "black_frames",
    "frozen_frames",
    "low_caption_contrast",
    "low_caption_relevance",
    "silent",
    "too_quiet",
    "too_loud",
    "clipping",
)


@dataclass(frozen=True)
class CaptionRegion:
    """Where one caption is shown alone: output frames [frame_start, frame_end) and its band's box."""

    frame_start: int
    frame_end: int  # exclusive
    box: tuple[int, int, int, int]  # left, top, right, bottom in full-size pixels, end exclusive


class QualityReport(BaseModel):
    """The measured numbers of one video (definitions: this module's docstring) and what they flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_frames: int = Field(description="frames scored")
    fps: float
    duration_s: float = Field(description="num_frames / fps")
    width: int
    height: int
    flicker: float = Field(description="mean 5-frame median |second difference| of mean luma (0..1)")
    ssim_mean: float | None = Field(description="mean SSIM of consecutive frames; None for one frame")
    ssim_min: float | None = Field(description="lowest SSIM of consecutive frames (cuts, crossfades)")
    black_fraction: float = Field(description="share of black frames")
    frozen_run_s: float = Field(description="longest still picture, seconds")
    caption_contrast: float | None = Field(description="lowest WCAG contrast of a caption; None: none")
    caption_relevance: float | None = Field(
        default=None, description="lowest caption-to-prompt similarity; None: not English or no model"
    )
    has_audio: bool
    loudness_lufs: float | None = Field(description="BS.1770-4 integrated; None: no audio or silent")
    clipped_fraction: float | None = Field(description="share of samples at |x| >= 0.999")
    flags: list[str] = Field(description="names from quality.FLAGS, in that order; empty: passed")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        """True when nothing is flagged."""
        return not self.flags


# --- entry points -----------------------------------------------------------------------------------


class Embedder(Protocol):
    """What caption relevance needs of a sentence-embedding model (pipelines/embeddings.py)."""

    def similarity(self, left: Sequence[str], right: Sequence[str]) -> np.ndarray: ...


def caption_relevance(storyboard: Storyboard, embedder: Embedder | None) -> float | None:
    """The lowest cosine similarity of a shot's caption to the prompt its picture was made from.

    A caption that talks about something its shot does not show (an LLM's slip, a mismatched step)
    scores low. The call-to-action shot is left out: its price and "Shop now" describe no picture.
    English storyboards only (the model is English); None without captions or a model.
    """
    pairs = [
        (shot.caption, shot.prompt)
        for shot in storyboard.shots
        if shot.caption.strip() and shot.kind != ShotKind.cta
    ]
    if embedder is None or storyboard.language != "en" or not pairs:
        return None
    similarity = embedder.similarity([caption for caption, _ in pairs], [prompt for _, prompt in pairs])
    return float(np.diag(similarity).min())


def with_caption_relevance(
    report: QualityReport, relevance: float | None, config: QualityConfig = QualityConfig()
) -> QualityReport:
    """``report`` with its caption relevance, flagged below ``config.min_caption_relevance``."""
    flags = set(report.flags)
    if relevance is not None and relevance < config.min_caption_relevance:
        flags.add("low_caption_relevance")
    return report.model_copy(
        update={"caption_relevance": relevance, "flags": [name for name in FLAGS if name in flags]}
    )


def score_frames(
    frames: np.ndarray,
    fps: float,
    *,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    captions: Sequence[CaptionRegion] = (),
    config: QualityConfig = QualityConfig(),
) -> QualityReport:
    """Score uint8 ``[T, H, W, 3]`` RGB frames at ``fps``, with optional ``[channels, samples]`` audio."""
    # 1. Check inputs
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be a uint8 [T, H, W, 3] array, got {_describe(frames)}")
    if frames.shape[0] < 1 or frames.shape[3] != 3:
        raise ValueError(f"frames must be a uint8 [T, H, W, 3] array with T >= 1, got {frames.shape}")
    num_frames, height, width = frames.shape[:3]
    _check_fps(fps)
    _check_audio(audio, sample_rate)
    _check_captions(captions, width=width, height=height, num_frames=num_frames)

    # 2. Picture, in batches
    analyser = _VideoAnalyser(height, width, captions, config)
    for start in range(0, num_frames, BATCH_FRAMES):
        analyser.add(frames[start : start + BATCH_FRAMES])

    # 3. Sound, then the report
    return _report(analyser, fps, audio, sample_rate, config)


def score_file(
    path: Path, *, captions: Sequence[CaptionRegion] = (), config: QualityConfig = QualityConfig()
) -> QualityReport:
    """Decode an MP4 (any file FFmpeg reads) and score it: video as rgb24, audio as float planar."""
    import av

    # 1. Open and check
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video file not found: {path}")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"video file has no video stream: {path}")
        video = container.streams.video[0]
        video.thread_type = "AUTO"
        rate = video.average_rate or video.guessed_rate
        if not rate:
            raise ValueError(f"video stream has no frame rate: {path}")
        fps = float(rate)
        width, height = video.codec_context.width, video.codec_context.height
        _check_captions(captions, width=width, height=height, num_frames=None)
        audio_stream = container.streams.audio[0] if container.streams.audio else None
        resampler: Any = None
        sample_rate = None
        if audio_stream is not None:
            sample_rate = int(audio_stream.rate)
            resampler = av.AudioResampler(format="fltp", layout=audio_stream.layout.name, rate=sample_rate)

        # 2. Decode both streams in one pass, analysing the picture a batch at a time
        analyser = _VideoAnalyser(height, width, captions, config)
        batch: list[np.ndarray] = []
        pieces: list[np.ndarray] = []
        streams = [video] if audio_stream is None else [video, audio_stream]
        for frame in container.decode(*streams):
            if isinstance(frame, av.VideoFrame):
                batch.append(frame.to_ndarray(format="rgb24"))
                if len(batch) == BATCH_FRAMES:
                    analyser.add(np.stack(batch))
                    batch = []
            else:
                pieces.extend(f.to_ndarray() for f in resampler.resample(frame))
        if batch:
            analyser.add(np.stack(batch))
        if resampler is not None:
            pieces.extend(f.to_ndarray() for f in resampler.resample(None))
    if analyser.count == 0:
        raise ValueError(f"video file has no decodable frames: {path}")
    _check_captions(captions, width=width, height=height, num_frames=analyser.count)
    audio = None
    if audio_stream is not None:
        channels = audio_stream.codec_context.channels
        audio = np.concatenate(pieces, axis=1) if pieces else np.zeros((channels, 0), np.float32)

    # 3. Sound, then the report
    return _report(analyser, fps, audio, sample_rate, config)


def caption_regions(storyboard: Storyboard, *, font_path: Path | None = None) -> list[CaptionRegion]:
    """Where each shot's caption is shown alone in the composed video (crossfade frames left out).

    Shots follow each other and a crossfade overlaps the last ``transition_frames`` of a shot with
    the first frames of the next (pipelines/compose.py), so shot k starts at output frame
    sum(num_frames - transition_frames) of the shots before it. Its caption is alone from the end of
    the incoming crossfade to the start of the outgoing one. ``font_path``: ``ComposeConfig.font_path``
    (the font changes the caption's wrapping, so its band's height).
    """
    painter = OverlayPainter(storyboard, [], font_path)
    regions = []
    start = incoming = 0
    for shot in storyboard.shots:
        end = start + shot.num_frames - shot.transition_frames  # the outgoing crossfade starts here
        box = painter.caption_box(shot)
        if box is not None and start + incoming < end:
            regions.append(CaptionRegion(frame_start=start + incoming, frame_end=end, box=box))
        start, incoming = end, shot.transition_frames
    return regions


# --- the measurements, usable on their own -------------------------------------------------------------


def luma(frames: np.ndarray, factor: int = 1) -> np.ndarray:
    """BT.709 luma (0..1, float32) of uint8 ``[..., H, W, 3]`` RGB, box-averaged over ``factor``² pixels.

    Rows and columns beyond a multiple of ``factor`` are dropped.
    """
    height, width = frames.shape[-3] // factor, frames.shape[-2] // factor
    frames = frames[..., : height * factor, : width * factor, :]
    if factor == 1:
        sums = frames.astype(np.float32)
    else:
        # Sum in integers through strided slices: several times faster than a float reshape-mean.
        dtype = np.uint16 if factor * factor * 255 <= np.iinfo(np.uint16).max else np.uint32
        rows: np.ndarray = frames[..., 0::factor, :, :].astype(dtype)
        for i in range(1, factor):
            rows += frames[..., i::factor, :, :]
        block: np.ndarray = rows[..., 0::factor, :].copy()
        for i in range(1, factor):
            block += rows[..., i::factor, :]
        sums = block.astype(np.float32)
    scale = np.float32(1.0 / (255.0 * factor * factor))
    r, g, b = (np.float32(w) * scale for w in LUMA_WEIGHTS)
    return sums[..., 0] * r + sums[..., 1] * g + sums[..., 2] * b


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean SSIM of luma images ``x`` and ``y`` (``[..., H, W]``, 0..1), one value per leading index.

    Gaussian 11x11 window (sigma 1.5), K1 = 0.01, K2 = 0.03, dynamic range 1; valid positions only.
    """
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.shape != y.shape or x.ndim < 2 or min(x.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs two images of one shape, at least 11x11, got {x.shape} and {y.shape}")
    mu_x, mu_y = _gaussian_valid(x), _gaussian_valid(y)
    return _ssim_map(mu_x, mu_y, _gaussian_valid(x * x), _gaussian_valid(y * y), _gaussian_valid(x * y)).mean(
        axis=(-2, -1)
    )


def relative_luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG 2.x relative luminance (0..1, float64) of uint8 sRGB ``[..., 3]``."""
    return _LUMINANCE_LUT[rgb] @ np.asarray(LUMA_WEIGHTS)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: the two classes are ``<= t`` and ``> t``."""
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * levels)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def caption_contrast(rgb: np.ndarray) -> float:
    """WCAG contrast ratio of the two luminance classes (Otsu) of uint8 ``[h, w, 3]`` caption pixels.

    1.0 when the pixels do not split (a uniform box).
    """
    luma8 = np.rint(luma(rgb) * 255).astype(np.uint8)
    threshold = otsu_threshold(luma8)
    dark = luma8 <= threshold
    if dark.all() or not dark.any():
        return 1.0
    lum = relative_luminance(rgb)
    high, low = float(np.median(lum[~dark])), float(np.median(lum[dark]))
    return (high + 0.05) / (low + 0.05)


def k_weighting(sample_rate: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """BS.1770's two K-weighting biquads ``((b, a) shelf, (b, a) high-pass)`` at ``sample_rate``.

    The standard tabulates them at 48 kHz; these are its analogue prototypes through the bilinear
    transform (as libebur128 derives them), equal to the table at 48 kHz.
    """
    # Stage 1: high shelf, +4 dB above ~1.7 kHz (the head's acoustic effect).
    k = math.tan(math.pi * 1681.974450955533 / sample_rate)
    q, gain_db = 0.7071752369554196, 3.999843853973347
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf_b = np.array([vh + vb * k / q + k * k, 2.0 * (k * k - vh), vh - vb * k / q + k * k]) / a0
    shelf_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0])
    # Stage 2: RLB high-pass at ~38 Hz.
    k = math.tan(math.pi * 38.13547087602444 / sample_rate)
    q = 0.5003270373238773
    a0 = 1.0 + k / q + k * k
    high_b = np.array([1.0, -2.0, 1.0])
    high_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0])
    return (shelf_b, shelf_a), (high_b, high_a)


def k_weighted(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """``audio`` ``[channels, samples]`` through the K-weighting filter, from rest (float64).

    Exact, vectorised: the product of the two biquads' frequency responses applied by FFT, with enough
    zero padding that the impulse response (poles inside radius r) has decayed below 1e-18 before it
    could wrap around; equal to running the difference equations to rounding error.
    """
    x = np.asarray(audio, np.float64)
    num_samples = x.shape[-1]
    stages = k_weighting(sample_rate)
    radius = max(float(np.abs(np.roots(a)).max()) for _, a in stages)
    # 2x: the high-pass's poles are nearly double (n * r**n decays a little slower than r**n).
    tail = math.ceil(2 * math.log(1e-18) / math.log(radius))
    size = 1 << (num_samples + tail - 1).bit_length()
    z = np.exp(-2j * np.pi * np.arange(size // 2 + 1) / size)  # z^-1 on the rfft grid
    response = np.ones_like(z)
    for b, a in stages:
        response *= (b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)
    return np.fft.irfft(np.fft.rfft(x, size) * response, size)[..., :num_samples]


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float:
    """ITU-R BS.1770-4 integrated loudness (LUFS) of ``[channels, samples]``; ``-inf`` for silence.

    Channel weights are all 1.0 (mono, stereo). Audio shorter than a 400 ms gating block is measured as
    one block.
    """
    _check_audio(audio, sample_rate)
    if audio.shape[1] == 0:
        return -math.inf
    # 1. K-weighting, then the mean square of every 400 ms block, 100 ms apart (75% overlap)
    y = k_weighted(audio, sample_rate)
    num_samples = y.shape[1]
    block = min(num_samples, round(GATE_BLOCK_S * sample_rate))
    hop = round(GATE_HOP_S * sample_rate)
    starts = np.arange(0, num_samples - block + 1, hop)
    cumulative = np.concatenate([np.zeros((y.shape[0], 1)), np.cumsum(y * y, axis=1)], axis=1)
    mean_square = np.maximum(cumulative[:, starts + block] - cumulative[:, starts], 0.0) / block
    power = mean_square.sum(axis=0)  # channel weights G_i = 1
    # 2. Absolute gate, relative gate, then the loudness of the blocks that pass both
    with np.errstate(divide="ignore"):
        block_loudness = LOUDNESS_OFFSET + 10 * np.log10(power)
    passed = block_loudness > ABSOLUTE_GATE_LUFS
    if not passed.any():
        return -math.inf
    relative_gate = LOUDNESS_OFFSET + 10 * math.log10(float(power[passed].mean())) + RELATIVE_GATE_LU
    passed &= block_loudness > relative_gate
    return LOUDNESS_OFFSET + 10 * math.log10(float(power[passed].mean()))


# --- internals ------------------------------------------------------------------------------------------


def _srgb_to_linear() -> np.ndarray:
    c = np.arange(256, dtype=np.float64) / 255.0
    # WCAG 2.x writes 0.03928 (an old sRGB draft); 0.04045 is the sRGB standard's. No 8-bit value lies
    # between them, so both give the same table.
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LUMINANCE_LUT = _srgb_to_linear()


def _gaussian_kernel() -> np.ndarray:
    offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return (kernel / kernel.sum()).astype(np.float32)


_GAUSSIAN = _gaussian_kernel()


def _gaussian_valid(a: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian filter over the last two axes, valid positions only."""
    taps = len(_GAUSSIAN)
    width = a.shape[-1] - taps + 1
    rows = a[..., 0:width] * _GAUSSIAN[0]
    for k in range(1, taps):
        rows += a[..., k : k + width] * _GAUSSIAN[k]
    height = a.shape[-2] - taps + 1
    out = rows[..., 0:height, :] * _GAUSSIAN[0]
    for k in range(1, taps):
        out += rows[..., k : k + height, :] * _GAUSSIAN[k]
    return out


def _ssim_map(
    mu_x: np.ndarray, mu_y: np.ndarray, xx: np.ndarray, yy: np.ndarray, xy: np.ndarray
) -> np.ndarray:
    """SSIM at each window from the Gaussian-weighted moments E[x], E[y], E[x²], E[y²], E[xy]."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_xy = mu_x * mu_y
    mu_xx, mu_yy = mu_x * mu_x, mu_y * mu_y
    numerator = (2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)
    denominator = (mu_xx + mu_yy + c1) * ((xx - mu_xx) + (yy - mu_yy) + c2)
    return numerator / denominator


def _downscale_factor(height: int, width: int, side: int) -> int:
    """The integer box factor that brings the longer side to at most ``side``, keeping 11 px for SSIM."""
    factor = max(1, math.ceil(max(height, width) / side))
    while factor > 1 and min(height, width) // factor < 2 * SSIM_RADIUS + 1:
        factor -= 1
    return factor


class _VideoAnalyser:
    """Takes frames a batch at a time and keeps only per-frame numbers (and caption contrasts)."""

    def __init__(
        self, height: int, width: int, captions: Sequence[CaptionRegion], config: QualityConfig
    ) -> None:
        if min(height, width) < 2 * SSIM_RADIUS + 1:
            raise ValueError(f"frames must be at least 11x11 pixels (the SSIM window), got {width}x{height}")
        self.height, self.width = height, width
        self.factor = _downscale_factor(height, width, config.analysis_side)
        self.captions = list(captions)
        # Which caption regions measure their contrast on which frame.
        self.caption_frames: dict[int, list[int]] = {}
        for index, region in enumerate(self.captions):
            count = min(CAPTION_SAMPLES, region.frame_end - region.frame_start)
            picks = np.linspace(region.frame_start, region.frame_end - 1, count).round().astype(int)
            for frame_index in np.unique(picks):
                self.caption_frames.setdefault(int(frame_index), []).append(index)
        self.contrasts: list[list[float]] = [[] for _ in self.captions]
        self.mean_luma: list[np.ndarray] = []
        self.black: list[np.ndarray] = []
        self.ssim: list[np.ndarray] = []
        self.mafd: list[np.ndarray] = []
        self.previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # luma, E[x], E[x²]
        self.count = 0

    def add(self, frames: np.ndarray) -> None:
        if frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frame of shape {frames.shape[1:]} in a {self.width}x{self.height} video")
        # 1. Caption contrast on full-size pixels (downscaling would blur the text into its band)
        for offset in range(len(frames)):
            for index in self.caption_frames.get(self.count + offset, ()):
                left, top, right, bottom = self.captions[index].box
                self.contrasts[index].append(caption_contrast(frames[offset, top:bottom, left:right]))
        # 2. Per-frame numbers on downscaled luma
        y = luma(frames, self.factor)
        self.mean_luma.append(y.mean(axis=(1, 2), dtype=np.float64))
        self.black.append((y <= BLACK_LUMA).mean(axis=(1, 2)) >= BLACK_PIXEL_RATIO)
        mu, xx = _gaussian_valid(y), _gaussian_valid(y * y)
        # 3. Consecutive pairs, including the last frame of the previous batch with this batch's first
        if self.previous is not None:
            y, mu, xx = (
                np.concatenate([p[None], c]) for p, c in zip(self.previous, (y, mu, xx), strict=True)
            )
        if len(y) > 1:
            xy = _gaussian_valid(y[:-1] * y[1:])
            self.ssim.append(
                _ssim_map(mu[:-1], mu[1:], xx[:-1], xx[1:], xy).mean(axis=(1, 2), dtype=np.float64)
            )
            self.mafd.append(np.abs(y[1:] - y[:-1]).mean(axis=(1, 2), dtype=np.float64))
        self.previous = (y[-1], mu[-1], xx[-1])
        self.count += len(frames)

    def measurements(self, fps: float) -> dict[str, Any]:
        mean_luma = np.concatenate(self.mean_luma)
        ssim_values = np.concatenate(self.ssim) if self.ssim else np.zeros(0)
        mafd = np.concatenate(self.mafd) if self.mafd else np.zeros(0)
        contrasts = [float(np.median(values)) for values in self.contrasts if values]
        return {
            "flicker": _flicker(mean_luma),
            "ssim_mean": float(ssim_values.mean()) if ssim_values.size else None,
            "ssim_min": float(ssim_values.min()) if ssim_values.size else None,
            "black_fraction": float(np.concatenate(self.black).mean()),
            "frozen_run_s": _longest_run(mafd <= FROZEN_MAFD) / fps,
            "caption_contrast": min(contrasts) if contrasts else None,
        }


def _flicker(mean_luma: np.ndarray) -> float:
    """Mean over the video of the 5-value running median of |second difference| of mean luma."""
    second = np.abs(mean_luma[2:] - 2 * mean_luma[1:-1] + mean_luma[:-2])
    if not second.size:
        return 0.0
    window = min(FLICKER_WINDOW, second.size)
    medians = np.median(np.lib.stride_tricks.sliding_window_view(second, window), axis=1)
    return float(medians.mean())


def _longest_run(same: np.ndarray) -> int:
    """Frames in the longest run of identical-looking frames (``same[t]``: t+1 looks like t); 0: none."""
    if not same.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], same.astype(np.int8), [0]])))
    return int((edges[1::2] - edges[0::2]).max()) + 1


def _report(
    analyser: _VideoAnalyser,
    fps: float,
    audio: np.ndarray | None,
    sample_rate: int | None,
    config: QualityConfig,
) -> QualityReport:
    numbers = analyser.measurements(fps)
    loudness = clipped = None
    if audio is not None and sample_rate is not None:
        lufs = integrated_loudness(audio, sample_rate)
        loudness = lufs if math.isfinite(lufs) else None
        clipped = float((np.abs(audio) >= CLIP_LEVEL).mean()) if audio.size else 0.0
    flagged = {
        "flicker": numbers["flicker"] > config.max_flicker,
        "low_ssim": numbers["ssim_mean"] is not None and numbers["ssim_mean"] < config.min_ssim,
        "black_frames": numbers["black_fraction"] > config.max_black_fraction,
        "frozen_frames": numbers["frozen_run_s"] > config.max_frozen_run_s,
        "low_caption_contrast": numbers["caption_contrast"] is not None
        and numbers["caption_contrast"] < config.min_caption_contrast,
        "silent": audio is not None and loudness is None,
        "too_quiet": loudness is not None and loudness < config.loudness_range_lufs[0],
        "too_loud": loudness is not None and loudness > config.loudness_range_lufs[1],
        "clipping": clipped is not None and clipped > config.max_clipped_fraction,
        "low_caption_relevance": False,  # needs the storyboard and a model: with_caption_relevance
    }
    return QualityReport(
        num_frames=analyser.count,
        fps=fps,
        duration_s=analyser.count / fps,
        width=analyser.width,
        height=analyser.height,
        **numbers,
        has_audio=audio is not None,
        loudness_lufs=loudness,
        clipped_fraction=clipped,
        flags=[name for name in FLAGS if flagged[name]],
    )


def _check_fps(fps: float) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def _check_audio(audio: np.ndarray | None, sample_rate: int | None) -> None:
    if audio is None:
        if sample_rate is not None:
            raise ValueError("sample_rate given without audio")
        return
    if not isinstance(audio, np.ndarray) or audio.ndim != 2 or not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be a float [channels, samples] array, got {_describe(audio)}")
    if audio.shape[0] < 1:
        raise ValueError("audio must have at least one channel")
    if not np.isfinite(audio).all():
        raise ValueError("audio has NaN or infinite samples")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer with audio, got {sample_rate!r}")


def _check_captions(
    captions: Sequence[CaptionRegion], *, width: int, height: int, num_frames: int | None
) -> None:
    for index, region in enumerate(captions):
        name = f"captions[{index}]"
        if not isinstance(region, CaptionRegion):
            raise ValueError(f"{name} must be a CaptionRegion, got {type(region).__name__}")
        if not 0 <= region.frame_start < region.frame_end:
            raise ValueError(f"{name} frames must satisfy 0 <= frame_start < frame_end, got {region}")
        if num_frames is not None and region.frame_end > num_frames:
            raise ValueError(f"{name} ends at frame {region.frame_end}, the video has {num_frames} frames")
        left, top, right, bottom = region.box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ValueError(f"{name}.box {region.box} is not inside the {width}x{height} frame")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


__all__ = [
    "FLAGS",
    "CaptionRegion",
    "QualityReport",
    "caption_contrast",
    "caption_regions",
    "integrated_loudness",
    "k_weighted",
    "k_weighting",
    "luma",
    "otsu_threshold",
    "relative_luminance",
    "score_file",
    "score_frames",
    "ssim",
]
