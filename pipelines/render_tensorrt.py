"""TensorRT renderer: engines built from the ONNX Runtime renderer's exported decoder steps.

Experimental: not covered by CI. It is written against the TensorRT 10 Python API
(``build_serialized_network``, named I/O tensors, ``execute_async_v3``) and needs TensorRT and a
CUDA GPU; verify it on yours with
``tests/test_render_backends.py::test_tensorrt_equals_the_reference_on_cuda`` before relying on it.

Design: the same three steps per latent size as ``render_onnx`` (latent frame 0, frame 1, and the
steady step), exported by the same code and checked against torch the same way (PSNR floor). Each
ONNX graph has static shapes (one per latent size), so each engine needs no optimisation profile:
a new size is a new engine. Engines are cached on disk under a key of the ONNX file, GPU name and
compute capability, TensorRT version and precision, and built lazily on the first shot of a size.
Causal caches stay on the GPU as torch tensors between steps.

Precisions: fp32, fp16 and bf16 (builder flags over the fp32 graph; inputs and outputs stay fp32).
INT8 and FP8 need a graph with signed, symmetric Q/DQ nodes (e.g. from NVIDIA ModelOpt): the
onnxruntime INT8 model uses unsigned activations, which TensorRT rejects, so they are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .render_onnx import OnnxDecoderBackend, _Graphs, _OnnxDecodeState, _role, atomic_path

INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt (it downloads from NVIDIA's package index), "
    "or use renderer backend 'onnxruntime' or 'torch'"
)
PRECISIONS = ("fp32", "fp16", "bf16")
WORKSPACE_BYTES = 8 << 30


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ValueError(INSTALL_HINT) from exc
    return tensorrt


class _EngineStep:
    """One TensorRT engine run on torch CUDA tensors: inputs in engine order, outputs allocated here."""

    def __init__(self, trt: Any, engine: Any) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_shapes = {n: tuple(engine.get_tensor_shape(n)) for n in self.outputs}

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream()
        for name, tensor in zip(self.inputs, tensors, strict=True):
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = [
            torch.empty(self.output_shapes[name], device=tensors[0].device, dtype=torch.float32)
            for name in self.outputs
        ]
        for name, tensor in zip(self.outputs, outputs, strict=True):
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream_handle=stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outputs


class TensorRTDecoderBackend(OnnxDecoderBackend):
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
        super().__init__(
            vae,
            device,
            precision="fp32",  # the ONNX graphs are always exported in fp32; the engine picks precision
            cache_dir=cache_dir,
            min_psnr_db=min_psnr_db,
            fallback_to_torch=fallback_to_torch,
        )
        self.engine_precision = precision
        self.providers = [f"TensorRT {self.trt.__version__} {precision}"]
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)

    def _check_usable(self, vae: Any, device: torch.device, precision: str) -> None:
        if device.type != "cuda":
            raise ValueError(f"the tensorrt renderer needs a CUDA device, the VAE is on {device}")
        if getattr(vae.config, "patch_size", None) is not None:
            raise ValueError("the tensorrt renderer does not export patchified VAEs (Wan 2.2) yet")

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "precision": self.engine_precision, "tested": False}

    def _open(self, path: Path) -> tuple[Any, list[str]]:
        engine = self._load_or_build_engine(path)
        step = _EngineStep(self.trt, engine)
        return step, step.inputs

    def engine_path(self, onnx_path: Path) -> Path:
        properties = torch.cuda.get_device_properties(self.device)
        parts = [
            onnx_path.name,
            properties.name,
            f"sm{properties.major}{properties.minor}",
            self.trt.__version__,
            self.engine_precision,
        ]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        return onnx_path.with_name(
            f"{onnx_path.name.removesuffix('.onnx')}.{key}.{self.engine_precision}.engine"
        )

    def _load_or_build_engine(self, onnx_path: Path) -> Any:
        trt = self.trt
        path = self.engine_path(onnx_path)
        runtime = trt.Runtime(self._logger)
        if path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
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
        if self.engine_precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.engine_precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValueError(f"TensorRT could not build an engine from {onnx_path.name}")
        with atomic_path(path) as temp:
            temp.write_bytes(bytes(serialized))
        return runtime.deserialize_cuda_engine(bytes(serialized))

    def _step(self, state: _OnnxDecodeState, graphs: _Graphs, frame: torch.Tensor) -> torch.Tensor:
        role = _role(state.latent_frames_done)
        latents = frame.detach().to(self.device, torch.float32).contiguous()
        caches = [torch.as_tensor(c, device=self.device).contiguous() for c in state.caches]
        video, *state.caches = graphs.sessions[role].run([latents, *caches])
        state.latent_frames_done += 1
        return video


def check_precision(precision: str) -> None:
    """Refuse what this backend cannot build before anything is loaded."""
    if precision in ("int8", "fp8"):
        raise ValueError(
            f"tensorrt {precision} needs a graph with signed symmetric Q/DQ nodes (e.g. NVIDIA ModelOpt), "
            "which shopreel does not make; use tensorrt fp16/bf16, or onnxruntime int8"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"tensorrt renderer supports precision {', '.join(PRECISIONS)}, not {precision!r}")
