"""Decoder output -> what the encoder consumes.

``to_uint8_frames`` is the plain-PyTorch reference: it matches diffusers' ``VideoProcessor``
(``x/2 + 0.5``, clamp to [0, 1], ``* 255``, round) so streamed frames equal a full pipeline decode
bit for bit. Fused/optimised variants (Triton, YUV420 output) are checked against it.

``decoder_output_to_rgb`` and ``decoder_output_to_yuv420`` pick a backend per call:

- ``"reference"``: ``to_uint8_frames`` (then ``yuv420.rgb_to_yuv420`` on the CPU for YUV);
- ``"triton"``: one fused kernel pass on the GPU (``triton_postprocess``), CUDA tensors only;
- ``"auto"`` (default): Triton for a CUDA tensor when the ``triton`` package is installed, else
  the reference. Both give identical bytes.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch

from .yuv420 import Yuv420Frames, check_yuv420_size, rgb_to_yuv420

Backend = Literal["auto", "reference", "triton"]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, T, H, W]`` floats in [-1, 1] -> ``uint8 [T, H, W, 3]`` (contiguous, on the CPU)."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"expected a [1, 3, T, H, W] video tensor, got {tuple(video.shape)}")
    # float32 first: rounding in bf16/fp16 would not match the reference pipeline.
    scaled = (video[0].float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return scaled.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def decoder_output_to_rgb(video: torch.Tensor, *, backend: Backend = "auto") -> np.ndarray:
    """Same contract and bytes as ``to_uint8_frames``; one fused kernel on CUDA with Triton."""
    if _use_triton(video, backend):
        from . import triton_postprocess

        return triton_postprocess.rgb(video).cpu().numpy()
    return to_uint8_frames(video)


def decoder_output_to_yuv420(video: torch.Tensor, *, backend: Backend = "auto") -> Yuv420Frames:
    """``[1, 3, T, H, W]`` floats in [-1, 1] (even H, W) -> YUV 4:2:0 planes on the CPU.

    Equal to ``rgb_to_yuv420(to_uint8_frames(video))``: the frames the encoder would get from
    swscale (see ``yuv420``). On CUDA with Triton the whole way is one kernel and only the YUV
    planes (half the bytes of RGB) are copied to the host.
    """
    use_triton = _use_triton(video, backend)
    check_yuv420_size(int(video.shape[3]), int(video.shape[4]))
    if use_triton:
        from . import triton_postprocess

        y, u, v = triton_postprocess.yuv420_planes(video)
        return Yuv420Frames(y=y.cpu().numpy(), u=u.cpu().numpy(), v=v.cpu().numpy())
    return rgb_to_yuv420(to_uint8_frames(video))


def triton_available() -> bool:
    """Whether the optional ``triton`` package is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(video: torch.Tensor, backend: Backend) -> bool:
    """Check the decoder output and the backend asked for; True when the Triton kernels run."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"expected a [1, 3, T, H, W] video tensor, got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a floating-point tensor in [-1, 1], got {video.dtype}")
    if backend == "reference":
        return False
    if backend == "triton":
        if not video.is_cuda:
            raise ValueError(f"backend='triton' needs a CUDA tensor, got one on {video.device}")
        if not triton_available():
            raise ModuleNotFoundError("backend='triton' needs the triton package: pip install triton")
        return True
    if backend == "auto":
        return video.is_cuda and triton_available()
    raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")


__all__ = [
    "Backend",
    "Yuv420Frames",
    "decoder_output_to_rgb",
    "decoder_output_to_yuv420",
    "rgb_to_yuv420",
    "to_uint8_frames",
    "triton_available",
]
