"""Shot cache: a shot's denoised latents, content-addressed, reused across requests, variants and replicas.

Denoising is the expensive stage, and variants of one product share most shots (the hook, the product,
the price). A shot's latents are decided by the model and a handful of inputs, so they are stored under
a sha256 of exactly those: the model's fingerprint (configs and weights of the transformer and text
encoder, the scheduler's config, dtype and device type) and the shot's prompt, negative prompt, seed,
size, frames, steps and guidance. Overlays and captions are composed later, per video, so a variant
with other captions still hits.

Two tiers, both bounded in bytes and evicting the least recently used entry first:

* memory, per process (one generator replica);
* a directory (``directory``), shared by the replicas that mount it (a node's disk or a shared
  volume): one ``.npy`` file per shot, written to a temporary name and renamed, so a reader sees a
  whole file or none; a read refreshes the file's mtime, which is what disk eviction orders by.

A hit returns exactly the latents a miss would have computed on the same device type (seeded,
deterministic denoising); a corrupt or unreadable file counts as a miss and is removed. Callers that
miss the same key at the same time make it once (``get_or_make``): the others wait for it.

The renderer keeps decoded frames the same way (memory only, keyed by the shot key and the decoder):
``ShotCache`` holds any tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ShotCacheConfig

logger = logging.getLogger(__name__)


@dataclass
class ShotCacheStats:
    """What the cache did, for metrics: hits by tier, misses, evictions, bytes held."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0


def weights_digest(module: Any) -> str:
    """sha256 over a model's config and every parameter/buffer: a changed model gets new cache keys."""
    # diffusers' private config keys (e.g. ``_use_default_values``, a list built from a set) change
    # order from one process to the next: a key built from them would never be found again.
    config = module.config  # diffusers: a FrozenDict; transformers (a text encoder): a PretrainedConfig
    items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
    public = {key: value for key, value in items if not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(pipe: Any, device_type: str) -> str:
    """sha256 over what decides a shot's latents besides its inputs: the denoiser's and text encoder's
    configs and weights, the scheduler's config, the weights' dtype and the device type."""
    digest = hashlib.sha256(device_type.encode())
    for name in ("transformer", "text_encoder"):
        module = getattr(pipe, name)
        digest.update(name.encode())
        digest.update(weights_digest(module).encode())
        digest.update(str(next(module.parameters()).dtype).encode())
    scheduler = {key: value for key, value in dict(pipe.scheduler.config).items() if not key.startswith("_")}
    digest.update(json.dumps(scheduler, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def shot_key(
    fingerprint: str,
    *,
    prompt: str,
    negative_prompt: str,
    seed: int,
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    sampler: str = "",
) -> str:
    """The content address of one shot's latents; ``sampler`` names a scheduler or step cache other
    than the model's own (empty: the model's, so addresses made before speed profiles still hold)."""
    inputs = {
        "model": fingerprint,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "size": [height, width],
        "num_frames": num_frames,
        "steps": num_inference_steps,
        "guidance": round(float(guidance_scale), 6),
    }
    if sampler:
        inputs["sampler"] = sampler
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class ShotCache:
    """Latents by shot key, in memory and (optionally) on disk; thread-safe."""

    def __init__(self, config: ShotCacheConfig) -> None:
        self.config = config
        self.stats = ShotCacheStats()
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[str, threading.Event] = {}  # keys some caller is making now
        self.directory = Path(config.directory) if config.directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.stats.disk_bytes = sum(path.stat().st_size for path in self.directory.glob("*.npy"))

    def get(self, key: str) -> torch.Tensor | None:
        """The latents stored under ``key`` (a copy the caller may keep), or None."""
        with self._lock:
            latents = self._memory.get(key)
            if latents is not None:
                self._memory.move_to_end(key)
                self.stats.memory_hits += 1
                return latents.clone()
        from_disk = self._read(key)
        with self._lock:
            if from_disk is None:
                self.stats.misses += 1
                return None
            self.stats.disk_hits += 1
            self._remember(key, from_disk)
        return from_disk.clone()

    def get_or_make(self, key: str, make: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The tensor under ``key``, else what ``make()`` returns (then kept); ``True`` with a hit.

        Concurrent callers of one key make it once: the others wait and then hit. If the maker fails,
        or its result was too large to keep, a waiter makes it itself.
        """
        while True:
            with self._lock:
                pending = self._making.get(key)
            if pending is not None:
                pending.wait()
            found = self.get(key)
            if found is not None:
                return found, True
            with self._lock:
                if key in self._making:  # another caller began meanwhile: wait for it instead
                    continue
                pending = self._making[key] = threading.Event()
            try:
                made = make()
                self.put(key, made)
                return made, False
            finally:
                with self._lock:
                    del self._making[key]
                pending.set()

    def put(self, key: str, latents: torch.Tensor) -> None:
        """Keep ``latents`` under ``key`` in both tiers (an entry larger than a tier skips it)."""
        stored = latents.detach().to("cpu").contiguous().clone()
        with self._lock:
            self._remember(key, stored)
        self._write(key, stored)

    # --- memory tier ----------------------------------------------------------------------------

    def _remember(self, key: str, latents: torch.Tensor) -> None:
        size = _nbytes(latents)
        if size > self.config.memory_bytes:
            return
        old = self._memory.pop(key, None)
        if old is not None:
            self.stats.memory_bytes -= _nbytes(old)
        self._memory[key] = latents
        self.stats.memory_bytes += size
        while self.stats.memory_bytes > self.config.memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            self.stats.memory_bytes -= _nbytes(evicted)
            self.stats.evictions += 1

    # --- disk tier ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.npy"

    def _read(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
            _touch(path)  # recently used: evicted last
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a damaged file is a miss, and goes
            logger.warning("shot cache: dropping unreadable %s (%s)", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        return torch.from_numpy(array)

    def _write(self, key: str, latents: torch.Tensor) -> None:
        if self.directory is None:
            return
        array = latents.numpy()
        if array.nbytes > self.config.disk_bytes:
            return
        path = self._path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(temporary, "wb") as file:
                np.save(file, array, allow_pickle=False)
            os.replace(temporary, path)
            _touch(path)
        except OSError as exc:  # a full or read-only disk costs the cache, never the video
            logger.warning("shot cache: cannot write %s (%s)", path.name, exc)
            temporary.unlink(missing_ok=True)
            return
        self._evict_disk()

    def _evict_disk(self) -> None:
        """Delete the least recently used files until the directory fits ``disk_bytes``."""
        assert self.directory is not None
        entries = []
        for path in self.directory.glob("*.npy"):
            try:
                status = path.stat()
            except FileNotFoundError:  # another replica evicted it meanwhile
                continue
            entries.append((status.st_mtime, status.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.config.disk_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            with self._lock:
                self.stats.evictions += 1
        with self._lock:
            self.stats.disk_bytes = total


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _touch(path: Path) -> None:
    """Stamp ``path`` as used now, to the nanosecond: the kernel's own stamps can tie within a tick."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))
