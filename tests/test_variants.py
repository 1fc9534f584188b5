"""Variant fan-out: one brief, a video per shopper. The planner marks the shots variants share; those
are denoised and decoded once (shot cache, frame cache, one maker per key) and the videos still equal
videos made without any cache."""

from __future__ import annotations

import threading
import time

import av
import numpy as np
import pytest
import torch

from shopreel.pipelines.config import PipelineConfig, RenderConfig, ShotCacheConfig
from shopreel.pipelines.pipeline import ProductVideoPipeline
from shopreel.pipelines.render import StreamingRenderer
from shopreel.pipelines.shot_cache import ShotCache
from shopreel.pipelines.types import LatentChunk, ProductBrief, ShopperProfile, VideoSize
from shopreel.pipelines.understand import TemplatePlanner, mark_shared_shots, plan_variants, shot_identity
from shopreel.serve.jobs import variant_leaders

BRIEF = ProductBrief(
    title="AeroRun Lightweight Running Shoe",
    category="running shoes",
    selling_points=[
        "Breathable mesh keeps feet cool",
        "Responsive foam cushions",
        "Grippy outsole for wet roads",
    ],
    price=599,
    currency="CNY",
    language="en",
    duration_s=6,
    size=VideoSize(width=64, height=64),
    fps=8,
    seed=42,
)
RAIN = ShopperProfile(interests=["rain", "wet weather grip"])
NIGHT_OWL = ShopperProfile(interests=["night running"], preferred_style="moody city night, neon")
KEYWORDS = PipelineConfig().planner.model_copy(update={"personalisation": "keywords"})


def test_variants_share_every_shot_that_looks_the_same_for_both_shoppers():
    plain, rainy, styled = plan_variants(TemplatePlanner(KEYWORDS), BRIEF, [None, RAIN, NIGHT_OWL])
    # Without a shopper the storyboard is the ordinary one (seeds by shot index), only marked.
    ordinary = TemplatePlanner(KEYWORDS).plan(BRIEF)
    assert [s.model_copy(update={"shared": False}) for s in plain.shots] == ordinary.shots
    assert [s.seed for s in plain.shots] == [42 + i for i in range(len(plain.shots))]
    # The rain shopper sees the grip feature first; it keeps its prompt, seed and camera move.
    assert rainy.shots[1].caption == "Grippy outsole for wet roads" != plain.shots[1].caption
    grip = next(s for s in plain.shots if s.caption == rainy.shots[1].caption)
    assert (rainy.shots[1].prompt, rainy.shots[1].seed, rainy.shots[1].camera_move) == (
        grip.prompt,
        grip.seed,
        grip.camera_move,
    )
    assert all(s.shared for s in plain.shots) and all(s.shared for s in rainy.shots)
    # A shopper's own style changes every prompt: nothing of that video is shared.
    assert not any(s.shared for s in styled.shots)
    assert variant_leaders([plain, rainy, styled]) == [None, 0, None]


def test_a_shot_is_shared_only_when_another_storyboard_holds_it():
    board = TemplatePlanner(KEYWORDS).plan(BRIEF)
    (alone,) = mark_shared_shots([board])
    assert not any(s.shared for s in alone.shots)  # repeated within one video is not "shared"
    other_seed = board.model_copy(
        update={"shots": [s.model_copy(update={"seed": s.seed + 100}) for s in board.shots]}
    )
    first, second = mark_shared_shots([board, other_seed])
    assert not any(s.shared for s in first.shots + second.shots)
    assert len({shot_identity(board, s) for s in board.shots}) == len(board.shots)
    with pytest.raises(ValueError, match="1..16"):
        plan_variants(TemplatePlanner(KEYWORDS), BRIEF, [])


def test_concurrent_misses_of_one_key_make_it_once_and_a_failed_maker_hands_over():
    cache = ShotCache(ShotCacheConfig(memory_bytes=2**20))
    calls, started = [], threading.Event()

    def make() -> torch.Tensor:
        calls.append(threading.get_ident())
        started.set()
        time.sleep(0.2)
        return torch.arange(8.0)

    results: list[tuple[torch.Tensor, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_make("k", make))) for _ in range(4)
    ]
    threads[0].start()
    started.wait(5)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False, True, True, True]
    assert all(torch.equal(latents, torch.arange(8.0)) for latents, _ in results)

    def fail() -> torch.Tensor:
        raise RuntimeError("denoiser crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cache.get_or_make("j", fail)
    assert cache.get_or_make("j", lambda: torch.ones(2))[1] is False  # nobody is left waiting on "j"


def _chunks(latents: torch.Tensor, request_id: str, cache_key: str | None) -> list[LatentChunk]:
    total = latents.shape[2]
    return [
        LatentChunk(request_id, 0, i, start, min(start + 2, total), latents[:, :, start : start + 2],
                    is_last=start + 2 >= total, is_last_shot=True, cache_key=cache_key)
        for i, start in enumerate(range(0, total, 2))
    ]  # fmt: skip


def test_renderer_keeps_a_cached_shots_frames_within_its_byte_limit(tiny_model):
    torch.manual_seed(0)
    latents = torch.randn(1, tiny_model.vae.config.z_dim, 5, 8, 8)
    fresh = StreamingRenderer(
        tiny_model.vae, tiny_model.device, RenderConfig(backend="torch", frame_cache_bytes=0)
    )
    expected = np.concatenate([fresh.render(c).frames for c in _chunks(latents, "ref", "shot-a")])
    shot_bytes = expected.nbytes

    renderer = StreamingRenderer(
        tiny_model.vae, tiny_model.device, RenderConfig(backend="torch", frame_cache_bytes=shot_bytes)
    )
    first = [renderer.render(c) for c in _chunks(latents, "v1", "shot-a")]
    again = [renderer.render(c) for c in _chunks(latents, "v2", "shot-a")]
    assert [c.timings["frames_cached"] for c in first + again] == [0.0] * 3 + [1.0] * 3
    assert np.array_equal(np.concatenate([c.frames for c in again]), expected)
    assert [(c.frame_start, c.frame_end) for c in again] == [(c.frame_start, c.frame_end) for c in first]
    # Without a content address nothing is kept; a second shot evicts the first (one shot fits).
    unkeyed = [renderer.render(c) for c in _chunks(latents, "v3", None)]
    assert not any(c.timings["frames_cached"] for c in unkeyed)
    [renderer.render(c) for c in _chunks(latents * 0.5, "v4", "shot-b")]
    assert renderer.frame_cache.stats.memory_bytes <= shot_bytes and renderer.frame_cache.stats.evictions == 1
    assert not any(
        c.timings["frames_cached"] for c in [renderer.render(c) for c in _chunks(latents, "v5", "shot-a")]
    )


def _decoded(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.slow
def test_second_variant_reuses_shared_shots_and_equals_an_uncached_video(tiny_model, tmp_path):
    config = PipelineConfig.model_validate({"generate": {"num_inference_steps": 2}, "planner": KEYWORDS})
    pipeline = ProductVideoPipeline(config, model=tiny_model)
    denoised: list[int] = []
    inner = pipeline.generator._denoise_batch
    pipeline.generator._denoise_batch = lambda batch: denoised.append(len(batch)) or inner(batch)

    # Two at a time: the styled video shares nothing and is made alongside the first; the second waits.
    results = pipeline.run_variants(
        BRIEF, [None, RAIN, NIGHT_OWL], output_dir=tmp_path / "cached", audio="none", concurrency=2
    )
    shots = len(results[0].storyboard.shots)
    assert all(s.shared for r in results[:2] for s in r.storyboard.shots)
    assert not any(s.shared for s in results[2].storyboard.shots)
    # Every shot of the second video came from the caches: no denoising, no decoding.
    assert sum(denoised) == shots + len(results[2].storyboard.shots)
    assert pipeline.generator.cache.stats.memory_hits == shots
    assert pipeline.renderer.frame_cache.stats.memory_hits == shots
    assert results[1].timings.render_s < results[0].timings.render_s / 5
    assert results[0].storyboard.shots[1].caption != results[1].storyboard.shots[1].caption

    uncached = PipelineConfig.model_validate(
        {**config.model_dump(), "generate": {"num_inference_steps": 2, "shot_cache": {"shared_shots": False}}}
    )
    plain = ProductVideoPipeline(
        uncached.model_copy(update={"render": RenderConfig(frame_cache_bytes=0)}), model=tiny_model
    )
    assert plain.generator.cache is None and plain.renderer.frame_cache is None
    reference = plain.render_storyboard(
        results[1].storyboard, seed=BRIEF.seed, output_path=tmp_path / "reference.mp4", audio="none"
    )
    assert reference.compose.num_frames == results[1].compose.num_frames
    assert np.array_equal(
        _decoded(tmp_path / "cached" / "variant-1.mp4"), _decoded(tmp_path / "reference.mp4")
    )
