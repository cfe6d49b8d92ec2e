"""HashEmbedder: the kernel's EmbedderPort without a model, for unit tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class HashEmbedder:
    """Deterministic unit vectors seeded by a hash of the text: enough for search to run."""

    name = "hash-embedder"
    dim = 16
    fingerprint = "hash-embedder/1"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)
