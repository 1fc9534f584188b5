"""Train the ``mini`` video model on procedural product clips, with the Wan classes we serve.

Three phases, each seeded:

1. **VAE**: an ``AutoencoderKLWan`` (the causal 3D VAE, in Wan 2.2's residual layout: 8x spatial,
   4x temporal compression) learns to reconstruct frames and short clips, with an L1 loss that
   weighs the product's pixels above the backdrop's. Its latent mean and spread per channel are
   then written into its config (``latents_mean`` / ``latents_std``), as in a Wan checkpoint, so
   ``WanPipeline`` normalises them the same way.
2. **Encode**: a fixed set of training clips becomes latents (the posterior's mean).
3. **Denoiser**: a ``WanTransformer3DModel`` and a byte-level ``UMT5EncoderModel`` learn rectified
   flow (the transformer predicts ``noise - latents``, Wan's ``flow_prediction``) on those latents,
   conditioned on freshly drawn English/Chinese captions; 10% of captions are empty and 5% are the
   planner's negative prompt, so classifier-free guidance has an unconditional branch. The
   transformer and text encoder are saved as an exponential moving average of their weights.

The result is a diffusers checkpoint directory (``model_index.json`` and one folder per component,
safetensors) plus ``shopreel.json`` serving defaults, ``training.json`` (config, losses, timings)
and ``losses.png``: the same loading path as a downloaded Wan checkpoint.

    shopreel train-mini --output models/mini          # about an hour on 2 CPU cores
    shopreel train-mini --output /tmp/m --smoke       # a few steps: CI checks it end to end
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..pipelines.presets import CHECKPOINT_DEFAULTS_FILE, DEFAULT_NEGATIVE_PROMPT, CheckpointDefaults
from ..pipelines.types import VideoSize
from ..pipelines.understand import NEGATIVE_PROMPT
from .clips import ClipShape, caption, render_clip, sample_spec

logger = logging.getLogger(__name__)


class MiniModelConfig(BaseModel):
    """Sizes of the three networks (all Wan 2.1 / UMT5 classes, scaled down)."""

    model_config = ConfigDict(extra="forbid")

    vae_base_dim: int = Field(default=32, ge=8, le=160, description="VAE channels after the 2x2 patchify")
    vae_dim_mult: list[int] = Field(default=[1, 2, 2], description="VAE channel multiple per level")
    z_dim: int = Field(default=16, ge=4, le=16, description="latent channels (Wan 2.1: 16)")
    text_dim: int = Field(default=64, ge=16, le=512, description="text encoder width")
    text_layers: int = Field(default=2, ge=1, le=8, description="text encoder layers")
    heads: int = Field(default=4, ge=1, le=16, description="transformer attention heads")
    head_dim: int = Field(default=32, ge=8, le=128, description="transformer width per head")
    ffn_dim: int = Field(default=512, ge=16, le=4096, description="transformer feed-forward width")
    layers: int = Field(default=4, ge=1, le=30, description="transformer blocks")
    max_sequence_length: int = Field(default=256, ge=32, le=512, description="prompt bytes the model reads")


class TrainMiniConfig(BaseModel):
    """One training run: data, steps, learning rates, seeds."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, description="seeds weights, data order, noise and captions")
    size: int = Field(default=64, ge=32, le=256, multiple_of=16, description="clip side in pixels")
    frames: int = Field(default=17, ge=5, le=81, description="frames per clip (4k+1)")
    model: MiniModelConfig = Field(default_factory=MiniModelConfig)
    vae_steps: int = Field(default=1200, ge=1, description="VAE optimiser steps")
    vae_batch: int = Field(
        default=8, ge=1, le=256, description="frames per VAE image step (clip steps: half)"
    )
    vae_frames: int = Field(default=9, ge=1, le=81, description="frames per VAE training clip (1 + 4k)")
    vae_clip_every: int = Field(default=4, ge=0, description="every Nth VAE step trains on clips; 0: never")
    vae_lr: float = Field(
        default=1.5e-4, gt=0, le=1, description="VAE peak learning rate (normed convolutions)"
    )
    vae_fast_lr_factor: float = Field(
        default=16.0, ge=1, le=100, description="VAE output-scale layers' lr multiple"
    )
    vae_foreground_weight: float = Field(
        default=10.0, ge=1, le=100, description="L1 weight of product pixels vs backdrop pixels"
    )
    vae_latent_penalty: float = Field(default=1e-4, ge=0, le=1, description="weight of mean squared latents")
    encoded_clips: int = Field(default=2000, ge=2, description="training clips encoded for the denoiser")
    denoiser_steps: int = Field(default=4000, ge=1, description="transformer + text encoder steps")
    denoiser_batch: int = Field(default=24, ge=1, le=1024, description="latents per denoiser step")
    denoiser_lr: float = Field(default=6e-4, gt=0, le=1, description="denoiser peak learning rate")
    denoiser_foreground_weight: float = Field(
        default=1.0, ge=1, le=100, description="MSE weight of latents over the product vs the backdrop"
    )
    warmup_steps: int = Field(default=200, ge=0, description="linear warm-up before the cosine decay")
    ema_decay: float = Field(default=0.998, ge=0, lt=1, description="weight EMA of the saved denoiser")
    flow_shift: float = Field(default=2.0, gt=0, le=20, description="training and sampling sigma shift")
    empty_caption_rate: float = Field(default=0.10, ge=0, le=1, description="captions dropped for CFG")
    negative_caption_rate: float = Field(
        default=0.05, ge=0, le=1, description="captions replaced by a negative prompt"
    )
    default_steps: int = Field(
        default=20, ge=1, le=100, description="the checkpoint's default denoising steps"
    )
    default_guidance: float = Field(
        default=4.0, ge=0, le=20, description="the checkpoint's default CFG scale"
    )
    default_fps: int = Field(default=8, ge=1, le=60, description="the checkpoint's default frame rate")
    snapshot_every: int = Field(
        default=1000, ge=0, description="denoiser steps between checkpoint snapshots; 0: none"
    )
    threads: int = Field(default=0, ge=0, le=256, description="torch CPU threads; 0: all cores")
    init_from: Path | None = Field(
        default=None, description="continue this checkpoint's denoiser (its VAE is kept, not retrained)"
    )

    @classmethod
    def smoke(cls) -> TrainMiniConfig:
        """A few steps of every phase at the same sizes: checks the script end to end in seconds."""
        return cls(
            vae_steps=2,
            vae_batch=2,
            vae_clip_every=2,
            encoded_clips=4,
            denoiser_steps=3,
            denoiser_batch=2,
            warmup_steps=1,
        )


def _lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_untrained(config: TrainMiniConfig) -> dict[str, Any]:
    """The five pipeline components with seeded initial weights."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    m = config.model
    torch.manual_seed(config.seed)
    tokenizer = ByT5Tokenizer()  # byte-level: English and Chinese without a vocabulary file
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=m.text_dim,
            d_kv=m.text_dim // 4,
            d_ff=m.text_dim * 2,
            num_layers=m.text_layers,
            num_heads=4,
            relative_attention_num_buckets=32,
            dropout_rate=0.0,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=m.heads,
        attention_head_dim=m.head_dim,
        in_channels=m.z_dim,
        out_channels=m.z_dim,
        text_dim=m.text_dim,
        freq_dim=256,
        ffn_dim=m.ffn_dim,
        num_layers=m.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    # Wan 2.2's residual layout (2x2 patchify, average-pool / duplicate shortcuts around every
    # down / up block): the shortcuts carry colour straight through, which a from-scratch CPU budget
    # needs. 2x2 patches x 2 downsamples = 8x spatial, 4x temporal, as in Wan 2.1.
    vae = AutoencoderKLWan(
        base_dim=m.vae_base_dim,
        z_dim=m.z_dim,
        dim_mult=m.vae_dim_mult,
        num_res_blocks=1,
        temperal_downsample=[True] * (len(m.vae_dim_mult) - 1),
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=2 * 2 ** (len(m.vae_dim_mult) - 1),
        scale_factor_temporal=4,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=config.flow_shift
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
    }


def _clip_batch(rng: random.Random, count: int, shape: ClipShape):
    """(specs, float tensor (B, 3, T, H, W) in [-1, 1]) of fresh training clips."""
    import torch

    specs = [sample_spec(rng, held_out=False) for _ in range(count)]
    frames = np.stack([render_clip(spec, shape) for spec in specs])  # B T H W C
    video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return specs, video


def _decode_unclamped(vae, latents):
    """``AutoencoderKLWan.decode`` without its final clamp to [-1, 1], which would stop the gradient of
    every overshooting pixel: the same causal frame-by-frame loop over the decoder and its cache."""
    import torch

    vae.clear_cache()
    hidden = vae.post_quant_conv(latents)
    frames = []
    for index in range(hidden.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(
                hidden[:, :, index : index + 1],
                feat_cache=vae._feat_map,
                feat_idx=vae._conv_idx,
                first_chunk=index == 0,
            )
        )
    vae.clear_cache()
    video = torch.cat(frames, dim=2)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        video = unpatchify(video, patch_size=vae.config.patch_size)
    return video


def _vae_parameter_groups(vae, config: TrainMiniConfig) -> list[dict]:
    """Two learning rates. Convolutions followed by an RMS norm are scale-invariant: their effective
    step is lr / |w|^2, large at initialisation, so they take ``vae_lr``. The layers that set output
    scale (biases, norm gains, the in/out and quant convolutions) learn ``vae_fast_lr_factor`` x
    faster; one rate for all either diverges (high) or crawls (low)."""
    fast, slow = [], []
    for name, parameter in vae.named_parameters():
        is_fast = name.endswith(("bias", "gamma")) or "conv_out" in name or "quant_conv" in name
        (fast if is_fast else slow).append(parameter)
    return [
        {"params": slow, "peak": config.vae_lr},
        {"params": fast, "peak": config.vae_lr * config.vae_fast_lr_factor},
    ]


def product_mask(video):
    """1.0 where a pixel differs from its frame's border (the product), 0.0 on the backdrop:
    (B, 1, T, H, W) for a (B, 3, T, H, W) video in [-1, 1]."""
    import torch

    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
    backdrop = border.median(dim=-1).values[..., None, None]
    return ((video - backdrop).abs().amax(dim=1, keepdim=True) > 0.1).float()


def foreground_weights(video, weight: float):
    """Per-pixel loss weights: ``weight`` on the product, 1 on the backdrop. The product is a tenth of
    the pixels; unweighted, an autoencoder learns the backdrop and the product's brightness long before
    its colour and shape."""
    return 1.0 + (weight - 1.0) * product_mask(video)


def train_vae(vae, config: TrainMiniConfig, log: dict, progress: bool) -> None:
    """Reconstruct single frames (the first-frame path, cheap) and, every ``vae_clip_every`` steps,
    short clips (the causal temporal path). A deterministic autoencoder (the posterior's mean): the
    denoiser learns the latents themselves, so a sampling spread would only blur them."""
    import torch
    from tqdm import tqdm

    rng = random.Random(config.seed + 1)
    image, clip = ClipShape(frames=1, size=config.size), ClipShape(frames=config.vae_frames, size=config.size)
    groups = _vae_parameter_groups(vae, config)
    optimiser = torch.optim.Adam(groups, lr=config.vae_lr)
    vae.train().requires_grad_(True)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(config.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = _lr(step, config.vae_steps, config.warmup_steps // 4, group["peak"])
        is_clip = config.vae_clip_every > 0 and step % config.vae_clip_every == config.vae_clip_every - 1
        shape, count = (clip, max(1, config.vae_batch // 2)) if is_clip else (image, config.vae_batch)
        _, video = _clip_batch(rng, count, shape)
        latents = vae.encode(video).latent_dist.mode()
        error = (_decode_unclamped(vae, latents) - video).abs()
        weights = foreground_weights(video, config.vae_foreground_weight)
        l1 = (weights * error).mean() / weights.mean()
        loss = l1 + config.vae_latent_penalty * latents.pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        losses.append(l1.item())
        bar.set_postfix(l1=f"{np.mean(losses[-20:]):.4f}")
    vae.eval().requires_grad_(False)
    log["vae"] = {"l1": losses, "seconds": time.perf_counter() - started}


@np.errstate(all="ignore")
def encode_clips(vae, config: TrainMiniConfig, log: dict, progress: bool):
    """Normalised latents of ``encoded_clips`` training clips, plus their specs."""
    import torch
    from tqdm import tqdm

    rng = random.Random(config.seed + 2)
    shape = ClipShape(frames=config.frames, size=config.size)
    specs, means, products = [], [], []
    started = time.perf_counter()
    batch = 8
    with torch.inference_mode():
        for start in tqdm(range(0, config.encoded_clips, batch), desc="encode", disable=not progress):
            chunk_specs, video = _clip_batch(rng, min(batch, config.encoded_clips - start), shape)
            specs += chunk_specs
            latent = vae.encode(video).latent_dist.mode()
            means.append(latent)
            # The share of each latent cell's pixels that show the product.
            product = product_mask(video)
            products.append(torch.nn.functional.adaptive_avg_pool3d(product, latent.shape[2:]))
    mean = torch.cat(means)
    if config.init_from is None:
        # Per-channel statistics of the latents, written where Wan keeps them (vae config).
        channel_mean = mean.mean(dim=(0, 2, 3, 4))
        channel_std = mean.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
        vae.register_to_config(latents_mean=channel_mean.tolist(), latents_std=channel_std.tolist())
    else:  # continuing: the denoiser learnt latents under the checkpoint's own statistics
        channel_mean, channel_std = (
            torch.tensor(vae.config.latents_mean),
            torch.tensor(vae.config.latents_std),
        )
    view = (1, -1, 1, 1, 1)
    log["encode"] = {"clips": len(specs), "seconds": time.perf_counter() - started}
    # Latent loss weights: 1 on the backdrop, up to denoiser_foreground_weight where the product is.
    weights = 1.0 + (config.denoiser_foreground_weight - 1.0) * (2 * torch.cat(products)).clamp(max=1.0)
    return specs, (mean - channel_mean.view(view)) / channel_std.view(view), weights


def encode_text(tokenizer, text_encoder, captions: list[str], max_length: int):
    """Prompt embeddings exactly as ``WanPipeline`` builds them: valid positions, zero padding."""
    import torch

    tokens = tokenizer(
        captions,
        padding="longest",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    hidden = hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
    padding = max_length - hidden.shape[1]
    return torch.nn.functional.pad(hidden, (0, 0, 0, padding))


def _sigmas(generator, count: int, shift: float):
    import torch

    # Half uniform, half logit-normal (mid-noise heavy), then the sampler's shift.
    uniform = torch.rand(count, generator=generator)
    logit = torch.sigmoid(torch.randn(count, generator=generator))
    u = torch.where(torch.rand(count, generator=generator) < 0.5, uniform, logit)
    return shift * u / (1 + (shift - 1) * u)


def train_denoiser(
    components: dict,
    latents,
    weights,
    specs,
    config: TrainMiniConfig,
    log: dict,
    progress: bool,
    snapshot: Any = None,
):
    """Train transformer + text encoder; returns their EMA copies."""
    import torch
    from tqdm import tqdm

    transformer, text_encoder, tokenizer = (
        components["transformer"],
        components["text_encoder"],
        components["tokenizer"],
    )
    modules = torch.nn.ModuleList([transformer, text_encoder]).train().requires_grad_(True)
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(modules.parameters(), lr=config.denoiser_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed + 3)
    rng = random.Random(config.seed + 4)
    negatives = (DEFAULT_NEGATIVE_PROMPT, NEGATIVE_PROMPT)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(config.denoiser_steps), desc="denoiser", disable=not progress)
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = _lr(step, config.denoiser_steps, config.warmup_steps, config.denoiser_lr)
        index = torch.randint(0, latents.shape[0], (config.denoiser_batch,), generator=generator)
        clean = latents[index]
        captions = []
        for i in index.tolist():
            draw = rng.random()
            if draw < config.empty_caption_rate:
                captions.append("")
            elif draw < config.empty_caption_rate + config.negative_caption_rate:
                captions.append(rng.choice(negatives))
            else:
                captions.append(caption(specs[i], rng))
        noise = torch.randn(clean.shape, generator=generator)
        sigma = _sigmas(generator, clean.shape[0], config.flow_shift)
        noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1, 1) * noise
        text = encode_text(tokenizer, text_encoder, captions, config.model.max_sequence_length)
        prediction = transformer(
            hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False
        )[0]
        # Weighted so that the product, a tenth of the picture, is not drowned out by its backdrop.
        weight = weights[index]
        loss = (weight * (prediction - (noise - clean)).pow(2)).mean() / weight.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimiser.step()
        # Short runs warm the average up so that a few hundred steps already move it.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), modules.parameters(), strict=True):
                averaged.lerp_(live, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if snapshot is not None and config.snapshot_every and (step + 1) % config.snapshot_every == 0:
            log["denoiser"] = {"mse": losses, "seconds": time.perf_counter() - started}
            snapshot(ema[0], ema[1])
    log["denoiser"] = {"mse": losses, "seconds": time.perf_counter() - started}
    return ema[0], ema[1]


def training_stages(log: dict) -> list[dict]:
    """The records of a checkpoint's training runs, oldest first (``init_from`` chains them)."""
    stages = [log]
    while stages[0].get("previous"):
        stages.insert(0, stages[0]["previous"])
    return stages


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], window: int) -> np.ndarray:
        window = max(1, min(window, len(values)))
        return np.convolve(values, np.ones(window) / window, mode="valid")

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, (phase, key, title) in zip(
        axes,
        (("vae", "l1", "VAE reconstruction (L1)"), ("denoiser", "mse", "flow-matching loss (MSE)")),
        strict=True,
    ):
        # The VAE trains in the first run only; the denoiser's runs follow each other.
        runs = [stage[phase] for stage in training_stages(log) if phase in stage]
        values = [value for run in runs for value in run[key]]
        for boundary in np.cumsum([len(run[key]) for run in runs])[:-1]:
            axis.axvline(boundary, color="grey", linestyle="--", linewidth=1)
        axis.plot(values, alpha=0.25, color="tab:blue")
        axis.plot(
            np.arange(len(smooth(values, 50))) + min(49, len(values) - 1),
            smooth(values, 50),
            color="tab:blue",
        )
        axis.set_title(f"{title}, {sum(run['seconds'] for run in runs) / 60:.1f} min")
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_checkpoint(components: dict, config: TrainMiniConfig, output: Path, log: dict) -> Path:
    """Write the diffusers checkpoint directory, serving defaults, training log and loss plot."""
    import torch
    from diffusers import WanPipeline

    # Half-precision files keep the repository small (loading casts to the configured dtype); the
    # copies leave the live weights, which training may still be averaging, in float32.
    halves = {
        name: copy.deepcopy(components[name]).to(torch.float16) for name in ("transformer", "text_encoder")
    }
    pipe = WanPipeline(**{**components, **halves})
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output, safe_serialization=True)
    defaults = CheckpointDefaults(
        default_size=VideoSize(width=config.size, height=config.size),
        default_fps=config.default_fps,
        default_steps=config.default_steps,
        default_guidance=config.default_guidance,
        max_sequence_length=config.model.max_sequence_length,
    )
    (output / CHECKPOINT_DEFAULTS_FILE).write_text(defaults.model_dump_json(indent=2) + "\n")
    record = {"config": config.model_dump(mode="json"), **log}
    (output / "training.json").write_text(json.dumps(record) + "\n")
    plot_losses(log, output / "losses.png")
    write_model_card(pipe, config, log, output / "README.md")
    return output


def _tail_mean(values: list[float], count: int = 100) -> float:
    return float(np.mean(values[-count:])) if values else float("nan")


def write_model_card(pipe, config: TrainMiniConfig, log: dict, path: Path) -> None:
    """The model card: what it is, its data, how long it trained, its losses and its limits."""
    import platform

    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    stages = training_stages(log)
    # Each run's settings: the current one's object, earlier ones' as recorded.
    settings = [TrainMiniConfig.model_validate(stage["config"]) for stage in stages[:-1]] + [config]
    first, first_log = settings[0], stages[0]
    m = config.model
    clip_steps = first.vae_steps // first.vae_clip_every if first.vae_clip_every else 0
    image_steps = first.vae_steps - clip_steps
    components_table = "\n".join(
        [
            f"| denoiser | `WanTransformer3DModel` | {millions(pipe.transformer)} | {m.layers} blocks, "
            f"{m.heads} heads x {m.head_dim}, FFN {m.ffn_dim}, patch 1x2x2 |",
            f"| VAE | `AutoencoderKLWan` | {millions(pipe.vae)} | base {m.vae_base_dim}, mults "
            f"{m.vae_dim_mult}, {m.z_dim} latent channels, 8x spatial / 4x temporal |",
            f"| text encoder | `UMT5EncoderModel` + `ByT5Tokenizer` | {millions(pipe.text_encoder)} | width "
            f"{m.text_dim}, {m.text_layers} layers, English and Chinese bytes, "
            f"{m.max_sequence_length} read |",
        ]
    )
    rows = [
        f"| 1. VAE (product-weighted L1) | {first.vae_steps} | {first.vae_batch} frames / "
        f"{max(1, first.vae_batch // 2)} clips | {first_log['vae']['seconds'] / 60:.1f} | "
        f"L1 {_tail_mean(first_log['vae']['l1']):.4f} (pixels in [-1, 1]) |"
    ]
    for number, (stage, run) in enumerate(zip(settings, stages, strict=True), start=1):
        weighting = (
            f", product latents x{stage.denoiser_foreground_weight:g}"
            if stage.denoiser_foreground_weight > 1
            else ""
        )
        rows += [
            f"| {number}. encode clips | | | {run.get('encode', {}).get('seconds', 0.0) / 60:.1f} | |",
            f"| {number}. denoiser + text encoder (rectified flow, EMA {stage.ema_decay}, peak lr "
            f"{stage.denoiser_lr:g}{weighting}) | {stage.denoiser_steps} | {stage.denoiser_batch} | "
            f"{run['denoiser']['seconds'] / 60:.1f} | MSE {_tail_mean(run['denoiser']['mse']):.4f} |",
        ]
    phases_table = "\n".join(rows)
    continued = (
        f" Run 1 trained every component from scratch; each later run continued the one before it "
        f"(`init_from`) with the VAE kept, {len(stages)} runs in all."
        if len(stages) > 1
        else ""
    )
    total_minutes = sum(stage.get("total_seconds", 0.0) for stage in stages) / 60
    card = f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-video
tags: [wan, text-to-video, synthetic-data, shopreel]
---

# shopreel mini: a {config.size}x{config.size} product-clip model trained in this repository

The same classes as Wan 2.1 text-to-video (`WanPipeline`: `WanTransformer3DModel`,
`AutoencoderKLWan`, `UMT5EncoderModel`, UniPC flow-matching scheduler), scaled down and trained
from scratch on procedural product clips, so that a default shopreel video shows a product in the
colour, with the camera move, that its prompt names. It loads through the same checkpoint path as a
downloaded Wan 2.1 checkpoint (`--preset mini`, or this directory as `--preset PATH`).

| component | class | parameters | configuration |
|---|---|---|---|
{components_table}

Weights: safetensors, the denoiser and text encoder in float16 (loading casts them to the
configured dtype), the VAE in float32. Serving defaults (`shopreel.json`): {config.size}x{config.size},
{config.default_fps} fps, {config.default_steps} steps, guidance {config.default_guidance:g}.

## Data
Procedural clips from `shopreel/train/clips.py` (seeded numpy/Pillow, nothing downloaded): five
product silhouettes (bottle, box, shoe, mug, phone) in nine named colours (red, orange, yellow,
green, blue, purple, pink, white, black) on five studio backdrops (white, grey, dark, beige,
gradient), filmed with the planner's seven camera moves (static, push-in, pull-out, pan left, pan
right, orbit, tilt up) under a slowly changing key light; {config.frames} frames at
{config.size}x{config.size}. Captions are drawn at every step from English and Chinese templates
(including the planner's own camera phrases and its "Product commercial, ..." form). 15% of the
(object, colour, camera move) combinations are held out of training (`is_held_out`) and used only
for evaluation. The VAE saw {image_steps * first.vae_batch:,} fresh single frames and
{clip_steps * max(1, first.vae_batch // 2):,} fresh {first.vae_frames}-frame clips; the
denoiser trained on {log.get("encode", {}).get("clips", config.encoded_clips):,} encoded clips, with
{config.empty_caption_rate:.0%} empty and {config.negative_caption_rate:.0%} negative-prompt captions
so that classifier-free guidance has an unconditional branch.

## Training
`shopreel train-mini` (seed {config.seed}) on {log.get("threads", "?")} CPU threads
({platform.processor() or platform.machine()}), {total_minutes:.0f} minutes in all.{continued}

| phase | steps | batch | minutes | final loss (mean of the last 100 steps) |
|---|---|---|---|---|
{phases_table}

![losses](losses.png)

`training.json` holds the configuration and every step's loss.

## Evaluation
Prompt following on held-out combinations is measured by `benchmarks/prompt_following.py`
(results in `benchmarks/results/prompt_following.md`): a 3D CNN trained only on the renderer's
ground-truth clips reads object, colour and camera move off the generated videos.

## Limits
- {config.size}x{config.size} pixels and about {config.frames} frames: it was trained on nothing
  else. Other sizes run (the classes accept them) but leave the training distribution.
- It knows five silhouettes, nine colours, five backdrops and seven camera moves. A real product
  brief's prompt is mapped onto these words: "running shoes" draws the shoe, a colour it does not
  know draws one it does, a thermos may come out as a mug or a bottle.
- No textures, text, hands, people or scenes; not a substitute for a real checkpoint such as
  Wan2.1-T2V-1.3B, which loads through the same path.
"""
    path.write_text(card)


def load_components(checkpoint: Path) -> tuple[dict[str, Any], dict]:
    """A checkpoint's five components in float32, and its training record (to continue training)."""
    import torch
    from diffusers import WanPipeline

    if not (checkpoint / "model_index.json").is_file():
        raise ValueError(f"{checkpoint} is not a diffusers checkpoint (no model_index.json)")
    pipe = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
    record_path = checkpoint / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    names = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    return {name: getattr(pipe, name) for name in names}, record


def train(config: TrainMiniConfig, output: Path, progress: bool = True) -> Path:
    """All three phases; returns the checkpoint directory."""
    import os

    import torch

    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    log: dict[str, Any] = {}
    if config.init_from is not None:
        components, log["previous"] = load_components(config.init_from)
    else:
        components = build_untrained(config)
        train_vae(components["vae"], config, log, progress)
        components["vae"].save_pretrained(output / "vae")  # inspectable while the denoiser trains
    specs, latents, weights = encode_clips(components["vae"], config, log, progress)

    def snapshot(transformer, text_encoder) -> None:
        # A loadable checkpoint mid-run: evaluation can start before training ends.
        save_checkpoint(
            {**components, "transformer": transformer, "text_encoder": text_encoder}, config, output, log
        )

    transformer, text_encoder = train_denoiser(
        components, latents, weights, specs, config, log, progress, snapshot=snapshot
    )
    components.update(transformer=transformer, text_encoder=text_encoder)
    log["total_seconds"] = time.perf_counter() - started
    log["threads"] = torch.get_num_threads()
    return save_checkpoint(components, config, output, log)
