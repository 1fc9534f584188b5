"""ONNX Runtime renderer: the decoder's three exported steps (``export``) as ONNX Runtime sessions.

fp32 graphs are checked against the torch reference before they serve (PSNR floor). INT8 graphs are
ONNX Runtime static QDQ models made by ``int8.quantize_int8``: always the steady step, the first two
steps too when the floor held with them INT8 (else those stay fp32); each is activated only if the
fidelity report it was accepted with meets this renderer's floor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chains import ChainState, StepChains
from .export import ROLES, GraphCache, ReferenceTrace
from .fidelity import check_saved_report
from .torch_backend import TorchDecoderBackend

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]  # one step's inputs by name: "latents", then "cache_<slot>"...


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_unusable_reason(vae: Any, device: torch.device) -> str | None:
    """Why the onnxruntime renderer cannot serve this VAE here (None: it can)."""
    if not onnxruntime_available():
        return "onnxruntime is not installed"
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        # A CPU graph behind a GPU VAE would be many times slower than torch on the GPU.
        return "the VAE is on CUDA and onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    if device.type not in ("cpu", "cuda"):
        return f"no onnxruntime execution provider for device {device}"
    if getattr(vae.config, "patch_size", None) is not None:
        return "patchified VAEs (Wan 2.2) are not exported yet"
    return None


def execution_providers(device: torch.device) -> list[str]:
    """CUDA (and TensorRT) providers when the VAE lives on a GPU and this onnxruntime has them, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = [
            p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available
        ] + wanted
    return wanted


def open_session(path: Path, providers: list[str]) -> Any:
    """A serving session for one graph: fully optimised, on as many threads as torch was given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads must not spin: on a shared CPU they would slow the generator beside us.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # As many threads as torch was given (a Serve replica sets that from its config).
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


@dataclass
class OnnxSteps:
    """The sessions of one latent size's first, second and steady steps."""

    sessions: dict[str, Any]
    paths: dict[str, Path]
    input_names: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.input_names = {role: [i.name for i in s.get_inputs()] for role, s in self.sessions.items()}

    def feeds(self, role: str, frame: torch.Tensor, caches: list[np.ndarray]) -> Feeds:
        names = self.input_names[role]
        return {"latents": frame.detach().float().cpu().numpy(), **dict(zip(names[1:], caches, strict=True))}

    def run_feeds(self, role: str, feeds: Feeds) -> tuple[torch.Tensor, list[np.ndarray]]:
        video, *caches = self.sessions[role].run(None, feeds)
        return torch.from_numpy(video), caches

    def run(
        self, role: str, frame: torch.Tensor, caches: list[np.ndarray]
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        return self.run_feeds(role, self.feeds(role, frame, caches))


class OnnxDecoderBackend:
    """Streaming decode with ONNX Runtime: three exported steps (latent frame 0, 1, and later)."""

    name = "onnxruntime"

    def __init__(
        self,
        vae: Any,
        device: torch.device,
        *,
        precision: str = "fp32",
        cache_dir: Path | None = None,
        min_psnr_db: float = 35.0,
        fallback_to_torch: bool = False,
    ) -> None:
        unusable = onnxruntime_unusable_reason(vae, device)
        if unusable is not None:
            raise ValueError(f"renderer backend 'onnxruntime' cannot run here: {unusable}")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"onnxruntime renderer supports precision fp32 or int8, not {precision!r}")
        self.vae = vae
        self.device = device
        self.precision = precision
        self.min_psnr_db = min_psnr_db
        self.providers = execution_providers(device)
        self.graphs = GraphCache(vae, cache_dir)
        self.reference = TorchDecoderBackend(vae, device)
        # fp32 graphs must match the reference on any latents; INT8 was held to the floor on real ones
        # (its fidelity report), and probe noise lies outside its calibrated ranges.
        self.chains: StepChains[np.ndarray, OnnxSteps] = StepChains(
            self.name,
            self.reference,
            self._open_steps,
            floor_db=min_psnr_db if precision == "fp32" else None,
            fallback_to_torch=fallback_to_torch,  # "auto": graphs that fail to build or check -> torch
        )

    @property
    def fallback_reason(self) -> str | None:
        return self.chains.fallback_reason

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "precision": self.precision,  # of the steady-state step (see int8_steps_by_latent_size)
            "device": str(self.device),
            "providers": self.providers,
            "graphs_by_latent_size": self.chains.steady_files(),  # "torch": that size decodes in torch
            "int8_steps_by_latent_size": {f"{h}x{w}": self.int8_roles((h, w)) for h, w in self.chains.built},
            "fallback_reason": self.fallback_reason,
        }

    def new_state(self) -> ChainState[np.ndarray]:
        return self.chains.new_state()

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        return self.chains.decode(state, latents)

    def int8_roles(self, latent_hw: tuple[int, int]) -> list[str]:
        steps = self.chains.built.get(latent_hw)
        return (
            [] if steps is None else [role for role in ROLES if steps.paths[role].name.endswith(".int8.onnx")]
        )

    def _open_steps(self, trace: ReferenceTrace) -> OnnxSteps:
        paths = {role: self._graph(trace, role) for role in ROLES}
        steps = OnnxSteps(
            sessions={role: open_session(path, self.providers) for role, path in paths.items()}, paths=paths
        )
        logger.info("%s renderer %s (%s): %s", self.name, self.precision, self.providers, paths)
        return steps

    def _graph(self, trace: ReferenceTrace, role: str) -> Path:
        """The graph a role runs at this renderer's precision."""
        if self.precision == "int8":
            path = self.graphs.path(trace.latent_hw, "int8", role)
            if path.is_file():
                if role == "steady":  # its report covers the INT8 chain it came with
                    check_saved_report(path, self.min_psnr_db)
                return path
            if role == "steady":
                h, w = trace.latent_hw
                raise ValueError(
                    f"no accepted INT8 decoder for latent size {h}x{w} in {self.graphs.dir}: calibrate one "
                    "first (shopreel quantize, or pipelines.render.int8.quantize_int8)"
                )
            # quantize_int8 left this step fp32: INT8 first/second steps missed the floor.
        return self.graphs.fp32_graph(trace, role)
