"""shopreel: product brief -> short product video.

Importing this package is lean on purpose: it loads no model, starts no Ray and touches no CUDA
(``tests/test_layering.py`` checks it). Import the stages from ``shopreel.pipelines``.
"""

__version__ = "0.1.0"
