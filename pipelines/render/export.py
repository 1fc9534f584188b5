"""The causal decoder exported to ONNX as three steps per latent size, cached on disk by content.

Each exported graph is one step of the causal decoder: one normalised latent frame and the causal
cache tensors in; that frame's video frames and the updated caches out (de-normalisation,
``post_quant_conv`` and the clamp are inside). Wan's decoder treats its first two latent frames
specially (empty caches, then the temporal upsamplers' "Rep" marker and one-frame caches), so there
are three graphs per latent size: ``first``, ``second`` and ``steady`` (every later frame, feeding
itself). Their cache layout comes from a run of the torch reference on probe latents
(``trace_reference``).

Graphs are files in a cache folder named by a key of the VAE's weights and config, the latent shape,
the precision and the torch/onnxruntime versions, so a changed model or size never reuses a stale
graph; they are written atomically, so a concurrent process never loads half a file.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..shot_cache import weights_digest  # graphs are addressed by the VAE's weights, like shots by theirs
from .torch_backend import TorchDecoderBackend

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 2  # bump when the exported graph changes meaning
ONNX_OPSET = 17
ROLES = ("first", "second", "steady")  # latent frame 0, latent frame 1, every later latent frame
CHECK_LATENT_FRAMES = 4  # first, second and two steady steps: the steady graph also feeds itself


def step_role(latent_index: int) -> str:
    """Which exported step decodes this latent frame of a shot."""
    return ROLES[min(latent_index, len(ROLES) - 1)]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHOPREEL_CACHE_DIR", Path.home() / ".cache" / "shopreel")) / "onnx"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary file beside ``target`` that replaces it only if the block succeeds, so a concurrent
    process never loads a half-written graph or engine."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


def cache_key(weights: str, latent_hw: tuple[int, int], precision: str) -> str:
    import onnxruntime as ort

    parts = [
        weights,
        f"{latent_hw[0]}x{latent_hw[1]}",
        precision,
        torch.__version__,
        ort.__version__,
        str(EXPORT_FORMAT_VERSION),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@dataclass
class ReferenceTrace:
    """What the torch reference did on probe latents: per role, the caches before the step."""

    num_slots: int
    kinds_before: dict[str, tuple[str, ...]]
    caches_before: dict[str, list[torch.Tensor]]
    latents: torch.Tensor  # [1, C, CHECK_LATENT_FRAMES, h, w]
    video: torch.Tensor  # the reference's decode of ``latents``

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.latents.shape[3], self.latents.shape[4]


def _slot_kinds(feat_cache: Sequence[Any]) -> tuple[str, ...]:
    """Each cache slot as the decoder leaves it: empty, the upsamplers' "Rep" marker, or a tensor."""
    return tuple(
        "tensor" if isinstance(c, torch.Tensor) else ("rep" if isinstance(c, str) else "none")
        for c in feat_cache
    )


def trace_reference(reference: TorchDecoderBackend, latent_hw: tuple[int, int]) -> ReferenceTrace:
    """Run the torch reference on seeded probe latents, noting each role's incoming caches."""
    generator = torch.Generator().manual_seed(0)
    z_dim = reference.vae.config.z_dim
    latents = torch.randn(1, z_dim, CHECK_LATENT_FRAMES, *latent_hw, generator=generator)
    state = reference.new_state()
    kinds: dict[str, tuple[str, ...]] = {}
    caches: dict[str, list[torch.Tensor]] = {}
    outputs = []
    for index in range(CHECK_LATENT_FRAMES):
        role = step_role(index)
        kinds.setdefault(role, _slot_kinds(state.feat_cache))
        caches.setdefault(
            role, [c.float().cpu().clone() for c in state.feat_cache if isinstance(c, torch.Tensor)]
        )
        outputs.append(reference.decode(state, latents[:, :, index : index + 1]).float().cpu())
    if _slot_kinds(state.feat_cache) != kinds["steady"]:
        raise ValueError("the decoder's cache layout does not settle after two latent frames")
    return ReferenceTrace(len(state.feat_cache), kinds, caches, latents, torch.cat(outputs, dim=2))


class _DecodeStep(torch.nn.Module):
    """One step of the causal decoder for one latent frame, caches as explicit inputs and outputs.

    ``slots_in`` are the tensor caches the step reads, ``rep_slots`` hold the "Rep" marker (Python
    state, not graph inputs), ``slots_out`` the tensor caches it leaves for the next step.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(
        self,
        vae: Any,
        *,
        num_slots: int,
        slots_in: Sequence[int],
        rep_slots: Sequence[int],
        slots_out: Sequence[int],
        first_chunk: bool,
    ) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        # A copy, so the model shared with the torch path is never changed: ONNX's legacy exporter has
        # no "nearest-exact", and for the decoder's integer 2x upsampling "nearest" picks the same pixels.
        self.decoder = copy.deepcopy(vae.decoder)
        for module in self.decoder.modules():
            if isinstance(module, torch.nn.Upsample) and module.mode == "nearest-exact":
                module.mode = "nearest"
        self.num_slots = num_slots
        self.slots_in, self.rep_slots, self.slots_out = list(slots_in), list(rep_slots), list(slots_out)
        self.first_chunk = first_chunk
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape))
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)
        self.register_buffer("inv_std", 1.0 / std)

    def forward(self, latents: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat_cache: list[Any] = [None] * self.num_slots
        for slot in self.rep_slots:
            feat_cache[slot] = "Rep"
        for slot, cache in zip(self.slots_in, caches, strict=True):
            feat_cache[slot] = cache
        x = self.post_quant_conv(latents / self.inv_std + self.mean)  # exactly the torch path's order
        video = self.decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=self.first_chunk)
        return (video.clamp(-1.0, 1.0), *(feat_cache[slot] for slot in self.slots_out))


def _export_step(vae: Any, trace: ReferenceTrace, role: str, path: Path) -> None:
    """Export one role's step as an fp32 graph: inputs ``latents``, ``cache_<slot>``...; outputs
    ``video``, ``next_cache_<slot>``..., both in slot order."""
    kinds_before = trace.kinds_before[role]
    next_role = ROLES[min(ROLES.index(role) + 1, len(ROLES) - 1)]
    step = _DecodeStep(
        vae,
        num_slots=trace.num_slots,
        slots_in=[i for i, kind in enumerate(kinds_before) if kind == "tensor"],
        rep_slots=[i for i, kind in enumerate(kinds_before) if kind == "rep"],
        slots_out=[i for i, kind in enumerate(trace.kinds_before[next_role]) if kind == "tensor"],
        first_chunk=role == "first",
    )
    step = step.float().cpu().eval()
    caches = tuple(trace.caches_before[role])
    example = torch.zeros(1, vae.config.z_dim, 1, *trace.latent_hw)
    names = ["latents", *(f"cache_{slot}" for slot in step.slots_in)]
    outputs = ["video", *(f"next_cache_{slot}" for slot in step.slots_out)]
    with atomic_path(path) as temp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the decoder's Python branches
        torch.onnx.export(
            step,
            (example, *caches),
            str(temp),
            input_names=names,
            output_names=outputs,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    logger.info("exported the %s decode step to %s", role, path)


class GraphCache:
    """One VAE's exported decoder steps in a cache folder, each file named by its content address."""

    def __init__(self, vae: Any, cache_dir: Path | None = None) -> None:
        self.vae = vae
        self.dir = cache_dir or default_cache_dir()
        self.weights = weights_digest(vae)

    def path(self, latent_hw: tuple[int, int], precision: str, role: str = "steady") -> Path:
        key = cache_key(self.weights, latent_hw, precision)
        return self.dir / f"wan-decode-{role}-{key}.{precision}.onnx"

    def fp32_graph(self, trace: ReferenceTrace, role: str) -> Path:
        """The fp32 graph of one step of the traced size: from the cache, else exported now."""
        path = self.path(trace.latent_hw, "fp32", role)
        if not path.is_file():
            _export_step(self.vae, trace, role, path)
        return path
