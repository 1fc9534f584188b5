"""The interface every renderer backend meets: per-shot state in, one chunk of latents decoded."""

from __future__ import annotations

from typing import Protocol

import torch


class DecoderBackend(Protocol):
    """Decodes latent frames of one shot in order; the caller owns the per-shot state."""

    name: str
    vae: torch.nn.Module  # the VAE (diffusers AutoencoderKLWan) whose decoder this backend runs

    def new_state(self) -> object: ...

    def describe(self) -> dict[str, object]:
        """What runs: backend, precision, device, and why an automatic choice fell back, if it did."""
        ...

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[1, C, t, h, w]`` -> video ``[1, 3, T, H, W]`` in [-1, 1]."""
        ...
