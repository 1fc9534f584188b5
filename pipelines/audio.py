"""Soundtracks for the compose stage: a generated background bed, or a user-supplied file.

Both come out as float32 ``[channels, samples]`` in [-1, 1], exactly ``num_samples`` long, so the
muxer can interleave audio with video frames without ever running ahead of the picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

AUDIO_CHANNELS = 2
FADE_S = 0.3

# Four-chord loops (semitones above the key's root): I-V-vi-IV and vi-IV-I-V, the shopping-mall staples.
_PROGRESSIONS = (
    ((0, 4, 7), (7, 11, 14), (9, 12, 16), (5, 9, 12)),
    ((9, 12, 16), (5, 9, 12), (0, 4, 7), (7, 11, 14)),
)


def background_bed(duration_s: float, sample_rate: int, *, seed: int = 0, peak: float = 0.25) -> np.ndarray:
    """A deterministic, royalty-free music bed: soft chord pads over a gentle four-on-the-floor pulse.

    ``seed`` picks the key, tempo and progression, so the same request always gets the same track.
    """
    rng = np.random.default_rng(seed)
    num_samples = max(1, round(duration_s * sample_rate))
    t = np.arange(num_samples, dtype=np.float64) / sample_rate
    root_hz = 220.0 * 2 ** (int(rng.integers(0, 12)) / 12)
    bpm = float(rng.choice([96, 104, 112, 120]))
    progression = _PROGRESSIONS[int(rng.integers(0, len(_PROGRESSIONS)))]
    beat_s = 60.0 / bpm
    bar_s = 4 * beat_s

    pad = np.zeros(num_samples)
    chord_index = (t // bar_s).astype(np.int64) % len(progression)
    for chord_number, chord in enumerate(progression):
        mask = chord_index == chord_number
        if not mask.any():
            continue
        for semitone in chord:
            hz = root_hz * 2 ** (semitone / 12)
            # A sine plus a quiet octave: warm, and inaudible aliasing at any sample rate we allow.
            pad[mask] += np.sin(2 * np.pi * hz * t[mask]) + 0.3 * np.sin(4 * np.pi * hz * t[mask])
    # Soften each chord change with a short swell instead of a click.
    bar_phase = (t % bar_s) / bar_s
    pad *= 0.6 + 0.4 * np.minimum(1.0, bar_phase * 8)

    beat_phase = t % beat_s
    kick_hz = 55.0 * np.exp(-beat_phase * 20) + 40.0
    kick = np.sin(2 * np.pi * np.cumsum(kick_hz) / sample_rate) * np.exp(-beat_phase * 18)

    mix = pad / (pad.std() * 4 + 1e-9) + 0.35 * kick
    mix *= _fade_envelope(num_samples, sample_rate)
    mix *= peak / max(float(np.abs(mix).max()), 1e-9)
    stereo = np.stack([mix, np.roll(mix, sample_rate // 200)])  # 5 ms offset: a touch of width
    return stereo.astype(np.float32)


def load_audio_file(path: Path, duration_s: float, sample_rate: int) -> np.ndarray:
    """Decode any audio file FFmpeg reads into stereo float32 at ``sample_rate``, looped or cut to fit.

    Raises ValueError with the file name when the file is missing, unreadable or has no audio.
    """
    import av

    num_samples = max(1, round(duration_s * sample_rate))
    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"audio file has no audio stream: {path}")
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate)
            pieces: list[np.ndarray] = []
            collected = 0
            for frame in container.decode(audio=0):
                for resampled in resampler.resample(frame):
                    pieces.append(resampled.to_ndarray())
                    collected += pieces[-1].shape[1]
                if collected >= num_samples:
                    break
            for resampled in resampler.resample(None):
                pieces.append(resampled.to_ndarray())
    except ValueError:
        raise
    except Exception as exc:  # FFmpeg's errors are many; all mean "not a usable audio file"
        raise ValueError(f"cannot read audio file {path}: {exc}") from exc
    if not pieces or sum(p.shape[1] for p in pieces) == 0:
        raise ValueError(f"audio file has no audio samples: {path}")
    track = np.concatenate(pieces, axis=1).astype(np.float32)
    if track.shape[1] < num_samples:
        track = np.tile(track, (1, -(-num_samples // track.shape[1])))
    track = track[:, :num_samples] * _fade_envelope(num_samples, sample_rate).astype(np.float32)
    return np.clip(track, -1.0, 1.0)


def _fade_envelope(num_samples: int, sample_rate: int) -> np.ndarray:
    fade = min(int(FADE_S * sample_rate), num_samples // 2)
    envelope = np.ones(num_samples)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        envelope[:fade] = ramp
        envelope[num_samples - fade :] = ramp[::-1]
    return envelope
