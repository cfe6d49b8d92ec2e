"""Fakes for the kernel's index-layer ports (memosd/kernel/ports.py): a hash embedder and exact in-memory indexes.

They stand in for the model-backed embedder and USearch+tantivy so the kernel's
own semantics can be tested fast. They are honest rather than trivial: the
embedder gives every text its own unit vector (a text is its own nearest
neighbour), and the index scores every key it holds exactly, so a search
through the kernel finds what the catalog lets it see and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memosd.kernel.ports import Accept, Scored

_WORD = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def term_count(query: str, text: str) -> float:
    """How often the query's distinct terms occur in ``text``: a lexical score with no corpus statistics."""
    words = terms(text)
    return float(sum(words.count(t) for t in set(terms(query))))


def _best(scored: Scored, k: int) -> Scored:
    # Ties broken by key, as the real indexes' callers sort (kernel/search.py).
    return sorted(scored, key=lambda ks: (-ks[1], ks[0]))[:k]


class FakeCubeIndex:
    """CubeIndexPort in memory: exact cosine over every held vector, term counts over every held text."""

    def __init__(self, directory: Path, dim: int) -> None:
        self.directory = directory
        self.dim = dim
        self.vectors: dict[int, np.ndarray] = {}
        self.texts: dict[int, str] = {}
        self.removed: set[int] = set()  # every key remove() was given: what compaction dropped
        self._watermark = 0
        self.destroyed = False

    def add(self, keys: np.ndarray, vectors: np.ndarray, texts: Sequence[str]) -> None:
        if len(texts) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(texts)} texts")
        self.add_dense(keys, vectors)
        self.add_lexical([(int(k), t) for k, t in zip(keys, texts, strict=True)])

    def add_dense(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        for key, vector in zip(keys, vectors, strict=True):
            self.vectors[int(key)] = np.asarray(vector, dtype=np.float32)

    def add_lexical(self, docs: Sequence[tuple[int, str]]) -> None:
        for key, text in docs:
            self.texts[int(key)] = text
            self._watermark = max(self._watermark, int(key))

    def remove(self, keys: np.ndarray) -> None:
        for key in (int(k) for k in keys):
            self.vectors.pop(key, None)
            self.texts.pop(key, None)
            self.removed.add(key)

    def dense_missing(self, keys: np.ndarray) -> np.ndarray:
        return np.array([k for k in keys if int(k) not in self.vectors], dtype=np.uint64)

    @property
    def lexical_watermark(self) -> int:
        return self._watermark

    def dense_search(self, query: np.ndarray, k: int, accept: Accept | None) -> Scored:
        q = np.asarray(query, dtype=np.float32)
        return _best([(key, float(v @ q)) for key, v in self.vectors.items() if accept is None or accept(key)], k)

    def dense_exact(self, query: np.ndarray, keys: np.ndarray) -> Scored:
        q = np.asarray(query, dtype=np.float32)
        present = [int(key) for key in keys if int(key) in self.vectors]
        return _best([(key, float(self.vectors[key] @ q)) for key in present], len(present))

    def lexical_search(self, query: str, k: int, accept: Accept | None) -> Scored:
        return self.lexical_staged(query, [(key, text) for key, text in self.texts.items()
                                           if accept is None or accept(key)], k)

    def lexical_staged(self, query: str, docs: Sequence[tuple[int, str]], k: int) -> Scored:
        scored = [(key, term_count(query, text)) for key, text in docs]
        return _best([(key, score) for key, score in scored if score > 0], k)  # no matching term: no hit

    def save(self) -> None:
        pass  # nothing on disk: a reopened kernel catches the indexes up from the store

    def close(self) -> None:
        pass

    def destroy(self) -> None:
        self.destroyed = True
        self.vectors.clear()
        self.texts.clear()

    def bytes_on_disk(self) -> tuple[int, int]:
        return 0, 0


class FakeIndexes:
    """IndexFactory handing out FakeCubeIndex instances, remembered by directory so tests can inspect them."""

    def __init__(self) -> None:
        self.opened: dict[Path, FakeCubeIndex] = {}

    def __call__(self, directory: Path, dim: int) -> FakeCubeIndex:
        index = self.opened[directory] = FakeCubeIndex(directory, dim)
        return index

    def of(self, cube_id: str) -> FakeCubeIndex:
        """The index most recently opened for the cube (a cube's directory is named by its id)."""
        (index,) = [i for d, i in self.opened.items() if d.name == cube_id]
        return index
