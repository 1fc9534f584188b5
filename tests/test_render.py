import numpy as np
import pytest
import torch

from shopreel.kernels.postprocess import to_uint8_frames
from shopreel.pipelines.config import RenderConfig
from shopreel.pipelines.render import StreamingRenderer, build_backend
from shopreel.pipelines.types import LatentChunk

TORCH = RenderConfig(backend="torch")  # the reference; other backends are compared to it elsewhere


def _latents(tiny_model, latent_frames=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, latent_frames, 8, 8, generator=generator)


def _full_decode(tiny_model, latents):
    """What WanPipeline does after denoising: de-normalise, vae.decode, VideoProcessor to uint8."""
    vae = tiny_model.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.inference_mode():
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return to_uint8_frames(video)


def _stream(renderer, latents, chunk, request_id="r", shot=0):
    total = latents.shape[2]
    out = []
    for index, start in enumerate(range(0, total, chunk)):
        end = min(start + chunk, total)
        frame_chunk = renderer.render(
            LatentChunk(request_id, shot, index, start, end, latents[:, :, start:end], end == total, True)
        )
        assert (frame_chunk.frame_start, frame_chunk.frame_end) == LatentChunk(
            request_id, shot, index, start, end, None, False, False
        ).frame_range
        out.append(frame_chunk.frames)
    return np.concatenate(out)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_decode_equals_full_decode(tiny_model, chunk):
    latents = _latents(tiny_model)
    renderer = StreamingRenderer(tiny_model.vae, tiny_model.device, TORCH)
    streamed = _stream(renderer, latents, chunk)
    full = _full_decode(tiny_model, latents)
    assert streamed.shape == (17, 64, 64, 3)
    assert np.array_equal(streamed, full)
    assert renderer.active_streams == 0  # caches freed at the last chunk


def test_decoder_is_causal(tiny_model):
    latents = _latents(tiny_model)
    changed = latents.clone()
    changed[:, :, 3:] = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    renderer = StreamingRenderer(tiny_model.vae, tiny_model.device, TORCH)
    a = _stream(renderer, latents, 1)
    b = _stream(renderer, changed, 1)
    first_frames = 1 + 4 * 2  # latent frames 0..2
    assert np.array_equal(a[:first_frames], b[:first_frames])
    assert not np.array_equal(a[first_frames:], b[first_frames:])


def test_interleaved_requests_match_separate_runs(tiny_model):
    x, y = _latents(tiny_model, seed=1), _latents(tiny_model, seed=2)
    renderer = StreamingRenderer(tiny_model.vae, tiny_model.device, TORCH)
    outputs: dict[str, list] = {"x": [], "y": []}
    for start in range(5):
        for name, latents in (("x", x), ("y", y)):
            chunk = LatentChunk(
                name, 0, start, start, start + 1, latents[:, :, start : start + 1], start == 4, True
            )
            outputs[name].append(renderer.render(chunk).frames)
    assert np.array_equal(np.concatenate(outputs["x"]), _full_decode(tiny_model, x))
    assert np.array_equal(np.concatenate(outputs["y"]), _full_decode(tiny_model, y))


def test_out_of_order_chunks_are_rejected(tiny_model):
    latents = _latents(tiny_model)
    renderer = StreamingRenderer(tiny_model.vae, tiny_model.device, TORCH)
    with pytest.raises(ValueError, match="must start at latent frame 0"):
        renderer.render(LatentChunk("r", 0, 1, 2, 3, latents[:, :, 2:3], False, True))
    renderer.render(LatentChunk("r", 0, 0, 0, 1, latents[:, :, :1], False, True))
    with pytest.raises(ValueError, match="expected latent frames from 1"):
        renderer.render(LatentChunk("r", 0, 1, 2, 3, latents[:, :, 2:3], False, True))
    renderer.release("r")
    assert renderer.active_streams == 0


def test_unknown_backend_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="unknown renderer backend 'vulkan'; available: auto, onnxruntime"):
        build_backend("vulkan", tiny_model.vae, tiny_model.device)


def test_postprocess_reference_matches_diffusers_video_processor():
    from diffusers.video_processor import VideoProcessor

    video = torch.rand(1, 3, 4, 8, 8) * 2.2 - 1.1
    expected = VideoProcessor().postprocess_video(video, output_type="np")
    assert np.array_equal(to_uint8_frames(video), (expected[0] * 255).round().astype(np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_decode_equals_full_decode_on_cuda():
    from shopreel.pipelines.config import ModelConfig
    from shopreel.pipelines.presets import load_model

    model = load_model(ModelConfig(device="cuda", dtype="float32"))
    latents = _latents(model, latent_frames=5).to("cuda")
    vae = model.vae
    mean = torch.tensor(vae.config.latents_mean, device="cuda").view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device="cuda").view(1, 16, 1, 1, 1)
    with torch.inference_mode():
        full = to_uint8_frames(vae.decode(latents / inv_std + mean, return_dict=False)[0])
    streamed = _stream(StreamingRenderer(vae, torch.device("cuda"), TORCH), latents, chunk=2)
    assert streamed.shape == full.shape
    assert np.abs(streamed.astype(int) - full.astype(int)).max() <= 1  # cuDNN may pick other kernels
