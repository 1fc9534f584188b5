"""Faster denoising: step caches behind the fidelity gate, speed profiles, prompt embeddings, compile."""

from __future__ import annotations

import threading

import pytest
import torch
from storyboards import make_storyboard

from shopreel.pipelines.config import CompileConfig, GenerateConfig, StepCacheConfig
from shopreel.pipelines.generate import LatentGenerator, PromptEmbeddings
from shopreel.pipelines.shot_cache import shot_key
from shopreel.pipelines.speed import SPEED_PROFILES, speed_profile
from shopreel.pipelines.step_cache import (
    FidelityRefused,
    describe_setting,
    record_mag_ratios,
    weight_sharing_copy,
)

METHODS = ["first_block", "mag", "taylorseer", "pab", "sea"]
STEPS = 12  # enough steps for every method to skip some (TaylorSeer warms up for 3)
# Floors every method meets: the gate measures and admits. Floors none can meet: it refuses.
# One short calibration clip keeps each measurement under a second.
ADMIT = dict(min_psnr_db=0.0, max_latent_error=10.0, calibration_prompts=1, calibration_frames=5)
REFUSE = dict(min_psnr_db=99.0, calibration_prompts=1, calibration_frames=5)


def _storyboard():
    return make_storyboard(shot_frames=(9,), width=64, height=64)


def _latents(generator, storyboard=None, **kwargs) -> torch.Tensor:
    chunks = generator.generate(storyboard or _storyboard(), request_id="r", **kwargs)
    return torch.cat([chunk.latents for chunk in chunks], 2)


@pytest.mark.parametrize("method", METHODS)
def test_each_step_cache_runs_and_its_gate_admits_it_under_a_floor_it_meets(tiny_model, method):
    generator = LatentGenerator(tiny_model, GenerateConfig(step_cache=StepCacheConfig(**ADMIT)))
    uncached = _latents(generator, num_inference_steps=STEPS)
    cached = _latents(generator, num_inference_steps=STEPS, step_cache=method)

    settings = generator.settings(STEPS, None, None, method)
    verdict = generator.check_step_cache(settings.step_cache, "default", STEPS)
    assert verdict.passed and verdict.setting == describe_setting(settings.step_cache)
    # The hooks really engaged: the cached run executed less compute and came out (slightly) different.
    assert 0.2 < verdict.compute_fraction < 1.0, verdict
    assert 0 < verdict.latent_error < 0.2 and verdict.psnr_db > 10
    assert cached.shape == uncached.shape and not torch.equal(cached, uncached)


@pytest.mark.parametrize("method", METHODS)
def test_a_step_cache_the_request_asks_for_is_refused_with_its_figures_below_the_floor(tiny_model, method):
    generator = LatentGenerator(tiny_model, GenerateConfig(step_cache=StepCacheConfig(**REFUSE)))
    chunks = generator.generate(_storyboard(), request_id="r", num_inference_steps=STEPS, step_cache=method)
    with pytest.raises(FidelityRefused, match=r"dB PSNR, latent error \d\.\d+, \d+% of the uncached compute"):
        next(chunks)
    assert isinstance(FidelityRefused("x", None), ValueError)  # the API answers it as the client's error


def test_a_profile_whose_step_cache_is_refused_still_makes_the_video_uncached(tiny_model):
    config = GenerateConfig(num_inference_steps=STEPS, step_cache=StepCacheConfig(**REFUSE))
    generator = LatentGenerator(tiny_model, config)
    made = _latents(generator, speed_profile="balanced")

    settings = generator.settings(None, None, "balanced")
    assert (
        settings.step_cache.method == "first_block" and generator.gated(settings).step_cache.method == "none"
    )
    plain = LatentGenerator(tiny_model)
    shot = _storyboard().shots[0]
    key = (64, 64, shot.num_frames, settings.num_inference_steps, settings.guidance_scale, "unipc")
    expected = plain._run_pipeline([shot.prompt], [""], [shot.seed], (*key, StepCacheConfig()))
    assert torch.equal(made, expected)


def test_the_gate_measures_a_setting_once(tiny_model):
    generator = LatentGenerator(tiny_model, GenerateConfig(step_cache=StepCacheConfig(**ADMIT)))
    calls = []
    measure = generator.gate._measure
    generator.gate._measure = lambda *args: calls.append(args) or measure(*args)  # type: ignore[method-assign]
    for _ in range(2):
        _latents(generator, num_inference_steps=STEPS, step_cache="first_block")
    assert len(calls) == 1


def test_speed_profiles_set_steps_scheduler_and_step_cache_as_documented(tiny_model):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    generator = LatentGenerator(tiny_model, GenerateConfig(num_inference_steps=30))
    expected = {"quality": (30, "default", "none"), "balanced": (20, "unipc", "first_block")}
    expected["fast"] = (12, "dpm++", "first_block")
    for name, (steps, scheduler, method) in expected.items():
        settings = generator.settings(None, None, name)
        assert (settings.num_inference_steps, settings.scheduler, settings.step_cache.method) == (
            steps,
            scheduler,
            method,
        )
    assert generator.settings(None, None, "fast").step_cache.first_block_threshold == 0.08
    assert generator.settings(7, None, "fast").num_inference_steps == 7  # the request's count wins
    assert generator.settings(None, None, "fast", "none").step_cache.method == "none"  # and its cache
    # The tiny preset's 4 steps: 4, 3 and 2.
    tiny = LatentGenerator(tiny_model)
    assert [tiny.settings(None, None, name).num_inference_steps for name in SPEED_PROFILES] == [4, 3, 2]
    with pytest.raises(ValueError, match="unknown speed profile"):
        speed_profile("turbo")

    # A fast video runs its 2 steps on DPM-Solver++ with the model's flow shift.
    steps_seen: list[int] = []
    _latents(tiny, speed_profile="fast", on_step=lambda shot, step, total: steps_seen.append(total))
    assert steps_seen == [2, 2]
    fast = tiny._schedulers["dpm++"]
    assert isinstance(fast, DPMSolverMultistepScheduler) and fast.config.flow_shift == 3.0
    assert isinstance(tiny._schedulers["default"], UniPCMultistepScheduler)


def test_each_profile_gives_other_latents_and_quality_is_the_plain_call(tiny_model):
    generator = LatentGenerator(tiny_model, GenerateConfig(step_cache=StepCacheConfig(gate=False)))
    plain = _latents(LatentGenerator(tiny_model, GenerateConfig(prompt_cache_bytes=0)))
    outputs = {name: _latents(generator, speed_profile=name) for name in SPEED_PROFILES}
    assert torch.equal(outputs["quality"], plain)
    assert not torch.equal(outputs["balanced"], plain) and not torch.equal(outputs["fast"], plain)


def test_shot_cache_addresses_differ_by_sampler_and_keep_the_old_address_for_the_default():
    fields = dict(
        prompt="p", negative_prompt="", seed=1, height=64, width=64, num_frames=9, num_inference_steps=4
    )
    default = shot_key("m", guidance_scale=5.0, **fields)
    assert shot_key("m", guidance_scale=5.0, sampler="", **fields) == default
    assert shot_key("m", guidance_scale=5.0, sampler="scheduler=dpm++", **fields) != default


def test_views_share_the_weights_and_concurrent_cached_videos_equal_sequential_ones(tiny_model):
    view = weight_sharing_copy(tiny_model.pipe.transformer)
    for (name, mine), theirs in zip(
        view.named_parameters(), tiny_model.pipe.transformer.parameters(), strict=True
    ):
        assert mine is theirs, name

    generator = LatentGenerator(tiny_model, GenerateConfig(step_cache=StepCacheConfig(gate=False)))
    storyboards = [make_storyboard(shot_frames=(9,), width=64, height=64, seed=seed) for seed in (1, 2)]
    sequential = [_latents(generator, sb, num_inference_steps=STEPS, step_cache="mag") for sb in storyboards]
    results: list[torch.Tensor | None] = [None, None]
    start = threading.Barrier(2)

    def run(index: int) -> None:
        start.wait()
        results[index] = _latents(generator, storyboards[index], num_inference_steps=STEPS, step_cache="mag")

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, sequential, strict=True):
        assert got is not None and torch.equal(got, expected)
    assert not torch.equal(sequential[0], sequential[1])
    registry = getattr(tiny_model.pipe.transformer, "_diffusers_hook", None)  # diffusers' hook registry
    assert registry is None or not registry.hooks  # the loaded model itself is never hooked


def test_mag_ratios_are_measured_per_step_from_the_conditional_pass(tiny_model):
    generator = LatentGenerator(tiny_model)
    ratios = generator._mag_ratios_for("default", 6)
    assert len(ratios) == 6 and ratios[0] == 1.0
    assert all(0.5 < ratio < 2.0 for ratio in ratios) and len(set(ratios)) > 2
    transformer = weight_sharing_copy(tiny_model.pipe.transformer)
    with record_mag_ratios(transformer, passes_per_step=1) as recorded:
        pass
    assert recorded == [] and not transformer.blocks[0]._forward_pre_hooks  # hooks removed


def test_prompt_embeddings_are_reused_and_give_the_same_latents(tiny_model):
    uncached = _latents(
        LatentGenerator(tiny_model, GenerateConfig(prompt_cache_bytes=0)), num_inference_steps=2
    )
    generator = LatentGenerator(tiny_model)
    assert torch.equal(_latents(generator, num_inference_steps=2), uncached)
    assert (generator.prompt_embeddings.hits, generator.prompt_embeddings.misses) == (
        0,
        2,
    )  # prompt, negative
    assert torch.equal(_latents(generator, num_inference_steps=2), uncached)
    assert generator.prompt_embeddings.hits == 2


def test_prompt_embeddings_evict_the_least_recent_within_their_byte_budget():
    tensor = torch.zeros(4, 8)  # 128 bytes
    cache = PromptEmbeddings(max_bytes=300)
    for text in ("a", "b", "a", "c"):  # "a" is used again before "c" arrives: "b" goes
        cache.get(text, 8, lambda _: tensor.clone())
    assert cache.bytes == 256 and (cache.hits, cache.misses) == (1, 3)
    cache.get("b", 8, lambda _: tensor.clone())
    assert cache.misses == 4


@pytest.mark.slow
def test_the_compiled_denoiser_equals_eager_with_and_without_a_step_cache(tiny_model):
    config = GenerateConfig(step_cache=StepCacheConfig(**ADMIT))
    eager_generator = LatentGenerator(tiny_model, config)
    eager = _latents(eager_generator, num_inference_steps=3)
    generator = LatentGenerator(
        tiny_model, config.model_copy(update={"compile": CompileConfig(enabled=True)})
    )
    compiled = _latents(generator, num_inference_steps=3)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    block = generator._plain_transformer.blocks[0]
    assert block._compiled_call_impl is not None  # the blocks really went through torch.compile
    assert getattr(tiny_model.pipe.transformer.blocks[0], "_compiled_call_impl", None) is None
    # A hooked view is compiled too (without fullgraph: a hook's skip decision is a graph break), and
    # the gate measures on eager copies of its own.
    for method in ("first_block", "mag"):
        cached = _latents(generator, num_inference_steps=STEPS, step_cache=method)
        expected = _latents(eager_generator, num_inference_steps=STEPS, step_cache=method)
        torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)
