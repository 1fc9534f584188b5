"""Prompt following: does a video show the object, colour and camera move its prompt names?

    .venv/bin/python -m shopreel.benchmarks.prompt_following [--presets mini tiny] [--per-combo 2]
    .venv/bin/python -m shopreel.benchmarks.prompt_following --quick     # 10 prompts, for CI

Prompts come from the combinations of (object, colour, camera move) that ``train.clips.is_held_out``
keeps out of the mini model's training data (15% of the 315), each written with the caption
templates in English and Chinese on a background drawn at random: the model never saw these
combinations, only their parts. Every preset makes the same videos from the same prompts and seeds
through its own ``WanPipeline`` (the classes served): 17 frames at 64x64, the mini checkpoint's
default steps and guidance, its negative prompt.

Two judges read the videos:
* the **probe** (``train.probe``), a small 3D CNN trained only on the renderer's ground-truth clips
  (never on generated ones), predicts object, colour and camera move; its accuracy on fresh
  ground-truth clips is reported as its ceiling;
* a **dominant-colour** rule without learning (``train.clips.dominant_colour``): the median colour
  of the pixels that differ from the frame border, matched to the nearest named colour.

Chance is one over the number of classes (5 objects, 9 colours, 7 camera moves). The probe is read
from ``models/probe.safetensors`` when present, else trained (about 10 minutes on 2 cores) and kept
there. Writes ``results/prompt_following.{json,md}`` and a PNG of mini's frames for the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..pipelines.config import ModelConfig
from ..pipelines.overlays import NOTO_SC_FACE_INDEX, default_font_path, load_font
from ..pipelines.presets import DEFAULT_NEGATIVE_PROMPT, load_model, resolve_preset
from ..train.clips import (
    BACKGROUNDS,
    LOW_CONTRAST,
    ClipSpec,
    all_combinations,
    caption,
    dominant_colour,
    is_held_out,
)
from ..train.probe import HEADS, classify, getattr_label, load_probe, save_probe, train_probe
from .common import write_results

REPOSITORY = Path(__file__).resolve().parent.parent
PROBE_PATH = REPOSITORY / "models" / "probe.safetensors"
FRAMES, SIZE = 17, 64


def held_out_prompts(per_combo: int, seed: int = 7) -> list[tuple[ClipSpec, str]]:
    """(spec, prompt) for each held-out combination, alternating English and Chinese."""
    rng = random.Random(seed)
    prompts = []
    for obj, colour, camera in all_combinations():
        if not is_held_out(obj, colour, camera):
            continue
        for k in range(per_combo):
            background = rng.choice([b for b in BACKGROUNDS if (colour, b) not in LOW_CONTRAST])
            spec = ClipSpec(obj, colour, camera, background, seed=rng.randrange(2**31))
            prompts.append((spec, caption(spec, rng, language=("en", "zh")[k % 2])))
    return prompts


def generate(preset: str, prompts: list[str], steps: int, guidance: float, seed: int = 0) -> np.ndarray:
    """uint8 (N, T, H, W, 3) videos, one per prompt, through the preset's WanPipeline."""
    import torch

    pipe = load_model(ModelConfig(preset=preset, device="cpu", dtype="float32")).pipe
    length = resolve_preset(preset).max_sequence_length
    videos = []
    for index, prompt in enumerate(prompts):
        frames = pipe(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            height=SIZE,
            width=SIZE,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + index),
            max_sequence_length=length,
            output_type="np",
        ).frames[0]
        videos.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(videos)


def score(videos: np.ndarray, specs: list[ClipSpec], probe) -> dict[str, Any]:
    predicted = classify(probe, videos)
    accuracy = {
        head: float(
            np.mean([p[head] == getattr_label(s, head) for p, s in zip(predicted, specs, strict=True)])
        )
        for head in HEADS
    }
    accuracy["colour_rule"] = float(
        np.mean([dominant_colour(v) == s.colour for v, s in zip(videos, specs, strict=True)])
    )
    return accuracy


def frames_sheet(videos: np.ndarray, prompts: list[str], path: Path, count: int = 6) -> None:
    """First, middle and last frame of the first ``count`` videos, upscaled, prompt beside each."""
    from PIL import Image, ImageDraw

    scale, picks = 3, (0, FRAMES // 2, FRAMES - 1)
    tile = SIZE * scale
    text_width = 330
    sheet = Image.new("RGB", (len(picks) * tile + text_width, count * tile), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    # The compositor's bundled CJK font: half the prompts are Chinese.
    font = load_font(str(default_font_path()), 13, NOTO_SC_FACE_INDEX)
    for row, (video, prompt) in enumerate(zip(videos[:count], prompts[:count], strict=True)):
        for column, frame in enumerate(picks):
            image = Image.fromarray(video[frame]).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(image, (column * tile, row * tile))
        words, lines = prompt.split(" "), [""]
        for word in words:  # wrap English; Chinese has no spaces and is cut by width
            candidate = f"{lines[-1]} {word}".strip()
            if draw.textlength(candidate, font=font) > text_width - 16 and lines[-1]:
                lines.append(word)
            else:
                lines[-1] = candidate
        draw.multiline_text(
            (len(picks) * tile + 8, row * tile + 8), "\n".join(lines), fill=(20, 20, 20), font=font
        )
    sheet.save(path)


def run(presets: list[str], per_combo: int, out: Path, quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    if PROBE_PATH.is_file():
        probe, probe_report = load_probe(PROBE_PATH), None
    else:
        probe, report = train_probe()
        save_probe(probe, PROBE_PATH)
        probe_report = dataclasses.asdict(report)
    cases = held_out_prompts(per_combo)
    if quick:
        cases = cases[:10]
    specs, prompts = [s for s, _ in cases], [p for _, p in cases]
    mini = resolve_preset("mini")
    # Ground truth through the judge: its ceiling on these very combinations.
    from ..train.clips import render_clip

    truth = np.stack([render_clip(s) for s in specs])
    rows = {"ground truth (renderer)": score(truth, specs, probe)}
    sheets: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for preset in presets:
        tick = time.perf_counter()
        videos = generate(preset, prompts, mini.default_steps, mini.default_guidance)
        seconds[preset] = (time.perf_counter() - tick) / len(prompts)
        rows[preset] = score(videos, specs, probe)
        sheets[preset] = videos
    chance = {head: 1 / len(names) for head, names in HEADS.items()}
    rows["chance"] = {**chance, "colour_rule": chance["colour"]}
    report = {
        "prompts": len(prompts),
        "held_out_combinations": len({(s.object, s.colour, s.camera) for s in specs}),
        "frames": FRAMES,
        "size": SIZE,
        "steps": mini.default_steps,
        "guidance": mini.default_guidance,
        "accuracy": rows,
        "seconds_per_video": seconds,
        "probe_trained_now": probe_report,
        "goal": {"colour": 0.8, "object": 0.6, "camera": 0.5},
        "seconds": time.perf_counter() - started,
    }
    lines = [
        f"Prompt following on {len(prompts)} prompts from {report['held_out_combinations']} held-out "
        f"(object, colour, camera) combinations, English and Chinese; {FRAMES} frames at {SIZE}x{SIZE}, "
        f"{mini.default_steps} steps, guidance {mini.default_guidance:g}.",
        "",
        "| videos from | object (probe) | colour (probe) | camera move (probe) | colour (rule) | s/video |",
        "|---|---|---|---|---|---|",
    ]
    for name, accuracy in rows.items():
        cells = " | ".join(f"{accuracy[k]:.0%}" for k in ("object", "colour", "camera", "colour_rule"))
        lines.append(
            f"| {name} | {cells} | {seconds[name]:.2f} |" if name in seconds else f"| {name} | {cells} | |"
        )
    lines += ["", "Goal for mini: colour >= 80%, object >= 60%, camera move >= 50% (probe)."]
    if quick:
        print("\n".join(lines))
    else:
        write_results(out, "prompt_following", report, "\n".join(lines) + "\n")
        if "mini" in sheets:
            frames_sheet(sheets["mini"], prompts, out / "prompt_following_mini.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mini", "tiny"])
    parser.add_argument("--per-combo", type=int, default=2, help="prompts per held-out combination")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="10 prompts, nothing written")
    args = parser.parse_args()
    run(args.presets, args.per_combo, args.out, args.quick)


if __name__ == "__main__":
    main()
