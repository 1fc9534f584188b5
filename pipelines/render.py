"""render: LatentChunk -> FrameChunk with a streaming, causal VAE decoder.

Wan's VAE decoder is causal in time: its 3D convolutions see the current latent frame plus a
cache of the previous ones. ``AutoencoderKLWan._decode`` already decodes one latent frame at a
time through such a cache; we drive the same loop ourselves with one cache per (request, shot),
so frames for latent frame k leave before later latents exist, several requests interleave on one
renderer, and the output equals ``vae.decode`` of the whole shot (tested). The loop follows
diffusers' private calling convention (``feat_cache``/``feat_idx``/``first_chunk``): diffusers is
pinned in pyproject.toml for that reason.

Backends sit behind a small registry (``BACKENDS``) so optimised decoders (ONNX Runtime, TensorRT)
can replace the torch one with the same ``new_state``/``decode`` interface.

A chunk that carries its shot's content address (``LatentChunk.cache_key``: the generator cached the
shot, e.g. one shared by a product's variants) has its shot's frames kept in a memory LRU under that
address and the decoder's identity: the next video with that shot gets them without decoding.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..kernels.postprocess import to_uint8_frames
from .config import RenderConfig, ShotCacheConfig
from .shot_cache import ShotCache
from .types import FrameChunk, LatentChunk


class DecoderBackend(Protocol):
    """Decodes latent frames of one shot in order; the caller owns the per-shot state."""

    name: str

    def new_state(self) -> object: ...

    def describe(self) -> dict[str, object]:
        """What runs: backend, precision, device, and why an automatic choice fell back, if it did."""
        ...

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[1, C, t, h, w]`` -> video ``[1, 3, T, H, W]`` in [-1, 1]."""
        ...


_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class _TorchDecodeState:
    feat_cache: list
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

    def new_state(self) -> _TorchDecodeState:
        return _TorchDecodeState(feat_cache=[None] * self._num_convs)

    @torch.inference_mode()
    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(state, _TorchDecodeState):
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
    from .render_onnx import OnnxDecoderBackend

    return OnnxDecoderBackend(
        vae,
        device,
        precision=config.precision,
        cache_dir=config.cache_dir,
        min_psnr_db=config.min_psnr_db,
        fallback_to_torch=fallback_to_torch,
    )


def _tensorrt_backend(vae, device: torch.device, config: RenderConfig) -> DecoderBackend:
    from .render_tensorrt import TensorRTDecoderBackend

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
        from .render_onnx import onnxruntime_unusable_reason

        reason = onnxruntime_unusable_reason(vae, device)
        if reason is None:
            return _onnxruntime_backend(vae, device, config, fallback_to_torch=True)
        backend = _torch_backend(vae, device, config)
        backend.fallback_reason = reason
        return backend
    if name not in BACKENDS:
        raise ValueError(f"unknown renderer backend {name!r}; available: auto, {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](vae, device, config)


@dataclass
class _ShotStream:
    state: object
    next_latent: int = 0
    next_chunk: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    frames_key: str | None = None  # where the shot's frames are kept (None: not kept)
    cached: torch.Tensor | None = None  # the shot's frames from the frame cache: nothing to decode
    decoded: list[np.ndarray] = field(default_factory=list)  # frames so far, to keep at the shot's end


class StreamingRenderer:
    """Decodes LatentChunks of many requests; keeps one causal cache per (request, shot)."""

    def __init__(self, vae, device: torch.device, config: RenderConfig | None = None) -> None:
        self.config = config or RenderConfig()
        self.backend = build_backend(self.config.backend, vae, device, self.config)
        self._streams: dict[tuple[str, int], _ShotStream] = {}
        self._streams_lock = threading.Lock()
        frame_bytes = self.config.frame_cache_bytes
        self.frame_cache = ShotCache(ShotCacheConfig(memory_bytes=frame_bytes)) if frame_bytes else None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        return str(self.backend.describe()["precision"])

    def describe(self) -> dict[str, object]:
        """The configured backend and what actually decodes (shown in /v1/models and the CLI)."""
        return {"requested": self.config.backend, **self.backend.describe()}

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def next_latent(self, request_id: str, shot_index: int) -> int:
        """The latent frame this renderer expects next for a shot (0 when it holds no state for it)."""
        stream = self._streams.get((request_id, shot_index))
        return stream.next_latent if stream is not None else 0

    def evict_idle(self, max_idle_s: float) -> int:
        """Drop caches of shots untouched for ``max_idle_s`` (their request died); returns how many."""
        cutoff = time.monotonic() - max_idle_s
        with self._streams_lock:
            stale = [key for key, stream in self._streams.items() if stream.last_used < cutoff]
            for key in stale:
                del self._streams[key]
        return len(stale)

    def render(self, chunk: LatentChunk) -> FrameChunk:
        key = (chunk.request_id, chunk.shot_index)
        # 1. Find (or open) this shot's causal state; a shot must start at latent frame 0.
        with self._streams_lock:
            stream = self._streams.get(key)
            if stream is None:
                if chunk.latent_start != 0:
                    raise ValueError(
                        f"request {chunk.request_id} shot {chunk.shot_index}: first chunk must start at "
                        f"latent frame 0, got {chunk.latent_start}"
                    )
                stream = self._streams[key] = self._open_stream(chunk)
        with stream.lock:
            # 2. Causality needs order: a gap or repeat would corrupt the cache.
            if chunk.latent_start != stream.next_latent or chunk.latent_end <= chunk.latent_start:
                raise ValueError(
                    f"request {chunk.request_id} shot {chunk.shot_index}: expected latent frames from "
                    f"{stream.next_latent}, got [{chunk.latent_start}, {chunk.latent_end})"
                )
            started = time.perf_counter()
            frame_start, frame_end = chunk.frame_range
            if stream.cached is not None:
                frames = stream.cached[frame_start:frame_end].numpy()
            else:
                video = self.backend.decode(stream.state, chunk.latents)  # type: ignore[arg-type]
                frames = to_uint8_frames(video)
                if stream.frames_key is not None:  # a copy: the caller owns (and may paint on) its frames
                    stream.decoded.append(frames.copy())
            decode_s = time.perf_counter() - started
            stream.next_latent = chunk.latent_end
            stream.last_used = time.monotonic()
            if frames.shape[0] != frame_end - frame_start:
                raise RuntimeError(
                    f"request {chunk.request_id} shot {chunk.shot_index}: {frames.shape[0]} frames for "
                    f"latent frames [{chunk.latent_start}, {chunk.latent_end})"
                )
            if chunk.is_last and stream.decoded and self.frame_cache is not None:
                assert stream.frames_key is not None
                self.frame_cache.put(stream.frames_key, torch.from_numpy(np.concatenate(stream.decoded)))
        # 3. The last chunk of a shot frees its cache.
        if chunk.is_last:
            self.release(chunk.request_id, chunk.shot_index)
        return FrameChunk(
            request_id=chunk.request_id,
            shot_index=chunk.shot_index,
            chunk_index=chunk.chunk_index,
            frame_start=frame_start,
            frame_end=frame_end,
            frames=frames,
            is_last=chunk.is_last,
            is_last_shot=chunk.is_last_shot,
            timings={
                **chunk.timings,
                "decode_s": decode_s,
                "frames_cached": float(stream.cached is not None),
            },
        )

    def _open_stream(self, chunk: LatentChunk) -> _ShotStream:
        """A shot's state: its kept frames if the frame cache has them, else a fresh decoder cache."""
        if chunk.cache_key is None or self.frame_cache is None:
            return _ShotStream(state=self.backend.new_state())
        described = self.backend.describe()
        frames_key = f"{chunk.cache_key}:{self.backend.name}:{described.get('precision')}"
        cached = self.frame_cache.get(frames_key)
        if cached is not None:
            return _ShotStream(state=None, frames_key=frames_key, cached=cached)
        return _ShotStream(state=self.backend.new_state(), frames_key=frames_key)

    def release(self, request_id: str, shot_index: int | None = None) -> None:
        """Drop causal caches of a finished or abandoned request (one shot, or all of them)."""
        with self._streams_lock:
            for key in [k for k in self._streams if k[0] == request_id]:
                if shot_index is None or key[1] == shot_index:
                    del self._streams[key]
