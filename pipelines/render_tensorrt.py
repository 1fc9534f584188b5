"""TensorRT renderer: registered, NOT implemented.

TensorRT cannot be installed on any machine we have (its PyPI packages fetch from NVIDIA's own
index, which none reaches, the lent GPU machine included), so an engine builder could never run
here. Rather than ship code nobody has executed, this backend only answers clearly: the install hint
when TensorRT is missing, and "not implemented" when it is present. The intended design: build the
engine from ``render_onnx``'s exported decode-step graph with optimisation profiles per configured
size and the precision flag, cached under GPU name, TensorRT version, shapes, precision and weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt (it downloads from NVIDIA's package index), "
    "or use renderer backend 'onnxruntime'"
)


class TensorRTDecoderBackend:
    name = "tensorrt"

    def __init__(
        self, vae: Any, device: torch.device, *, precision: str = "fp16", cache_dir: Path | None = None
    ):
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise ValueError(INSTALL_HINT) from exc
        if device.type != "cuda":
            raise ValueError(f"the tensorrt renderer needs a CUDA device, the VAE is on {device}")
        if precision in ("int8", "fp8"):
            raise ValueError(
                f"tensorrt {precision} needs a quantised ONNX graph, which this build cannot make yet"
            )
        raise ValueError(
            "the tensorrt renderer is not in this build: it has never run on a machine with TensorRT"
        )

    # The DecoderBackend interface, unreachable until the engine builder exists (the constructor raises).
    def new_state(self) -> object:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        raise NotImplementedError

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
