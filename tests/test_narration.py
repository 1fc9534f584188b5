"""Narration: captions spoken by espeak-ng, timed to the shots, mixed under the ducked music bed. The
track is measured on the decoded audio of composed videos."""

from __future__ import annotations

import shutil

import av
import numpy as np
import pytest
from storyboards import make_storyboard
from test_compose import frame_chunks

from shopreel.pipelines.compose import Compositor
from shopreel.pipelines.config import ComposeConfig, NarrationConfig, PipelineConfig
from shopreel.pipelines.narration import (
    NarrationUnavailable,
    check_engine,
    duck,
    narration_track,
    shot_starts_s,
    speak,
)
from shopreel.pipelines.pipeline import ProductVideoPipeline
from shopreel.pipelines.types import ProductBrief
from shopreel.pipelines.understand import TemplatePlanner

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh does as root)",
)
RATE = 44100
CONFIG = NarrationConfig()


def _storyboard(**overrides):
    captions = ["Keeps drinks cold all day", "A leak-proof lid that clicks shut and never spills", "Shop now"]
    storyboard = make_storyboard(shot_frames=(25, 13, 17), fps=8, narration=True, **overrides)
    shots = [
        shot.model_copy(update={"caption": c}) for shot, c in zip(storyboard.shots, captions, strict=True)
    ]
    return storyboard.model_copy(update={"shots": shots})


def _envelope(track: np.ndarray, window_s: float = 0.02) -> np.ndarray:
    """RMS per window of a mono track."""
    size = int(window_s * RATE)
    count = track.size // size
    return np.sqrt((track[: count * size].reshape(count, size) ** 2).mean(axis=1))


def _decoded_audio(path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=RATE)
        pieces = [f.to_ndarray()[0] for frame in container.decode(stream) for f in resampler.resample(frame)]
    return np.concatenate(pieces)


@needs_espeak
@pytest.mark.parametrize(("text", "language"), [("Leak-proof lid", "en"), ("防漏杯盖", "zh")])
def test_a_caption_is_spoken_in_its_language(text, language):
    slow = speak(text, language, RATE, CONFIG, 140)
    fast = speak(text, language, RATE, CONFIG, 280)
    assert slow.dtype == np.float32 and 0.05 < np.abs(slow).max() <= 1.0
    assert 0.3 < slow.size / RATE < 4.0
    assert fast.size < 0.8 * slow.size  # the rate is what makes a long caption fit its shot


@needs_espeak
def test_each_caption_is_heard_inside_its_own_shot():
    storyboard = _storyboard()
    num_samples = round(storyboard.duration_s * RATE)
    track, lines = narration_track(storyboard, num_samples, RATE, CONFIG)
    starts = shot_starts_s(storyboard) + [storyboard.duration_s]
    assert [line.shot_index for line in lines] == [0, 1, 2]
    for line in lines:
        assert line.start_s == pytest.approx(starts[line.shot_index] + CONFIG.lead_s, abs=1e-3)
        assert line.end_s <= starts[line.shot_index + 1] - CONFIG.gap_s + 1e-3
    # Shot 1 lasts 1.6 s: its caption was sped up to fit; the long first shot's was not.
    assert lines[0].words_per_minute == CONFIG.words_per_minute < lines[1].words_per_minute
    assert track.dtype == np.float32 and track.size == num_samples


@needs_espeak
def test_decoded_voice_starts_with_each_shot(tmp_path):
    """Voice alone (no music): silence before each shot starts, speech just after, in the decoded AAC."""
    storyboard = _storyboard()
    session = Compositor(ComposeConfig()).open(storyboard, request_id="r1", audio="none")
    for chunk in frame_chunks(storyboard):
        session.push(chunk)
    _, result = session.finish(tmp_path / "n.mp4", None)
    assert result.has_audio
    envelope = _envelope(_decoded_audio(tmp_path / "n.mp4"))
    for start in shot_starts_s(storyboard):
        # From just before the shot (the previous line ended gap_s earlier) until its own line starts.
        before = envelope[max(0, int((start - 0.04) / 0.02)) : int((start + CONFIG.lead_s - 0.03) / 0.02)]
        after = envelope[int((start + 0.2) / 0.02) : int((start + 0.6) / 0.02)]
        assert before.max() < 0.01 and after.mean() > 0.03, (start, before.max(), after.mean())


@needs_espeak
def test_the_music_ducks_under_the_voice(tmp_path):
    storyboard = _storyboard()
    num_samples = round(storyboard.duration_s * RATE)
    voice, lines = narration_track(storyboard, num_samples, RATE, CONFIG)
    music = np.full((2, num_samples), 0.2, np.float32)
    ducked = duck(music, voice, RATE, CONFIG)
    speaking = slice(int((lines[0].start_s + 0.3) * RATE), int((lines[0].end_s - 0.3) * RATE))
    between = slice(
        int((lines[0].end_s + CONFIG.hold_s + CONFIG.ramp_s) * RATE),
        int((lines[1].start_s - CONFIG.hold_s - CONFIG.ramp_s) * RATE),  # it dips a little ahead
    )
    assert between.stop - between.start > RATE // 5
    assert ducked[:, speaking].max() == pytest.approx(0.2 * CONFIG.duck_to, rel=0.02)
    assert ducked[:, between].min() == pytest.approx(0.2, rel=0.02)
    # In the composed video: the bed under the voice is quieter than the bed alone.
    plain = Compositor(ComposeConfig()).open(
        storyboard.model_copy(update={"narration": False}), request_id="p", audio="bed"
    )
    spoken = Compositor(ComposeConfig()).open(storyboard, request_id="s", audio="bed")
    assert not np.array_equal(plain.audio, spoken.audio)
    plain.close()
    spoken.close()


def test_narration_without_the_engine_is_a_clear_error_before_any_work(tiny_model):
    missing = NarrationConfig(engine="no-such-tts-engine")
    with pytest.raises(NarrationUnavailable, match="apt-get install espeak-ng"):
        check_engine(missing)
    brief = ProductBrief.model_validate({"title": "Mug", "narration": True, "size": "64x64", "fps": 8})
    assert TemplatePlanner().plan(brief).narration is True
    pipeline = ProductVideoPipeline(
        PipelineConfig(compose=ComposeConfig(narration=missing)), model=tiny_model
    )
    with pytest.raises(NarrationUnavailable, match="no-such-tts-engine"):
        pipeline.plan(brief)  # what the CLI and the planner replica call: a 400 / exit 2, no video
    assert isinstance(NarrationUnavailable("x"), ValueError)
