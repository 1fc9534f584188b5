"""compose: FrameChunks -> fragmented MP4 while frames arrive, then a download MP4 and a thumbnail.

One ``CompositionSession`` per video holds the muxer, so a request's frames must reach the same
compositor (the serving layer keeps them on one replica). Each pushed chunk gets its shot's
overlay (caption, price/CTA, badge, product picture, AIGC label), crossfades are blended by
holding back the last frames of a shot until the next shot's first frames arrive, and the frames
go to libx264 (``tune=zerolatency``: no lookahead, so bytes leave with the frames). The muxer
writes fragmented MP4 (``frag_keyframe+empty_moov+default_base_moof``): the header as soon as the
first frame is in, then one fragment per keyframe, which a browser's MSE or ``<video>`` plays
progressively. ``finish`` remuxes the same packets into a ``faststart`` MP4 (no re-encode).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..kernels.yuv420 import Yuv420Frames, rgb_to_yuv420
from .audio import AUDIO_CHANNELS, background_bed, load_audio_file
from .config import ComposeConfig
from .narration import mix_narration
from .overlays import Overlay, OverlayPainter
from .types import FrameChunk, Storyboard

if TYPE_CHECKING:
    from PIL import Image

AudioSource = Literal["bed", "none"] | Path
AAC_FRAME_SAMPLES = 1024
THUMBNAIL_QUALITY = 85
# Priming samples make AAC's first packet negative; shifting every stream to compensate would
# offset the video too (and break its frame rate in the file). Keep timestamps as written.
MUXER_OPTIONS = {"avoid_negative_ts": "disabled"}
STREAM_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+use_metadata_tags"
DOWNLOAD_MOVFLAGS = "faststart+use_metadata_tags"


@dataclass(frozen=True)
class ComposeResult:
    num_frames: int
    duration_s: float
    fps: int
    width: int
    height: int
    has_audio: bool
    mp4_path: Path | None
    thumbnail_path: Path | None
    fragment_bytes: int  # bytes of fragmented MP4 streamed out
    encode_s: float  # seconds spent in this stage: overlays, blending, encoding, remuxing


class _FragmentSink:
    """A non-seekable file for FFmpeg's muxer: collects what it writes and spools a copy for the remux."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.total = 0
        # Closed by the session (finish/close), not here: it outlives every write.
        self.spool = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115

    def write(self, data: bytes) -> int:
        chunk = bytes(data)
        self.pending.append(chunk)
        self.spool.write(chunk)
        self.total += len(chunk)
        return len(chunk)

    def seekable(self) -> bool:
        return False

    def drain(self) -> list[bytes]:
        """Bytes written since the last drain, as one fragment (or nothing)."""
        if not self.pending:
            return []
        data, self.pending = b"".join(self.pending), []
        return [data]


class Compositor:
    """Opens one composition session per video; holds only configuration, so it is shareable."""

    def __init__(self, config: ComposeConfig | None = None) -> None:
        self.config = config or ComposeConfig()

    def open(
        self,
        storyboard: Storyboard,
        *,
        request_id: str,
        product_images: list[Image.Image] | tuple[Image.Image, ...] = (),
        audio: AudioSource = "bed",
        seed: int = 0,
    ) -> CompositionSession:
        """Check everything about the request up front (audio file, font), then start the muxer."""
        return CompositionSession(
            storyboard,
            self.config,
            request_id=request_id,
            product_images=list(product_images),
            audio=audio,
            seed=seed,
        )


class CompositionSession:
    def __init__(
        self,
        storyboard: Storyboard,
        config: ComposeConfig,
        *,
        request_id: str,
        product_images: list[Image.Image],
        audio: AudioSource,
        seed: int,
    ) -> None:
        import av

        started = time.perf_counter()
        self.storyboard = storyboard
        self.config = config
        self.request_id = request_id
        self.fps, self.total_frames = storyboard.fps, storyboard.total_frames
        # Small models (mini: 64x64) are enlarged so captions and the label do not cover the picture.
        self.scale = enlargement(storyboard.height, config.min_height)
        self.width, self.height = storyboard.width * self.scale, storyboard.height * self.scale

        # 1. The whole soundtrack up front, so a bad audio file fails before any frame is encoded.
        self.audio = _soundtrack(storyboard, config, audio, seed)

        # 2. Each shot's overlay, painted once (the font is checked here too).
        # The storyboard at the output's size: what overlays are painted for and the scorer reads.
        self.canvas = storyboard.model_copy(update={"width": self.width, "height": self.height})
        painter = OverlayPainter(self.canvas, product_images, config.font_path)
        self.overlays: list[Overlay | None] = [painter.shot_overlay(shot) for shot in storyboard.shots]

        # 3. Where the stream stands: next expected (shot, frame) and frames held back for a crossfade.
        self.shot_index = 0
        self.next_frame = 0
        self.fade_in: np.ndarray | None = None  # previous shot's tail, blended into this shot's head
        self.fade_out: np.ndarray | None = None  # this shot's tail, collected for the next shot
        self.frames_out = 0
        self.audio_out = 0
        self.thumbnail_frame_index = min(self.total_frames - 1, storyboard.shots[0].num_frames // 2)
        self.thumbnail: np.ndarray | None = None
        self.finished = False
        self.closed = False

        # 4. The fragmented-MP4 muxer: H.264 at a fixed GOP, plus AAC when there is a soundtrack.
        self.sink = _FragmentSink()
        self.container: Any = av.open(
            self.sink,
            mode="w",
            format="mp4",
            buffer_size=64 * 1024,
            options={**MUXER_OPTIONS, "movflags": STREAM_MOVFLAGS},
        )
        self.container.metadata.update(self._metadata())
        keyframe_interval = max(1, round(config.keyframe_interval_s * self.fps))
        self.video = self.container.add_stream(
            "libx264",
            rate=self.fps,
            options={
                "preset": config.x264_preset,
                "crf": str(config.crf),
                "tune": "zerolatency",
                "g": str(keyframe_interval),
                "keyint_min": str(keyframe_interval),
                "sc_threshold": "0",  # fixed GOP: fragments at a steady cadence for streaming
            },
        )
        self.video.width, self.video.height = self.width, self.height
        self.video.pix_fmt = "yuv420p"
        self.audio_stream: Any = None
        if self.audio is not None:
            self.audio_stream = self.container.add_stream(
                "aac", rate=config.audio_sample_rate, layout="stereo"
            )
            self.audio_stream.bit_rate = config.audio_bitrate
        self.encode_s = time.perf_counter() - started

    # --- streaming ------------------------------------------------------------------------------

    def push(self, chunk: FrameChunk) -> list[bytes]:
        """Compose one chunk of decoded frames; returns the fMP4 bytes that became ready (maybe none)."""
        started = time.perf_counter()
        self._check_chunk(chunk)
        shot = self.storyboard.shots[chunk.shot_index]
        frames = _enlarge(chunk.frames, self.scale)
        overlay = self.overlays[chunk.shot_index]
        if overlay is not None:
            overlay.apply(frames)

        # Crossfade in: this shot's first frames blend with the tail held back from the previous shot.
        if self.fade_in is not None and chunk.frame_start < len(self.fade_in):
            n = len(self.fade_in)
            for offset in range(min(n, chunk.frame_end) - chunk.frame_start):
                k = chunk.frame_start + offset
                weight = (k + 1) / (n + 1)  # of the incoming shot
                blended = self.fade_in[k].astype(np.float32) * (1 - weight) + frames[offset] * weight
                frames[offset] = np.rint(blended).astype(np.uint8)
        # Crossfade out: the last transition_frames of this shot wait for the next shot's first ones.
        hold_from = shot.num_frames - shot.transition_frames
        keep = max(0, min(chunk.frame_end, hold_from) - chunk.frame_start)
        if chunk.frame_end > hold_from:
            if self.fade_out is None:
                self.fade_out = np.empty((shot.transition_frames, self.height, self.width, 3), np.uint8)
            start = chunk.frame_start + keep - hold_from
            self.fade_out[start : start + len(frames) - keep] = frames[keep:]
        self._encode(frames[:keep])

        self.next_frame = chunk.frame_end
        if chunk.frame_end == shot.num_frames:
            self.fade_in, self.fade_out = self.fade_out, None
            self.shot_index += 1
            self.next_frame = 0
        self.encode_s += time.perf_counter() - started
        return self.sink.drain()

    def finish(
        self, mp4_path: Path | None, thumbnail_path: Path | None = None
    ) -> tuple[list[bytes], ComposeResult]:
        """Flush the encoders, end the stream, write the download MP4 and thumbnail atomically."""
        started = time.perf_counter()
        if self.shot_index != len(self.storyboard.shots):
            raise ValueError(
                f"finish() before every frame arrived: "
                f"{self.frames_out} of {self.total_frames} frames composed"
            )
        self._push_audio(until=None)
        for packet in self.video.encode():
            self.container.mux(packet)
        if self.audio_stream is not None:
            for packet in self.audio_stream.encode():
                self.container.mux(packet)
        self.container.close()
        self.finished = True
        tail = self.sink.drain()
        if mp4_path is not None:
            self._write_download_mp4(mp4_path)
        if thumbnail_path is not None and self.thumbnail is not None:
            _write_thumbnail(self.thumbnail, thumbnail_path)
        self.sink.spool.close()
        self.closed = True
        self.encode_s += time.perf_counter() - started
        return tail, ComposeResult(
            num_frames=self.frames_out,
            duration_s=self.frames_out / self.fps,
            fps=self.fps,
            width=self.width,
            height=self.height,
            has_audio=self.audio is not None,
            mp4_path=mp4_path,
            thumbnail_path=thumbnail_path if self.thumbnail is not None else None,
            fragment_bytes=self.sink.total,
            encode_s=self.encode_s,
        )

    def close(self) -> None:
        """Abandon the session (the request failed or was cancelled); safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            # A half-fed muxer may refuse to write its trailer; the stream is abandoned anyway.
            with contextlib.suppress(Exception):
                self.container.close()
        self.sink.spool.close()

    # --- internals ------------------------------------------------------------------------------

    def _check_chunk(self, chunk: FrameChunk) -> None:
        if self.finished or self.closed:
            raise ValueError("this composition session is already finished")
        if chunk.request_id != self.request_id:
            raise ValueError(f"chunk of request {chunk.request_id!r} pushed to session {self.request_id!r}")
        if chunk.shot_index != self.shot_index or chunk.frame_start != self.next_frame:
            raise ValueError(
                f"frames out of order: expected shot {self.shot_index} frame {self.next_frame}, "
                f"got shot {chunk.shot_index} frames [{chunk.frame_start}, {chunk.frame_end})"
            )
        shot = self.storyboard.shots[chunk.shot_index]
        if chunk.frame_end > shot.num_frames:
            raise ValueError(
                f"shot {shot.index} has {shot.num_frames} frames, chunk ends at {chunk.frame_end}"
            )
        expected = (self.storyboard.height, self.storyboard.width)
        if chunk.frames.shape[1:3] != expected:
            raise ValueError(
                f"frames are {chunk.frames.shape[2]}x{chunk.frames.shape[1]}, "
                f"the storyboard is {expected[1]}x{expected[0]}"
            )

    def _encode(self, frames: np.ndarray) -> None:
        import av

        # "kernel": our swscale-exact RGB -> YUV 4:2:0 (kernels.yuv420) hands libx264 its own pixel
        # format, so the encoder skips its conversion and writes the same bytes. On CPU FFmpeg's SIMD
        # conversion is faster (measured 1.05-1.6x), hence the "encoder" default.
        planes = rgb_to_yuv420(frames) if self.config.pixel_conversion == "kernel" else None
        for index, frame in enumerate(frames):
            if self.frames_out == self.thumbnail_frame_index:
                self.thumbnail = frame.copy()
            if planes is not None:
                video_frame = _yuv420_video_frame(planes, index)
            else:
                video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = self.frames_out
            video_frame.time_base = Fraction(1, self.fps)
            for packet in self.video.encode(video_frame):
                self.container.mux(packet)
            self.frames_out += 1
        # Keep audio level with the picture, in whole AAC frames until the end.
        self._push_audio(until=self.frames_out / self.fps)

    def _push_audio(self, until: float | None) -> None:
        import av

        if self.audio is None or self.audio_stream is None:
            return
        total = self.audio.shape[1]
        if until is None:
            target = total
        else:
            whole_frames = int(until * self.config.audio_sample_rate) // AAC_FRAME_SAMPLES
            target = min(total, whole_frames * AAC_FRAME_SAMPLES)
        while self.audio_out < target:
            count = min(AAC_FRAME_SAMPLES, target - self.audio_out)
            samples = np.ascontiguousarray(self.audio[:, self.audio_out : self.audio_out + count])
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
            frame.sample_rate = self.config.audio_sample_rate
            frame.pts = self.audio_out
            frame.time_base = Fraction(1, self.config.audio_sample_rate)
            for packet in self.audio_stream.encode(frame):
                self.container.mux(packet)
            self.audio_out += count

    def _metadata(self) -> dict[str, str]:
        """Implicit AIGC label (as in GB 45438-2025's metadata field) alongside the visible one."""
        aigc = {"Label": "1", "ContentProducer": "shopreel", "ProduceID": self.request_id}
        return {
            "title": self.storyboard.title,
            "comment": f"{self.storyboard.aigc_label} (AI-generated content, shopreel)",
            "AIGC": json.dumps(aigc, separators=(",", ":")),
        }

    def _write_download_mp4(self, mp4_path: Path) -> None:
        """Remux the streamed packets into a faststart MP4 (moov first), published by an atomic rename."""
        import av

        mp4_path.parent.mkdir(parents=True, exist_ok=True)
        self.sink.spool.seek(0)
        fd, temp_name = tempfile.mkstemp(prefix=f".{mp4_path.name}.", suffix=".part", dir=mp4_path.parent)
        os.close(fd)
        try:
            with (
                av.open(self.sink.spool, mode="r", format="mp4") as source,
                av.open(
                    temp_name,
                    mode="w",
                    format="mp4",
                    options={**MUXER_OPTIONS, "movflags": DOWNLOAD_MOVFLAGS},
                ) as target,
            ):
                target.metadata.update(self._metadata())
                streams = {stream.index: target.add_stream_from_template(stream) for stream in source.streams}
                for packet in source.demux():
                    if packet.dts is None:  # demuxer's end-of-stream marker
                        continue
                    packet.stream = streams[packet.stream.index]
                    target.mux(packet)
            os.replace(temp_name, mp4_path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise


def _soundtrack(
    storyboard: Storyboard, config: ComposeConfig, audio: AudioSource, seed: int
) -> np.ndarray | None:
    """The video's whole soundtrack: the music bed, the given file or none; a narrated storyboard's
    captions are spoken over it (ducked), or alone."""
    sample_rate = config.audio_sample_rate
    duration_s = storyboard.total_frames / storyboard.fps
    track: np.ndarray | None
    if audio == "none":
        track = None
    elif audio == "bed":
        track = background_bed(duration_s, sample_rate, seed=seed, peak=config.music_volume)
    elif isinstance(audio, Path):
        track = load_audio_file(audio, duration_s, sample_rate)
    else:
        raise ValueError(f"audio must be 'bed', 'none' or a file path, got {audio!r}")
    if storyboard.narration:
        num_samples = max(1, round(duration_s * sample_rate))
        track, _ = mix_narration(
            track, storyboard, num_samples, sample_rate, AUDIO_CHANNELS, config.narration
        )
    return track


def _yuv420_video_frame(planes: Yuv420Frames, index: int) -> Any:
    """Frame ``index`` of ``planes`` as a yuv420p ``av.VideoFrame`` (rows padded to FFmpeg's line size)."""
    import av

    video_frame = av.VideoFrame(planes.width, planes.height, "yuv420p")
    for plane, data in zip(video_frame.planes, planes.frame(index), strict=True):
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
        rows[:, : plane.width] = data
    return video_frame


def enlargement(height: int, min_height: int) -> int:
    """The whole factor that brings ``height`` to at least ``min_height`` (1: leave it)."""
    return max(1, -(-min_height // height))


def _enlarge(frames: np.ndarray, scale: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H*scale, W*scale, 3), bicubic; a copy either way (overlays paint on it)."""
    if scale == 1:
        return frames.copy()
    from PIL import Image

    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in frames]
    )


def _write_thumbnail(frame: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(frame).save(temp_name, format="JPEG", quality=THUMBNAIL_QUALITY)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


__all__ = ["AUDIO_CHANNELS", "AudioSource", "ComposeResult", "CompositionSession", "Compositor"]
