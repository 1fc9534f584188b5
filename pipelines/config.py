"""Configuration: one small model per concern, joined into ``PipelineConfig``.

Every field has a default, bounds and a one-line doc (the ``description``). Configs are frozen and
forbid unknown keys, so a typo in a config file is an error rather than a silently ignored value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .types import MAX_GUIDANCE_SCALE, MAX_INFERENCE_STEPS, SpeedProfileName, StepCacheMethod


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Config):
    preset: str = Field(
        default="tiny",
        min_length=1,
        description="a preset name (`shopreel presets`) or a local diffusers checkpoint directory",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto picks cuda when available, else cpu",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="transformer/text-encoder dtype; auto: bfloat16 on cuda, float32 on cpu"
    )
    vae_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="VAE decoder dtype (Wan recommends float32 for fidelity)"
    )


class ShotCacheConfig(_Config):
    """Denoised shots reused across requests, variants and replicas (pipelines/shot_cache.py)."""

    enabled: bool = Field(default=False, description="look every shot up before denoising it, keep new ones")
    shared_shots: bool = Field(
        default=True,
        description="cache the shots a variant fan-out marks shared (Shot.shared) even with `enabled` off",
    )
    memory_bytes: int = Field(
        default=256 * 2**20, ge=0, le=2**40, description="latents kept in each generator process's memory"
    )
    directory: Path | None = Field(
        default=None, description="a directory shared by the replicas that mount it; None: memory only"
    )
    disk_bytes: int = Field(default=4 * 2**30, ge=0, le=2**50, description="bytes of latents kept on disk")


class StepCacheConfig(_Config):
    """Training-free step caching on the denoiser (diffusers hooks), behind a fidelity gate.

    Each method reuses work of earlier denoising steps where the model's activations barely change;
    the thresholds trade speed for fidelity. ``gate`` compares a setting's output with the uncached
    one on calibration prompts before its first use and refuses it below the floors.
    """

    method: StepCacheMethod = Field(
        default="none",
        description="none; first_block (FirstBlockCache), mag (MagCache), taylorseer (TaylorSeer), pab "
        "(Pyramid Attention Broadcast), sea (SeaCache)",
    )
    first_block_threshold: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="first_block: skip the other blocks while the first block's output changes by less "
        "than this (relative mean absolute difference); higher: faster, less faithful",
    )
    mag_threshold: float = Field(
        default=0.06,
        ge=0.0,
        le=1.0,
        description="mag: skip while the accumulated residual-magnitude error stays under this",
    )
    mag_max_skip_steps: int = Field(
        default=3, ge=1, le=20, description="mag: consecutive steps skipped at most"
    )
    mag_retention_ratio: float = Field(
        default=0.2, ge=0.0, le=1.0, description="mag: share of the first steps never skipped"
    )
    taylorseer_interval: int = Field(
        default=3, ge=2, le=20, description="taylorseer: one full step every this many; the others predicted"
    )
    taylorseer_warmup_steps: int = Field(
        default=3, ge=1, le=50, description="taylorseer: first steps always computed (fit the Taylor series)"
    )
    taylorseer_order: int = Field(default=1, ge=1, le=3, description="taylorseer: order of the Taylor series")
    pab_skip_range: int = Field(
        default=2, ge=2, le=10, description="pab: self-attention recomputed every this many steps"
    )
    pab_timestep_range: tuple[int, int] = Field(
        default=(100, 800),
        description="pab: broadcast attention only while the timestep (0..1000) is inside this range",
    )
    sea_threshold: float = Field(
        default=0.25,
        ge=0.0,
        le=5.0,
        description="sea: accumulated relative change allowed before a full step",
    )
    gate: bool = Field(
        default=True, description="refuse a setting whose output misses the floors against the uncached one"
    )
    min_psnr_db: float = Field(
        default=30.0, ge=0.0, le=100.0, description="gate: PSNR of decoded frames vs the uncached output"
    )
    max_latent_error: float = Field(
        default=0.15,
        ge=0.0,
        le=10.0,
        description="gate: relative L2 error of the latents vs the uncached ones",
    )
    calibration_prompts: int = Field(
        default=2, ge=1, le=8, description="gate: built-in product prompts the setting is measured on"
    )
    calibration_frames: int = Field(
        default=9, ge=1, le=81, description="gate: frames of each calibration clip (4k+1 for Wan)"
    )

    @model_validator(mode="after")
    def _check_pab_range(self) -> StepCacheConfig:
        low, high = self.pab_timestep_range
        if not 0 <= low < high <= 1000:
            raise ValueError(
                f"pab_timestep_range must be (low, high) with 0 <= low < high <= 1000, got {low, high}"
            )
        return self


class CompileConfig(_Config):
    """torch.compile of the denoiser's repeated blocks (regional compilation, as diffusers recommends)."""

    enabled: bool = Field(default=False, description="compile each transformer block once, reused by all")
    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        default="default",
        description="torch.compile mode; reduce-overhead adds CUDA graphs (static shapes, CUDA only)",
    )
    fullgraph: bool = Field(default=True, description="fail on graph breaks instead of silently splitting")


class GenerateConfig(_Config):
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=MAX_INFERENCE_STEPS, description="denoising steps; None: the preset's default"
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_GUIDANCE_SCALE,
        description="classifier-free guidance; None: the preset's default",
    )
    chunk_latent_frames: int = Field(
        default=2, ge=1, le=41, description="latent frames per LatentChunk handed to the renderer"
    )
    batch_max_shots: int = Field(
        default=1,
        ge=1,
        le=16,
        description="shots of the same shape from concurrent videos denoised in one batch; 1: no batching",
    )
    batch_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="how long a shot waits for batch partners, only while other videos are denoising",
    )
    shot_cache: ShotCacheConfig = Field(
        default_factory=ShotCacheConfig, description="reuse denoised shots: variants' shared ones, or all"
    )
    speed_profile: SpeedProfileName = Field(
        default="quality",
        description="steps, scheduler and step cache for requests that name none (pipelines/speed.py)",
    )
    step_cache: StepCacheConfig = Field(
        default_factory=StepCacheConfig, description="step caching: method, thresholds and its fidelity gate"
    )
    compile: CompileConfig = Field(default_factory=CompileConfig, description="torch.compile of the denoiser")
    prompt_cache_bytes: int = Field(
        default=256 * 2**20,
        ge=0,
        le=2**40,
        description="text-encoder outputs kept per prompt, on the model's device (a campaign repeats "
        "prompts; 4 MiB each for Wan 2.1 in bf16); 0: encode every time",
    )


class RenderConfig(_Config):
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = Field(
        default="auto", description="decoder backend; auto: onnxruntime when it imports and passes its check"
    )
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field(
        default="fp32", description="decoder precision (int8 needs a calibrated model: shopreel quantize)"
    )
    torch_compile: bool = Field(
        default=False, description="torch backend: torch.compile the decoder (first frames pay compile time)"
    )
    min_psnr_db: float = Field(
        default=35.0, ge=10.0, le=100.0, description="fidelity floor vs the fp32 torch reference"
    )
    cache_dir: Path | None = Field(
        default=None, description="exported graphs; None: $SHOPREEL_CACHE_DIR/onnx or ~/.cache/shopreel/onnx"
    )
    frame_cache_bytes: int = Field(
        default=512 * 2**20,
        ge=0,
        le=2**40,
        description="decoded frames of cached shots kept per renderer process (LRU); 0: decode every time",
    )


class PlannerConfig(_Config):
    kind: Literal["template", "llm"] = Field(default="template", description="storyboard planner")
    llm_path: Path | None = Field(
        default=None, description="local transformers causal-LM directory for kind='llm'"
    )
    max_new_tokens: int = Field(default=768, ge=16, le=4096, description="LLM output budget")
    max_feature_shots: int = Field(default=3, ge=0, le=8, description="selling-point shots at most")
    crossfade_s: float = Field(default=0.25, ge=0.0, le=1.0, description="crossfade length; 0: all cuts")
    personalisation: Literal["embedding", "keywords"] = Field(
        default="embedding",
        description="rank selling points by meaning (sentence embeddings; English briefs) or by shared words",
    )
    min_similarity: float = Field(
        default=0.2,
        ge=-1.0,
        le=1.0,
        description="a selling point this close (cosine) to an interest is moved ahead of the others",
    )


class NarrationConfig(_Config):
    """Spoken captions (pipelines/narration.py), for briefs that ask for narration."""

    engine: str = Field(
        default="espeak-ng", min_length=1, description="text-to-speech executable (espeak-ng CLI)"
    )
    words_per_minute: int = Field(
        default=160,
        ge=80,
        le=300,
        description="speaking rate; a caption too long for its shot is spoken faster",
    )
    voice_volume: float = Field(default=0.8, ge=0.0, le=1.0, description="gain of the voice")
    duck_to: float = Field(
        default=0.3, ge=0.0, le=1.0, description="music level while the voice speaks (0.3: about -10 dB)"
    )
    ramp_s: float = Field(default=0.15, ge=0.0, le=2.0, description="how fast the music dips and comes back")
    hold_s: float = Field(
        default=0.3, ge=0.0, le=2.0, description="the music stays down over pauses this short"
    )
    lead_s: float = Field(
        default=0.15, ge=0.0, le=2.0, description="the voice starts this long after its shot"
    )
    gap_s: float = Field(default=0.1, ge=0.0, le=2.0, description="quiet left before the next shot starts")


class ComposeConfig(_Config):
    crf: int = Field(default=23, ge=0, le=51, description="x264 constant rate factor (lower: better)")
    x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = Field(
        default="veryfast", description="x264 speed/size trade-off"
    )
    keyframe_interval_s: float = Field(
        default=0.5, ge=0.1, le=5.0, description="seconds between keyframes; each starts an fMP4 fragment"
    )
    audio_sample_rate: int = Field(default=44100, ge=8000, le=48000, description="AAC sample rate")
    audio_bitrate: int = Field(default=128_000, ge=32_000, le=320_000, description="AAC bit rate")
    music_volume: float = Field(default=0.25, ge=0.0, le=1.0, description="background-bed peak level")
    font_path: Path | None = Field(
        default=None, description="TrueType/OpenType font; None: bundled Noto Sans CJK (zh + en)"
    )
    narration: NarrationConfig = Field(
        default_factory=NarrationConfig, description="spoken captions, for briefs with narration: true"
    )
    pixel_conversion: Literal["encoder", "kernel"] = Field(
        default="encoder",
        description="RGB -> yuv420p by FFmpeg's swscale, or by kernels.yuv420 (same bytes; slower on CPU)",
    )
    min_height: int = Field(
        default=0,
        ge=0,
        le=1080,
        description="smaller frames are enlarged by a whole factor (bicubic) before overlays; 0: never",
    )


class ComplianceConfig(_Config):
    """Advertising-law checks on every brief and storyboard (pipelines/compliance.py)."""

    enabled: bool = Field(default=True, description="check briefs and storyboards before any model work")
    default_policy: Literal["reject", "rewrite"] = Field(
        default="reject", description="for briefs that do not say: refuse with 400, or rewrite the terms"
    )
    extra_banned_terms: list[str] = Field(
        default_factory=list, max_length=1000, description="more absolute-claim terms (dropped on rewrite)"
    )
    extra_prohibited_goods: list[str] = Field(
        default_factory=list, max_length=1000, description="more goods no video may advertise"
    )


class QualityConfig(_Config):
    """Thresholds that flag a finished video (pipelines/quality.py); the numbers are always reported."""

    enabled: bool = Field(
        default=True,
        description="score every finished video (decodes it once more: ~0.8 s of CPU for 10 s at 832x480)",
    )
    analysis_side: int = Field(
        default=256, ge=32, le=4096, description="frames are box-downscaled to at most this longer side"
    )
    max_flicker: float = Field(
        default=0.02,
        ge=0.0,
        le=2.0,
        description="5-frame median |2nd difference| of mean luma (0..1); 0.02: a 1% flip every frame",
    )
    min_ssim: float = Field(
        default=0.7,
        ge=-1.0,
        le=1.0,
        description="mean SSIM of consecutive frames; coherent footage scores above ~0.8, noise about 0",
    )
    max_black_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0, description="share of black frames allowed (a short fade to black)"
    )
    max_frozen_run_s: float = Field(
        default=1.0, ge=0.0, le=60.0, description="longest still picture allowed, seconds (a stalled shot)"
    )
    min_caption_contrast: float = Field(
        default=4.5, ge=1.0, le=21.0, description="WCAG 2.x contrast of caption text on its band (AA: 4.5)"
    )
    min_caption_relevance: float = Field(
        default=0.2,
        ge=-1.0,
        le=1.0,
        description="cosine similarity of a shot's caption to its prompt (sentence embeddings, English)",
    )
    loudness_range_lufs: tuple[float, float] = Field(
        default=(-24.0, -10.0),
        description="BS.1770 integrated loudness allowed: below broadcast's -23 a clip sounds weak on a "
        "phone; above -10 it is squashed, and platforms (about -14) turn it down anyway",
    )
    max_clipped_fraction: float = Field(
        default=0.001, ge=0.0, le=1.0, description="share of samples at |x| >= 0.999 (sustained clipping)"
    )

    @model_validator(mode="after")
    def _check_loudness_range(self) -> QualityConfig:
        low, high = self.loudness_range_lufs
        if not -70.0 <= low <= high <= 0.0:
            raise ValueError(
                f"loudness_range_lufs must be (min, max) with -70 <= min <= max <= 0, "
                f"got {self.loudness_range_lufs}"
            )
        return self


class PipelineConfig(_Config):
    model: ModelConfig = Field(default_factory=ModelConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    compose: ComposeConfig = Field(default_factory=ComposeConfig)
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="thresholds that flag a finished video's quality report"
    )
