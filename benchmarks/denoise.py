"""Faster denoising: seconds per step at the Wan 2.1 1.3B transformer shape, and seconds per
video on the tiny preset, per step cache, compile and speed profile, with the fidelity of each.

    .venv/bin/python -m shopreel.benchmarks.denoise [--parts shape video] [--repeats 3]
        [--steps 4 30] [--shape-steps N] [--layers N] [--size WxH] [--frames N] [--text-tokens N]
    .venv/bin/python -m shopreel.benchmarks.denoise --quick    # smoke run: 1-2 minutes, tiny shapes

**Part A, step time at the Wan 2.1 1.3B shape** (``--parts shape``). A ``WanPipeline`` whose
transformer has the real Wan2.1-T2V-1.3B configuration (``WAN_2_1_1_3B``: 30 blocks of width 1536,
12 heads, FFN 8960, text width 4096; 1.42 B parameters) with seeded random weights: the time of a
step does not depend on the weight values. Around it: a one-layer UMT5 text encoder of width 4096
(its output has the transformer's ``text_dim``; encoding is outside the timed loop), the tiny
preset's VAE, tokenizer and UniPC scheduler (flow shift 3.0). The ``LatentGenerator`` denoises a
one-shot storyboard with classifier-free guidance (5.0: two transformer passes per step) for
``--shape-steps`` steps; the prompt's embeddings come from the generator's per-prompt cache (filled
by a warm-up call), so a call is the denoising loop plus per-call setup of milliseconds.
A step's time is the gap between ``on_step`` callbacks (the first from the call's start; on CUDA the
device is synchronised at each), seconds per step the whole loop over the step count, so the steps a
cache skips count as the cheap steps they are. Rows: eager (fp32 on CPU, bf16 on CUDA, with the
parameters ``from_pretrained`` keeps in fp32 kept so), regionally compiled (``CompileConfig``: each
block compiled once, compile time excluded and reported), and eager with each step cache, with the
fidelity gate's figures for it (``LatentGenerator.gate.verdict``: cached vs uncached at the same
scheduler and steps, calibration clips of the benchmark's own shape). The gate decodes with the tiny
VAE and the weights are random, so its PSNR and latent error describe how far a cache moves a
random model's latents, not how a trained model's video looks; compute fraction (the linear layers'
FLOPs the gate counted) and the timings do carry over.

On CUDA the full shape is the default: 832x480, 81 frames (21x30x52 = 32,760 latent tokens), 512 text
tokens, 30 blocks, bf16, 30 steps, and the rows are compared with the anchors: 0.95 s/step published
for Wan 2.1 1.3B at 480p on one H100, and 0.57 s/step, the compute floor with CFG at full bf16
throughput (989 TFLOPS dense on H100 and H200 alike; ``wan_step_flops`` computes the FLOPs of any
shape). THE CUDA PATH IS UNTESTED: it was written by reading and never ran; it is the CPU code path
with another shape and dtype, plus device synchronisation. On CPU that shape is out of reach (one
forward at 192 tokens takes ~4 s on 2 cores with 30 blocks), so the CPU default is scaled down, and
the report says what was: 128x128, 9 frames (3x8x8 = 192 tokens), 64 text tokens (prompts are
padded to this length; Wan pads to 512), ``--layers`` blocks (default 4 of 30: a run fits in ~15
minutes), fp32, 10 steps, gate on 1 calibration prompt instead of 2. At that shape attention is a
sliver of the work (at 480p it is two thirds) and a block is a bigger share of a step, so CPU rows
are reported only as ratios to eager, not against the anchors.

**Part B, seconds per video on the tiny preset** (``--parts video``): the default model,
``ProductVideoPipeline`` in process on ``examples/brief_en.json`` (its product image left out; the
planner makes 5 shots of 21-25 frames at 128x128) at each ``--steps`` count (the generator config's
step count; a profile takes its share of it). Rows: uncached (the ``quality`` profile, the
reference), each step cache asked for per request, and each other speed profile (fewer steps,
another scheduler, a step cache). The fidelity gate is off while timing, so every row runs what it
names; the gate's verdict (the production default: 2 calibration prompts) is measured apart and
shown with what production would do (cached; refused: a request's own step cache below the floor;
uncached: a profile's step cache below the floor is dropped). Per row: denoising seconds (the
generator's, summed over shots), per step, whole-video seconds (plan to MP4 with quality scoring;
rendering overlaps denoising), and fidelity against the uncached video: relative L2 error of all
shots' latents and PSNR of their frames decoded whole by the VAE. The tiny preset is untrained: its
random VAE turns small latent differences into large pixel ones (a latent error of 0.5% can read
25 dB), and a profile's other scheduler and step count land a random model's latents elsewhere,
so read the PSNR column as a ranking of the rows, not as visible quality.

Medians over ``--repeats`` runs, rows interleaved within each repeat. A shared machine: compare the
ratios within one run, not seconds across runs. The default run takes about 10 minutes on 2 idle
CPU cores (15 on loaded ones); on one H100 or H200 part A's full shape needs, by estimate, about
half an hour (30 steps x 7 rows x 3 repeats, and the gate's 4 calibration runs per cache).
Writes ``benchmarks/results/denoise.json``, ``.md`` and ``.png`` (seconds per step per row; seconds
per video against fidelity).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from .common import write_results

if TYPE_CHECKING:
    import torch

    from shopreel.pipelines.generate import LatentGenerator

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE_BRIEF = Path(__file__).resolve().parents[1] / "examples" / "brief_en.json"

# Wan2.1-T2V-1.3B-Diffusers, transformer/config.json.
WAN_2_1_1_3B: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
# Anchors of the issue: published step time and the compute floor, Wan 2.1 1.3B, 832x480, 81 frames.
PUBLISHED_S_PER_STEP = 0.95  # one H100
FLOOR_S_PER_STEP = 0.57  # CFG, full bf16 throughput
PEAK_BF16_FLOPS = 989e12  # H100 SXM and H200, dense
GUIDANCE = 5.0
PROMPT = "white running shoes on a clean grey background, camera pans right, commercial lighting"


@dataclass(frozen=True)
class Shape:
    """What part A runs, and what of it was scaled down from Wan 2.1 1.3B at 480p."""

    width: int
    height: int
    frames: int
    layers: int
    text_tokens: int
    steps: int
    dtype: str
    calibration_prompts: int

    @property
    def latent_tokens(self) -> int:
        return ((self.frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16)


FULL_SHAPE = Shape(832, 480, 81, 30, 512, 30, "bfloat16", 2)
CPU_SHAPE = Shape(128, 128, 9, 4, 64, 10, "float32", 1)
QUICK_SHAPE = Shape(64, 64, 5, 2, 16, 4, "float32", 1)  # FirstBlockCache needs 2 blocks


def wan_step_flops(shape: Shape, *, guidance: bool = True) -> float:
    """FLOPs of one denoising step of the Wan 2.1 1.3B transformer at ``shape`` (blocks and text
    embedding; patch embedding, time embedding and head are under 0.1% and left out).

    Per block and pass, in multiply-adds, with n video tokens, L text tokens, width d, FFN f:
    self-attention projections 4nd^2 and scores plus values 2n^2 d; cross-attention query and
    output 2nd^2, keys and values of the text 2Ld^2, scores plus values 2nLd; FFN 2ndf.
    """
    n, text, layers = shape.latent_tokens, shape.text_tokens, shape.layers
    d = WAN_2_1_1_3B["num_attention_heads"] * WAN_2_1_1_3B["attention_head_dim"]
    f = WAN_2_1_1_3B["ffn_dim"]
    self_attention = 4 * n * d * d + 2 * n * n * d
    cross_attention = 2 * n * d * d + 2 * text * d * d + 2 * n * text * d
    block = self_attention + cross_attention + 2 * n * d * f
    text_embedding = text * (WAN_2_1_1_3B["text_dim"] * d + d * d)
    passes = 2 if guidance else 1
    return 2.0 * passes * (layers * block + text_embedding)


def is_full_model_shape(shape: Shape) -> bool:
    """Wan 2.1 1.3B at 480p, 81 frames, in bf16 (what the published step time was measured at)."""
    return dataclasses.replace(shape, steps=FULL_SHAPE.steps, calibration_prompts=2) == FULL_SHAPE


def scaled_down(shape: Shape) -> list[str]:
    """What ``shape`` changed from the full Wan 2.1 1.3B 480p shape (empty: nothing)."""
    full = FULL_SHAPE
    notes = []
    if (shape.width, shape.height, shape.frames) != (full.width, full.height, full.frames):
        notes.append(
            f"video {shape.width}x{shape.height}, {shape.frames} frames ({shape.latent_tokens} latent "
            f"tokens) instead of {full.width}x{full.height}, {full.frames} frames ({full.latent_tokens})"
        )
    if shape.layers != full.layers:
        notes.append(f"{shape.layers} transformer blocks instead of {full.layers}")
    if shape.text_tokens != full.text_tokens:
        notes.append(f"{shape.text_tokens} text tokens instead of {full.text_tokens}")
    if shape.dtype != full.dtype:
        notes.append(f"{shape.dtype} instead of {full.dtype}")
    if shape.steps != full.steps:
        notes.append(f"{shape.steps} steps instead of {full.steps}")
    if shape.calibration_prompts != full.calibration_prompts:
        notes.append(f"gate on {shape.calibration_prompts} calibration prompt(s) instead of 2")
    return notes


# --- part A: the Wan 2.1 1.3B transformer shape ---------------------------------------------------


def wan_shaped_preset(shape: Shape) -> Any:
    """A ``Preset`` whose pipeline has Wan 2.1 1.3B's transformer (``shape.layers`` blocks), seeded."""
    from shopreel.pipelines.config import ModelConfig
    from shopreel.pipelines.presets import TINY, Preset
    from shopreel.pipelines.types import VideoSize

    def build(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
        import torch
        from diffusers import WanPipeline, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        # The tiny preset's tokenizer (byte-level), VAE (z_dim 16) and scheduler (UniPC, shift 3.0).
        tiny = TINY.build(ModelConfig(device="cpu"), torch.device("cpu"), torch.float32)
        state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same weights in every process
        try:
            text_encoder = UMT5EncoderModel(
                UMT5Config(
                    vocab_size=len(tiny.tokenizer),
                    d_model=WAN_2_1_1_3B["text_dim"],
                    d_kv=8,
                    d_ff=64,
                    num_layers=1,
                    num_heads=4,
                    relative_attention_num_buckets=8,
                    dropout_rate=0.0,
                )
            )
            transformer = WanTransformer3DModel(**{**WAN_2_1_1_3B, "num_layers": shape.layers})
        finally:
            torch.random.set_rng_state(state)
        if dtype != torch.float32:
            text_encoder.to(dtype=dtype)
            _cast_like_from_pretrained(transformer, dtype)
        pipe = WanPipeline(
            tokenizer=tiny.tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=tiny.vae,
            scheduler=tiny.scheduler,
        )
        pipe.to(device)
        for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
            module.eval().requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return Preset(
        name="wan-1.3b-shaped",
        description="Wan 2.1 T2V 1.3B transformer config, seeded random weights; tiny VAE, 1-layer UMT5",
        default_size=VideoSize(width=shape.width, height=shape.height),
        default_fps=16,
        default_steps=shape.steps,
        default_guidance=GUIDANCE,
        max_sequence_length=shape.text_tokens,
        build=build,
        untrained=True,
    )


def _cast_like_from_pretrained(transformer: Any, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` but the parameters a bf16 ``from_pretrained`` keeps in fp32 (norms, time
    embedding, modulation tables: ``_keep_in_fp32_modules``), as a real checkpoint is loaded."""
    keep = set(transformer._keep_in_fp32_modules or ())
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        # Wan's own test for a kept module: a part of the dotted name (model_loading_utils).
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)


def one_shot_storyboard(width: int, height: int, frames: int) -> Any:
    from shopreel.pipelines.types import Shot, ShotKind, Storyboard

    shot = Shot(index=0, kind=ShotKind.hook, prompt=PROMPT, caption="AeroRun", num_frames=frames, seed=7)
    return Storyboard(
        title="AeroRun",
        language="en",
        width=width,
        height=height,
        fps=16,
        shots=[shot],
        price_text="¥599",
        cta_text="Shop now",
        aigc_label="AI-generated",
    )


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    generator: LatentGenerator, storyboard: Any, steps: int, method: str, request_id: str
) -> list[float]:
    """Seconds of each denoising step of one shot (the first counted from the call)."""
    device = generator.model.device
    marks: list[float] = []

    def on_step(_shot: int, _step: int, _steps: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    _sync(device)
    started = time.perf_counter()
    for _ in generator.generate(
        storyboard,
        request_id=request_id,
        num_inference_steps=steps,
        step_cache=method,  # type: ignore[arg-type]
        on_step=on_step,
    ):
        pass
    if len(marks) != steps:
        raise RuntimeError(f"expected {steps} step callbacks, got {len(marks)}")
    return [b - a for a, b in zip([started, *marks[:-1]], marks, strict=True)]


def _verdict_fields(verdict: Any) -> dict[str, Any]:
    return {
        "gate_psnr_db": None if math.isinf(verdict.psnr_db) else round(verdict.psnr_db, 2),
        "gate_latent_error": round(verdict.latent_error, 5),
        "gate_compute_fraction": round(verdict.compute_fraction, 4),
        "gate_passed": verdict.passed,
    }


def run_shape(shape: Shape, device: torch.device, repeats: int, log: Any) -> dict[str, Any]:
    import torch

    from shopreel.pipelines.config import CompileConfig, GenerateConfig, ModelConfig, StepCacheConfig
    from shopreel.pipelines.generate import LatentGenerator
    from shopreel.pipelines.presets import LoadedModel

    dtype = getattr(torch, shape.dtype)
    preset = wan_shaped_preset(shape)
    started = time.perf_counter()
    model = LoadedModel(preset, preset.build(ModelConfig(), device, dtype), device, dtype)
    build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.pipe.transformer.parameters())
    log(f"part A: built {parameters / 1e9:.2f} B-parameter transformer in {build_s:.0f} s")
    config = GenerateConfig(
        num_inference_steps=shape.steps,
        # Timing runs what they name; the gate is asked for its verdict apart, on clips of this shape.
        step_cache=StepCacheConfig(
            gate=False, calibration_prompts=shape.calibration_prompts, calibration_frames=shape.frames
        ),
    )
    generators = {
        "eager": LatentGenerator(model, config),
        "compiled": LatentGenerator(
            model, config.model_copy(update={"compile": CompileConfig(enabled=True)})
        ),
    }
    storyboard = one_shot_storyboard(shape.width, shape.height, shape.frames)
    warmup_s = {}
    for name, generator in generators.items():  # prompt embeddings cached; compiled: compile now
        began = time.perf_counter()
        timed_steps(generator, storyboard, 2, "none", f"warmup-{name}")
        warmup_s[name] = round(time.perf_counter() - began, 2)
        log(f"part A: {name} warm-up (2 steps) {warmup_s[name]:.1f} s")
    methods = step_cache_methods()
    rows: list[dict[str, Any]] = [
        {"row": f"eager {shape.dtype}", "generator": "eager", "method": "none"},
        {"row": f"compiled {shape.dtype}", "generator": "compiled", "method": "none"},
        *({"row": f"eager + {m}", "generator": "eager", "method": m} for m in methods),
        # Compiled blocks under a cache hook (compiled without fullgraph: the hook breaks the graph).
        *({"row": f"compiled + {m}", "generator": "compiled", "method": m} for m in ("first_block", "mag")),
    ]
    eager = generators["eager"]
    for row in rows:
        if row["method"] == "none":
            continue
        settings = eager.settings(shape.steps, None, None, row["method"])
        began = time.perf_counter()
        verdict = eager.gate.verdict(settings.step_cache, (settings.scheduler, settings.num_inference_steps))
        row.update(step_cache=verdict.setting, gate_s=round(time.perf_counter() - began, 1))
        row.update(_verdict_fields(verdict))
        log(f"part A: gate {verdict.describe()} ({row['gate_s']:.0f} s)")
    runs: dict[str, list[list[float]]] = {row["row"]: [] for row in rows}
    for repeat in range(repeats):
        for row in rows:
            steps_s = timed_steps(
                generators[row["generator"]], storyboard, shape.steps, row["method"], f"a-{repeat}"
            )
            runs[row["row"]].append(steps_s)
            log(f"part A: {row['row']}: {sum(steps_s) / shape.steps:.3f} s/step (repeat {repeat + 1})")
    flops = wan_step_flops(shape)
    full = is_full_model_shape(shape)
    for row in rows:
        measured = runs[row["row"]]
        per_step = [sum(steps_s) / shape.steps for steps_s in measured]
        middle = sorted(measured, key=sum)[len(measured) // 2]
        row.update(
            s_per_step=round(statistics.median(per_step), 4),
            s_per_step_runs=[round(value, 4) for value in per_step],
            first_step_s=round(middle[0], 4),
            step_s=[round(value, 4) for value in middle],
        )
        if row["method"] == "none":
            # Achieved throughput: only uncached rows do every step's FLOPs.
            row["tflops"] = round(flops / row["s_per_step"] / 1e12, 3)
    eager_s = rows[0]["s_per_step"]
    for row in rows:
        row["speedup_vs_eager"] = round(eager_s / row["s_per_step"], 3)
        if device.type == "cuda":
            row["vs_floor"] = round(row["s_per_step"] / (flops / PEAK_BF16_FLOPS), 3)
            if full:
                row["vs_published"] = round(row["s_per_step"] / PUBLISHED_S_PER_STEP, 3)
    return {
        "preset": preset.name,
        "transformer": {**WAN_2_1_1_3B, "num_layers": shape.layers},
        "parameters": parameters,
        "shape": asdict(shape),
        "latent_tokens": shape.latent_tokens,
        "scaled_down": scaled_down(shape),
        "full_model_shape": full,
        "guidance": GUIDANCE,
        "flops_per_step": flops,
        "floor_s_per_step": round(flops / PEAK_BF16_FLOPS, 4),
        "build_s": round(build_s, 1),
        "warmup_s": warmup_s,
        "rows": rows,
    }


def step_cache_methods() -> list[str]:
    """Every step cache the generator offers (``StepCacheMethod`` but none)."""
    from shopreel.pipelines.types import StepCacheMethod

    return [method for method in get_args(StepCacheMethod) if method != "none"]


# --- part B: whole videos on the tiny preset ------------------------------------------------------


def _brief(quick: bool) -> Any:
    from shopreel.pipelines.types import ProductBrief

    data = json.loads(EXAMPLE_BRIEF.read_text())
    data.pop("images")  # the same overlay on every row: nothing to do with denoising
    if quick:
        data.update(duration_s=2, size="64x64")
    return ProductBrief.model_validate(data)


def _production(verdict: Any, chosen_by: str) -> str:
    """What a production with the gate on does with this row's step cache."""
    if verdict.passed:
        return "cached"
    return "refused" if chosen_by == "request" else "uncached"


def run_video(steps_list: list[int], repeats: int, quick: bool, log: Any) -> dict[str, Any]:
    import torch

    from shopreel.pipelines.config import GenerateConfig, ModelConfig, PipelineConfig, StepCacheConfig
    from shopreel.pipelines.pipeline import ProductVideoPipeline
    from shopreel.pipelines.presets import load_model
    from shopreel.pipelines.speed import SPEED_PROFILES
    from shopreel.pipelines.step_cache import psnr_db, relative_error

    model = load_model(ModelConfig())
    brief = _brief(quick)
    methods = step_cache_methods()
    # (row, speed profile, step cache asked for by the request)
    plan: list[tuple[str, str, str | None]] = [
        ("uncached (quality)", "quality", None),
        *((m, "quality", m) for m in methods),
        *((f"profile {name}", name, None) for name in SPEED_PROFILES if name != "quality"),
    ]
    # The production gate's defaults (quick: fewer, shorter calibration clips).
    gate_config = StepCacheConfig(calibration_prompts=1, calibration_frames=5) if quick else StepCacheConfig()
    rows: list[dict[str, Any]] = []
    storyboard = None
    with tempfile.TemporaryDirectory() as tmp:
        for steps in steps_list:
            pipeline = ProductVideoPipeline(
                PipelineConfig(
                    generate=GenerateConfig(
                        num_inference_steps=steps, step_cache=gate_config.model_copy(update={"gate": False})
                    )
                ),
                model=model,
            )
            generator = pipeline.generator
            latents: dict[int, torch.Tensor] = {}
            inner = generator._denoise_batch

            def keeping(batch: list[Any], inner: Any = inner, latents: dict = latents) -> torch.Tensor:
                out = inner(batch)
                for index, call in enumerate(batch):
                    latents[call.shot_index] = out[index : index + 1].detach().float().cpu()
                return out

            generator._denoise_batch = keeping  # type: ignore[method-assign]
            storyboard = pipeline.plan(brief)
            began = time.perf_counter()
            pipeline.run(brief, output_path=Path(tmp) / "warmup.mp4")  # first calls, encoder start-up
            log(f"part B, {steps} steps: warm-up video {time.perf_counter() - began:.1f} s")
            group: list[dict[str, Any]] = []
            for name, profile, method in plan:
                settings = generator.settings(None, None, profile, method)  # type: ignore[arg-type]
                row: dict[str, Any] = {
                    "steps": steps,
                    "row": name,
                    "speed_profile": profile,
                    "step_cache_request": method,
                    "steps_run": settings.num_inference_steps,
                    "scheduler": settings.scheduler,
                    "step_cache": "none",
                    "runs": [],
                }
                if settings.step_cache.method != "none":
                    began = time.perf_counter()
                    verdict = generator.gate.verdict(
                        settings.step_cache, (settings.scheduler, settings.num_inference_steps)
                    )
                    row.update(step_cache=verdict.setting, gate_s=round(time.perf_counter() - began, 1))
                    row.update(_verdict_fields(verdict))
                    row["production"] = _production(verdict, settings.step_cache_from)
                    log(f"part B, {steps} steps: gate {verdict.describe()} ({row['gate_s']:.0f} s)")
                group.append(row)
            kept: dict[str, dict[int, torch.Tensor]] = {}
            for repeat in range(repeats):
                for row in group:
                    latents.clear()
                    result = pipeline.run(
                        brief,
                        output_path=Path(tmp) / "video.mp4",
                        speed_profile=row["speed_profile"],
                        step_cache=row["step_cache_request"],
                    )
                    row["runs"].append(
                        {
                            "denoise_s": result.timings.generate_s,
                            "video_s": result.timings.total_s,
                            "steps_run": result.num_inference_steps,
                        }
                    )
                    kept[row["row"]] = dict(latents)
                    log(
                        f"part B, {steps} steps: {row['row']}: denoise {result.timings.generate_s:.2f} s, "
                        f"video {result.timings.total_s:.2f} s (repeat {repeat + 1})"
                    )
            reference = kept[plan[0][0]]
            shots = sorted(reference)
            with torch.inference_mode():
                reference_frames = torch.cat(
                    [generator._decode(reference[i].to(model.device)) for i in shots], dim=2
                )
                for row in group:
                    own = kept[row["row"]]
                    if sorted(own) != shots:
                        raise RuntimeError(f"{row['row']}: shots {sorted(own)} denoised, expected {shots}")
                    frames = torch.cat([generator._decode(own[i].to(model.device)) for i in shots], dim=2)
                    flat = torch.cat([own[i].flatten() for i in shots])
                    flat_reference = torch.cat([reference[i].flatten() for i in shots])
                    psnr = psnr_db(reference_frames, frames)
                    row["latent_error"] = round(relative_error(flat_reference, flat), 5)
                    row["psnr_db"] = None if math.isinf(psnr) else round(psnr, 2)
            total_steps = None
            for row in group:
                runs = row.pop("runs")
                total_steps = row["steps_run"] * len(shots)
                row["denoise_s"] = round(statistics.median(r["denoise_s"] for r in runs), 3)
                row["video_s"] = round(statistics.median(r["video_s"] for r in runs), 3)
                row["denoise_s_per_step"] = round(row["denoise_s"] / total_steps, 4)
                row["video_s_runs"] = [round(r["video_s"], 3) for r in runs]
                if {r["steps_run"] for r in runs} != {row["steps_run"]}:
                    raise RuntimeError(
                        f"{row['row']}: the pipeline ran {runs} steps, expected {row['steps_run']}"
                    )
            for row in group:
                row["denoise_speedup"] = round(group[0]["denoise_s"] / row["denoise_s"], 3)
                row["video_speedup"] = round(group[0]["video_s"] / row["video_s"], 3)
            rows += group
    assert storyboard is not None
    return {
        "preset": model.preset.name,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "brief": EXAMPLE_BRIEF.name + (" (2 s at 64x64: --quick)" if quick else ""),
        "size": f"{storyboard.width}x{storyboard.height}",
        "shot_frames": [shot.num_frames for shot in storyboard.shots],
        "gate": {
            "calibration_prompts": gate_config.calibration_prompts,
            "calibration_frames": gate_config.calibration_frames,
            "min_psnr_db": gate_config.min_psnr_db,
            "max_latent_error": gate_config.max_latent_error,
        },
        "profiles": {
            name: {
                "step_fraction": p.step_fraction,
                "min_steps": p.min_steps,
                "scheduler": p.scheduler,
                "step_cache": p.step_cache,
                "step_cache_overrides": dict(p.step_cache_overrides),
            }
            for name, p in SPEED_PROFILES.items()
        },
        "rows": rows,
    }


# --- report -----------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _psnr(value: float | None, present: bool) -> str:
    if not present:
        return "-"
    return "identical" if value is None else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        "# Denoising speed: step caches, compile and speed profiles",
        "",
        f"{machine['platform']}, {machine['device']}, {machine['threads']} threads, "
        f"torch {machine['torch']}, diffusers {machine['diffusers']}; {report['at']}; "
        f"{report['wall_s']:.0f} s in all. Median of {report['repeats']} runs per row, rows "
        "interleaved. A shared machine: compare the ratios within "
        "this run, not seconds across runs.",
        "",
    ]
    shape_part = report.get("shape")
    if shape_part is not None:
        shape = shape_part["shape"]
        cuda = machine["device"].startswith("cuda")
        lines += [
            f"## A. Seconds per step, Wan 2.1 1.3B transformer shape ({shape_part['parameters'] / 1e9:.2f} B "
            "parameters, random weights)",
            "",
            f"{shape['width']}x{shape['height']}, {shape['frames']} frames ({shape_part['latent_tokens']} "
            f"latent tokens), {shape['text_tokens']} text tokens, {shape['layers']} blocks, "
            f"{shape['dtype']}, CFG {shape_part['guidance']:g} (two passes per step), "
            f"{shape['steps']} steps; {shape_part['flops_per_step'] / 1e12:.3g} TFLOP per step.",
        ]
        if shape_part["scaled_down"]:
            lines += [
                "",
                "Scaled down from Wan 2.1 1.3B at 480p on this machine: "
                + "; ".join(shape_part["scaled_down"])
                + ".",
            ]
        if not cuda:
            lines += [
                "",
                "On CPU the rows are compared with eager only: at this shape attention is a sliver of the "
                "work (two thirds at 480p) and one block is a bigger share of a step than one of 30, so "
                f"neither the {PUBLISHED_S_PER_STEP} s/step published (H100) nor the {FLOOR_S_PER_STEP} "
                "s/step floor applies.",
            ]
        gpu_columns = " vs 0.57 floor | vs 0.95 published |" if cuda else ""
        lines += [
            "",
            "| row | step cache | s/step | speed-up vs eager | first step s | TFLOP/s | gate PSNR dB "
            "| gate latent err | gate compute | gate passed |" + gpu_columns,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if cuda else ""),
        ]
        for row in shape_part["rows"]:
            gated = "gate_passed" in row
            line = (
                f"| {row['row']} | {row.get('step_cache', 'none')} | {row['s_per_step']:.3f} "
                f"| {row['speedup_vs_eager']:.2f}x | {row['first_step_s']:.3f} "
                f"| {_fmt(row.get('tflops'), '.3f')} "
                f"| {_psnr(row.get('gate_psnr_db'), gated)} | {_fmt(row.get('gate_latent_error'), '.4f')} "
                f"| {_fmt(row.get('gate_compute_fraction'), '.0%')} "
                f"| {('yes' if row['gate_passed'] else 'no') if gated else '-'} |"
            )
            if cuda:
                line += f" {_fmt(row.get('vs_floor'), '.2f')}x | {_fmt(row.get('vs_published'), '.2f')}x |"
            lines.append(line)
        warm = shape_part["warmup_s"]
        lines += [
            "",
            f"Transformer built in {shape_part['build_s']:.0f} s; warm-up (2 steps) "
            f"{warm['eager']:.1f} s eager, {warm['compiled']:.1f} s compiled (the compile). "
            "s/step: the loop over all steps, cached steps included (the prompt's embeddings "
            "come from the prompt cache). TFLOP/s: uncached rows, "
            "the analytic FLOPs of a step over its time. Gate: cached vs uncached latents of the "
            "calibration clips at this shape, decoded by the tiny VAE; the weights are random, so "
            "PSNR and latent error tell how far a cache moves a random model's output, not how a "
            "trained model's video looks. Gate compute: the linear layers' FLOPs the cached run "
            "executed over the uncached run's (attention's own matmuls are not counted).",
            "",
        ]
    video = report.get("video")
    if video is not None:
        lines += [
            f"## B. Seconds per video, tiny preset ({video['device']}, {video['dtype']})",
            "",
            f"ProductVideoPipeline in process on {video['brief']}: {len(video['shot_frames'])} shots of "
            f"{', '.join(map(str, video['shot_frames']))} frames at {video['size']}, CFG on. Steps: the "
            "config's count; a profile takes its share (pipelines/speed.py). Gate off while timing; its "
            f"verdict measured apart ({video['gate']['calibration_prompts']} calibration prompts, "
            f"{video['gate']['calibration_frames']} frames, floors {video['gate']['min_psnr_db']:g} dB and "
            f"{video['gate']['max_latent_error']:g}). Fidelity: against the uncached video at the same "
            "config steps (latents of all shots; frames decoded whole by the VAE).",
            "",
            "| steps | row | steps run | scheduler | step cache | denoise s | s/step | video s | "
            "denoise speed-up | video speed-up | latent err | PSNR dB | gate PSNR dB | gate err | "
            "gate compute | with the gate on |",
            "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in video["rows"]:
            gated = "gate_passed" in row
            lines.append(
                f"| {row['steps']} | {row['row']} | {row['steps_run']} | {row['scheduler']} "
                f"| {row['step_cache']} | {row['denoise_s']:.2f} | {row['denoise_s_per_step']:.4f} "
                f"| {row['video_s']:.2f} "
                f"| {row['denoise_speedup']:.2f}x | {row['video_speedup']:.2f}x | {row['latent_error']:.4f} "
                f"| {_psnr(row['psnr_db'], True)} | {_psnr(row.get('gate_psnr_db'), gated)} "
                f"| {_fmt(row.get('gate_latent_error'), '.4f')} "
                f"| {_fmt(row.get('gate_compute_fraction'), '.0%')} | {row.get('production', '-')} |"
            )
        lines += [
            "",
            "s/step: denoising seconds over the steps of all shots. Video: plan to MP4 with quality "
            "scoring; rendering overlaps denoising. With the gate on: cached (passed), refused (a "
            "request's own step cache below a floor: the video fails as invalid_request with the "
            "figures) or uncached (a profile's step cache below a floor is dropped, the video made "
            "uncached).",
            "",
        ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape_part, video = report.get("shape"), report.get("video")
    steps_list = sorted({row["steps"] for row in video["rows"]}) if video else []
    panels = (1 if shape_part else 0) + len(steps_list)
    if not panels:
        return
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    axes_iter = iter(axes[0])
    if shape_part:
        axis = next(axes_iter)
        rows = shape_part["rows"]
        names = [row["row"] for row in rows]
        values = [row["s_per_step"] for row in rows]
        bars = axis.barh(names, values, color=["tab:grey", "tab:blue", *["tab:orange"] * (len(rows) - 2)])
        for bar, row in zip(bars, rows, strict=True):
            axis.annotate(
                f" {row['speedup_vs_eager']:.2f}x",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                va="center",
                fontsize=8,
            )
        if report["machine"]["device"].startswith("cuda"):
            axis.axvline(shape_part["floor_s_per_step"], color="green", linestyle="--", label="compute floor")
            if shape_part["full_model_shape"]:
                axis.axvline(PUBLISHED_S_PER_STEP, color="red", linestyle=":", label="0.95 s published")
            axis.legend(fontsize=8)
        shape = shape_part["shape"]
        axis.invert_yaxis()
        axis.set_title(
            f"Wan 1.3B shape, {shape['width']}x{shape['height']}x{shape['frames']}, {shape['layers']} blocks",
            fontsize=10,
        )
        axis.set_xlabel("seconds per step (CFG)")
        axis.grid(alpha=0.3, axis="x")
    for steps in steps_list:
        axis = next(axes_iter)
        for row in (r for r in video["rows"] if r["steps"] == steps):
            psnr = row["psnr_db"] if row["psnr_db"] is not None else 60.0
            marker = "s" if row["row"].startswith("profile") else "o"
            axis.scatter(row["video_s"], psnr, marker="*" if row["step_cache"] == "none" else marker, s=50)
            axis.annotate(
                row["row"], (row["video_s"], psnr), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axis.set_title(f"tiny preset, {steps} steps (config)", fontsize=10)
        axis.set_xlabel("seconds per video")
        axis.set_ylabel("PSNR vs uncached, dB (identical at 60)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- command line ---------------------------------------------------------------------------------


def shape_from_args(args: argparse.Namespace, device: torch.device) -> Shape:
    base = QUICK_SHAPE if args.quick else (FULL_SHAPE if device.type == "cuda" else CPU_SHAPE)
    width, height = base.width, base.height
    if args.size:
        width, height = (int(part) for part in args.size.lower().split("x"))
    return Shape(
        width=width,
        height=height,
        frames=args.frames or base.frames,
        layers=args.layers or base.layers,
        text_tokens=args.text_tokens or base.text_tokens,
        steps=args.shape_steps or base.steps,
        dtype=base.dtype,
        calibration_prompts=base.calibration_prompts,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    from shopreel.pipelines.presets import resolve_device

    device = resolve_device(args.device)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "device": str(device)
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m shopreel.benchmarks.denoise", *sys.argv[1:]]),
        "quick": args.quick,
        "repeats": args.repeats,
        "anchors": {
            "published_s_per_step": PUBLISHED_S_PER_STEP,
            "floor_s_per_step": FLOOR_S_PER_STEP,
            "peak_bf16_tflops": PEAK_BF16_FLOPS / 1e12,
            "floor_s_per_step_computed": round(wan_step_flops(FULL_SHAPE) / PEAK_BF16_FLOPS, 4),
        },
    }
    if "shape" in args.parts:
        report["shape"] = run_shape(shape_from_args(args, device), device, args.repeats, log)
    if "video" in args.parts:
        if device.type != "cpu" and args.device != "auto":
            log("part B runs the default model config (device auto)")
        report["video"] = run_video(args.steps, args.repeats, args.quick, log)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=["shape", "video"], default=["shape", "video"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median); rows interleaved")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="part B steps (default 4 30)")
    parser.add_argument("--shape-steps", type=int, default=None, help="part A steps (CPU 10, CUDA 30)")
    parser.add_argument("--layers", type=int, default=None, help="part A blocks (CPU 4, CUDA 30 = Wan 1.3B)")
    parser.add_argument("--size", default=None, help="part A WIDTHxHEIGHT (CPU 128x128, CUDA 832x480)")
    parser.add_argument("--frames", type=int, default=None, help="part A frames, 4k+1 (CPU 9, CUDA 81)")
    parser.add_argument("--text-tokens", type=int, default=None, help="part A text length (CPU 64, CUDA 512)")
    parser.add_argument("--device", default="auto", help="part A device: auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 1 repeat, 2 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.steps = args.steps or [2]
    args.steps = args.steps or [4, 30]
    report = run(args)
    write_results(args.out, "denoise", report, markdown(report))
    plot(report, args.out / "denoise.png")


if __name__ == "__main__":
    main()
