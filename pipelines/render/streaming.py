"""StreamingRenderer: LatentChunks of many requests -> FrameChunks, one causal cache per (request, shot).

Chunks of a shot must arrive in order from latent frame 0 (causality needs it); the backend's
per-shot state is dropped at the shot's last chunk, or when its request goes idle.

A chunk that carries its shot's content address (``LatentChunk.cache_key``: the generator cached the
shot, e.g. one shared by a product's variants) has its shot's frames kept in a memory LRU under that
address and the decoder's identity: the next video with that shot gets them without decoding.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ...kernels.postprocess import to_uint8_frames
from ..config import RenderConfig, ShotCacheConfig
from ..shot_cache import ShotCache
from ..types import FrameChunk, LatentChunk
from .registry import build_backend


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
