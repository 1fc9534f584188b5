"""shopreel: product brief -> short product video.

Importing this package is lean on purpose: it loads no model, starts no Ray and touches no CUDA
(``tests/test_layering.py`` checks it). Import the stages from ``shopreel.pipelines``.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# The repository root *is* this package. Run from it (`python -m ...`, pytest), Python puts the root
# on sys.path, and its folders would shadow PyPI packages of the same top-level name: transformers
# >= 5.25 imports Hugging Face's `kernels`, which would resolve to our `kernels/`. Our modules are
# always imported as `shopreel.*`, so the root never needs to be on the path.
_ROOT = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _ROOT]
