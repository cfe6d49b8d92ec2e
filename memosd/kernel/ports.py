"""What the kernel needs from the index layer. Tests may pass fakes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

Accept = Callable[[int], bool]
Scored = list[tuple[int, float]]


class EmbedderPort(Protocol):
    name: str
    dim: int
    fingerprint: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class CubeIndexPort(Protocol):
    """The derived indexes of one cube, keyed by version key (vkey)."""

    def add(self, keys: np.ndarray, vectors: np.ndarray, texts: Sequence[str]) -> None: ...
    def add_dense(self, keys: np.ndarray, vectors: np.ndarray) -> None: ...
    def add_lexical(self, docs: Sequence[tuple[int, str]]) -> None: ...
    def dense_missing(self, keys: np.ndarray) -> np.ndarray: ...
    @property
    def lexical_watermark(self) -> int: ...
    def dense_search(self, query: np.ndarray, k: int, accept: Accept | None) -> Scored: ...
    def dense_exact(self, query: np.ndarray, keys: np.ndarray) -> Scored: ...
    def lexical_search(self, query: str, k: int, accept: Accept | None) -> Scored: ...
    def save(self) -> None: ...
    def close(self) -> None: ...
    def destroy(self) -> None: ...
    def bytes_on_disk(self) -> tuple[int, int]: ...


class IndexFactory(Protocol):
    def __call__(self, directory: Path, dim: int) -> CubeIndexPort: ...


class AdhocLexical(Protocol):
    """BM25 over a handful of texts (a mount's staged items)."""

    def __call__(self, query: str, docs: Sequence[tuple[int, str]], k: int) -> Scored: ...


class FusedHitLike(Protocol):
    key: int
    score: float
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int


class Fuser(Protocol):
    def __call__(self, dense: Scored, lexical: Scored, k: int) -> Sequence[FusedHitLike]: ...
