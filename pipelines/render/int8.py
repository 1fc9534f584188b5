"""Static INT8 for the ONNX Runtime renderer, calibrated on latents the generator really produces.

``quantize_int8`` builds ONNX Runtime static QDQ models of the exported decoder steps: the steady step
always, the first two steps too when the floor holds with them INT8 (else they stay fp32). Ranges
come from real generator latents (``calibrate.calibration_set``), never noise; the Convs that would
miss the floor fall back to fp32 (an accuracy-driven search). The model is kept, with its fidelity
report beside it, only when its PSNR against the fp32 torch reference on held-out latents reaches
the configured floor.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .export import GraphCache, atomic_path, step_role
from .fidelity import FidelityReport, decode_clip, fidelity_path, psnr_db, save_report
from .onnxruntime_backend import Feeds, OnnxDecoderBackend, OnnxSteps

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")
# Node names from the exporter: the latent input projection and the RGB output convolution.
FP32_NODES = ("/post_quant_conv/Conv", "/decoder/conv_in/Conv", "/decoder/conv_out/Conv")
HEAD_ROLES = ("first", "second")


@dataclass
class _CalibrationClip:
    feeds: list[Feeds]  # what the fp32 steady graph was fed, step by step
    warmup: list[torch.Tensor]  # the fp32 first/second steps' frames: the same in every candidate
    expected: torch.Tensor  # the whole clip decoded in fp32
    latents: torch.Tensor  # the clip itself, for scoring whole chains from latent frame 0


def _decode_chain(
    steps: OnnxSteps, latents: torch.Tensor, fed: dict[str, list[Feeds]] | None = None
) -> list[torch.Tensor]:
    """Each latent frame's video through a chain of steps from empty caches; with ``fed``, what each
    step was fed is added there, by role."""
    caches: list[np.ndarray] = []
    frames = []
    for index in range(latents.shape[2]):
        role = step_role(index)
        feeds = steps.feeds(role, latents[:, :, index : index + 1], caches)
        if fed is not None:
            fed.setdefault(role, []).append({name: value.copy() for name, value in feeds.items()})
        video, caches = steps.run_feeds(role, feeds)
        frames.append(video)
    return frames


def _record_calibration(
    fp32: OnnxDecoderBackend, calibration: Iterable[torch.Tensor]
) -> tuple[list[_CalibrationClip], dict[str, list[Feeds]], tuple[int, int]]:
    """Decode each calibration clip with the fp32 chain: the clips with steady steps, what the first and
    second steps were fed over all clips, and the clips' latent size."""
    clips: list[_CalibrationClip] = []
    head_feeds: dict[str, list[Feeds]] = {}
    latent_hw: tuple[int, int] | None = None
    for clip in calibration:
        latent_hw = (clip.shape[3], clip.shape[4])
        steps = fp32.chains.for_size(latent_hw)
        assert steps is not None  # no torch fallback here: a failing graph raised
        fed: dict[str, list[Feeds]] = {}
        frames = _decode_chain(steps, clip, fed)
        for role in HEAD_ROLES:
            if role in fed:
                head_feeds.setdefault(role, []).extend(fed[role])
        if "steady" in fed:
            warmup = frames[: clip.shape[2] - len(fed["steady"])]
            clips.append(_CalibrationClip(fed["steady"], warmup, torch.cat(frames, dim=2), clip))
    if not clips or latent_hw is None:
        raise ValueError("calibration needs latents with more than 2 latent frames")
    return clips, head_feeds, latent_hw


def _chain_psnr(steps: OnnxSteps, clip: _CalibrationClip) -> float:
    """PSNR of a chain of first/second/steady steps over a whole calibration clip, from empty caches."""
    return psnr_db(clip.expected, torch.cat(_decode_chain(steps, clip.latents), dim=2))


def _basic_session(path: Path, providers: list[str]) -> Any:
    """Unfused QDQ for scoring candidates: the same rounding as the int8 kernels to well under a dB,
    and no fusion cost."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _closed_loop_psnr(session: Any, clip: _CalibrationClip) -> float:
    """PSNR of a candidate on a calibration clip, decoded on its own caches from the fp32 hand-over on
    (so errors compound frame to frame as when serving), over the whole clip like the held-out check."""
    names = [i.name for i in session.get_inputs()]
    caches = [clip.feeds[0][name] for name in names[1:]]
    outputs = list(clip.warmup)
    for feed in clip.feeds:
        inputs = {"latents": feed["latents"], **dict(zip(names[1:], caches, strict=True))}
        video, *caches = session.run(None, inputs)
        outputs.append(torch.from_numpy(video))
    return psnr_db(clip.expected, torch.cat(outputs, dim=2))


class _Int8Builder:
    """Static QDQ graphs of one fp32 decode step that differ only in which Convs stay fp32.

    Calibration (the costly part) runs once: where this onnxruntime has ``calibration_cache_path`` the
    tensor ranges are kept in ``workdir`` and every later candidate reuses them.
    """

    def __init__(
        self,
        fp32_path: Path,
        feeds: list[dict[str, np.ndarray]],
        method: str,
        options: dict[str, Any],
        workdir: Path,
        providers: list[str],
    ) -> None:
        import inspect

        import onnx
        from onnxruntime.quantization import quantize_static

        self.fp32_path = fp32_path
        self.feeds = feeds
        self.method = method
        self.options = dict(options)
        self.workdir = workdir
        self.providers = providers
        self.cache_ranges = "calibration_cache_path" in inspect.signature(quantize_static).parameters
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        self.convs = [n.name for n in graph.node if n.op_type == "Conv" and n.name not in FP32_NODES]
        self.tried = 0

    def build(self, path: Path, fp32_nodes: Sequence[str]) -> None:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self, items: list[dict[str, np.ndarray]]) -> None:
                self.items = iter(items)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        cached = {"calibration_cache_path": str(self.workdir / "ranges.json")} if self.cache_ranges else {}
        quantize_static(
            str(self.fp32_path),
            str(path),
            Reader(self.feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],  # the compute; norms and activations stay fp32
            nodes_to_exclude=[*FP32_NODES, *fp32_nodes],  # first/last convolutions and the fallback
            calibrate_method=getattr(CalibrationMethod, self.method),
            extra_options=dict(self.options),
            **cached,
        )

    def score(self, fp32_nodes: Sequence[str], clips: Sequence[_CalibrationClip]) -> float:
        """Worst closed-loop PSNR over ``clips`` of the graph with ``fp32_nodes`` kept fp32."""
        path = self.workdir / "candidate.onnx"
        self.build(path, fp32_nodes)
        self.tried += 1
        session = _basic_session(path, self.providers)
        return min(_closed_loop_psnr(session, clip) for clip in clips)


def _choose_fallback(
    builder: _Int8Builder, clips: Sequence[_CalibrationClip], target_db: float
) -> tuple[list[str], float]:
    """Accuracy-driven mixed precision on the calibration clips: the fewest Convs to keep fp32 so that
    the worst calibration clip reaches ``target_db``.

    Every Conv is ranked once by single-layer sensitivity (only that Conv INT8, PSNR on the first
    calibration clip), then the smallest k such that the k most sensitive stay fp32 is bisected
    (about log2(#convs) more candidates on all calibration clips). Returns (fp32 Convs, their score).
    """
    full = builder.score([], clips)
    if full >= target_db:
        return [], full
    convs = builder.convs
    sensitivity = {conv: builder.score([c for c in convs if c != conv], clips[:1]) for conv in convs}
    ranked = sorted(convs, key=lambda conv: sensitivity[conv])  # most damaging first
    logger.info(
        "INT8 single-layer sensitivity (dB, most sensitive first): %s",
        ", ".join(f"{conv}={sensitivity[conv]:.1f}" for conv in ranked),
    )
    scores = {0: full, len(ranked): math.inf}  # all fp32: the fp32 graph itself
    low, high = 0, len(ranked)  # invariant: low misses the target, high reaches it
    while high - low > 1:
        middle = (low + high) // 2
        scores[middle] = builder.score(ranked[:middle], clips)
        low, high = (low, middle) if scores[middle] >= target_db else (middle, high)
    return ranked[:high], scores[high]


def _quantize_heads(
    graphs: GraphCache,
    latent_hw: tuple[int, int],
    head_feeds: dict[str, list[Feeds]],
    clips: Sequence[_CalibrationClip],
    fp32_nodes: Sequence[str],
    steady_path: Path,
    steady_builder: _Int8Builder,
    target_db: float,
) -> tuple[list[str], float | None]:
    """INT8 first/second steps (the same Convs fp32 as the steady one), kept in the cache folder only
    if the whole INT8 chain still reaches ``target_db`` on the calibration clips; returns their roles."""
    for role in HEAD_ROLES:  # a stale pair from an earlier calibration must not stay behind
        graphs.path(latent_hw, "int8", role).unlink(missing_ok=True)
    if set(head_feeds) != set(HEAD_ROLES):
        return [], None
    providers = steady_builder.providers
    sessions = {"steady": _basic_session(steady_path, providers)}
    built: dict[str, Path] = {}
    for role in HEAD_ROLES:
        workdir = steady_builder.workdir / role
        workdir.mkdir()
        builder = _Int8Builder(
            graphs.path(latent_hw, "fp32", role),
            head_feeds[role],
            steady_builder.method,
            steady_builder.options,
            workdir,
            providers,
        )
        built[role] = workdir / "int8.onnx"
        builder.build(built[role], fp32_nodes)
        sessions[role] = _basic_session(built[role], providers)
    chain = OnnxSteps(sessions=sessions, paths={"steady": steady_path, **built})
    quality = min(_chain_psnr(chain, clip) for clip in clips)
    if quality < target_db:
        logger.info("INT8 first/second steps stay fp32: %.1f dB < %.1f dB", quality, target_db)
        return [], quality
    for role, path in built.items():
        with atomic_path(graphs.path(latent_hw, "int8", role)) as temp:
            shutil.copyfile(path, temp)
    return list(built), quality


@dataclass(frozen=True)
class _HeldOut:
    psnr_db: float  # the worst held-out clip, INT8 chain vs the fp32 torch reference
    max_abs_error: float
    speedup_vs_fp32: float  # ONNX fp32 time / INT8 time over the held-out clips


def _check_held_out(
    candidate: OnnxDecoderBackend, fp32: OnnxDecoderBackend, held_out: Sequence[torch.Tensor]
) -> _HeldOut:
    """Decode the held-out clips with the INT8 candidate, the fp32 graphs and the fp32 torch reference."""
    reference = candidate.reference
    psnrs, max_error, seconds = [], 0.0, {"int8": 0.0, "fp32": 0.0}
    decode_clip(candidate, held_out[0][:, :, :3])  # load the sessions outside the timing
    for clip in held_out:
        expected, decoded = decode_clip(reference, clip), {}
        for name, backend in (("int8", candidate), ("fp32", fp32)):
            clip_started = time.perf_counter()
            decoded[name] = decode_clip(backend, clip)
            seconds[name] += time.perf_counter() - clip_started
        got = decoded["int8"]
        psnrs.append(psnr_db(expected, got))
        max_error = max(max_error, float((expected - got).abs().max()))
    return _HeldOut(min(psnrs), max_error, seconds["fp32"] / seconds["int8"])


def _remove_int8(graphs: GraphCache, latent_hw: tuple[int, int], *, steady: bool) -> None:
    """Delete the INT8 first/second steps of a size (and with ``steady``, the steady step and its report)."""
    roles = (*HEAD_ROLES, "steady") if steady else HEAD_ROLES
    for role in roles:
        graphs.path(latent_hw, "int8", role).unlink(missing_ok=True)
    if steady:
        fidelity_path(graphs.path(latent_hw, "int8")).unlink(missing_ok=True)


def quantize_int8(
    vae: Any,
    device: torch.device,
    calibration: Iterable[torch.Tensor],
    held_out: Sequence[torch.Tensor],
    *,
    cache_dir: Path | None = None,
    min_psnr_db: float = 35.0,
    calibrate_method: str = "MinMax",
    calibration_options: dict[str, Any] | None = None,
    margin_db: float = 1.0,
    fp32_nodes: Sequence[str] | None = None,
) -> FidelityReport:
    """Static INT8 (QDQ) decode steps calibrated on real latents; kept only if they meet the PSNR floor.

    ``calibration`` and ``held_out`` are generator latents of one spatial size, ``[1, C, T, h, w]``
    with T > 2 (the steady step decodes every frame after the first two). Recipe: per-channel INT8
    weights, per-tensor UINT8 activations, ranges from ``calibrate_method`` (``calibration_options``:
    onnxruntime's ``extra_options``, e.g. ``{"CalibPercentile": 99.99}``), Convs only, the first and
    last convolutions fp32. When the all-INT8 graph misses ``min_psnr_db + margin_db`` on the
    calibration clips (decoded closed-loop, so cache errors compound as in serving), the most
    sensitive Convs fall back to fp32 (``_choose_fallback``); ``fp32_nodes`` skips that search and
    keeps exactly these Convs fp32. The first and second steps are quantised with the same fp32 Convs
    and kept INT8 only if the whole INT8 chain still reaches that target. The fidelity check then
    decodes ``held_out`` — clips used neither for the ranges nor for choosing layers — with the INT8
    chain and with the fp32 torch reference.
    """
    if calibrate_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibrate_method must be one of {CALIBRATION_METHODS}, not {calibrate_method!r}")
    started = time.perf_counter()
    target_db = min_psnr_db + margin_db

    # 1. Decode the calibration clips with the fp32 chain, keeping what each step was fed.
    fp32 = OnnxDecoderBackend(vae, device, precision="fp32", cache_dir=cache_dir)
    clips, head_feeds, latent_hw = _record_calibration(fp32, calibration)
    int8_path = fp32.graphs.path(latent_hw, "int8")

    # 2. Choose the Convs that stay fp32 and write the INT8 steady step, then the first/second steps
    #    where the whole INT8 chain keeps the target (ranges are calibrated once, in a scratch folder).
    try:
        with atomic_path(int8_path) as temp, tempfile.TemporaryDirectory(prefix="shopreel-int8-") as workdir:
            builder = _Int8Builder(
                fp32.graphs.path(latent_hw, "fp32"),
                [feed for clip in clips for feed in clip.feeds],
                calibrate_method,
                calibration_options or {},
                Path(workdir),
                fp32.providers,
            )
            if fp32_nodes is None:
                fallback, calibration_psnr = _choose_fallback(builder, clips, target_db)
            else:
                fallback = [node for node in fp32_nodes if node not in FP32_NODES]
                calibration_psnr = builder.score(fallback, clips)
            builder.build(temp, fallback)
            heads, heads_psnr = _quantize_heads(
                fp32.graphs, latent_hw, head_feeds, clips, fallback, temp, builder, target_db
            )
        search_s = time.perf_counter() - started
    except BaseException:
        _remove_int8(fp32.graphs, latent_hw, steady=False)
        raise

    # 3. Judge the INT8 chain on the held-out clips (its own check is off: these clips are the test).
    candidate = OnnxDecoderBackend(vae, device, precision="int8", cache_dir=cache_dir, min_psnr_db=-math.inf)
    held = _check_held_out(candidate, fp32, held_out)
    kept = set(fallback)
    report = FidelityReport(
        precision="int8",
        psnr_db=round(held.psnr_db, 2),
        max_abs_error=round(held.max_abs_error, 5),
        min_psnr_db=min_psnr_db,
        accepted=held.psnr_db >= min_psnr_db,
        model_path=str(int8_path),
        calibration_method=calibrate_method,
        calibration_psnr_db=round(calibration_psnr, 2),
        quantized_nodes=tuple(conv for conv in builder.convs if conv not in kept),
        fp32_nodes=(*FP32_NODES, *fallback),
        fallback_nodes=tuple(fallback),
        candidates_tried=builder.tried,
        search_s=round(search_s, 1),
        speedup_vs_fp32=round(held.speedup_vs_fp32, 2),
        int8_steps=(*heads, "steady"),
        int8_first_steps_psnr_db=None if heads_psnr is None else round(heads_psnr, 2),
    )
    logger.info(
        "INT8 recipe: %s calibration, %d Convs INT8, %d fp32 (%d by fallback), %.1f dB on calibration clips",
        calibrate_method,
        len(report.quantized_nodes),
        len(report.fp32_nodes),
        len(fallback),
        calibration_psnr,
    )

    # 4. Keep the model with its report only above the floor: a renderer must never load one below it.
    if report.accepted:
        save_report(report)
    else:
        _remove_int8(fp32.graphs, latent_hw, steady=True)
        logger.warning("INT8 decoder refused: %.1f dB < floor %.1f dB", report.psnr_db, min_psnr_db)
    return report
