"""The renderer backends by name, and ``auto``: which one a ``RenderConfig`` gets.

The optimised backends are imported when asked for: TensorRT is optional, and a torch renderer
never loads the export machinery.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import RenderConfig
from .backend import DecoderBackend
from .torch_backend import TorchDecoderBackend

BackendFactory = Callable[[object, torch.device, RenderConfig], DecoderBackend]


def _torch_backend(vae, device: torch.device, config: RenderConfig) -> TorchDecoderBackend:
    if config.precision != "fp32":
        raise ValueError(
            "the torch renderer decodes in the VAE's own dtype: set model.vae_dtype (float32, bfloat16, "
            f"float16) instead of renderer precision {config.precision!r}"
        )
    return TorchDecoderBackend(vae, device, compile=config.torch_compile)


def _onnxruntime_backend(
    vae, device: torch.device, config: RenderConfig, *, fallback_to_torch: bool = False
) -> DecoderBackend:
    from .onnxruntime_backend import OnnxDecoderBackend

    return OnnxDecoderBackend(
        vae,
        device,
        precision=config.precision,
        cache_dir=config.cache_dir,
        min_psnr_db=config.min_psnr_db,
        fallback_to_torch=fallback_to_torch,
    )


def _tensorrt_backend(vae, device: torch.device, config: RenderConfig) -> DecoderBackend:
    from .tensorrt_backend import TensorRTDecoderBackend

    return TensorRTDecoderBackend(
        vae, device, precision=config.precision, cache_dir=config.cache_dir, min_psnr_db=config.min_psnr_db
    )


BACKENDS: dict[str, BackendFactory] = {
    "torch": _torch_backend,
    "onnxruntime": _onnxruntime_backend,
    "tensorrt": _tensorrt_backend,
}


def build_backend(name: str, vae, device: torch.device, config: RenderConfig | None = None) -> DecoderBackend:
    """The configured backend. ``auto``: onnxruntime where it can run on the VAE's device (it checks
    itself against torch on first use of each size and falls back to torch there), else torch."""
    config = (config or RenderConfig()).model_copy(update={"backend": name})
    if name == "auto":
        from .onnxruntime_backend import onnxruntime_unusable_reason

        reason = onnxruntime_unusable_reason(vae, device)
        if reason is None:
            return _onnxruntime_backend(vae, device, config, fallback_to_torch=True)
        backend = _torch_backend(vae, device, config)
        backend.fallback_reason = reason
        return backend
    if name not in BACKENDS:
        raise ValueError(f"unknown renderer backend {name!r}; available: auto, {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](vae, device, config)
