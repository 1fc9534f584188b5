import pytest
import torch
from storyboards import make_storyboard

from shopreel.pipelines.config import GenerateConfig
from shopreel.pipelines.generate import LatentGenerator


def _collect(generator, storyboard, **kwargs):
    return list(generator.generate(storyboard, request_id="req", num_inference_steps=2, **kwargs))


def test_latent_chunks_shapes_and_order(tiny_model):
    storyboard = make_storyboard(shot_frames=(9, 17))
    generator = LatentGenerator(tiny_model, GenerateConfig(chunk_latent_frames=2))
    steps = []
    chunks = _collect(
        generator, storyboard, on_step=lambda shot, step, total: steps.append((shot, step, total))
    )
    # 9 frames -> 3 latent frames -> chunks [0,2) [2,3); 17 frames -> 5 latent -> [0,2) [2,4) [4,5)
    ranges = [(c.shot_index, c.latent_start, c.latent_end) for c in chunks]
    assert ranges == [(0, 0, 2), (0, 2, 3), (1, 0, 2), (1, 2, 4), (1, 4, 5)]
    assert [c.is_last for c in chunks] == [False, True, False, False, True]
    assert [c.is_last_shot for c in chunks] == [False, False, True, True, True]
    for chunk in chunks:
        assert chunk.latents.shape == (1, 16, chunk.latent_end - chunk.latent_start, 8, 8)
        assert chunk.latents.dtype == torch.float32
    assert steps == [(0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)]


def test_same_seed_same_latents_pinned_slice(tiny_model):
    storyboard = make_storyboard(shot_frames=(9,))
    generator = LatentGenerator(tiny_model)
    first = torch.cat([c.latents for c in _collect(generator, storyboard)], dim=2)
    second = torch.cat([c.latents for c in _collect(generator, storyboard)], dim=2)
    assert torch.equal(first, second)
    # Pinned: seeded tiny weights + seeded noise. A change here means the model or sampler changed.
    expected = torch.tensor([-0.2918, -0.5625, -0.2842, -1.0166, 0.4843, 0.9674])
    assert torch.allclose(first[0, 0, 0, 0, :6], expected, atol=1e-3), first[0, 0, 0, 0, :6]


def test_other_seed_other_latents(tiny_model):
    generator = LatentGenerator(tiny_model)
    base = make_storyboard(shot_frames=(9,))
    reseeded = base.model_copy(update={"shots": [base.shots[0].model_copy(update={"seed": 99})]})
    a = _collect(generator, base)[0].latents
    b = _collect(generator, reseeded)[0].latents
    assert not torch.allclose(a, b)


def test_check_inputs_rejects_what_the_model_cannot_make(tiny_model):
    generator = LatentGenerator(tiny_model)
    storyboard = make_storyboard(shot_frames=(9,))
    with pytest.raises(ValueError, match="num_inference_steps"):
        generator.check_inputs(storyboard, num_inference_steps=0)


def test_concurrent_requests_on_one_generator_match_sequential(tiny_model):
    """Serving replicas run several requests at once in threads; the scheduler state must not leak."""
    import threading

    generator = LatentGenerator(tiny_model)
    storyboard = make_storyboard(shot_frames=(9, 13), width=64, height=64)

    def latents(request_id):
        chunks = generator.generate(storyboard, request_id=request_id, num_inference_steps=3)
        return torch.cat([chunk.latents for chunk in chunks], dim=2)

    reference = latents("sequential")
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: latents(f"r{i}")})) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for result in results.values():
        assert torch.equal(result, reference)
