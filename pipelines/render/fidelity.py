"""How close a backend's frames are to the torch reference, and the report a quantised model keeps.

A quantised model is accepted on held-out generator latents (``int8.quantize_int8``) and its report
is written beside it; a renderer loading the model checks that report against its own floor, since
probe noise is not what the model was calibrated for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def psnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR of videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((reference.float().cpu() - other.float().cpu()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def decode_clip(backend: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode one shot's latents ``[1, C, T, h, w]`` frame by frame through a backend."""
    state = backend.new_state()
    return torch.cat(
        [backend.decode(state, latents[:, :, i : i + 1]).float().cpu() for i in range(latents.shape[2])], 2
    )


@dataclass(frozen=True)
class FidelityReport:
    """What ``quantize_int8`` built and how close it is to the fp32 torch reference.

    ``psnr_db`` is measured on the held-out clips only; ``calibration_psnr_db`` is the worst calibration
    clip of the chosen recipe (the clips that calibrated the ranges and chose the fp32 fallback layers).
    """

    precision: str
    psnr_db: float
    max_abs_error: float
    min_psnr_db: float
    accepted: bool
    model_path: str
    calibration_method: str = "MinMax"
    calibration_psnr_db: float | None = None
    quantized_nodes: tuple[str, ...] = ()  # Convs that run as INT8
    fp32_nodes: tuple[str, ...] = ()  # Convs kept fp32: int8.FP32_NODES, then the accuracy fallback
    fallback_nodes: tuple[str, ...] = ()  # the part of fp32_nodes the sensitivity search chose
    candidates_tried: int = 0  # INT8 graphs built and scored on calibration clips
    search_s: float = 0.0  # seconds spent choosing the recipe (calibration included)
    # Whole held-out clips (torch warm-up frames included) on this machine: INT8 / ONNX fp32 time.
    # Fidelity decides acceptance; this says whether INT8 is worth activating here at all.
    speedup_vs_fp32: float | None = None
    int8_steps: tuple[str, ...] = ("steady",)  # which of first/second/steady run INT8
    # Worst calibration clip with the first two steps INT8 too (None: not tried); they stay fp32 below
    # the floor plus margin.
    int8_first_steps_psnr_db: float | None = None


def fidelity_path(model_path: Path) -> Path:
    """The FidelityReport kept beside a quantised model."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".fidelity.json")


def save_report(report: FidelityReport) -> None:
    """Keep an accepted model's report beside it, for renderers to check before they activate it."""
    fidelity_path(Path(report.model_path)).write_text(json.dumps(dataclasses.asdict(report), indent=2))


def check_saved_report(model_path: Path, min_psnr_db: float) -> None:
    """A quantised model is judged on the held-out generator latents it was accepted on: that PSNR must
    meet this renderer's floor (``-inf``: no floor, for quantize_int8's own candidate and benchmarks)."""
    if min_psnr_db == -math.inf:
        return
    try:
        report = json.loads(fidelity_path(model_path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{model_path.name} has no readable fidelity report: quantise it again") from exc
    if not report.get("accepted") or float(report["psnr_db"]) < min_psnr_db:
        raise ValueError(
            f"{model_path.name}: {report['psnr_db']} dB on held-out latents, floor {min_psnr_db} dB"
        )
