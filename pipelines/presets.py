"""Model presets: which diffusers/transformers classes make up a video model, and how to build them.

``tiny`` builds the *real* Wan 2.1 classes (``WanTransformer3DModel``, ``AutoencoderKLWan``,
``UMT5EncoderModel``) from small configs with seeded random weights, offline, in about a second on
CPU. Its frames are noise-like because the weights are untrained; it exists so that every stage, the
tests and CI run the same code path as a real checkpoint. A real checkpoint (e.g.
Wan2.1-T2V-1.3B-Diffusers) is a local directory passed as ``ModelConfig.preset``; it is loaded with
``from_pretrained(local_files_only=True)`` into the same pipeline class. ``mini`` is such a
checkpoint, trained in this repository on procedural product clips (``shopreel train-mini``) and
shipped in ``models/mini/``: 64x64, it draws a product on the backdrop its prompt names and partly
follows the product's colour (``benchmarks/prompt_following.py`` measures how well).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ModelConfig
from .types import MAX_FPS, MAX_GUIDANCE_SCALE, MAX_INFERENCE_STEPS, MIN_FPS, VideoSize

if TYPE_CHECKING:
    import torch

# diffusers resolves its classes through lazy modules that type checkers cannot follow.
VideoPipeline = Any

logger = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, distorted product, deformed, watermark, text artifacts, extra objects, "
    "jpeg artifacts, overexposed, static frame"
)


@dataclass(frozen=True)
class Preset:
    """Defaults that belong to a model family, plus how to build its diffusers pipeline."""

    name: str
    description: str
    default_size: VideoSize
    default_fps: int
    default_steps: int
    default_guidance: float
    max_sequence_length: int
    build: Callable[[ModelConfig, torch.device, torch.dtype], VideoPipeline]
    untrained: bool = False  # random weights: frames are noise-like
    # Only the VAE, for renderer replicas that never run the transformer; None: build() and take .vae
    build_vae: Callable[[ModelConfig, torch.device], Any] | None = None


@dataclass
class LoadedModel:
    """A built pipeline together with the preset it came from and where it runs."""

    preset: Preset
    pipe: VideoPipeline
    device: torch.device
    dtype: torch.dtype

    @property
    def vae(self):
        return self.pipe.vae


# --- tiny: real classes, small configs, seeded random weights -----------------------------------


def _build_tiny_wan(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> VideoPipeline:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    # Seeded so that every process (tests, Ray replicas, benchmarks) builds identical weights.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        tokenizer = ByT5Tokenizer()  # byte-level: needs no vocabulary file
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
            )
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe: VideoPipeline = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )
    if dtype != torch.float32:
        # Random weights have no fp32-kept modules to protect; cast what from_pretrained would.
        pipe.text_encoder.to(dtype=dtype)
        pipe.transformer.to(dtype=dtype)
    return _place(pipe, config, device)


def _load_wan_checkpoint(path: Path) -> Callable[[ModelConfig, torch.device, torch.dtype], VideoPipeline]:
    def build(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> VideoPipeline:
        import torch
        from diffusers import AutoencoderKLWan, WanPipeline

        # The VAE stays in its own dtype (float32 by default) as Wan's model card recommends.
        vae = AutoencoderKLWan.from_pretrained(
            path, subfolder="vae", dtype=getattr(torch, config.vae_dtype), local_files_only=True
        )
        pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype, local_files_only=True)
        return _place(pipe, config, device)

    return build


def _load_wan_vae(path: Path) -> Callable[[ModelConfig, torch.device], Any]:
    def build(config: ModelConfig, device: torch.device) -> Any:
        import torch
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(
            path, subfolder="vae", dtype=getattr(torch, config.vae_dtype), local_files_only=True
        )
        return vae.to(device).eval().requires_grad_(False)

    return build


def _place(pipe: VideoPipeline, config: ModelConfig, device: torch.device) -> VideoPipeline:
    import torch

    # dtypes were set at construction/loading (from_pretrained keeps Wan's fp32 modules in fp32).
    pipe.to(device)
    if pipe.vae.dtype != getattr(torch, config.vae_dtype):
        pipe.vae.to(dtype=getattr(torch, config.vae_dtype))
    # Freshly constructed modules are in training mode (dropout on): inference must be eval.
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY = Preset(
    name="tiny",
    description="Wan 2.1 classes, tiny configs, seeded random weights (offline, seconds on CPU, noise-like)",
    default_size=VideoSize(width=128, height=128),
    default_fps=16,
    default_steps=4,
    default_guidance=5.0,
    max_sequence_length=128,
    build=_build_tiny_wan,
    untrained=True,
)

# The trained mini model ships inside the package as a diffusers checkpoint directory.
MINI_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "mini"


# Optional file in a checkpoint directory with serving defaults that differ from Wan 2.1 480p.
CHECKPOINT_DEFAULTS_FILE = "shopreel.json"


class CheckpointDefaults(BaseModel):
    """Serving defaults a checkpoint directory may carry in ``shopreel.json``."""

    model_config = ConfigDict(extra="forbid")

    default_size: VideoSize = VideoSize(width=832, height=480)
    default_fps: int = Field(default=16, ge=MIN_FPS, le=MAX_FPS)
    default_steps: int = Field(default=30, ge=1, le=MAX_INFERENCE_STEPS)
    default_guidance: float = Field(default=5.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    max_sequence_length: int = Field(default=512, ge=8, le=1024)
    untrained: bool = False


def wan_checkpoint_preset(path: Path) -> Preset:
    """A preset for a local Wan 2.1 T2V checkpoint in diffusers format (model_index.json inside)."""
    defaults_file = path / CHECKPOINT_DEFAULTS_FILE
    try:
        defaults = (
            CheckpointDefaults.model_validate_json(defaults_file.read_text())
            if defaults_file.is_file()
            else CheckpointDefaults()
        )
    except ValidationError as exc:
        raise ValueError(f"{defaults_file} is invalid: {exc}") from exc
    return Preset(
        name=str(path),
        description="Wan 2.1 text-to-video checkpoint (diffusers format) from a local directory",
        build=_load_wan_checkpoint(path),
        build_vae=_load_wan_vae(path),
        **defaults.model_dump(exclude={"default_size"}),
        default_size=defaults.default_size,
    )


def _mini_preset() -> Preset:
    """``mini``: trained in this repository (train/mini.py), loaded like any Wan checkpoint."""
    checkpoint = wan_checkpoint_preset(MINI_CHECKPOINT)
    return replace(
        checkpoint,
        name="mini",
        description="Wan 2.1 classes trained here on synthetic product clips (64x64, backdrop, some colour)",
    )


PRESETS: dict[str, Preset] = {TINY.name: TINY, "mini": _mini_preset()}


def export_tiny_checkpoint(path: Path) -> Path:
    """Write the tiny preset as a diffusers checkpoint directory (tests the real loading path offline)."""
    import torch

    pipe = TINY.build(ModelConfig(), torch.device("cpu"), torch.float32)
    pipe.save_pretrained(path)
    defaults = CheckpointDefaults(
        default_size=TINY.default_size,
        default_fps=TINY.default_fps,
        default_steps=TINY.default_steps,
        default_guidance=TINY.default_guidance,
        max_sequence_length=TINY.max_sequence_length,
        untrained=True,
    )
    (path / CHECKPOINT_DEFAULTS_FILE).write_text(defaults.model_dump_json(indent=2))
    return path


def resolve_preset(name_or_path: str) -> Preset:
    """A preset name from PRESETS, or a local checkpoint directory; anything else is a ValueError."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model preset {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory"
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path} has no model_index.json: expected a diffusers-format checkpoint directory")
    pipeline_class = _read_pipeline_class(index)
    if pipeline_class != "WanPipeline":
        raise ValueError(f"{path} holds a {pipeline_class}; shopreel supports WanPipeline checkpoints")
    return wan_checkpoint_preset(path.resolve())


def _read_pipeline_class(index: Path) -> str:
    import json

    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{index} is not a readable diffusers model_index.json") from exc


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_vae(config: ModelConfig) -> tuple[Any, torch.device]:
    """The VAE alone (renderer replicas), on the configured device, in ``config.vae_dtype``."""
    preset = resolve_preset(config.preset)
    device = resolve_device(config.device)
    if preset.build_vae is not None:
        return preset.build_vae(config, device), device
    return preset.build(config, device, resolve_dtype(config.dtype, device)).vae, device


def load_model(config: ModelConfig) -> LoadedModel:
    """Resolve the preset, device and dtype from config and build the pipeline."""
    preset = resolve_preset(config.preset)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    logger.info("loading model preset %s on %s (%s)", preset.name, device, dtype)
    return LoadedModel(preset=preset, pipe=preset.build(config, device, dtype), device=device, dtype=dtype)
