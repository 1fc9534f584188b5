"""TensorRT renderer: engines built from the decoder's exported ONNX steps.

Experimental: not covered by CI. It is written against the TensorRT 10 Python API
(``build_serialized_network``, named I/O tensors, ``execute_async_v3``) and needs TensorRT and a
CUDA GPU; verify it on yours with
``tests/test_render_backends.py::test_tensorrt_equals_the_reference_on_cuda`` before relying on it.

Design: the same three steps per latent size as the ONNX Runtime renderer (latent frame 0, frame 1,
and the steady step), exported by the same code (``export``) and checked against torch the same way
(``chains``: PSNR floor). Each ONNX graph has static shapes (one per latent size), so each engine
needs no optimisation profile: a new size is a new engine. Engines are cached on disk beside their
graph under a key of the ONNX file, GPU name and compute capability, TensorRT version and precision,
and built lazily on the first shot of a size. Causal caches stay on the GPU as torch tensors between
steps.

Precisions: fp32, fp16 and bf16 (builder flags over the fp32 graph; inputs and outputs stay fp32).
INT8 and FP8 need a graph with signed, symmetric Q/DQ nodes (e.g. from NVIDIA ModelOpt): the
onnxruntime INT8 model uses unsigned activations, which TensorRT rejects, so they are refused.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chains import ChainState, StepChains
from .export import ROLES, GraphCache, ReferenceTrace, atomic_path
from .torch_backend import TorchDecoderBackend

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt (it downloads from NVIDIA's package index), "
    "or use renderer backend 'onnxruntime' or 'torch'"
)
PRECISIONS = ("fp32", "fp16", "bf16")
WORKSPACE_BYTES = 8 << 30


def check_precision(precision: str) -> None:
    """Refuse what this backend cannot build before anything is loaded."""
    if precision in ("int8", "fp8"):
        raise ValueError(
            f"tensorrt {precision} needs a graph with signed symmetric Q/DQ nodes (e.g. NVIDIA ModelOpt), "
            "which shopreel does not make; use tensorrt fp16/bf16, or onnxruntime int8"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"tensorrt renderer supports precision {', '.join(PRECISIONS)}, not {precision!r}")


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ValueError(INSTALL_HINT) from exc
    return tensorrt


def _io_order(name: str) -> tuple[int, int]:
    """The exported graph's I/O order (``latents``/``video``, then ``[next_]cache_<slot>`` by slot), which
    chains one step's outputs into the next step's inputs: not left to the engine's enumeration."""
    prefix, _, slot = name.rpartition("_")
    return (1, int(slot)) if prefix.endswith("cache") else (0, 0)


class _EngineStep:
    """One TensorRT engine run on torch CUDA tensors: inputs in graph order, outputs allocated here."""

    def __init__(self, trt: Any, engine: Any, device: torch.device) -> None:
        self.engine = engine
        self.device = device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if any(engine.get_tensor_dtype(n) != trt.DataType.FLOAT for n in names):
            raise ValueError("TensorRT engine inputs and outputs must stay fp32")
        self.inputs = sorted(
            (n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT), key=_io_order
        )
        self.outputs = sorted(
            (n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT), key=_io_order
        )
        self.output_shapes = {n: tuple(engine.get_tensor_shape(n)) for n in self.outputs}
        # One execution context holds the tensor addresses of the call in flight: calls from the
        # renderer's decode threads take turns.
        self._lock = threading.Lock()

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            for name, tensor in zip(self.inputs, tensors, strict=True):
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = [
                torch.empty(self.output_shapes[name], device=self.device, dtype=torch.float32)
                for name in self.outputs
            ]
            for name, tensor in zip(self.outputs, outputs, strict=True):
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(stream_handle=stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        return outputs


@dataclass
class TensorRTSteps:
    """The engines of one latent size's first, second and steady steps."""

    engines: dict[str, _EngineStep]
    paths: dict[str, Path]
    device: torch.device

    def run(
        self, role: str, frame: torch.Tensor, caches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        latents = frame.detach().to(self.device, torch.float32).contiguous()
        video, *next_caches = self.engines[role].run([latents, *caches])
        return video, next_caches


class TensorRTDecoderBackend:
    """Streaming decode with TensorRT engines of the three exported decoder steps (untested)."""

    name = "tensorrt"

    def __init__(
        self,
        vae: Any,
        device: torch.device,
        *,
        precision: str = "fp16",
        cache_dir: Path | None = None,
        min_psnr_db: float = 35.0,
        fallback_to_torch: bool = False,
    ) -> None:
        check_precision(precision)
        self.trt = _import_tensorrt()
        if device.type != "cuda":
            raise ValueError(f"the tensorrt renderer needs a CUDA device, the VAE is on {device}")
        if getattr(vae.config, "patch_size", None) is not None:
            raise ValueError("the tensorrt renderer does not export patchified VAEs (Wan 2.2) yet")
        self.vae = vae
        self.device = device
        self.precision = precision  # the engines'; the ONNX graphs they are built from are fp32
        self.graphs = GraphCache(vae, cache_dir)
        self.reference = TorchDecoderBackend(vae, device)
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        with torch.cuda.device(device):
            self._runtime = self.trt.Runtime(self._logger)  # outlives every engine it deserialises
        self.chains: StepChains[torch.Tensor, TensorRTSteps] = StepChains(
            self.name,
            self.reference,
            self._open_steps,
            floor_db=min_psnr_db,
            fallback_to_torch=fallback_to_torch,
        )

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": str(self.device),
            "tensorrt_version": self.trt.__version__,
            "graphs_by_latent_size": self.chains.steady_files(),  # engine files; "torch": that size fell back
            "fallback_reason": self.chains.fallback_reason,
            "tested": False,
        }

    def new_state(self) -> ChainState[torch.Tensor]:
        return self.chains.new_state()

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        return self.chains.decode(state, latents)

    def engine_path(self, onnx_path: Path) -> Path:
        properties = torch.cuda.get_device_properties(self.device)
        parts = [
            onnx_path.name,
            properties.name,
            f"sm{properties.major}{properties.minor}",
            self.trt.__version__,
            self.precision,
        ]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        return onnx_path.with_name(f"{onnx_path.name.removesuffix('.onnx')}.{key}.{self.precision}.engine")

    def _open_steps(self, trace: ReferenceTrace) -> TensorRTSteps:
        engines, paths = {}, {}
        with torch.cuda.device(self.device):  # engines and their contexts live on the VAE's GPU
            for role in ROLES:
                onnx_path = self.graphs.fp32_graph(trace, role)
                paths[role] = self.engine_path(onnx_path)
                engines[role] = _EngineStep(
                    self.trt, self._load_or_build_engine(onnx_path, paths[role]), self.device
                )
        logger.info(
            "%s renderer %s (TensorRT %s): %s", self.name, self.precision, self.trt.__version__, paths
        )
        return TensorRTSteps(engines=engines, paths=paths, device=self.device)

    def _load_or_build_engine(self, onnx_path: Path, path: Path) -> Any:
        trt = self.trt
        if path.is_file():
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                return engine
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValueError(f"TensorRT could not build an engine from {onnx_path.name}")
        with atomic_path(path) as temp:
            temp.write_bytes(bytes(serialized))
        engine = self._runtime.deserialize_cuda_engine(bytes(serialized))
        if engine is None:
            raise ValueError(f"TensorRT could not load the engine it built from {onnx_path.name}")
        return engine
