"""quality: picture, caption and loudness scores of a finished video, on constructed clips."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
from storyboards import make_storyboard

from shopreel.pipelines.compose import Compositor
from shopreel.pipelines.config import ComposeConfig, PipelineConfig, QualityConfig
from shopreel.pipelines.overlays import NOTO_SC_FACE_INDEX, default_font_path, load_font
from shopreel.pipelines.quality import (
    CaptionRegion,
    caption_contrast,
    caption_regions,
    integrated_loudness,
    k_weighted,
    k_weighting,
    luma,
    score_file,
    score_frames,
    ssim,
)
from shopreel.pipelines.types import FrameChunk, Storyboard

# --- constructed clips ---------------------------------------------------------------------------------


def texture(height: int, width: int, shift: float = 0.0) -> np.ndarray:
    """A smooth two-frequency pattern (0..1) moved ``shift`` pixels to the right."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    return 0.5 + 0.2 * np.sin((xx - shift) / 9.0) + 0.15 * np.cos(yy / 7.0 + (xx - shift) / 23.0)


def panning_clip(num_frames: int, height: int = 96, width: int = 160, speed: float = 1.5) -> np.ndarray:
    """A gradient texture panning slowly: what coherent footage looks like to these measures."""
    frames = np.stack([texture(height, width, speed * t) for t in range(num_frames)])
    return np.repeat((frames * 255).round().astype(np.uint8)[..., None], 3, axis=3)


def sine(hz: float, seconds: float, sample_rate: int, amplitude: float = 1.0) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * hz * t)


# --- picture -------------------------------------------------------------------------------------------


def test_flickering_clip_scores_worse_than_a_smooth_one_and_is_flagged():
    smooth = panning_clip(40)
    gain = np.where(np.arange(40) % 2 == 0, 1.0, 0.85)[:, None, None, None]
    flickering = (smooth * gain).round().astype(np.uint8)
    good, bad = score_frames(smooth, 16), score_frames(flickering, 16)
    assert bad.flicker > 10 * good.flicker
    # The flip is 15% of a mean luma of ~0.5 every frame: second differences of 2 x 0.075.
    assert bad.flicker == pytest.approx(2 * 0.15 * smooth.mean() / 255, rel=0.05)
    assert bad.ssim_mean is not None and good.ssim_mean is not None and good.ssim_min is not None
    assert bad.ssim_mean < good.ssim_mean
    assert good.ssim_min > 0.9
    assert "flicker" in bad.flags and not bad.passed
    assert good.flags == [] and good.passed
    assert good.black_fraction == 0.0 and good.frozen_run_s == 0.0


def test_a_cut_is_not_flicker():
    clip = panning_clip(40)
    clip[20:] = (255 - clip[20:]) * 2 // 5  # one hard cut to a different, much darker picture
    report = score_frames(clip, 16)
    # A mean of |second differences| would count the step twice: 2 x 0.3 / 38 = 0.016.
    assert report.flicker < 0.002 and "flicker" not in report.flags
    assert report.ssim_min is not None and report.ssim_min < 0.5  # the cut shows in the minimum only
    assert "low_ssim" not in report.flags


def test_noise_is_flagged_low_ssim():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    report = score_frames(noise, 8)
    assert report.ssim_mean is not None and abs(report.ssim_mean) < 0.1
    assert "low_ssim" in report.flags


def test_black_clip_is_flagged_even_under_overlay_text():
    from PIL import Image, ImageDraw

    black = np.zeros((10, 96, 160, 3), np.uint8)
    report = score_frames(black, 8)
    assert report.black_fraction == 1.0
    assert "black_frames" in report.flags
    # Overlays stay visible on a black picture (caption text, a white price pill: 10-20% of the pixels,
    # a mean luma over 0.1): the frame is still black.
    image = Image.fromarray(black[0])
    draw = ImageDraw.Draw(image)
    font = load_font(str(default_font_path()), 14, NOTO_SC_FACE_INDEX)
    draw.text((10, 74), "Shop now, black friday", font=font, fill=(255, 255, 255))
    draw.rectangle((40, 30, 119, 53), fill=(245, 245, 245))
    texted = np.repeat(np.asarray(image)[None], 10, axis=0)
    assert 0.1 < (texted > 128).mean() < 0.2 and texted.mean() / 255 > 0.1
    assert score_frames(texted, 8).black_fraction == 1.0
    # A dim picture, or a bright product over a third of a black one, is not black.
    assert score_frames(np.full((10, 96, 160, 3), 40, np.uint8), 8).black_fraction == 0.0
    product = black.copy()
    product[:, 20:76, 50:140] = 200
    assert score_frames(product, 8).black_fraction == 0.0
    assert score_frames(panning_clip(10), 8).black_fraction == 0.0


def test_two_second_freeze_is_flagged():
    fps = 8
    clip = panning_clip(48)
    clip[10 : 10 + 2 * fps] = clip[10]  # frame 10 held for 2 s (16 frames)
    report = score_frames(clip, fps)
    assert report.frozen_run_s == pytest.approx(2.0, abs=1 / fps)
    assert "frozen_frames" in report.flags
    half = panning_clip(48)
    half[10:14] = half[10]  # half a second: allowed by the 1 s default
    report = score_frames(half, fps)
    assert report.frozen_run_s == pytest.approx(0.5)
    assert "frozen_frames" not in report.flags


def test_downscaled_luma_is_the_box_average():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 45, 67, 3), dtype=np.uint8)
    weights = np.array([0.2126, 0.7152, 0.0722])
    full = frames.astype(np.float64) @ weights / 255
    for factor in (1, 3, 20):  # 20: sums beyond uint16
        h, w = 45 // factor, 67 // factor
        expected = full[:, : h * factor, : w * factor].reshape(2, h, factor, w, factor).mean(axis=(2, 4))
        np.testing.assert_allclose(luma(frames, factor), expected, atol=1e-5)


def test_ssim_of_a_frame_with_itself_is_one():
    frame = panning_clip(1, 40, 48)[0]
    y = frame[..., 0].astype(np.float32) / 255
    assert float(ssim(y, y)) == 1.0
    assert float(ssim(np.zeros((16, 16)), np.zeros((16, 16)))) == 1.0


def test_ssim_matches_the_textbook_formula():
    """Wang et al. 2004 window by window (11x11 Gaussian, sigma 1.5), slowly."""
    rng = np.random.default_rng(1)
    x = rng.random((19, 23))
    y = np.clip(0.7 * x + 0.3 * rng.random((19, 23)) + 0.05, 0, 1)
    g = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append(
                ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            )
    reference = float(np.mean(values))
    assert 0.2 < reference < 0.9
    assert float(ssim(x, y)) == pytest.approx(reference, abs=1e-5)
    # Batched: one value per leading index.
    both = ssim(np.stack([x, x]), np.stack([y, x]))
    assert both.shape == (2,) and both[0] == pytest.approx(reference, abs=1e-5) and both[1] == 1.0


# --- captions ------------------------------------------------------------------------------------------


def captioned_clip(band_rgba: tuple[int, int, int, int], text_rgb: tuple[int, int, int]) -> np.ndarray:
    """A panning clip with a caption band (drawn with the compositor's font) over its bottom 30 rows."""
    from PIL import Image, ImageDraw

    clip = panning_clip(8, 120, 200)
    font = load_font(str(default_font_path()), 16, NOTO_SC_FACE_INDEX)
    layer = Image.new("RGBA", (200, 120), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle((0, 90, 200, 120), fill=band_rgba)
    draw.text((12, 95), "Soft, warm, washable", font=font, fill=(*text_rgb, 255))
    out = []
    for frame in clip:
        image = Image.fromarray(frame).convert("RGBA")
        image.alpha_composite(layer)
        out.append(np.asarray(image.convert("RGB")))
    return np.stack(out)


def test_white_text_on_the_dark_band_beats_grey_on_grey():
    region = [CaptionRegion(frame_start=1, frame_end=7, box=(0, 90, 200, 120))]
    good = score_frames(captioned_clip((0, 0, 0, 150), (255, 255, 255)), 8, captions=region)
    bad = score_frames(captioned_clip((128, 128, 128, 255), (165, 165, 165)), 8, captions=region)
    assert good.caption_contrast is not None and bad.caption_contrast is not None
    assert good.caption_contrast > 7 > bad.caption_contrast
    assert "low_caption_contrast" not in good.flags
    assert "low_caption_contrast" in bad.flags
    assert score_frames(captioned_clip((0, 0, 0, 150), (255, 255, 255)), 8).caption_contrast is None


def test_caption_contrast_is_the_wcag_ratio():
    box = np.zeros((20, 40, 3), np.uint8)
    box[5:15, 10:30] = 255
    assert caption_contrast(box) == pytest.approx(21.0)
    # WCAG's well-known pair: #767676 on white is 4.54:1, the lightest grey passing AA.
    box[:] = 255
    box[5:15, 10:30] = 0x76
    assert caption_contrast(box) == pytest.approx(4.54, abs=0.01)
    assert caption_contrast(np.full((8, 8, 3), 90, np.uint8)) == 1.0
    # Anti-aliased edges (grey, fewer than the text's own pixels) do not dilute the text's luminance.
    box[:] = 0
    box[4:16, 8:32] = 160
    box[5:15, 9:31] = 255
    assert caption_contrast(box) == pytest.approx(21.0)


def test_caption_regions_leave_out_crossfades_and_add_up():
    storyboard = make_storyboard(shot_frames=(17, 13, 9), width=128, height=96, crossfade=4)
    regions = caption_regions(storyboard)
    spans = [(r.frame_start, r.frame_end) for r in regions]
    # Shot 0: frames 0..16, its last 4 fade into shot 1, which starts at 13; shot 2 starts at 22.
    assert spans == [(0, 13), (17, 22), (26, 31)]
    assert storyboard.total_frames == 31
    crossfades = {*range(13, 17), *range(22, 26)}
    shown = [f for start, end in spans for f in range(start, end)]
    assert not crossfades & set(shown) and len(shown) == len(set(shown)) == 31 - 8
    cuts = make_storyboard(shot_frames=(17, 13, 9), width=128, height=96)
    assert [(r.frame_start, r.frame_end) for r in caption_regions(cuts)] == [(0, 17), (17, 30), (30, 39)]
    # A shot without a caption has no region.
    silent_shot = cuts.shots[1].model_copy(update={"caption": ""})
    no_caption = cuts.model_copy(update={"shots": [cuts.shots[0], silent_shot, cuts.shots[2]]})
    assert [(r.frame_start, r.frame_end) for r in caption_regions(no_caption)] == [(0, 17), (30, 39)]
    for region in regions:
        left, top, right, bottom = region.box
        assert (left, right, bottom) == (0, 128, 96) and 48 < top < 96


# --- a real video through the compositor --------------------------------------------------------------

TINTS = [(200, 70, 60), (60, 70, 200), (70, 190, 60)]  # one dominant channel per shot


def tinted_chunks(storyboard: Storyboard, chunk: int = 4):
    for shot in storyboard.shots:
        frames = []
        for t in range(shot.num_frames):
            pattern = texture(storyboard.height, storyboard.width, 2.0 * t + 40 * shot.index)[..., None]
            frames.append(np.clip(np.array(TINTS[shot.index]) * (0.6 + 0.8 * pattern), 0, 255))
        pixels = np.stack(frames).round().astype(np.uint8)
        for start in range(0, shot.num_frames, chunk):
            end = min(start + chunk, shot.num_frames)
            yield FrameChunk(
                request_id="q1",
                shot_index=shot.index,
                chunk_index=start // chunk,
                frame_start=start,
                frame_end=end,
                frames=pixels[start:end],
                is_last=end == shot.num_frames,
                is_last_shot=shot.index == len(storyboard.shots) - 1,
            )


def test_score_file_on_a_composed_video(tmp_path):
    storyboard = make_storyboard(shot_frames=(17, 13, 9), width=320, height=192, fps=8, crossfade=4)
    session = Compositor(ComposeConfig(keyframe_interval_s=0.5)).open(
        storyboard, request_id="q1", audio="bed"
    )
    for chunk in tinted_chunks(storyboard):
        session.push(chunk)
    session.finish(tmp_path / "out.mp4")

    regions = caption_regions(storyboard)
    report = score_file(tmp_path / "out.mp4", captions=regions)
    assert (report.num_frames, report.width, report.height, report.fps) == (31, 320, 192, 8.0)
    assert report.caption_contrast is not None and report.caption_contrast > 4.5
    assert report.has_audio and report.loudness_lufs is not None
    assert -24 < report.loudness_lufs < -10  # the default music bed sits inside the default range
    assert report.flags == [], report

    with av.open(str(tmp_path / "out.mp4")) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(float)
    for shot, region in zip(storyboard.shots, regions, strict=True):
        left, top, right, bottom = region.box
        assert 0 <= left < right <= 320 and 0 <= top < bottom <= 192
        shown = frames[region.frame_start : region.frame_end]
        # The box starts at the band's edge: its first row is much darker than the row above.
        luma = shown @ np.array([0.2126, 0.7152, 0.0722])
        assert luma[:, top].mean() < 0.6 * luma[:, top - 1].mean()
        assert luma[:, top:bottom].mean() < 0.75 * luma[:, top - bottom + top : top].mean()
        # Only this shot's picture is on screen in the region (no crossfade frames): its tint dominates.
        colour = shown[:, : top - 4].mean(axis=(1, 2))  # [frames, 3]
        dominant = int(np.argmax(TINTS[shot.index]))
        others = np.delete(colour, dominant, axis=1)
        assert (colour[:, dominant] > 1.8 * others.max(axis=1)).all(), shot.index
    # ... while in a crossfade frame two tints mix.
    mixed = frames[14, :100].mean(axis=(0, 1))
    assert mixed[0] > 1.2 * mixed[1] and mixed[2] > 1.2 * mixed[1]


# --- sound ---------------------------------------------------------------------------------------------


def test_k_weighting_matches_the_standard_at_48k():
    (shelf_b, shelf_a), (high_b, high_a) = k_weighting(48000)
    # ITU-R BS.1770-4, tables 1 and 2.
    np.testing.assert_allclose(shelf_b, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-9)
    np.testing.assert_allclose(shelf_a, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-9)
    np.testing.assert_allclose(high_b, [1.0, -2.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(high_a, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-9)


def test_k_weighted_equals_the_difference_equations():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3000))
    stages = k_weighting(44100)

    def direct_form(b, a, signal):
        out, x1, x2, y1, y2 = np.zeros_like(signal), 0.0, 0.0, 0.0, 0.0
        for n, value in enumerate(signal):
            out[n] = b[0] * value + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
            x1, x2, y1, y2 = value, x1, out[n], y1
        return out

    for channel in range(2):
        expected = x[channel]
        for b, a in stages:
            expected = direct_form(b, a, expected)
        np.testing.assert_allclose(k_weighted(x, 44100)[channel], expected, atol=1e-9)


@pytest.mark.parametrize("sample_rate", [48000, 44100])
def test_loudness_of_a_997_hz_sine(sample_rate):
    tone = sine(997, 5.0, sample_rate)
    # BS.1770: a 0 dBFS 997 Hz sine in one front channel reads -3.01 LKFS; in both, 3 dB more.
    assert integrated_loudness(tone[None], sample_rate) == pytest.approx(-3.01, abs=0.1)
    assert integrated_loudness(np.stack([tone, 0 * tone]), sample_rate) == pytest.approx(-3.01, abs=0.1)
    assert integrated_loudness(np.stack([tone, tone]), sample_rate) == pytest.approx(0.0, abs=0.1)
    # EBU Tech 3341 case 1: stereo sine at -23 dBFS reads -23.0 LUFS.
    quiet = np.stack([tone, tone]) * 10 ** (-23 / 20)
    assert integrated_loudness(quiet, sample_rate) == pytest.approx(-23.0, abs=0.1)
    drop = integrated_loudness(quiet, sample_rate) - integrated_loudness(quiet / 2, sample_rate)
    assert drop == pytest.approx(20 * math.log10(2), abs=0.1)  # 6.02 dB


def test_loudness_gates_out_quiet_passages():
    """EBU Tech 3341 case 3: -36 / -23 / -36 dBFS for 10 / 60 / 10 s reads -23.0 +- 0.1 LUFS."""
    rate = 48000
    level = np.concatenate([np.full(10 * rate, -36.0), np.full(60 * rate, -23.0), np.full(10 * rate, -36.0)])
    tone = 10 ** (level / 20) * sine(1000, 80.0, rate)
    assert integrated_loudness(np.stack([tone, tone]), rate) == pytest.approx(-23.0, abs=0.1)


def test_audio_flags():
    rate, frames = 16000, panning_clip(32)
    tone = sine(997, 2.0, rate)

    def flags(audio):
        return score_frames(frames, 16, audio=audio.astype(np.float32), sample_rate=rate).flags

    assert flags(np.stack([tone, tone]) * 10 ** (-16 / 20)) == []
    assert flags(np.stack([tone, tone]) * 10 ** (-40 / 20)) == ["too_quiet"]
    assert flags(np.stack([tone, tone]) * 0.95) == ["too_loud"]
    square_ish = np.clip(3 * tone, -1, 1) * 0.5  # a clipped sine, brought down to a normal loudness
    assert flags(np.stack([square_ish, square_ish]) * 2) == ["too_loud", "clipping"]
    report = score_frames(frames, 16, audio=np.stack([square_ish, square_ish]) * 2, sample_rate=rate)
    assert report.clipped_fraction is not None and report.clipped_fraction > 0.5


def test_silence_and_no_audio_are_reported_apart():
    frames = panning_clip(32)
    silent = score_frames(frames, 16, audio=np.zeros((2, 32000), np.float32), sample_rate=16000)
    assert silent.has_audio and silent.loudness_lufs is None and silent.flags == ["silent"]
    assert silent.clipped_fraction == 0.0
    assert integrated_loudness(np.zeros((2, 32000)), 16000) == -math.inf
    mute = score_frames(frames, 16)
    assert not mute.has_audio and mute.loudness_lufs is None and mute.clipped_fraction is None
    assert mute.flags == []


# --- inputs and config ---------------------------------------------------------------------------------


def test_bad_inputs_are_refused_by_name():
    clip = panning_clip(4)
    with pytest.raises(ValueError, match="frames"):
        score_frames(clip.astype(np.float32), 8)
    with pytest.raises(ValueError, match="fps"):
        score_frames(clip, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        score_frames(clip, 8, audio=np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match=r"captions\[0\]"):
        score_frames(clip, 8, captions=[CaptionRegion(0, 5, (0, 80, 160, 96))])
    with pytest.raises(ValueError, match=r"captions\[0\]\.box"):
        score_frames(clip, 8, captions=[CaptionRegion(0, 4, (0, 80, 161, 96))])


def test_quality_config_is_part_of_the_pipeline_config():
    config = PipelineConfig()
    assert config.quality == QualityConfig()
    assert config.quality.min_caption_contrast == 4.5
    assert config.quality.loudness_range_lufs == (-24.0, -10.0)
    with pytest.raises(ValueError, match="loudness_range_lufs"):
        QualityConfig(loudness_range_lufs=(-10.0, -24.0))
    with pytest.raises(ValueError):
        QualityConfig(max_flickr=0.1)  # a typo is an error, not an ignored value
    strict = QualityConfig(max_frozen_run_s=0.25)
    clip = panning_clip(16)
    clip[4:8] = clip[4]
    assert score_frames(clip, 8, config=strict).flags == ["frozen_frames"]
    assert score_frames(clip, 8).flags == []
