"""Decode a video back (PyAV) to check what a stage or the CLI wrote."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av


@dataclass
class ProbedVideo:
    frames: int
    fps: Fraction
    width: int
    height: int
    duration_s: float
    audio_streams: int
    audio_duration_s: float
    codec: str


def probe(path: Path | str) -> ProbedVideo:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        fps = video.average_rate
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio_duration = 0.0
        audio_streams = len(container.streams.audio)
        if audio_streams:
            audio_duration = sum(frame.samples for frame in container.decode(audio=0)) / float(
                container.streams.audio[0].rate
            )
        duration = float(container.duration / av.time_base) if container.duration else 0.0
        return ProbedVideo(
            frames=frames,
            fps=fps,
            width=video.codec_context.width,
            height=video.codec_context.height,
            duration_s=duration,
            audio_streams=audio_streams,
            audio_duration_s=audio_duration,
            codec=video.codec_context.name,
        )
