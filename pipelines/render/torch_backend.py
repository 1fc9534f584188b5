"""Eager PyTorch decoding: the reference every other backend is compared against.

``AutoencoderKLWan._decode`` already decodes one latent frame at a time through a causal cache; this
backend drives the same loop one chunk at a time with the caller's cache. The loop follows diffusers'
private calling convention (``feat_cache``/``feat_idx``/``first_chunk``): diffusers is pinned in
pyproject.toml for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class TorchDecodeState:
    feat_cache: list  # the decoder's causal cache slots: None, the "Rep" marker, or a tensor
    latent_frames_done: int = 0


class TorchDecoderBackend:
    """Eager PyTorch: the reference every other backend is compared against."""

    name = "torch"

    def __init__(self, vae, device: torch.device, *, compile: bool = False) -> None:
        self.vae = vae
        self.device = device
        self.dtype = next(vae.parameters()).dtype
        self.compiled = compile
        # torch.compile traces the per-frame decoder call; the cache list it mutates is replayed by
        # dynamo, and frames 0, 1 and 2+ (empty cache, "Rep" marker, steady state) get their own graphs.
        self._decoder = torch.compile(vae.decoder, dynamic=False) if compile else vae.decoder
        # Normalised latents (what the pipeline returns) -> the VAE's latent space, written exactly as
        # WanPipeline does (divide by 1/std) so frames match a full pipeline decode bit for bit.
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self._mean = torch.tensor(vae.config.latents_mean, device=device, dtype=self.dtype).view(shape)
        self._inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device, dtype=self.dtype).view(
            shape
        )
        self._num_convs = vae._cached_conv_counts["decoder"]
        self.fallback_reason: str | None = None  # why "auto" chose torch, if it did

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "precision": _PRECISION_NAMES.get(self.dtype, str(self.dtype)),
            "torch_compile": self.compiled,
            "device": str(self.device),
            "fallback_reason": self.fallback_reason,
        }

    def new_state(self) -> TorchDecodeState:
        return TorchDecodeState(feat_cache=[None] * self._num_convs)

    @torch.inference_mode()
    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(state, TorchDecodeState):
            raise TypeError("state was not made by this backend")
        z = latents.to(device=self.device, dtype=self.dtype) / self._inv_std + self._mean
        # post_quant_conv is a 1x1x1 convolution: applying it per chunk equals applying it once.
        x = self.vae.post_quant_conv(z)
        outputs = []
        for i in range(x.shape[2]):
            outputs.append(
                self._decoder(
                    x[:, :, i : i + 1],
                    feat_cache=state.feat_cache,
                    feat_idx=[0],
                    first_chunk=state.latent_frames_done == 0,
                )
            )
            state.latent_frames_done += 1
        out = torch.cat(outputs, dim=2)
        if self.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.clamp(-1.0, 1.0)
