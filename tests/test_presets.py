import json

import pytest
import torch
from storyboards import make_storyboard

from shopreel.pipelines.config import ModelConfig
from shopreel.pipelines.generate import LatentGenerator
from shopreel.pipelines.presets import export_tiny_checkpoint, load_model, resolve_device, resolve_preset


def test_checkpoint_directory_loads_through_the_real_path(tmp_path, tiny_model):
    """A diffusers checkpoint on disk gives the same latents as the preset it was saved from."""
    export_tiny_checkpoint(tmp_path / "ckpt")
    loaded = load_model(ModelConfig(preset=str(tmp_path / "ckpt"), device="cpu"))
    assert loaded.preset.name == str((tmp_path / "ckpt").resolve())
    assert loaded.preset.default_size == tiny_model.preset.default_size
    storyboard = make_storyboard(shot_frames=(9,))

    def latents(model):
        chunks = LatentGenerator(model).generate(storyboard, request_id="r", num_inference_steps=2)
        return torch.cat([c.latents for c in chunks], dim=2)

    # Same weights; from_pretrained rebuilds scheduler/config objects, so allow float rounding.
    assert torch.allclose(latents(loaded), latents(tiny_model), atol=1e-4)


def test_bad_presets_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_preset("wan-does-not-exist")
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_preset(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="supports WanPipeline"):
        resolve_preset(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on CPU-only machines")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_preset_on_cuda_bf16():
    model = load_model(ModelConfig(device="cuda", dtype="bfloat16"))
    chunks = list(LatentGenerator(model).generate(make_storyboard(shot_frames=(9,)), request_id="r"))
    assert chunks[0].latents.device.type == "cuda"
