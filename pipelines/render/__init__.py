"""render: LatentChunk -> FrameChunk with a streaming, causal VAE decoder.

Wan's VAE decoder is causal in time: its 3D convolutions see the current latent frame plus a cache
of the previous ones. The renderer drives that loop itself with one cache per (request, shot), so
frames for latent frame k leave before later latents exist, several requests interleave on one
renderer, and the output equals ``vae.decode`` of the whole shot (tested).

The package, from what callers use down to what backends share:

- ``streaming``: ``StreamingRenderer``, the per-(request, shot) streams and the frame cache.
- ``registry``: ``BACKENDS`` and ``build_backend`` (``auto`` included).
- ``backend``: the ``DecoderBackend`` protocol every backend meets.
- ``torch_backend``: eager PyTorch, the reference every other backend is compared against.
- ``onnxruntime_backend``, ``tensorrt_backend``: the decoder exported as three steps per latent
  size, run by ONNX Runtime sessions or TensorRT engines.
- ``chains``: what both exported backends run: each size's steps built once, checked against torch,
  then run frame by frame with the causal caches threaded through.
- ``export``: the decoder-step ONNX graphs, their content-addressed disk cache and atomic writes.
- ``int8``: static INT8 calibration and quantisation of the ONNX steps (``quantize_int8``).
- ``fidelity``: PSNR against the reference and the report kept beside a quantised model.
"""

from .backend import DecoderBackend
from .registry import BACKENDS, BackendFactory, build_backend
from .streaming import StreamingRenderer
from .torch_backend import TorchDecoderBackend

__all__ = [
    "BACKENDS",
    "BackendFactory",
    "DecoderBackend",
    "StreamingRenderer",
    "TorchDecoderBackend",
    "build_backend",
]
