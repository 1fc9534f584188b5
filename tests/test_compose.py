"""compose: fMP4 fragments while frames arrive, download MP4 + thumbnail, overlays, crossfades, audio."""

from __future__ import annotations

import dataclasses
import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from media import probe
from storyboards import make_storyboard

from shopreel.pipelines.compose import Compositor
from shopreel.pipelines.config import ComposeConfig
from shopreel.pipelines.overlays import NOTO_SC_FACE_INDEX, default_font_path, load_font
from shopreel.pipelines.types import FrameChunk, Storyboard


def frame_chunks(storyboard: Storyboard, colours=None, chunk=4, request_id="r1"):
    """Solid-colour frames per shot, cut into chunks the way the renderer emits them."""
    for shot in storyboard.shots:
        colour = colours[shot.index] if colours else (128, 128, 128)
        frames = np.empty((shot.num_frames, storyboard.height, storyboard.width, 3), np.uint8)
        frames[:] = colour
        for start in range(0, shot.num_frames, chunk):
            end = min(start + chunk, shot.num_frames)
            yield FrameChunk(
                request_id=request_id,
                shot_index=shot.index,
                chunk_index=start // chunk,
                frame_start=start,
                frame_end=end,
                frames=frames[start:end],
                is_last=end == shot.num_frames,
                is_last_shot=shot.index == len(storyboard.shots) - 1,
            )


def compose(storyboard, tmp_path, *, colours=None, audio="bed", **open_kwargs):
    session = Compositor(ComposeConfig(keyframe_interval_s=0.25)).open(
        storyboard, request_id="r1", audio=audio, **open_kwargs
    )
    pushes = [session.push(chunk) for chunk in frame_chunks(storyboard, colours)]
    tail, result = session.finish(tmp_path / "out.mp4", tmp_path / "out.jpg")
    return pushes, tail, result


def decode_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_download_mp4_matches_the_storyboard(tmp_path):
    storyboard = make_storyboard(shot_frames=(17, 13, 9), width=96, height=64, fps=8, crossfade=4)
    pushes, tail, result = compose(storyboard, tmp_path)
    video = probe(tmp_path / "out.mp4")
    assert video.frames == storyboard.total_frames == result.num_frames == 17 + 13 + 9 - 8
    assert (video.width, video.height, video.fps) == (96, 64, 8)
    assert video.codec == "h264"
    assert video.audio_streams == 1 and result.has_audio
    assert video.audio_duration_s == pytest.approx(storyboard.duration_s, abs=0.05)
    assert (tmp_path / "out.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    # The streamed fMP4 is a valid file on its own, with the same frames.
    streamed = b"".join(b for push in pushes for b in push) + b"".join(tail)
    assert len(streamed) == result.fragment_bytes
    (tmp_path / "stream.mp4").write_bytes(streamed)
    assert probe(tmp_path / "stream.mp4").frames == storyboard.total_frames
    # Download file is faststart: the moov box comes before the media data.
    data = (tmp_path / "out.mp4").read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert '"Label":"1"' in container.metadata.get("AIGC", "")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_fragments_arrive_before_the_last_frame_is_pushed(tmp_path):
    storyboard = make_storyboard(shot_frames=(17, 17, 17), fps=8)
    pushes, tail, _ = compose(storyboard, tmp_path, audio="none")
    sent = [i for i, push in enumerate(pushes) if push]
    assert pushes[sent[0]][0][4:8] == b"ftyp"  # the header goes out first
    # Media fragments (moof) leave while later chunks are still to come.
    with_media = [i for i, push in enumerate(pushes) if any(b"moof" in b for b in push)]
    assert with_media and with_media[0] < len(pushes) // 2
    assert tail  # the final fragment is flushed by finish()


def test_caption_pixels_are_drawn_in_the_bottom_band(tmp_path):
    with_caption = make_storyboard(shot_frames=(9,), width=128, height=128, price_text=None, cta_text="")
    without = with_caption.model_copy(
        update={"shots": [with_caption.shots[0].model_copy(update={"caption": ""})]}
    )
    compose(with_caption, tmp_path, audio="none")
    captioned = decode_frames(tmp_path / "out.mp4")[4].astype(int)
    compose(without, tmp_path, audio="none")
    plain = decode_frames(tmp_path / "out.mp4")[4].astype(int)
    bottom, middle = slice(110, 128), slice(50, 80)
    # The caption band darkens the grey frame and its text is brighter than the band.
    assert np.abs(captioned[bottom] - plain[bottom]).mean() > 20
    band = captioned[bottom].mean(axis=2)
    assert band.max() > 200 and band.min() < 90
    assert np.abs(captioned[middle] - plain[middle]).mean() < 2
    # The AIGC label sits top right on every frame, with or without a caption.
    assert np.abs(plain[2:12, 70:126] - 128).mean() > 20


def test_small_frames_are_enlarged_before_the_overlays(tmp_path):
    """min_height: a 64x64 model's frames become 192x192 (x3), captions painted at that size."""
    from shopreel.pipelines.compose import enlargement
    from shopreel.pipelines.quality import caption_regions

    assert [enlargement(64, m) for m in (0, 64, 65, 128, 180, 256)] == [1, 1, 2, 2, 3, 4]
    storyboard = make_storyboard(shot_frames=(9, 9), width=64, height=64, fps=8, crossfade=2)
    # A left/right split picture: enlarging must keep where things are, not just the size.
    frames = np.zeros((9, 64, 64, 3), np.uint8)
    frames[:, :, :32] = (200, 30, 30)
    frames[:, :, 32:] = (30, 30, 200)
    session = Compositor(ComposeConfig(min_height=180)).open(storyboard, request_id="r1", audio="none")
    assert (session.canvas.width, session.canvas.height) == (192, 192)
    for chunk in frame_chunks(storyboard):
        session.push(dataclasses.replace(chunk, frames=frames[chunk.frame_start : chunk.frame_end]))
    _, result = session.finish(tmp_path / "out.mp4", tmp_path / "out.jpg")
    assert (result.width, result.height) == (192, 192)
    video = decode_frames(tmp_path / "out.mp4")
    assert video.shape[1:3] == (192, 192)
    middle = video[4, 80:110].astype(int)
    assert np.abs(middle[:, 10:80] - (200, 30, 30)).mean() < 12
    assert np.abs(middle[:, 112:182] - (30, 30, 200)).mean() < 12
    # The caption band is painted for 192 rows (its box lies in the bottom of the larger frame).
    box = caption_regions(session.canvas)[0].box
    assert box[3] > 150 and box[3] <= 192


def test_chinese_caption_uses_real_glyphs():
    font = load_font(str(default_font_path()), 32, NOTO_SC_FACE_INDEX)
    masks = {ch: bytes(font.getmask(ch)) for ch in "限时特惠"}
    assert len(set(masks.values())) == 4  # four distinct glyphs, not four copies of a missing-glyph box
    missing = bytes(font.getmask("\U0010fffd"))
    assert missing not in masks.values()


def test_zh_storyboard_composes(tmp_path):
    storyboard = make_storyboard(
        shot_frames=(9, 9),
        language="zh",
        price_text="¥299",
        cta_text="立即抢购",
        aigc_label="AI生成",
        badge_text="11.11",
    )
    _, _, result = compose(storyboard, tmp_path)
    assert probe(tmp_path / "out.mp4").frames == result.num_frames == 18


def test_crossfade_blends_the_two_shots(tmp_path):
    storyboard = make_storyboard(
        shot_frames=(13, 13), width=64, height=64, fps=8, crossfade=4, price_text=None, cta_text=""
    )
    storyboard = storyboard.model_copy(
        update={"shots": [s.model_copy(update={"caption": ""}) for s in storyboard.shots]}
    )
    compose(storyboard, tmp_path, colours=[(220, 20, 20), (20, 20, 220)], audio="none")
    frames = decode_frames(tmp_path / "out.mp4")
    assert len(frames) == 22
    red_minus_blue = frames[:, 32, 32, 0].astype(int) - frames[:, 32, 32, 2].astype(int)
    assert red_minus_blue[:9].min() > 150 and red_minus_blue[13:].max() < -150
    fade = red_minus_blue[8:14]
    assert all(a > b for a, b in zip(fade, fade[1:], strict=False)), fade  # red turns purple turns blue


def test_product_picture_appears_on_feature_shots(tmp_path):
    from PIL import Image

    storyboard = make_storyboard(shot_frames=(9, 9, 9), width=128, height=128, price_text=None, cta_text="")
    picture = Image.new("RGB", (40, 40), (0, 200, 0))
    compose(storyboard, tmp_path, audio="none", product_images=[picture])
    frames = decode_frames(tmp_path / "out.mp4").astype(int)
    green = frames[..., 1] - frames[..., 0]
    assert green[4].max() < 40  # hook shot: the generated picture alone
    assert green[13].max() > 120  # feature shot: the merchant's photo picture-in-picture


def test_user_audio_file_is_looped_to_the_video_length(tmp_path):
    path = tmp_path / "jingle.wav"
    rate = 22050
    tone = (np.sin(np.arange(rate // 2) * 2 * np.pi * 440 / rate) * 20000).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(tone.tobytes())
    storyboard = make_storyboard(shot_frames=(13, 13), fps=8)
    compose(storyboard, tmp_path, audio=path)
    video = probe(tmp_path / "out.mp4")
    assert video.audio_duration_s == pytest.approx(storyboard.duration_s, abs=0.05)


@pytest.mark.parametrize("audio", ["missing.wav", "not_audio.txt"])
def test_unreadable_audio_is_refused_before_any_work(tmp_path, audio):
    (tmp_path / "not_audio.txt").write_text("hello")
    with pytest.raises(ValueError, match="audio"):
        Compositor().open(make_storyboard(), request_id="r1", audio=tmp_path / audio)


def test_missing_font_is_refused(tmp_path):
    with pytest.raises(ValueError, match="font"):
        Compositor(ComposeConfig(font_path=tmp_path / "nope.ttf")).open(make_storyboard(), request_id="r1")


def test_out_of_order_and_wrong_size_chunks_are_refused():
    storyboard = make_storyboard(shot_frames=(9, 9))
    session = Compositor().open(storyboard, request_id="r1", audio="none")
    chunks = list(frame_chunks(storyboard))
    with pytest.raises(ValueError, match="out of order"):
        session.push(chunks[1])
    wrong = FrameChunk("r1", 0, 0, 0, 4, np.zeros((4, 32, 32, 3), np.uint8), False, False)
    with pytest.raises(ValueError, match="storyboard is 64x64"):
        session.push(wrong)
    with pytest.raises(ValueError, match="request"):
        session.push(FrameChunk("other", 0, 0, 0, 4, chunks[0].frames, False, False))
    session.push(chunks[0])
    with pytest.raises(ValueError, match="before every frame"):
        session.finish(None)
    session.close()
    session.close()
    with pytest.raises(ValueError, match="finished"):
        session.push(chunks[1])


def test_streamed_bytes_play_from_a_pipe(tmp_path):
    """A client that reads the stream sequentially (no seeking) decodes every frame."""
    storyboard = make_storyboard(shot_frames=(9, 9), fps=8)
    pushes, tail, _ = compose(storyboard, tmp_path)
    stream = io.BytesIO(b"".join(b for push in pushes for b in push) + b"".join(tail))
    with av.open(stream, format="mp4") as container:
        assert sum(1 for _ in container.decode(video=0)) == 18


def test_kernel_pixel_conversion_writes_the_same_video(tmp_path):
    """kernels.yuv420 reproduces swscale exactly, so the encoder's output bytes do not change."""
    storyboard = make_storyboard(shot_frames=(9, 13), width=96, height=64, crossfade=4)
    outputs = []
    for conversion in ("encoder", "kernel"):
        session = Compositor(ComposeConfig(pixel_conversion=conversion)).open(
            storyboard, request_id="r1", audio="none"
        )
        for chunk in frame_chunks(storyboard, colours=[(200, 40, 90), (10, 150, 240)]):
            session.push(chunk)
        session.finish(tmp_path / f"{conversion}.mp4")
        outputs.append(decode_frames(tmp_path / f"{conversion}.mp4"))
    np.testing.assert_array_equal(outputs[0], outputs[1])
