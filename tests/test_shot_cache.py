"""Shot cache: content addresses, byte limits and LRU eviction in both tiers, a second replica reading
the first one's disk, and the generator skipping the denoiser on a hit with identical latents."""

from __future__ import annotations

import torch
from storyboards import make_storyboard

from shopreel.pipelines.config import GenerateConfig, ShotCacheConfig
from shopreel.pipelines.generate import LatentGenerator
from shopreel.pipelines.shot_cache import ShotCache, shot_key

SHOT = {
    "prompt": "a steel bottle",
    "negative_prompt": "",
    "seed": 1,
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "num_inference_steps": 2,
    "guidance_scale": 5.0,
}


def _latents(value: float, numel: int = 256) -> torch.Tensor:  # 1 KiB of float32
    return torch.full((1, 4, numel // 4), value, dtype=torch.float32)


def test_a_key_covers_the_model_and_every_input_that_decides_the_latents():
    key = shot_key("model-a", **SHOT)
    assert key == shot_key("model-a", **SHOT) and len(key) == 64
    assert shot_key("model-b", **SHOT) != key
    changes = {"prompt": "a mug", "negative_prompt": "blur", "seed": 2, "height": 80, "width": 80}
    changes |= {"num_frames": 13, "num_inference_steps": 3, "guidance_scale": 4.0}
    for field, other in changes.items():
        assert shot_key("model-a", **{**SHOT, field: other}) != key, field


def test_memory_tier_keeps_its_byte_limit_least_recently_used_out_first():
    cache = ShotCache(ShotCacheConfig(enabled=True, memory_bytes=3 * 1024))
    for name in "abc":
        cache.put(name, _latents(ord(name)))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _latents(4.0))
    assert cache.stats.memory_bytes == 3 * 1024 and cache.stats.evictions == 1
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert (cache.stats.memory_hits, cache.stats.misses) == (3, 1)
    held = cache.get("a")
    assert held is not None
    held.zero_()  # a caller's copy: the cached latents stay as they were
    assert torch.equal(cache.get("a"), _latents(ord("a")))


def test_disk_tier_is_shared_bounded_and_survives_damage(tmp_path):
    config = ShotCacheConfig(enabled=True, memory_bytes=0, directory=tmp_path, disk_bytes=2 * 1024 + 256)
    first = ShotCache(config)
    first.put("a", _latents(1.0))
    first.put("b", _latents(2.0))
    other_replica = ShotCache(config)  # same directory, empty memory
    assert torch.equal(other_replica.get("a"), _latents(1.0)) and other_replica.stats.disk_hits == 1
    first.put("c", _latents(3.0))  # over the limit: b, the least recently used, goes
    assert sorted(path.stem for path in tmp_path.glob("*.npy")) == ["a", "c"]
    assert first.stats.disk_bytes <= config.disk_bytes
    (tmp_path / "c.npy").write_bytes(b"not an array")
    assert other_replica.get("c") is None and not (tmp_path / "c.npy").exists()
    assert not list(tmp_path.glob("*.tmp"))  # writes are atomic: no leftovers


def test_a_second_request_reuses_the_shots_with_identical_latents(tiny_model, tmp_path):
    storyboard = make_storyboard(shot_frames=(9, 13))
    plain = LatentGenerator(tiny_model, GenerateConfig(num_inference_steps=2))
    cached = LatentGenerator(
        tiny_model,
        GenerateConfig(num_inference_steps=2, shot_cache=ShotCacheConfig(enabled=True, directory=tmp_path)),
    )
    denoised: list[int] = []
    denoise = cached._denoise_alone

    def counting(call):
        denoised.append(call.shot_index)
        return denoise(call)

    cached._denoise_alone = counting  # type: ignore[method-assign]

    def run(generator, request_id):
        steps: list[tuple[int, int]] = []
        chunks = list(
            generator.generate(
                storyboard, request_id=request_id, on_step=lambda s, k, n: steps.append((s, k))
            )
        )
        return chunks, steps

    reference, _ = run(plain, "r0")
    first, _ = run(cached, "r1")
    second, steps = run(cached, "r2")  # another request, e.g. a variant with other captions
    assert denoised == [0, 1]  # the second request denoised nothing
    assert (cached.cache.stats.memory_hits, cached.cache.stats.misses) == (2, 2)
    assert steps == [(0, 2), (1, 2)]  # progress still reaches each shot's last step
    for want, got, again in zip(reference, first, second, strict=True):
        assert torch.equal(want.latents, got.latents) and torch.equal(want.latents, again.latents)
    assert [c.timings["cached"] for c in second] == [1.0] * len(second)
    assert [c.timings["cached"] for c in first] == [0.0] * len(first)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # and on disk for the other replicas
