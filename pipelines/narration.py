"""Narration: each shot's caption spoken by an offline TTS engine (espeak-ng), mixed under ducked music.

The voice of shot k starts ``lead_s`` after the shot appears and ends before the next one: a caption
too long for its shot is spoken faster (up to ``MAX_WORDS_PER_MINUTE``), then cut with a short fade.
While the voice speaks, the music is lowered to ``duck_to`` of its level with smooth ramps (ducking),
so the words stay clear over the bed.

espeak-ng is a Debian package (``apt-get install espeak-ng``), not a Python one: ``check_engine``
says at request time, with the install command, when it is missing, rather than making a silent video.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np

from .config import NarrationConfig
from .types import Language, Storyboard

VOICES: dict[Language, str] = {"en": "en-us", "zh": "cmn"}
MAX_WORDS_PER_MINUTE = 320
TAIL_FADE_S = 0.05
WAV_HEADER_BYTES = 44  # espeak-ng's canonical RIFF header; its size fields are placeholders on --stdout


class NarrationUnavailable(ValueError):
    """Narration was asked for where no TTS engine is installed (a request error: HTTP 400)."""


@dataclass(frozen=True)
class SpokenLine:
    """Where one shot's caption is heard in the video, in seconds from its start."""

    shot_index: int
    start_s: float
    end_s: float
    words_per_minute: int


def check_engine(config: NarrationConfig) -> str:
    """The TTS executable's path; ``NarrationUnavailable`` naming the fix when it is not installed."""
    path = shutil.which(config.engine)
    if path is None:
        raise NarrationUnavailable(
            f"narration needs the {config.engine!r} text-to-speech engine, which is not installed on this "
            "server (Debian/Ubuntu: apt-get install espeak-ng); ask without narration"
        )
    return path


def speak(text: str, language: Language, sample_rate: int, config: NarrationConfig, wpm: int) -> np.ndarray:
    """``text`` spoken at ``wpm`` words per minute: mono float32 at ``sample_rate``."""
    engine = check_engine(config)
    done = subprocess.run(
        [engine, "--stdout", "-v", VOICES[language], "-s", str(wpm), "--", text],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(f"{config.engine} failed ({done.returncode}): {done.stderr.decode()[:200]}")
    raw = done.stdout
    with wave.open(io.BytesIO(raw[:WAV_HEADER_BYTES])) as reader:
        rate, width, channels = reader.getframerate(), reader.getsampwidth(), reader.getnchannels()
    if width != 2:
        raise RuntimeError(f"{config.engine} wrote {8 * width}-bit audio; expected 16-bit PCM")
    body = raw[WAV_HEADER_BYTES:]
    pcm = np.frombuffer(body[: len(body) // (2 * channels) * 2 * channels], dtype="<i2")
    voice = pcm.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    return _resample(voice, rate, sample_rate)


def _resample(signal: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (speech band-limited well below both Nyquist rates)."""
    if rate == target or signal.size == 0:
        return signal
    count = round(signal.size * target / rate)
    positions = np.arange(count, dtype=np.float64) * (rate / target)
    return np.interp(positions, np.arange(signal.size), signal).astype(np.float32)


def shot_starts_s(storyboard: Storyboard) -> list[float]:
    """When each shot first appears in the output video (a crossfade starts the next shot early)."""
    starts, frame = [], 0
    for shot in storyboard.shots:
        starts.append(frame / storyboard.fps)
        frame += shot.num_frames - shot.transition_frames
    return starts


def narration_track(
    storyboard: Storyboard, num_samples: int, sample_rate: int, config: NarrationConfig
) -> tuple[np.ndarray, list[SpokenLine]]:
    """Every captioned shot's caption, spoken in its own time slot: mono ``[num_samples]`` and where."""
    track = np.zeros(num_samples, dtype=np.float32)
    lines: list[SpokenLine] = []
    starts = shot_starts_s(storyboard) + [num_samples / sample_rate]
    for shot, start_s, next_start_s in zip(storyboard.shots, starts, starts[1:], strict=False):
        text = shot.caption.strip()
        if not text:
            continue
        slot_s = next_start_s - start_s - config.lead_s - config.gap_s
        if slot_s <= 0.2:
            continue  # too short a shot to say anything in
        wpm = config.words_per_minute
        voice = _trimmed(speak(text, storyboard.language, sample_rate, config, wpm), sample_rate)
        while voice.size / sample_rate > slot_s and wpm < MAX_WORDS_PER_MINUTE:
            wpm = min(MAX_WORDS_PER_MINUTE, round(wpm * voice.size / sample_rate / slot_s) + 10)
            voice = _trimmed(speak(text, storyboard.language, sample_rate, config, wpm), sample_rate)
        limit = int(slot_s * sample_rate)
        if voice.size > limit:  # still too long at the fastest rate: cut it with a short fade
            voice = voice[:limit].copy()
            fade = min(limit, int(TAIL_FADE_S * sample_rate))
            voice[limit - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        first = int(round((start_s + config.lead_s) * sample_rate))
        end = min(num_samples, first + voice.size)
        if end <= first:
            continue
        track[first:end] += voice[: end - first]
        lines.append(SpokenLine(shot.index, first / sample_rate, end / sample_rate, wpm))
    return track, lines


def _trimmed(voice: np.ndarray, sample_rate: int, threshold: float = 1e-3) -> np.ndarray:
    """Without the engine's leading and trailing silence, so the words start where they are placed."""
    loud = np.flatnonzero(np.abs(voice) > threshold)
    if loud.size == 0:
        return voice[:0]
    pad = int(0.01 * sample_rate)
    return voice[max(0, loud[0] - pad) : loud[-1] + 1 + pad]


def duck(music: np.ndarray, voice: np.ndarray, sample_rate: int, config: NarrationConfig) -> np.ndarray:
    """``music`` ``[channels, samples]`` lowered to ``duck_to`` wherever ``voice`` speaks, ramped.

    Centred windows: the dip starts ``hold_s / 2 + ramp_s / 2`` ahead of the first word (a look-ahead,
    so the first syllable is not masked) and ends as long after the last.
    """
    speaking = np.abs(voice) > 1e-3
    # Hold the duck over the gaps between words: a window of hold_s around every voiced sample.
    hold = max(1, int(config.hold_s * sample_rate))
    held = np.convolve(speaking.astype(np.float32), np.ones(hold, dtype=np.float32), mode="same") > 0
    gain = np.where(held, config.duck_to, 1.0).astype(np.float32)
    ramp = max(1, int(config.ramp_s * sample_rate))
    smooth = np.convolve(gain, np.full(ramp, 1.0 / ramp, dtype=np.float32), mode="same")
    return (music * smooth[None, :]).astype(np.float32)


def mix_narration(
    music: np.ndarray | None,
    storyboard: Storyboard,
    num_samples: int,
    sample_rate: int,
    channels: int,
    config: NarrationConfig,
) -> tuple[np.ndarray, list[SpokenLine]]:
    """The soundtrack with the captions spoken over it (music ducked); ``music`` None: voice alone."""
    voice, lines = narration_track(storyboard, num_samples, sample_rate, config)
    voice = voice * config.voice_volume
    bed = (
        np.zeros((channels, num_samples), np.float32)
        if music is None
        else duck(music, voice, sample_rate, config)
    )
    return np.clip(bed + voice[None, :], -1.0, 1.0).astype(np.float32), lines
