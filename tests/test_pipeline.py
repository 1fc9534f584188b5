import io

import pytest
from media import probe

from shopreel.pipelines.config import GenerateConfig, PipelineConfig
from shopreel.pipelines.pipeline import ProductVideoPipeline
from shopreel.pipelines.types import ProductBrief


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return ProductVideoPipeline(
        PipelineConfig(generate=GenerateConfig(num_inference_steps=2)), model=tiny_model
    )


def _brief(**fields):
    base = {
        "title": "Trail bottle",
        "category": "water bottle",
        "selling_points": ["Keeps drinks cold 24 h", "Leak-proof lid", "Fits every cup holder"],
        "price": "129.00",
        "duration_s": 3,
        "size": "64x64",
        "fps": 8,
    }
    return ProductBrief.model_validate({**base, **fields})


def test_fragments_stream_before_the_last_shot_is_denoised(pipeline, tmp_path):
    events: list[tuple[str, int]] = []
    fragments = io.BytesIO()
    steps_per_shot = 2

    steps_seen = 0

    def on_progress(progress):
        nonlocal steps_seen
        if progress.denoise_steps_done > steps_seen:  # a denoising step (not frames composed)
            steps_seen = progress.denoise_steps_done
            events.append(("step", (steps_seen - 1) // steps_per_shot))

    def on_fragment(data: bytes):
        fragments.write(data)
        events.append(("fragment", -1))

    result = pipeline.run(
        _brief(), output_path=tmp_path / "v.mp4", on_progress=on_progress, on_fragment=on_fragment
    )
    last_shot = len(result.storyboard.shots) - 1
    assert last_shot >= 2
    first_fragment = events.index(("fragment", -1))
    first_step_of_last_shot = events.index(("step", last_shot))
    assert first_fragment < first_step_of_last_shot, events
    # The streamed bytes alone are a valid MP4 with every planned frame.
    (tmp_path / "stream.mp4").write_bytes(fragments.getvalue())
    streamed = probe(tmp_path / "stream.mp4")
    assert streamed.frames == result.storyboard.total_frames == result.compose.num_frames
    timings = result.timings
    assert timings.generate_s > 0 and timings.render_s > 0 and timings.compose_s > 0
    assert 0 < timings.first_fragment_s < timings.total_s
    assert len(result.per_shot_denoise_s) == len(result.storyboard.shots)


def test_same_brief_same_video_frames(pipeline, tmp_path):
    import av
    import numpy as np

    def frames(path):
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    a = pipeline.run(_brief(duration_s=2), output_path=tmp_path / "a.mp4", audio="none")
    b = pipeline.run(_brief(duration_s=2), output_path=tmp_path / "b.mp4", audio="none")
    assert a.storyboard == b.storyboard
    assert np.array_equal(frames(tmp_path / "a.mp4"), frames(tmp_path / "b.mp4"))
    assert probe(tmp_path / "a.mp4").audio_streams == 0


def test_preset_defaults_fill_size_and_fps(pipeline):
    storyboard = pipeline.plan(ProductBrief(title="Mug", duration_s=2))
    preset = pipeline.model.preset
    assert (storyboard.width, storyboard.height, storyboard.fps) == (
        preset.default_size.width,
        preset.default_size.height,
        preset.default_fps,
    )


def _events(pipeline, storyboard, *, step_interval_s: float, progress_interval_s: float):
    """Every event ``produce`` yields for ``storyboard``, and every step the latent source reported."""
    import asyncio

    from shopreel.pipelines.produce import (
        DenoiseStep,
        LocalFrameRenderer,
        LocalLatentSource,
        ProductionOrder,
        produce,
    )

    order = ProductionOrder(request_id="rate", storyboard=storyboard)
    source = LocalLatentSource(pipeline.generator, step_interval_s=step_interval_s)
    steps: list[tuple[int, int]] = []
    stream = source.stream

    async def recording(order):
        async for item in stream(order):
            if isinstance(item, DenoiseStep):
                steps.append((item.shot_index, item.step))
            yield item

    source.stream = recording  # type: ignore[method-assign]

    async def drive():
        renderer = LocalFrameRenderer(pipeline.renderer)
        events = produce(
            order,
            source,
            renderer,
            pipeline.compositor,
            mp4_path=None,
            progress_interval_s=progress_interval_s,
        )
        return [event async for event in events]

    return asyncio.run(drive()), steps


def test_progress_reports_are_rate_limited_and_fragments_are_not(pipeline):
    """On a replica each step and progress report is a message: they are spaced, fragments never."""
    from shopreel.pipelines.produce import Fragment, Produced, ProductionProgress

    storyboard = pipeline.plan(_brief())
    shots = len(storyboard.shots)
    every, every_step = _events(pipeline, storyboard, step_interval_s=0.0, progress_interval_s=0.0)
    spaced, spaced_steps = _events(pipeline, storyboard, step_interval_s=3600, progress_interval_s=3600)

    assert every_step == [(shot, step) for shot in range(shots) for step in (1, 2)]
    # The first step is reported, then only each shot's last: the driver still sees every shot end.
    assert spaced_steps == [(0, 1)] + [(shot, 2) for shot in range(shots)]
    progress = [e for e in every if isinstance(e, ProductionProgress)]
    assert len(progress) > shots and [e for e in spaced if isinstance(e, ProductionProgress)] == progress[:1]

    def fragments(events):
        return b"".join(e.data for e in events if isinstance(e, Fragment))

    assert fragments(spaced) == fragments(every) and isinstance(spaced[-1], Produced)


def test_every_finished_video_is_scored_and_scoring_can_be_switched_off(pipeline, tiny_model, tmp_path):
    from shopreel.pipelines.config import QualityConfig
    from shopreel.pipelines.embeddings import default_embedder
    from shopreel.pipelines.quality import (
        caption_regions,
        caption_relevance,
        score_file,
        with_caption_relevance,
    )

    result = pipeline.run(_brief(), output_path=tmp_path / "v.mp4")
    report = result.quality
    assert report is not None and result.timings.quality_s > 0
    # The report is the file's, as the quality module measures it, caption bands included.
    regions = caption_regions(result.storyboard)
    measured = score_file(tmp_path / "v.mp4", captions=regions, config=pipeline.config.quality)
    relevance = caption_relevance(result.storyboard, default_embedder())
    assert report == with_caption_relevance(measured, relevance, pipeline.config.quality)
    assert report.num_frames == result.storyboard.total_frames and report.caption_contrast is not None

    off = ProductVideoPipeline(
        pipeline.config.model_copy(update={"quality": QualityConfig(enabled=False)}), model=tiny_model
    )
    unscored = off.run(_brief(), output_path=tmp_path / "w.mp4")
    assert unscored.quality is None and unscored.timings.quality_s == 0
