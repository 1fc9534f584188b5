"""Step caching on the denoiser: diffusers' training-free cache hooks, made safe to serve.

Three things make diffusers' hooks (``transformer.enable_cache``) servable here:

1. **One transformer view per concurrent call.** A hook keeps state on the module it is attached to
   (the previous step's residuals), so two videos denoising through one hooked transformer would
   read each other's state. A *view* is a copy of the module tree that shares every weight tensor
   with the loaded model (no memory but the Python objects); views are pooled per setting and each
   call resets its view's state before the first step.
2. **MagCache calibrated on the spot.** MagCache needs the model's per-step residual magnitude ratios;
   they are measured once per (model, scheduler, steps) on an uncached calibration run, with
   diffusers' own formula (mean over tokens of |r_t| / |r_t-1|, conditional pass).
3. **A fidelity gate.** Before a setting's first use the gate denoises ``calibration_prompts``
   built-in product prompts with and without it (same seeds, scheduler and steps), decodes both
   with the VAE and compares: PSNR of the frames and relative L2 error of the latents. A setting
   under ``min_psnr_db`` or over ``max_latent_error`` is refused (``FidelityRefused``, a ValueError:
   the API answers with the figures). Verdicts are kept per process.

FasterCache is not offered: it needs the conditional and unconditional passes in one batch, and
WanPipeline runs them as two calls (its hook fails on Wan's inputs).
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .config import StepCacheConfig
from .render.fidelity import psnr_db

# Product-like prompts the gate measures a setting on (the model's own default size and seeds 1..n).
CALIBRATION_PROMPTS = (
    "a glass perfume bottle on a marble pedestal, soft studio light, slow orbit, product video",
    "white running shoes on a clean grey background, camera pans right, commercial lighting",
    "a ceramic coffee mug with steam, warm kitchen light, close-up, gentle zoom in",
    "a smartphone rotating on a turntable, dark gradient backdrop, specular highlights",
    "a leather handbag on a wooden table, daylight from a window, static shot",
    "a bottle of shampoo splashing water, bright blue background, slow motion",
    "a wireless headphone set floating, neon rim light, camera orbits",
    "a box of chocolates opening, red ribbon, festive bokeh lights",
)


# The Wan block parts TaylorSeer predicts between full steps: self-attention, cross-attention, MLP.
TAYLORSEER_WAN_MODULES = (r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn")


class FidelityRefused(ValueError):
    """A step-cache setting missed the gate's floors; the message carries the measured figures."""

    def __init__(self, message: str, verdict: GateVerdict) -> None:
        super().__init__(message)
        self.verdict = verdict

    def __reduce__(self):  # crosses Ray (the generator replica's error reaches the job service)
        return (FidelityRefused, (str(self), self.verdict))


@dataclass(frozen=True)
class GateVerdict:
    """What the gate measured for one setting: cached vs uncached on the calibration prompts."""

    setting: str
    psnr_db: float  # worst prompt's PSNR of decoded frames (inf: identical)
    latent_error: float  # worst prompt's relative L2 error of the latents
    compute_fraction: float  # FLOPs of the cached run over the uncached one (1.0: nothing skipped)
    passed: bool

    def describe(self) -> str:
        psnr = "identical" if math.isinf(self.psnr_db) else f"{self.psnr_db:.1f} dB"
        return (
            f"step cache {self.setting}: {psnr} PSNR, latent error {self.latent_error:.3f}, "
            f"{self.compute_fraction:.0%} of the uncached compute"
        )


def describe_setting(config: StepCacheConfig) -> str:
    """A short stable name of a setting, with the fields its method reads (cache keys, logs, errors)."""
    fields = {
        "none": (),
        "first_block": ("first_block_threshold",),
        "mag": ("mag_threshold", "mag_max_skip_steps", "mag_retention_ratio"),
        "taylorseer": ("taylorseer_interval", "taylorseer_warmup_steps", "taylorseer_order"),
        "pab": ("pab_skip_range", "pab_timestep_range"),
        "sea": ("sea_threshold",),
    }[config.method]
    if not fields:
        return config.method
    values = ",".join(f"{name.removeprefix(config.method + '_')}={getattr(config, name)}" for name in fields)
    return f"{config.method}({values})"


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float().cpu(), other.float().cpu()
    return float((other - reference).norm() / reference.norm().clamp_min(1e-12))


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose parameters and buffers are the very tensors of ``module``."""
    shared: dict[int, Any] = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, shared)


class TimestepSource:
    """What Pyramid Attention Broadcast reads the current timestep from: the pipeline of the call."""

    def __init__(self) -> None:
        self.pipe: Any = None

    def __call__(self) -> Any:
        return self.pipe.current_timestep if self.pipe is not None else None


@dataclass
class TransformerView:
    """A copy of the transformer (hooked or not), used by one call at a time."""

    transformer: torch.nn.Module
    timestep_source: TimestepSource

    @classmethod
    def of(
        cls,
        base: torch.nn.Module,
        make_config: Callable[[Callable[[], Any]], Any] | None = None,
        prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda transformer: transformer,
    ) -> TransformerView:
        """A weight-sharing copy of ``base``, prepared (e.g. compiled), hooked by ``make_config``."""
        source = TimestepSource()
        transformer = prepare(weight_sharing_copy(base))
        if make_config is not None:
            transformer.enable_cache(make_config(source))  # type: ignore[operator]
        return cls(transformer, source)


def diffusers_cache_config(
    config: StepCacheConfig, num_inference_steps: int, timestep_source: Callable[[], Any], mag_ratios=None
) -> Any:
    """The diffusers hook config for ``config`` (``method`` is not ``none``)."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    if config.method == "first_block":
        return FirstBlockCacheConfig(threshold=config.first_block_threshold)
    if config.method == "mag":
        if mag_ratios is None:
            raise ValueError("mag needs the model's magnitude ratios (calibrate_mag_ratios)")
        return MagCacheConfig(
            threshold=config.mag_threshold,
            max_skip_steps=config.mag_max_skip_steps,
            retention_ratio=config.mag_retention_ratio,
            num_inference_steps=num_inference_steps,
            mag_ratios=list(mag_ratios),
        )
    if config.method == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=config.taylorseer_interval,
            disable_cache_before_step=config.taylorseer_warmup_steps,
            max_order=config.taylorseer_order,
            taylor_factors_dtype=torch.float32,  # bf16 factors lose the small differences it extrapolates
            # diffusers' default patterns ("^blocks.*attn", full match) miss Wan's attn1/attn2 names
            cache_identifiers=list(TAYLORSEER_WAN_MODULES),
        )
    if config.method == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=config.pab_skip_range,
            spatial_attention_timestep_skip_range=config.pab_timestep_range,
            current_timestep_callback=timestep_source,
        )
    if config.method == "sea":
        return SeaCacheConfig(threshold=config.sea_threshold)
    raise ValueError(f"no diffusers cache for method {config.method!r}")


@contextmanager
def record_mag_ratios(transformer: torch.nn.Module, passes_per_step: int) -> Iterator[list[float]]:
    """Per-step MagCache ratios of one uncached run through ``transformer`` (conditional passes).

    The residual is what the block stack adds to its input (last block's output minus the first
    block's input); the ratio of a step is the token-mean of |r_t| / |r_t-1|, as diffusers computes
    it in calibration mode. WanPipeline calls the conditional pass first in every step, then the
    unconditional one when guidance is on (``passes_per_step`` 2).
    """
    blocks: Any = transformer.blocks
    ratios: list[float] = []
    state: dict[str, Any] = {"input": None, "previous": None, "calls": 0}

    def before(_module, args, kwargs):
        state["input"] = args[0] if args else kwargs["hidden_states"]

    def after(_module, _args, _kwargs, output):
        state["calls"] += 1
        if (state["calls"] - 1) % passes_per_step:  # an unconditional pass: its ratios are not used
            return
        out = output[0] if isinstance(output, tuple) else output
        residual = (out - state["input"]).float()
        previous = state["previous"]
        if previous is None:
            ratios.append(1.0)
        else:
            norm, prev_norm = torch.linalg.norm(residual, dim=-1), torch.linalg.norm(previous, dim=-1)
            ratios.append(float((norm / (prev_norm + 1e-8)).mean()))
        state["previous"] = residual

    handles = [
        blocks[0].register_forward_pre_hook(before, with_kwargs=True),
        blocks[-1].register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield ratios
    finally:
        for handle in handles:
            handle.remove()


class TransformerViews:
    """Hooked transformer views, pooled per (setting, steps, scheduler); thread-safe."""

    def __init__(self, base: torch.nn.Module, prepare: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        self.base = base  # the loaded transformer, never hooked itself
        self.prepare = prepare  # e.g. regional torch.compile of a fresh view
        self._free: dict[tuple, list[TransformerView]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def borrow(
        self, key: tuple, make_config: Callable[[Callable[[], Any]], Any]
    ) -> Iterator[TransformerView]:
        """A view hooked with ``make_config(timestep_source)``, its cache state reset, for one call."""
        with self._lock:
            pool = self._free.setdefault(key, [])
            view = pool.pop() if pool else None
        if view is None:
            view = TransformerView.of(self.base, make_config, self.prepare)
        view.transformer._reset_stateful_cache()  # type: ignore[operator]
        try:
            yield view
        finally:
            view.timestep_source.pipe = None
            with self._lock:
                self._free[key].append(view)


@contextmanager
def count_linear_flops(transformer: torch.nn.Module) -> Iterator[FlopCount]:
    """FLOPs of the linear layers ``transformer`` runs inside the block (what a step cache saves).

    Linear layers are nearly all of a DiT's work at short sequences; attention's own matmuls are left
    out (so at 480p, where they are about a third, the fraction saved is understated). A forward hook
    per layer costs far less than a dispatch-level counter.
    """
    count = FlopCount()

    def counted(module: torch.nn.Linear, args: tuple, _output: Any) -> None:
        count.total += 2 * args[0].numel() * module.out_features  # tokens x in x out multiply-adds

    handles = [
        module.register_forward_hook(counted)
        for module in transformer.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class FlopCount:
    total: int = 0


# (prompt, seed, setting or None for uncached, sampler, frames) -> (latents, FLOPs executed)
CalibrationDenoise = Callable[[str, int, StepCacheConfig | None, tuple, int], tuple[torch.Tensor, int]]


class FidelityGate:
    """Measures a step-cache setting against the uncached output once, then admits or refuses it."""

    def __init__(self, denoise: CalibrationDenoise, decode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.denoise = denoise
        self.decode = decode  # latents -> frames in [-1, 1]
        self.verdicts: dict[tuple, GateVerdict] = {}
        # Uncached clips (latents, frames, FLOPs) by prompt, seed, sampler and length: every setting
        # measured at the same sampler is compared with the same reference, made once.
        self._references: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._lock = threading.Lock()  # one measurement at a time; the others wait for its verdict

    def verdict(self, config: StepCacheConfig, sampler: tuple) -> GateVerdict:
        """The measured verdict for ``config`` under ``sampler`` (scheduler, steps, ...): cached."""
        key = (
            describe_setting(config),
            config.min_psnr_db,
            config.max_latent_error,
            config.calibration_prompts,
            config.calibration_frames,
            sampler,
        )
        with self._lock:
            if key not in self.verdicts:
                self.verdicts[key] = self._measure(config, sampler)
            return self.verdicts[key]

    def check(self, config: StepCacheConfig, sampler: tuple) -> GateVerdict:
        """The verdict if it passed; else ``FidelityRefused`` with the figures."""
        verdict = self.verdict(config, sampler)
        if not verdict.passed:
            raise FidelityRefused(
                f"{verdict.describe()}: below the fidelity floor (PSNR >= {config.min_psnr_db:g} dB, "
                f"latent error <= {config.max_latent_error:g}); pick a lower threshold or another method",
                verdict,
            )
        return verdict

    def _measure(self, config: StepCacheConfig, sampler: tuple) -> GateVerdict:
        worst_psnr, worst_error, flops, flops_uncached = math.inf, 0.0, 0, 0
        frames = config.calibration_frames
        for seed, prompt in enumerate(CALIBRATION_PROMPTS[: config.calibration_prompts], start=1):
            clip = (prompt, seed, sampler, frames)
            if clip not in self._references:
                latents, made_flops = self.denoise(prompt, seed, None, sampler, frames)
                self._references[clip] = (latents, self.decode(latents), made_flops)
            reference, reference_frames, reference_flops = self._references[clip]
            cached, cached_flops = self.denoise(prompt, seed, config, sampler, frames)
            worst_error = max(worst_error, relative_error(reference, cached))
            worst_psnr = min(worst_psnr, psnr_db(reference_frames, self.decode(cached)))
            flops, flops_uncached = flops + cached_flops, flops_uncached + reference_flops
        return GateVerdict(
            setting=describe_setting(config),
            psnr_db=worst_psnr,
            latent_error=worst_error,
            compute_fraction=flops / flops_uncached if flops_uncached else 1.0,
            passed=worst_psnr >= config.min_psnr_db and worst_error <= config.max_latent_error,
        )
