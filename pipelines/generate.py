"""generate: Shot -> stream of LatentChunk, through a diffusers text-to-video pipeline.

Each shot is one ``WanPipeline`` call with ``output_type="latent"``: the denoiser (a full-attention
DiT) needs every latent frame of the shot at every step, so a shot's latents exist only once its
denoising loop ends. They leave at once, split along time into ``chunk_latent_frames`` pieces, so
the causal renderer can decode piece 0 while the next shot is still denoising.

Batching (``batch_max_shots`` > 1). Shots of the same shape, step count and guidance from videos
denoising at the same time go through one pipeline call as a batch (per-shot prompts and seeds), which
keeps a GPU busier than one shot at a time. A shot waits at most ``batch_wait_ms`` for partners, and
only while other videos are denoising. The noise of each shot comes from its own seeded generator,
so a batched shot's latents equal its unbatched ones up to float rounding (batched matmuls sum in
another order), not bit for bit; a shot with no partner is exactly the unbatched call.

Speed (pipelines/speed.py, pipelines/step_cache.py). A request's speed profile picks the step count,
the scheduler and the step cache; a cached setting runs on its own hooked view of the transformer
after passing the fidelity gate. Text-encoder outputs are kept per prompt, and the transformer's
repeated blocks can be compiled (``GenerateConfig.compile``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from .config import GenerateConfig, StepCacheConfig
from .presets import LoadedModel
from .shot_cache import ShotCache, model_fingerprint, shot_key
from .speed import SchedulerName, build_scheduler, speed_profile
from .step_cache import (
    CALIBRATION_PROMPTS,
    FidelityGate,
    FidelityRefused,
    GateVerdict,
    TransformerView,
    TransformerViews,
    count_linear_flops,
    describe_setting,
    diffusers_cache_config,
    record_mag_ratios,
    weight_sharing_copy,
)
from .types import MAX_GUIDANCE_SCALE, MAX_INFERENCE_STEPS, LatentChunk, Shot, StepCacheMethod, Storyboard

logger = logging.getLogger(__name__)

# Called after every denoising step: (shot index, step done, steps in total).
StepCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class GenerateSettings:
    """The knobs resolved for one request: config value, else the preset's default."""

    num_inference_steps: int
    guidance_scale: float
    chunk_latent_frames: int
    speed_profile: str = "quality"
    scheduler: SchedulerName = "default"
    step_cache: StepCacheConfig = field(default_factory=StepCacheConfig)
    step_cache_from: Literal["request", "profile", "config"] = "config"  # who chose the step cache

    @property
    def sampler(self) -> str:
        """Scheduler and step cache, as they enter cache keys; empty for the model's own sampler."""
        parts = [] if self.scheduler == "default" else [f"scheduler={self.scheduler}"]
        if self.step_cache.method != "none":
            parts.append(f"step_cache={describe_setting(self.step_cache)}")
        return ";".join(parts)


# Everything that must match for shots to share a batch (one pipeline call): height, width, frames,
# steps, guidance, scheduler and step cache.
BatchKey = tuple[int, int, int, int, float, SchedulerName, StepCacheConfig]
_NO_STEP_CACHE = StepCacheConfig()


class PromptEmbeddings:
    """Text-encoder outputs by prompt, LRU within a byte budget; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, prompt: str, max_length: int, encode: Callable[[str], torch.Tensor]) -> torch.Tensor:
        key = (prompt, max_length)
        with self._lock:
            embeds = self._entries.get(key)
            if embeds is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return embeds
            self.misses += 1
        embeds = encode(prompt)  # outside the lock: encoding is the slow part
        size = embeds.numel() * embeds.element_size()
        with self._lock:
            if key not in self._entries and size <= self.max_bytes:
                self._entries[key] = embeds
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self.bytes -= dropped.numel() * dropped.element_size()
        return embeds


@dataclass(eq=False)
class _ShotCall:
    """One shot waiting in the batcher, and where its result goes."""

    key: BatchKey
    prompt: str
    negative_prompt: str
    seed: int
    shot_index: int
    on_step: StepCallback | None
    done: threading.Event = field(default_factory=threading.Event)
    latents: torch.Tensor | None = None
    error: BaseException | None = None


class _AllStopped(Exception):
    """Every shot of a batch was cancelled by its caller: stop the denoising loop."""


class ShotBatcher:
    """Collects shots from concurrent ``generate`` calls and denoises same-shaped ones in one batch."""

    def __init__(self, generator: LatentGenerator, max_batch: int, max_wait_s: float) -> None:
        self.generator = generator
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.active_streams = 0  # generate() calls under way: partners worth waiting for
        self.batches: dict[int, int] = {}  # batch size -> pipeline calls made with it
        self._pending: list[_ShotCall] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """A ``generate`` call under way: while it lasts, its next shot is worth waiting for."""
        with self._cond:
            self.active_streams += 1
        try:
            yield
        finally:
            with self._cond:
                self.active_streams -= 1
                self._cond.notify_all()  # a shot waiting for this stream's partner stops waiting

    def denoise(self, call: _ShotCall) -> torch.Tensor:
        """Block the calling thread until its shot is denoised (alone or with partners)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shot-batcher", daemon=True)
                self._thread.start()
            self._pending.append(call)
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.latents is not None
        return call.latents

    def _take(self) -> list[_ShotCall]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            first = self._pending[0]
            deadline = time.monotonic() + self.max_wait_s
            while True:
                batch = [call for call in self._pending if call.key == first.key][: self.max_batch]
                left = deadline - time.monotonic()
                # Waiting only pays while other streams may still send a shot of this shape.
                if len(batch) >= min(self.max_batch, self.active_streams) or left <= 0:
                    break
                self._cond.wait(left)
            for call in batch:
                self._pending.remove(call)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            self.batches[len(batch)] = self.batches.get(len(batch), 0) + 1
            try:
                latents = self.generator._denoise_batch(batch)
                for index, call in enumerate(batch):
                    call.latents = latents[index : index + 1]
            except BaseException as exc:  # noqa: BLE001 - each caller re-raises it in its own thread
                for call in batch:
                    call.error = call.error or exc
            finally:
                for call in batch:
                    call.done.set()


class LatentGenerator:
    """Denoises the shots of a storyboard and streams their latents out chunk by chunk."""

    def __init__(self, model: LoadedModel, config: GenerateConfig | None = None) -> None:
        self.model = model
        self.config = config or GenerateConfig()
        pipe = model.pipe
        self._spatial_multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        self._temporal_factor = pipe.vae_scale_factor_temporal
        self.batcher = (
            ShotBatcher(self, self.config.batch_max_shots, self.config.batch_wait_ms / 1000)
            if self.config.batch_max_shots > 1
            else None
        )
        cache = self.config.shot_cache
        self.cache = ShotCache(cache) if cache.enabled or cache.shared_shots else None
        self._fingerprint: str | None = None  # of the model, for cache keys: computed on first use
        # The loaded transformer stays unhooked; uncached calls share one (compiled) copy of it, and
        # each step-cache setting gets hooked views of it (pipelines/step_cache.py).
        self._base_transformer = pipe.transformer
        self._plain_transformer = (
            self._prepare(weight_sharing_copy(pipe.transformer))
            if self.config.compile.enabled
            else pipe.transformer
        )
        self.views = TransformerViews(pipe.transformer, self._prepare_hooked)
        self.gate = FidelityGate(self._calibration_denoise, self._decode)
        self.prompt_embeddings = (
            PromptEmbeddings(self.config.prompt_cache_bytes) if self.config.prompt_cache_bytes else None
        )
        self._schedulers: dict[SchedulerName, object] = {"default": pipe.scheduler}
        self._mag_ratios: dict[tuple[SchedulerName, int], list[float]] = {}
        self._mag_lock = threading.Lock()

    def _prepare(self, transformer: torch.nn.Module, fullgraph: bool | None = None) -> torch.nn.Module:
        """A fresh transformer copy, compiled block by block when configured."""
        compile_config = self.config.compile
        if compile_config.enabled:
            transformer.compile_repeated_blocks(  # type: ignore[operator]
                fullgraph=compile_config.fullgraph if fullgraph is None else fullgraph,
                mode=compile_config.mode,
                dynamic=False,
            )
        return transformer

    def _prepare_hooked(self, transformer: torch.nn.Module) -> torch.nn.Module:
        # A cache hook decides in Python whether a block runs: that is a graph break by design.
        return self._prepare(transformer, fullgraph=False)

    def settings(
        self,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        speed_profile_name: str | None = None,
        step_cache: StepCacheMethod | None = None,
    ) -> GenerateSettings:
        """Per-request value, else the speed profile's, else the config's, else the preset's default.

        Steps: the request's, else the profile's share of the default (the config's, else the
        preset's). Step cache: the request's method, else the profile's, else the config's; the
        thresholds and gate floors come from the config unless the profile sets them.
        """
        preset = self.model.preset
        if guidance_scale is not None:
            if not 0.0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
                raise ValueError(f"guidance_scale must be in 0..{MAX_GUIDANCE_SCALE:g}, got {guidance_scale}")
            guidance = guidance_scale
        elif self.config.guidance_scale is not None:
            guidance = self.config.guidance_scale
        else:
            guidance = preset.default_guidance
        profile = speed_profile(speed_profile_name or self.config.speed_profile)
        default_steps = self.config.num_inference_steps or preset.default_steps
        cache_config = self.config.step_cache
        chosen_by: Literal["request", "profile", "config"] = "config"
        if step_cache is not None:
            cache_config = cache_config.model_copy(update={"method": step_cache})
            chosen_by = "request"
        elif profile.step_cache is not None:
            cache_config = cache_config.model_copy(
                update={"method": profile.step_cache, **dict(profile.step_cache_overrides)}
            )
            chosen_by = "profile"
        if cache_config.method == "none":
            cache_config = _NO_STEP_CACHE  # one value, so uncached shots batch together
        return GenerateSettings(
            num_inference_steps=num_inference_steps or profile.steps(default_steps),
            guidance_scale=guidance,
            chunk_latent_frames=self.config.chunk_latent_frames,
            speed_profile=profile.name,
            scheduler=profile.scheduler,
            step_cache=cache_config,
            step_cache_from=chosen_by,
        )

    def gated(self, settings: GenerateSettings) -> GenerateSettings:
        """``settings`` once its step cache passed the fidelity gate (measured on first use).

        A step cache the request asked for is refused with the figures (``FidelityRefused``); one a
        profile or the config chose is dropped with a warning, so a profile switched on for a sales
        event never fails videos: they are made uncached instead.
        """
        cache = settings.step_cache
        if cache.method == "none" or not cache.gate:
            return settings
        try:
            self.check_step_cache(cache, settings.scheduler, settings.num_inference_steps)
        except FidelityRefused as exc:
            if settings.step_cache_from == "request":
                raise
            logger.warning("%s; the %s's step cache is off for this shot", exc, settings.step_cache_from)
            return dataclasses.replace(settings, step_cache=_NO_STEP_CACHE)
        return settings

    def check_inputs(self, storyboard: Storyboard, num_inference_steps: int | None = None) -> None:
        """Reject what this model cannot produce exactly; never round a planned value."""
        for name in ("width", "height"):
            value = getattr(storyboard, name)
            if value % self._spatial_multiple:
                raise ValueError(
                    f"{name}={value} must be a multiple of {self._spatial_multiple} for this model"
                )
        for shot in storyboard.shots:
            if (shot.num_frames - 1) % self._temporal_factor:
                raise ValueError(
                    f"shots[{shot.index}].num_frames={shot.num_frames} must be "
                    f"{self._temporal_factor}k+1 for this model"
                )
        if num_inference_steps is not None and not 1 <= num_inference_steps <= MAX_INFERENCE_STEPS:
            raise ValueError(
                f"num_inference_steps must be in 1..{MAX_INFERENCE_STEPS}, got {num_inference_steps}"
            )

    def generate(
        self,
        storyboard: Storyboard,
        *,
        request_id: str,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        on_step: StepCallback | None = None,
        start_shot: int = 0,
        end_shot: int | None = None,
        speed_profile: str | None = None,
        step_cache: StepCacheMethod | None = None,
    ) -> Iterator[LatentChunk]:
        """Shots ``start_shot`` to ``end_shot`` (exclusive; None: the last), in order; chunks of one
        shot leave as soon as it is denoised.

        A range other than the whole storyboard resumes a video whose earlier shots were already
        generated (a serving replica died mid-stream), or makes one shot of a video whose shots are
        denoised in parallel: shots are seeded one by one, so the shots generated here equal those of
        a run from shot 0, with the same indices and ``is_last_shot``.
        """
        self.check_inputs(storyboard, num_inference_steps)
        self.settings(num_inference_steps, guidance_scale, speed_profile, step_cache)  # a bad name fails here
        count = len(storyboard.shots)
        end_shot = count if end_shot is None else end_shot
        if not 0 <= start_shot < end_shot <= count:
            raise ValueError(
                f"need 0 <= start_shot < end_shot <= {count}, got start_shot {start_shot}, "
                f"end_shot {end_shot}"
            )
        with self.batcher.stream() if self.batcher is not None else contextlib.nullcontext():
            for shot in storyboard.shots[start_shot:end_shot]:
                yield from self.generate_shot(
                    storyboard,
                    shot,
                    request_id=request_id,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    on_step=on_step,
                    speed_profile=speed_profile,
                    step_cache=step_cache,
                )

    def _pipe_for_one_call(self, scheduler: SchedulerName = "default"):  # -> the diffusers pipeline
        # A diffusers pipeline keeps per-call state on itself and on its scheduler (timesteps, step
        # index, guidance), so two threads calling one pipeline corrupt each other. A shallow copy with
        # its own scheduler shares the weights (read-only at inference) and isolates that state.
        if scheduler not in self._schedulers:
            self._schedulers[scheduler] = build_scheduler(scheduler, self.model.pipe.scheduler)
        pipe = copy.copy(self.model.pipe)
        pipe.scheduler = copy.deepcopy(self._schedulers[scheduler])
        pipe.transformer = self._plain_transformer
        return pipe

    def _denoise_alone(self, call: _ShotCall) -> torch.Tensor:
        """One shot, on the calling thread: a batch of one, which is exactly the plain pipeline call."""
        try:
            return self._denoise_batch([call])
        except _AllStopped:
            assert call.error is not None  # its step callback raised: that is the caller's to see
            raise call.error from None

    @torch.inference_mode()
    def _denoise_batch(self, batch: list[_ShotCall]) -> torch.Tensor:
        """One pipeline call for shots that share ``_ShotCall.key`` (on the batcher's thread)."""
        height, width, num_frames, steps, guidance, scheduler, step_cache = batch[0].key

        def step_end(_pipe, step: int, _timestep, callback_kwargs):
            for call in batch:
                if call.error is None and call.on_step is not None:
                    try:
                        call.on_step(call.shot_index, step + 1, steps)
                    except BaseException as exc:  # noqa: BLE001 - this caller stopped; the others go on
                        call.error = exc
            if all(call.error is not None for call in batch):
                raise _AllStopped
            return callback_kwargs

        return self._run_pipeline(
            [call.prompt for call in batch],
            [call.negative_prompt for call in batch],
            [call.seed for call in batch],
            (height, width, num_frames, steps, guidance, scheduler, step_cache),
            callback=step_end,
        )

    def _run_pipeline(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        key: BatchKey,
        callback: Callable | None = None,
        view: TransformerView | None = None,
    ) -> torch.Tensor:
        """The diffusers call itself: latents of each prompt, with the key's scheduler and step cache
        (or on ``view`` as it is, hooked or not: the gate's own copies)."""
        height, width, num_frames, steps, guidance, scheduler, step_cache = key
        pipe = self._pipe_for_one_call(scheduler)
        text = self._text_inputs(pipe, prompts, negative_prompts, guidance)
        if view is not None:
            view.timestep_source.pipe = pipe
            pipe.transformer = view.transformer
            step_cache = _NO_STEP_CACHE
        with self._transformer_for(pipe, step_cache, scheduler, steps):
            return pipe(
                **text,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator(device=self.model.device).manual_seed(seed) for seed in seeds],
                output_type="latent",
                max_sequence_length=self.model.preset.max_sequence_length,
                callback_on_step_end=callback,
            ).frames

    def _text_inputs(self, pipe, prompts: list[str], negative_prompts: list[str], guidance: float) -> dict:
        """Prompt embeddings from the per-prompt cache, or the prompts themselves when it is off."""
        if self.prompt_embeddings is None:
            return {"prompt": prompts, "negative_prompt": negative_prompts}
        length = self.model.preset.max_sequence_length

        def encode(prompt: str) -> torch.Tensor:
            embeds, _ = pipe.encode_prompt(
                prompt=prompt,
                do_classifier_free_guidance=False,
                max_sequence_length=length,
                device=self.model.device,
            )
            return embeds

        def embeds(texts: list[str]) -> torch.Tensor:
            return torch.cat([self.prompt_embeddings.get(text, length, encode) for text in texts])  # type: ignore[union-attr]

        inputs = {"prompt_embeds": embeds(prompts)}
        if guidance > 1.0:  # WanPipeline runs the unconditional pass only then
            inputs["negative_prompt_embeds"] = embeds(negative_prompts)
        return inputs

    @contextlib.contextmanager
    def _transformer_for(
        self, pipe, step_cache: StepCacheConfig, scheduler: SchedulerName, steps: int
    ) -> Iterator[None]:
        """Run ``pipe`` on a view hooked with ``step_cache`` (its own, for this call), or plainly."""
        if step_cache.method == "none":
            yield
            return
        key = (describe_setting(step_cache), scheduler, steps)
        with self.views.borrow(key, self._cache_config_maker(step_cache, scheduler, steps)) as view:
            view.timestep_source.pipe = pipe
            pipe.transformer = view.transformer
            yield

    def _cache_config_maker(
        self, step_cache: StepCacheConfig, scheduler: SchedulerName, steps: int
    ) -> Callable[[Callable[[], object]], object]:
        """timestep source -> the diffusers hook config of ``step_cache`` at this sampler."""
        mag_ratios = self._mag_ratios_for(scheduler, steps) if step_cache.method == "mag" else None
        return lambda timestep_source: diffusers_cache_config(step_cache, steps, timestep_source, mag_ratios)

    def check_step_cache(
        self, step_cache: StepCacheConfig, scheduler: SchedulerName, steps: int
    ) -> GateVerdict:
        """The gate's verdict on a setting (measured on first use); ``FidelityRefused`` below the floors."""
        return self.gate.check(step_cache, (scheduler, steps))

    def _calibration_key(
        self,
        scheduler: SchedulerName,
        steps: int,
        frames: int = 9,
        step_cache: StepCacheConfig = _NO_STEP_CACHE,
    ) -> BatchKey:
        """A calibration clip at the model's default size, guidance and ``frames`` (rounded to 4k+1)."""
        size = self.model.preset.default_size
        frames -= (frames - 1) % self._temporal_factor
        guidance = self.model.preset.default_guidance
        return (size.height, size.width, frames, steps, guidance, scheduler, _NO_STEP_CACHE)

    def _calibration_denoise(
        self, prompt: str, seed: int, step_cache: StepCacheConfig | None, sampler: tuple, frames: int
    ) -> tuple[torch.Tensor, int]:
        """One calibration clip, with ``step_cache`` or uncached, and the linear-layer FLOPs it ran.

        Both run on copies of the transformer of their own, uncompiled: serving calls never see the
        gate's counters, and a compiled denoiser equals the eager one within float tolerance.
        """
        scheduler, steps = sampler
        key = self._calibration_key(scheduler, steps, frames)
        if step_cache is None:
            view = TransformerView.of(self._base_transformer)
        else:
            view = TransformerView.of(
                self._base_transformer, self._cache_config_maker(step_cache, scheduler, steps)
            )
        with count_linear_flops(view.transformer) as flops:
            latents = self._run_pipeline([prompt], [""], [seed], key, view=view)
        return latents, flops.total

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1] of whole-clip latents, decoded as WanPipeline does (the gate's PSNR)."""
        vae = self.model.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        return vae.decode(latents.to(vae.dtype) / inv_std + mean, return_dict=False)[0].float().cpu()

    def _mag_ratios_for(self, scheduler: SchedulerName, steps: int) -> list[float]:
        """MagCache's per-step ratios for this model, scheduler and step count: measured once."""
        with self._mag_lock:
            if (scheduler, steps) not in self._mag_ratios:
                view = TransformerView.of(self._base_transformer)  # never hook a shared module
                key = self._calibration_key(scheduler, steps, self.config.step_cache.calibration_frames)
                passes = 2 if key[4] > 1.0 else 1  # guidance on: a conditional and an unconditional pass
                with record_mag_ratios(view.transformer, passes) as ratios, torch.inference_mode():
                    self._run_pipeline([CALIBRATION_PROMPTS[0]], [""], [1], key, view=view)
                self._mag_ratios[(scheduler, steps)] = list(ratios)
            return self._mag_ratios[(scheduler, steps)]

    @torch.inference_mode()
    def generate_shot(
        self,
        storyboard: Storyboard,
        shot: Shot,
        *,
        request_id: str,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        on_step: StepCallback | None = None,
        speed_profile: str | None = None,
        step_cache: StepCacheMethod | None = None,
    ) -> Iterator[LatentChunk]:
        settings = self.gated(self.settings(num_inference_steps, guidance_scale, speed_profile, step_cache))

        # 1. Denoise the whole shot (seeded per shot: same storyboard, same latents), alone or batched
        #    with same-shaped shots of other videos that use the same sampler.
        started = time.perf_counter()
        call = _ShotCall(
            (
                storyboard.height,
                storyboard.width,
                shot.num_frames,
                settings.num_inference_steps,
                settings.guidance_scale,
                settings.scheduler,
                settings.step_cache,
            ),
            shot.prompt,
            shot.negative_prompt or "",
            shot.seed,
            shot.index,
            on_step,
        )

        def denoise() -> torch.Tensor:
            return self.batcher.denoise(call) if self.batcher is not None else self._denoise_alone(call)

        cacheable = self.cache is not None and (self.config.shot_cache.enabled or shot.shared)
        key = self._cache_key(call, settings.sampler) if cacheable else None
        if self.cache is not None and key is not None:
            latents, cached = self.cache.get_or_make(key, denoise)
        else:
            latents, cached = denoise(), False
        if cached:  # the cache keeps latents on the CPU
            latents = latents.to(self.model.device)
            if on_step is not None:  # progress still reaches the end of the shot's steps
                on_step(shot.index, settings.num_inference_steps, settings.num_inference_steps)
        denoise_s = time.perf_counter() - started

        # 2. Stream the shot out along time; the renderer decodes causally, chunk by chunk.
        total = latents.shape[2]
        if total != shot.num_latent_frames:
            raise RuntimeError(
                f"model returned {total} latent frames for shot {shot.index}, expected "
                f"{shot.num_latent_frames}"
            )
        step = settings.chunk_latent_frames
        is_last_shot = shot.index == len(storyboard.shots) - 1
        for chunk_index, start in enumerate(range(0, total, step)):
            end = min(start + step, total)
            yield LatentChunk(
                request_id=request_id,
                shot_index=shot.index,
                chunk_index=chunk_index,
                latent_start=start,
                latent_end=end,
                latents=latents[:, :, start:end].contiguous(),
                is_last=end == total,
                is_last_shot=is_last_shot,
                timings={"denoise_s": denoise_s if chunk_index == 0 else 0.0, "cached": float(cached)},
                cache_key=key,
            )

    def _cache_key(self, call: _ShotCall, sampler: str) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model.pipe, self.model.device.type)
        height, width, num_frames, steps, guidance, _, _ = call.key
        return shot_key(
            self._fingerprint,
            prompt=call.prompt,
            negative_prompt=call.negative_prompt,
            seed=call.seed,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            sampler=sampler,
        )
