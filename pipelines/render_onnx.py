"""ONNX Runtime renderer: the streaming decoder exported to ONNX, fp32 or static INT8.

Each exported graph is one step of the causal decoder: one normalised latent frame and the causal
cache tensors in; that frame's video frames and the updated caches out (de-normalisation,
``post_quant_conv`` and the clamp are inside). Wan's decoder treats its first two latent frames
specially (empty caches, then the temporal upsamplers' "Rep" marker and one-frame caches), so there
are three graphs per latent size: ``first``, ``second`` and ``steady`` (every later frame, feeding
itself). Their cache layout comes from a run of the torch reference on probe latents, and the chain
is checked against that reference before it serves (PSNR floor).

Exported files are cached on disk under a key of the VAE's weights and config, the latent shape,
the precision and the torch/onnxruntime versions, so a changed model or size never reuses a stale
graph. INT8 is ONNX Runtime's static QDQ quantisation, calibrated on real generator latents
(``quantize_int8``): the steady step always, the first two steps too when the floor holds with them
INT8 (else they stay fp32). It is activated only when its PSNR
against the fp32 torch reference on held-out latents reaches the configured floor.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .render import TorchDecoderBackend
from .shot_cache import weights_digest  # graphs are addressed by the VAE's weights, like shots by theirs

logger = logging.getLogger("shopreel.pipelines.render")

EXPORT_FORMAT_VERSION = 2  # bump when the exported graph changes meaning
ONNX_OPSET = 17
# Node names from the exporter: the latent input projection and the RGB output convolution.
FP32_NODES = ("/post_quant_conv/Conv", "/decoder/conv_in/Conv", "/decoder/conv_out/Conv")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHOPREEL_CACHE_DIR", Path.home() / ".cache" / "shopreel")) / "onnx"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary file beside ``target`` that replaces it only if the block succeeds, so a concurrent
    process never loads a half-written graph or engine."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_unusable_reason(vae: Any, device: torch.device) -> str | None:
    """Why the onnxruntime renderer cannot serve this VAE here (None: it can)."""
    if not onnxruntime_available():
        return "onnxruntime is not installed"
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        # A CPU graph behind a GPU VAE would be many times slower than torch on the GPU.
        return "the VAE is on CUDA and onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    if device.type not in ("cpu", "cuda"):
        return f"no onnxruntime execution provider for device {device}"
    if getattr(vae.config, "patch_size", None) is not None:
        return "patchified VAEs (Wan 2.2) are not exported yet"
    return None


def execution_providers(device: torch.device) -> list[str]:
    """CUDA (and TensorRT) providers when the VAE lives on a GPU and this onnxruntime has them, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = [
            p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available
        ] + wanted
    return wanted


def cache_key(weights: str, latent_hw: tuple[int, int], precision: str) -> str:
    import onnxruntime as ort

    parts = [
        weights,
        f"{latent_hw[0]}x{latent_hw[1]}",
        precision,
        torch.__version__,
        ort.__version__,
        str(EXPORT_FORMAT_VERSION),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


ROLES = ("first", "second", "steady")  # latent frame 0, latent frame 1, every later latent frame
CHECK_LATENT_FRAMES = 4  # first, second and two steady steps: the steady graph also feeds itself


def _role(latent_index: int) -> str:
    return ROLES[min(latent_index, len(ROLES) - 1)]


def _slot_kinds(feat_cache: Sequence[Any]) -> tuple[str, ...]:
    """Each cache slot as the decoder leaves it: empty, the upsamplers' "Rep" marker, or a tensor."""
    return tuple(
        "tensor" if isinstance(c, torch.Tensor) else ("rep" if isinstance(c, str) else "none")
        for c in feat_cache
    )


class _DecodeStep(torch.nn.Module):
    """One step of the causal decoder for one latent frame, caches as explicit inputs and outputs.

    Wan's decoder treats its first two latent frames specially (empty caches, then the temporal
    upsamplers' "Rep" marker and one-frame caches), so each role gets its own step: ``slots_in`` are
    the tensor caches it reads, ``rep_slots`` hold the marker (Python state, not graph inputs),
    ``slots_out`` the tensor caches it leaves for the next step.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(
        self,
        vae: Any,
        *,
        num_slots: int,
        slots_in: Sequence[int],
        rep_slots: Sequence[int],
        slots_out: Sequence[int],
        first_chunk: bool,
    ) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        # A copy, so the model shared with the torch path is never changed: ONNX's legacy exporter has
        # no "nearest-exact", and for the decoder's integer 2x upsampling "nearest" picks the same pixels.
        self.decoder = copy.deepcopy(vae.decoder)
        for module in self.decoder.modules():
            if isinstance(module, torch.nn.Upsample) and module.mode == "nearest-exact":
                module.mode = "nearest"
        self.num_slots = num_slots
        self.slots_in, self.rep_slots, self.slots_out = list(slots_in), list(rep_slots), list(slots_out)
        self.first_chunk = first_chunk
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape))
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)
        self.register_buffer("inv_std", 1.0 / std)

    def forward(self, latents: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat_cache: list[Any] = [None] * self.num_slots
        for slot in self.rep_slots:
            feat_cache[slot] = "Rep"
        for slot, cache in zip(self.slots_in, caches, strict=True):
            feat_cache[slot] = cache
        x = self.post_quant_conv(latents / self.inv_std + self.mean)  # exactly the torch path's order
        video = self.decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=self.first_chunk)
        return (video.clamp(-1.0, 1.0), *(feat_cache[slot] for slot in self.slots_out))


@dataclass
class _Trace:
    """What the torch reference did on probe latents: per role, the caches before the step."""

    num_slots: int
    kinds_before: dict[str, tuple[str, ...]]
    caches_before: dict[str, list[torch.Tensor]]
    latents: torch.Tensor  # [1, C, CHECK_LATENT_FRAMES, h, w]
    video: torch.Tensor  # the reference's decode of ``latents``


@dataclass
class _Graphs:
    """The three sessions of one latent size; ``slots[role]`` are the tensor caches that step reads."""

    sessions: dict[str, Any]
    paths: dict[str, Path]
    input_names: dict[str, list[str]]


@dataclass
class _OnnxDecodeState:
    graphs: _Graphs | None = None  # None: this size decodes with torch (see ``torch_state``)
    torch_state: Any = None
    caches: list[np.ndarray] = field(default_factory=list)
    latent_frames_done: int = 0
    recorder: list[dict[str, np.ndarray]] | None = None  # calibration: feeds of the steady graph
    head_recorder: dict[str, list[dict[str, np.ndarray]]] | None = None  # ... and of first/second


class OnnxDecoderBackend:
    """Streaming decode with ONNX Runtime: three exported steps (latent frame 0, 1, and later)."""

    name = "onnxruntime"

    def __init__(
        self,
        vae: Any,
        device: torch.device,
        *,
        precision: str = "fp32",
        cache_dir: Path | None = None,
        min_psnr_db: float = 35.0,
        fallback_to_torch: bool = False,
    ) -> None:
        self._check_usable(vae, device, precision)
        self.vae = vae
        self.device = device
        self.precision = precision
        self.reference = TorchDecoderBackend(vae, device)
        self.cache_dir = cache_dir or default_cache_dir()
        self.providers = execution_providers(device) if onnxruntime_available() else []
        self.weights = weights_digest(vae)
        self.min_psnr_db = min_psnr_db
        self.fallback_to_torch = fallback_to_torch  # "auto": graphs that fail to build or check -> torch
        self.fallback_reason: str | None = None
        self.check_psnr_db: dict[tuple[int, int], float] = {}
        self._graphs: dict[tuple[int, int], _Graphs | None] = {}
        self._lock = threading.Lock()

    def _check_usable(self, vae: Any, device: torch.device, precision: str) -> None:
        unusable = onnxruntime_unusable_reason(vae, device)
        if unusable is not None:
            raise ValueError(f"renderer backend 'onnxruntime' cannot run here: {unusable}")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"onnxruntime renderer supports precision fp32 or int8, not {precision!r}")

    def describe(self) -> dict[str, object]:
        graphs = {
            f"{h}x{w}": ("torch" if g is None else g.paths["steady"].name)
            for (h, w), g in self._graphs.items()
        }
        return {
            "backend": self.name,
            "precision": self.precision,  # of the steady-state step (see int8_steps_by_latent_size)
            "device": str(self.device),
            "providers": self.providers,
            "graphs_by_latent_size": graphs,  # "torch": that size failed its check and decodes in torch
            "int8_steps_by_latent_size": {f"{h}x{w}": self.int8_roles((h, w)) for h, w in self._graphs},
            "fallback_reason": self.fallback_reason,
        }

    def new_state(self) -> _OnnxDecodeState:
        return _OnnxDecodeState()

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(state, _OnnxDecodeState):
            raise TypeError("state was not made by this backend")
        if state.latent_frames_done == 0:
            state.graphs = self.graphs_for((latents.shape[3], latents.shape[4]))
            if state.graphs is None:
                state.torch_state = self.reference.new_state()
        if state.graphs is None:
            video = self.reference.decode(state.torch_state, latents).float().cpu()
            state.latent_frames_done += latents.shape[2]
            return video
        outputs = []
        for index in range(latents.shape[2]):
            outputs.append(self._step(state, state.graphs, latents[:, :, index : index + 1]))
        return torch.cat(outputs, dim=2)

    def _step(self, state: _OnnxDecodeState, graphs: _Graphs, frame: torch.Tensor) -> torch.Tensor:
        role = _role(state.latent_frames_done)
        names = graphs.input_names[role]
        feeds = {
            "latents": frame.detach().float().cpu().numpy(),
            **dict(zip(names[1:], state.caches, strict=True)),
        }
        if state.recorder is not None and role == "steady":
            state.recorder.append({name: value.copy() for name, value in feeds.items()})
        if state.head_recorder is not None and role != "steady":
            state.head_recorder.setdefault(role, []).append(
                {name: value.copy() for name, value in feeds.items()}
            )
        video, *state.caches = graphs.sessions[role].run(None, feeds)
        state.latent_frames_done += 1
        return torch.from_numpy(video)

    def graphs_for(self, latent_hw: tuple[int, int]) -> _Graphs | None:
        """The sessions for this latent size: loaded from the cache dir, else exported now, then checked
        once against the torch reference. None: this size decodes with torch (``auto`` only)."""
        with self._lock:
            if latent_hw in self._graphs:
                return self._graphs[latent_hw]
            graphs: _Graphs | None
            try:
                trace = self._trace(latent_hw)
                graphs = self._load_or_export(trace, latent_hw)
                self._check_fidelity(graphs, trace, latent_hw)
            except Exception as exc:
                if not self.fallback_to_torch:
                    raise
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "onnxruntime renderer unusable for latent size %s, decoding with torch: %s",
                    latent_hw,
                    self.fallback_reason,
                )
                graphs = None
            self._graphs[latent_hw] = graphs
            return graphs

    def _trace(self, latent_hw: tuple[int, int]) -> _Trace:
        """Run the torch reference on seeded probe latents, noting each role's incoming caches."""
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, self.vae.config.z_dim, CHECK_LATENT_FRAMES, *latent_hw, generator=generator)
        state = self.reference.new_state()
        kinds: dict[str, tuple[str, ...]] = {}
        caches: dict[str, list[torch.Tensor]] = {}
        outputs = []
        for index in range(CHECK_LATENT_FRAMES):
            role = _role(index)
            kinds.setdefault(role, _slot_kinds(state.feat_cache))
            caches.setdefault(
                role, [c.float().cpu().clone() for c in state.feat_cache if isinstance(c, torch.Tensor)]
            )
            outputs.append(self.reference.decode(state, latents[:, :, index : index + 1]).float().cpu())
        if _slot_kinds(state.feat_cache) != kinds["steady"]:
            raise ValueError("the decoder's cache layout does not settle after two latent frames")
        return _Trace(len(state.feat_cache), kinds, caches, latents, torch.cat(outputs, dim=2))

    def _check_fidelity(self, graphs: _Graphs, trace: _Trace, latent_hw: tuple[int, int]) -> None:
        state = _OnnxDecodeState(graphs=graphs)
        video = torch.cat(
            [self._step(state, graphs, trace.latents[:, :, i : i + 1]) for i in range(CHECK_LATENT_FRAMES)], 2
        )
        quality = psnr_db(trace.video, video)
        self.check_psnr_db[latent_hw] = quality
        # fp32 graphs must match the reference on any latents; INT8 was held to the floor on real ones
        # (``_check_int8_report``), and probe noise lies outside its calibrated ranges.
        if self.precision == "fp32" and quality < self.min_psnr_db:
            raise ValueError(
                f"{graphs.paths['steady'].name}: {quality:.1f} dB vs the torch reference, "
                f"floor {self.min_psnr_db} dB"
            )

    def model_path(
        self, latent_hw: tuple[int, int], precision: str | None = None, role: str = "steady"
    ) -> Path:
        precision = precision or self.precision
        key = cache_key(self.weights, latent_hw, precision)
        return self.cache_dir / f"wan-decode-{role}-{key}.{precision}.onnx"

    def _load_or_export(self, trace: _Trace, latent_hw: tuple[int, int]) -> _Graphs:
        sessions, paths, names = {}, {}, {}
        for role in ROLES:
            # The steady step (all frames but two) is what INT8 is about; quantize_int8 also leaves INT8
            # first/second steps when they keep the floor, else those stay fp32.
            precision = self.precision
            if role != "steady" and not self.model_path(latent_hw, precision, role).is_file():
                precision = "fp32"
            path = self.model_path(latent_hw, precision, role)
            if not path.is_file():
                if precision == "int8":
                    raise ValueError(
                        f"no accepted INT8 decoder for latent size {latent_hw[0]}x{latent_hw[1]} in "
                        f"{self.cache_dir}: calibrate one first (shopreel quantize, or "
                        "pipelines.render_onnx.quantize_int8)"
                    )
                self._export(trace, role, path)
            if precision == "int8" and role == "steady":  # its report covers the INT8 chain it came with
                self._check_int8_report(path)
            sessions[role], names[role] = self._open(path)
            paths[role] = path
        logger.info("%s renderer %s (%s): %s", self.name, self.precision, self.providers, paths)
        return _Graphs(sessions=sessions, paths=paths, input_names=names)

    def _open(self, path: Path) -> tuple[Any, list[str]]:
        """A runnable step for one exported graph and its input names."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads must not spin: on a shared CPU they would slow the generator beside us.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # As many threads as torch was given (a Serve replica sets that from its config).
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        return session, [i.name for i in session.get_inputs()]

    def int8_roles(self, latent_hw: tuple[int, int]) -> list[str]:
        graphs = self._graphs.get(latent_hw)
        return (
            []
            if graphs is None
            else [role for role in ROLES if graphs.paths[role].name.endswith(".int8.onnx")]
        )

    def _check_int8_report(self, path: Path) -> None:
        """A quantised step is judged on the held-out generator latents it was accepted on (probe noise
        is not what it was calibrated for): that PSNR must meet this renderer's floor."""
        if self.min_psnr_db == -math.inf:  # no floor (quantize_int8's own candidate, benchmarks)
            return
        try:
            report = json.loads(fidelity_path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path.name} has no readable fidelity report: quantise it again") from exc
        if not report.get("accepted") or float(report["psnr_db"]) < self.min_psnr_db:
            raise ValueError(
                f"{path.name}: {report['psnr_db']} dB on held-out latents, floor {self.min_psnr_db} dB"
            )

    def _export(self, trace: _Trace, role: str, path: Path) -> None:
        kinds_before = trace.kinds_before[role]
        next_role = ROLES[min(ROLES.index(role) + 1, len(ROLES) - 1)]
        step = _DecodeStep(
            self.vae,
            num_slots=trace.num_slots,
            slots_in=[i for i, kind in enumerate(kinds_before) if kind == "tensor"],
            rep_slots=[i for i, kind in enumerate(kinds_before) if kind == "rep"],
            slots_out=[i for i, kind in enumerate(trace.kinds_before[next_role]) if kind == "tensor"],
            first_chunk=role == "first",
        )
        step = step.float().cpu().eval()
        caches = tuple(trace.caches_before[role])
        example = torch.zeros(1, self.vae.config.z_dim, 1, *trace.latents.shape[3:])
        names = ["latents", *(f"cache_{slot}" for slot in step.slots_in)]
        outputs = ["video", *(f"next_cache_{slot}" for slot in step.slots_out)]
        with atomic_path(path) as temp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about the decoder's Python branches
            torch.onnx.export(
                step,
                (example, *caches),
                str(temp),
                input_names=names,
                output_names=outputs,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        logger.info("exported the %s decode step to %s", role, path)


# --- INT8 -----------------------------------------------------------------------------------------

CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")


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
    fp32_nodes: tuple[str, ...] = ()  # Convs kept fp32: FP32_NODES, then the accuracy fallback
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


def decode_clip(backend: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode one shot's latents ``[1, C, T, h, w]`` frame by frame through a backend."""
    state = backend.new_state()
    return torch.cat(
        [backend.decode(state, latents[:, :, i : i + 1]).float().cpu() for i in range(latents.shape[2])], 2
    )


def psnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR of videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((reference.float().cpu() - other.float().cpu()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


@dataclass
class _CalibrationClip:
    feeds: list[dict[str, np.ndarray]]  # what the fp32 graph was fed, step by step
    warmup: list[torch.Tensor]  # the fp32 first/second steps' frames: the same in every candidate
    expected: torch.Tensor  # the whole clip decoded in fp32
    latents: torch.Tensor  # the clip itself, for scoring whole chains from latent frame 0


def _chain_psnr(sessions: dict[str, Any], clip: _CalibrationClip) -> float:
    """PSNR of a chain of first/second/steady sessions over a whole calibration clip, from empty caches."""
    caches: list[np.ndarray] = []
    outputs = []
    for index in range(clip.latents.shape[2]):
        session = sessions[_role(index)]
        names = [i.name for i in session.get_inputs()]
        frame = clip.latents[:, :, index : index + 1].float().numpy()
        video, *caches = session.run(None, {"latents": frame, **dict(zip(names[1:], caches, strict=True))})
        outputs.append(torch.from_numpy(video))
    return psnr_db(clip.expected, torch.cat(outputs, dim=2))


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
    fp32: OnnxDecoderBackend,
    latent_hw: tuple[int, int],
    head_feeds: dict[str, list[dict[str, np.ndarray]]],
    clips: Sequence[_CalibrationClip],
    fp32_nodes: Sequence[str],
    steady_path: Path,
    workdir: Path,
    steady_builder: _Int8Builder,
    target_db: float,
) -> tuple[list[str], float | None]:
    """INT8 first/second steps (the same Convs fp32 as the steady one), kept in the cache folder only
    if the whole INT8 chain still reaches ``target_db`` on the calibration clips; returns their roles."""
    for role in ("first", "second"):  # a stale pair from an earlier calibration must not stay behind
        fp32.model_path(latent_hw, "int8", role).unlink(missing_ok=True)
    if set(head_feeds) != {"first", "second"}:
        return [], None
    sessions = {"steady": _basic_session(steady_path, fp32.providers)}
    built: dict[str, Path] = {}
    for role in ("first", "second"):
        (workdir / role).mkdir()
        builder = _Int8Builder(
            fp32.model_path(latent_hw, "fp32", role),
            head_feeds[role],
            steady_builder.method,
            steady_builder.options,
            workdir / role,
            fp32.providers,
        )
        built[role] = workdir / role / "int8.onnx"
        builder.build(built[role], fp32_nodes)
        sessions[role] = _basic_session(built[role], fp32.providers)
    quality = min(_chain_psnr(sessions, clip) for clip in clips)
    if quality < target_db:
        logger.info("INT8 first/second steps stay fp32: %.1f dB < %.1f dB", quality, target_db)
        return [], quality
    for role, path in built.items():
        with atomic_path(fp32.model_path(latent_hw, "int8", role)) as temp:
            shutil.copyfile(path, temp)
    return list(built), quality


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
    """Static INT8 (QDQ) decode step calibrated on real latents; kept only if it meets the PSNR floor.

    ``calibration`` and ``held_out`` are generator latents of one spatial size, ``[1, C, T, h, w]``
    with T > 2 (frames past the torch warm-up are what the graph decodes). Recipe: per-channel INT8
    weights, per-tensor UINT8 activations, ranges from ``calibrate_method`` (``calibration_options``:
    onnxruntime's ``extra_options``, e.g. ``{"CalibPercentile": 99.99}``), Convs only, the first and
    last convolutions fp32. When the all-INT8 graph misses ``min_psnr_db + margin_db`` on the
    calibration clips (decoded closed-loop, so cache errors compound as in serving), the most
    sensitive Convs fall back to fp32 (``_choose_fallback``); ``fp32_nodes`` skips that search and
    keeps exactly these Convs fp32. The fidelity check then decodes ``held_out`` — clips used neither
    for the ranges nor for choosing layers — with the INT8 graph and with the fp32 torch reference.
    """
    import time

    if calibrate_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibrate_method must be one of {CALIBRATION_METHODS}, not {calibrate_method!r}")
    started = time.perf_counter()
    fp32 = OnnxDecoderBackend(vae, device, precision="fp32", cache_dir=cache_dir)
    clips: list[_CalibrationClip] = []
    head_feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    latent_hw: tuple[int, int] | None = None
    for clip in calibration:
        latent_hw = (clip.shape[3], clip.shape[4])
        state = fp32.new_state()
        state.recorder, state.head_recorder = [], head_feeds
        frames = [fp32.decode(state, clip[:, :, i : i + 1]) for i in range(clip.shape[2])]
        if state.recorder:
            warmup = frames[: clip.shape[2] - len(state.recorder)]
            clips.append(_CalibrationClip(state.recorder, warmup, torch.cat(frames, dim=2), clip))
    if not clips or latent_hw is None:
        raise ValueError("calibration needs latents with more than 2 latent frames")

    int8_path = fp32.model_path(latent_hw, "int8")
    try:
        with atomic_path(int8_path) as temp, tempfile.TemporaryDirectory(prefix="shopreel-int8-") as workdir:
            builder = _Int8Builder(
                fp32.model_path(latent_hw),
                [feed for clip in clips for feed in clip.feeds],
                calibrate_method,
                calibration_options or {},
                Path(workdir),
                fp32.providers,
            )
            if fp32_nodes is None:
                fallback, calibration_psnr = _choose_fallback(builder, clips, min_psnr_db + margin_db)
            else:
                fallback = [node for node in fp32_nodes if node not in FP32_NODES]
                calibration_psnr = builder.score(fallback, clips)
            builder.build(temp, fallback)
            heads, heads_psnr = _quantize_heads(
                fp32,
                latent_hw,
                head_feeds,
                clips,
                fallback,
                temp,
                Path(workdir),
                builder,
                min_psnr_db + margin_db,
            )
        search_s = time.perf_counter() - started
    except BaseException:
        for role in ("first", "second"):
            fp32.model_path(latent_hw, "int8", role).unlink(missing_ok=True)
        raise
    # The candidate's own check is disabled: the held-out clips below are the real test.
    candidate = OnnxDecoderBackend(vae, device, precision="int8", cache_dir=cache_dir, min_psnr_db=-math.inf)
    reference = TorchDecoderBackend(vae, device)
    psnrs, max_error, seconds = [], 0.0, {"int8": 0.0, "fp32": 0.0}
    decode_clip(candidate, held_out[0][:, :, :3])  # load the session outside the timing
    for clip in held_out:
        expected, decoded = decode_clip(reference, clip), {}
        for name, backend in (("int8", candidate), ("fp32", fp32)):
            clip_started = time.perf_counter()
            decoded[name] = decode_clip(backend, clip)
            seconds[name] += time.perf_counter() - clip_started
        got = decoded["int8"]
        psnrs.append(psnr_db(expected, got))
        max_error = max(max_error, float((expected - got).abs().max()))
    kept = set(fallback)
    report = FidelityReport(
        precision="int8",
        psnr_db=round(min(psnrs), 2),
        max_abs_error=round(max_error, 5),
        min_psnr_db=min_psnr_db,
        accepted=min(psnrs) >= min_psnr_db,
        model_path=str(int8_path),
        calibration_method=calibrate_method,
        calibration_psnr_db=round(calibration_psnr, 2),
        quantized_nodes=tuple(conv for conv in builder.convs if conv not in kept),
        fp32_nodes=(*FP32_NODES, *fallback),
        fallback_nodes=tuple(fallback),
        candidates_tried=builder.tried,
        search_s=round(search_s, 1),
        speedup_vs_fp32=round(seconds["fp32"] / seconds["int8"], 2),
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
    if not report.accepted:  # never leave a model below the floor where a renderer would load it
        int8_path.unlink(missing_ok=True)
        fidelity_path(int8_path).unlink(missing_ok=True)
        for role in ("first", "second"):
            fp32.model_path(latent_hw, "int8", role).unlink(missing_ok=True)
        logger.warning("INT8 decoder refused: %.1f dB < floor %.1f dB", report.psnr_db, min_psnr_db)
    else:  # what a renderer checks against its own floor before it activates the model
        fidelity_path(int8_path).write_text(json.dumps(dataclasses.asdict(report), indent=2))
    return report


def fidelity_path(model_path: Path) -> Path:
    """The FidelityReport kept beside a quantised model."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".fidelity.json")
