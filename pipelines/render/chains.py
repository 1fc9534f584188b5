"""Decoding through exported steps: what the ONNX Runtime and TensorRT backends both run.

A backend opens one latent size's three exported steps (``first``, ``second``, ``steady``) its own way
and says how one step runs; ``StepChains`` does the rest for it: builds each size once, checks the
chain against the torch reference on probe latents (PSNR floor), and decodes frame by frame with the
causal caches threaded from step to step. Where a size fails to build or check and the backend allows
it (``auto``), that size decodes with torch instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from .export import CHECK_LATENT_FRAMES, ReferenceTrace, step_role, trace_reference
from .fidelity import psnr_db
from .torch_backend import TorchDecoderBackend, TorchDecodeState

logger = logging.getLogger(__name__)

CacheT = TypeVar("CacheT")  # one causal cache as the backend holds it between steps


class Steps(Protocol[CacheT]):
    """One latent size's three runnable steps."""

    @property
    def paths(self) -> dict[str, Path]:
        """The file each role runs (a graph or an engine)."""
        ...

    def run(self, role: str, frame: torch.Tensor, caches: list[CacheT]) -> tuple[torch.Tensor, list[CacheT]]:
        """One latent frame ``[1, C, 1, h, w]`` and the caches the previous step left -> its video
        frames and the caches for the next step."""
        ...


StepsT = TypeVar("StepsT", bound="Steps[Any]")


@dataclass
class ChainState(Generic[CacheT]):
    """One shot's place in the chain: the steps of its size and the caches the last step left."""

    steps: Steps[CacheT] | None = None  # None: this size decodes with torch (see ``torch_state``)
    torch_state: TorchDecodeState | None = None
    caches: list[CacheT] = field(default_factory=list)
    latent_frames_done: int = 0


class StepChains(Generic[CacheT, StepsT]):
    """Per latent size, the steps ``open_steps`` makes from the torch reference's trace, checked once.

    ``floor_db``: the PSNR the chain must reach against the reference on probe latents (None: measured
    only, as for INT8 steps, whose fidelity was judged on real latents). ``fallback_to_torch``: a size
    whose steps fail to build or check decodes with torch, and ``fallback_reason`` says why.
    """

    def __init__(
        self,
        backend_name: str,
        reference: TorchDecoderBackend,
        open_steps: Callable[[ReferenceTrace], StepsT],
        *,
        floor_db: float | None,
        fallback_to_torch: bool = False,
    ) -> None:
        self.backend_name = backend_name
        self.reference = reference
        self.open_steps = open_steps
        self.floor_db = floor_db
        self.fallback_to_torch = fallback_to_torch
        self.fallback_reason: str | None = None
        self.check_psnr_db: dict[tuple[int, int], float] = {}
        self.built: dict[tuple[int, int], StepsT | None] = {}  # None: that size decodes with torch
        self._lock = threading.Lock()

    def for_size(self, latent_hw: tuple[int, int]) -> StepsT | None:
        """The steps of this latent size, built and checked on first use. None: it decodes with torch."""
        with self._lock:
            if latent_hw in self.built:
                return self.built[latent_hw]
            steps: StepsT | None
            try:
                trace = trace_reference(self.reference, latent_hw)
                steps = self.open_steps(trace)
                self._check(steps, trace)
            except Exception as exc:
                if not self.fallback_to_torch:
                    raise
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "%s renderer unusable for latent size %s, decoding with torch: %s",
                    self.backend_name,
                    latent_hw,
                    self.fallback_reason,
                )
                steps = None
            self.built[latent_hw] = steps
            return steps

    def steady_files(self) -> dict[str, str]:
        """Per latent size ("HxW"), the file its steady step runs, or "torch" where it fell back."""
        return {
            f"{h}x{w}": "torch" if s is None else s.paths["steady"].name for (h, w), s in self.built.items()
        }

    def new_state(self) -> ChainState[CacheT]:
        return ChainState()

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(state, ChainState):
            raise TypeError("state was not made by this backend")
        if state.latent_frames_done == 0:
            state.steps = self.for_size((latents.shape[3], latents.shape[4]))
            if state.steps is None:
                state.torch_state = self.reference.new_state()
        if state.steps is None:
            video = self.reference.decode(state.torch_state, latents).float().cpu()
            state.latent_frames_done += latents.shape[2]
            return video
        steps = state.steps
        return torch.cat([_step(steps, state, latents[:, :, i : i + 1]) for i in range(latents.shape[2])], 2)

    def _check(self, steps: StepsT, trace: ReferenceTrace) -> None:
        state: ChainState[CacheT] = ChainState(steps=steps)
        video = torch.cat(
            [_step(steps, state, trace.latents[:, :, i : i + 1]) for i in range(CHECK_LATENT_FRAMES)], 2
        )
        quality = psnr_db(trace.video, video)
        self.check_psnr_db[trace.latent_hw] = quality
        if self.floor_db is not None and quality < self.floor_db:
            raise ValueError(
                f"{steps.paths['steady'].name}: {quality:.1f} dB vs the torch reference, "
                f"floor {self.floor_db} dB"
            )


def _step(steps: Steps[CacheT], state: ChainState[CacheT], frame: torch.Tensor) -> torch.Tensor:
    """One latent frame through the step of its role, the shot's caches moving on to the next."""
    video, state.caches = steps.run(step_role(state.latent_frames_done), frame, state.caches)
    state.latent_frames_done += 1
    return video
