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
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .config import GenerateConfig
from .presets import LoadedModel
from .shot_cache import ShotCache, model_fingerprint, shot_key
from .types import MAX_GUIDANCE_SCALE, MAX_INFERENCE_STEPS, LatentChunk, Shot, Storyboard

# Called after every denoising step: (shot index, step done, steps in total).
StepCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class GenerateSettings:
    """The knobs resolved for one request: config value, else the preset's default."""

    num_inference_steps: int
    guidance_scale: float
    chunk_latent_frames: int


@dataclass(eq=False)
class _ShotCall:
    """One shot waiting in the batcher, and where its result goes."""

    key: tuple[int, int, int, int, float]  # what must match to share a batch: h, w, frames, steps, cfg
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

    def settings(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None
    ) -> GenerateSettings:
        """Per-request value, else the config's, else the preset's default."""
        preset = self.model.preset
        if guidance_scale is not None:
            if not 0.0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
                raise ValueError(f"guidance_scale must be in 0..{MAX_GUIDANCE_SCALE:g}, got {guidance_scale}")
            guidance = guidance_scale
        elif self.config.guidance_scale is not None:
            guidance = self.config.guidance_scale
        else:
            guidance = preset.default_guidance
        return GenerateSettings(
            num_inference_steps=num_inference_steps
            or self.config.num_inference_steps
            or preset.default_steps,
            guidance_scale=guidance,
            chunk_latent_frames=self.config.chunk_latent_frames,
        )

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
    ) -> Iterator[LatentChunk]:
        """Shots ``start_shot`` to ``end_shot`` (exclusive; None: the last), in order; chunks of one
        shot leave as soon as it is denoised.

        A range other than the whole storyboard resumes a video whose earlier shots were already
        generated (a serving replica died mid-stream), or makes one shot of a video whose shots are
        denoised in parallel: shots are seeded one by one, so the shots generated here equal those of
        a run from shot 0, with the same indices and ``is_last_shot``.
        """
        self.check_inputs(storyboard, num_inference_steps)
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
                )

    def _pipe_for_one_call(self):  # -> the diffusers pipeline, isolated for one call
        # A diffusers pipeline keeps per-call state on itself and on its scheduler (timesteps, step
        # index, guidance), so two threads calling one pipeline corrupt each other. A shallow copy with
        # its own scheduler shares the weights (read-only at inference) and isolates that state.
        pipe = copy.copy(self.model.pipe)
        pipe.scheduler = copy.deepcopy(self.model.pipe.scheduler)
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
        height, width, num_frames, steps, guidance = batch[0].key
        pipe = self._pipe_for_one_call()

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

        return pipe(
            prompt=[call.prompt for call in batch],
            negative_prompt=[call.negative_prompt for call in batch],
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator(device=self.model.device).manual_seed(call.seed) for call in batch],
            output_type="latent",
            max_sequence_length=self.model.preset.max_sequence_length,
            callback_on_step_end=step_end,
        ).frames

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
    ) -> Iterator[LatentChunk]:
        settings = self.settings(num_inference_steps, guidance_scale)

        # 1. Denoise the whole shot (seeded per shot: same storyboard, same latents), alone or batched
        #    with same-shaped shots of other videos.
        started = time.perf_counter()
        call = _ShotCall(
            (
                storyboard.height,
                storyboard.width,
                shot.num_frames,
                settings.num_inference_steps,
                settings.guidance_scale,
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
        key = self._cache_key(call) if cacheable else None
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

    def _cache_key(self, call: _ShotCall) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model.pipe, self.model.device.type)
        height, width, num_frames, steps, guidance = call.key
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
        )
