"""The session's one cold load of the embedded model, as the tests that share it see it.

A module of its own, not conftest.py: a test file cannot import from ``conftest`` reliably (tests/cluster has a
conftest.py too, and the two compete for that module name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SmolLM2Build:
    """The embedded model, loaded once per test session from its GGUF (the cold path)."""

    loaded: Any  # memosd.runtime.LoadedModel
    cache_dir: Path
    gguf_model: Any  # the model exactly as the GGUF dequantized, before caching
    gguf_tokenizer: Any
    seconds: float
