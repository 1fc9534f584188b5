"""Decoder output -> what the encoder consumes.

``to_uint8_frames`` is the plain-PyTorch reference: it matches diffusers' ``VideoProcessor``
(``x/2 + 0.5``, clamp to [0, 1], ``* 255``, round) so streamed frames equal a full pipeline decode
bit for bit. Fused/optimised variants (Triton, YUV420 output) are checked against it.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, T, H, W]`` floats in [-1, 1] -> ``uint8 [T, H, W, 3]`` (contiguous, on the CPU)."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"expected a [1, 3, T, H, W] video tensor, got {tuple(video.shape)}")
    # float32 first: rounding in bf16/fp16 would not match the reference pipeline.
    scaled = (video[0].float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return scaled.permute(1, 2, 3, 0).contiguous().cpu().numpy()
