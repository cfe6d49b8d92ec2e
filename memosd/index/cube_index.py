"""Everything one cube indexes, under one directory.

    <directory>/
      dense.usearch        DenseIndex (saved by save(); rebuilt from the store if lost)
      lexical/             LexicalIndex (committed on every add/remove; has a watermark)

Both indexes are keyed by vkey and hold every version ever added until it is
removed; which versions a search may return (revision, staging, tags, time) is
the caller's ``accept`` predicate. Recovery at start: re-add to the lexical
index the items above ``lexical_watermark``, and to the dense index the keys
``dense_missing`` reports.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from memosd.index.accept import Accept, Hits
from memosd.index.dense import DenseIndex, as_keys
from memosd.index.fusion import FusedHit, fuse, single
from memosd.index.lexical import LexicalIndex

DENSE_FILE = "dense.usearch"
LEXICAL_DIR = "lexical"

Mode = Literal["hybrid", "dense", "lexical"]

# Each list is fetched this deep before fusion (see default_depth).
MIN_DEPTH = 100
DEPTH_FACTOR = 10


def default_depth(k: int) -> int:
    """Candidates per list for a top-``k`` hybrid search: max(10k, 100).

    RRF gives a document credit for its rank in *each* list, so the lists must
    be deep enough that a document one list ranks 60th still gets its share.
    On the offline eval (scripts/eval_fusion_offline.py, k=10) depth 100 beat
    depth 50 on dbpedia (nDCG@10 +0.005, recall@10 +0.010) and tied msmarco
    within noise; 200 changed nothing. Cost: a k=10 hybrid search over 100k
    items takes ~1.5 ms; with a filter, ``accept`` sees at least 4 x depth
    candidates per list (see DenseIndex.search on selective filters).
    """
    return max(DEPTH_FACTOR * k, MIN_DEPTH)


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:  # a tantivy merge removed it meanwhile
            continue
    return total


@dataclass(frozen=True)
class StagedItems:
    """A mount's uncommitted items, searched alongside a cube's indexes.

    ``keys`` only need to be distinct from the cube's vkeys (the caller may use
    provisional ids); ``vectors[i]`` (unit-norm, as Embedder returns them) and
    ``texts[i]`` belong to ``keys[i]``. They are scored exactly: cosine by a
    matrix product, BM25 with the cube's own statistics (LexicalIndex.score_staged),
    so each merges by score into the committed list of the same kind.
    """

    keys: Sequence[int]
    vectors: npt.NDArray[np.float32]
    texts: Sequence[str]

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.texts) == self.vectors.shape[0]:
            raise ValueError("staged keys, vectors and texts differ in length")

    def dense(self, qvec: npt.ArrayLike, accept: Accept | None) -> Hits:
        q = np.asarray(qvec, dtype=np.float32).reshape(-1)
        sims = np.asarray(self.vectors, dtype=np.float32) @ q
        hits = [(int(key), float(sim)) for key, sim in zip(self.keys, sims.tolist(), strict=True)]
        hits.sort(key=lambda h: (-h[1], h[0]))
        return [h for h in hits if accept is None or accept(h[0])]


def _merge(a: Hits, b: Hits, n: int) -> Hits:
    """Two score-ordered lists on one scale -> the top ``n`` of both."""
    return sorted(a + b, key=lambda h: (-h[1], h[0]))[:n]


class CubeIndex:
    """One cube's DenseIndex + LexicalIndex, searched together."""

    def __init__(self, directory: Path, dense: DenseIndex, lexical: LexicalIndex) -> None:
        self.directory = directory
        self.dense = dense
        self.lexical = lexical

    @classmethod
    def open(cls, directory: Path, dim: int) -> CubeIndex:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dense = DenseIndex.open(directory / DENSE_FILE, dim)
        try:
            lexical = LexicalIndex.open(directory / LEXICAL_DIR)
        except BaseException:
            dense.close()
            raise
        return cls(directory, dense, lexical)

    @property
    def dim(self) -> int:
        return self.dense.dim

    # -- writes ------------------------------------------------------------

    def add(self, keys: npt.ArrayLike, vectors: npt.ArrayLike, texts: Sequence[str]) -> None:
        """Index new versions: ``vectors[i]`` and ``texts[i]`` belong to ``keys[i]``.

        Lexical is committed (durable, watermark advanced) before this returns;
        dense lives in memory until ``save``. Both are upserts, so replaying an
        add during recovery is harmless.
        """
        k = as_keys(keys)
        if len(texts) != k.size:
            raise ValueError(f"{k.size} keys but {len(texts)} texts")
        if k.size == 0:
            return
        self.dense.add(k, vectors)
        self.lexical.add(list(zip(k.tolist(), texts, strict=True)))

    def remove(self, keys: npt.ArrayLike) -> None:
        k = as_keys(keys)
        if k.size == 0:
            return
        self.dense.remove(k)
        self.lexical.remove(k)

    # -- search ------------------------------------------------------------

    def search(
        self,
        qvec: npt.ArrayLike | None,
        qtext: str,
        k: int,
        mode: Mode = "hybrid",
        accept: Accept | None = None,
        depth: int | None = None,
        candidates: npt.ArrayLike | None = None,
        staged: StagedItems | None = None,
    ) -> list[FusedHit]:
        """Top ``k`` for a query given as a vector (dense) and text (lexical).

        ``accept(key)`` filters both lists before fusion, so k accepted hits
        come back whenever k exist. ``candidates``, when given, restricts the
        indexed part of the search to those vkeys: dense scores them exactly
        (the better plan when a filter leaves few items) and lexical accepts
        only them. ``staged`` adds a mount's uncommitted items (see
        StagedItems; ``accept`` applies to them too, ``candidates`` does not).
        ``depth`` is the per-list candidate depth for hybrid (default
        ``default_depth(k)``). In hybrid mode a missing query part (no qvec, or
        text with no words) leaves the other list alone, ranked by its RRF score.
        """
        if k <= 0:
            return []
        cand = np.unique(as_keys(candidates)) if candidates is not None else None
        want_dense = mode in ("hybrid", "dense") and qvec is not None
        want_lexical = mode in ("hybrid", "lexical")
        n = k if mode != "hybrid" else (depth if depth is not None else default_depth(k))
        n = max(n, k)

        dense_hits: Hits = []
        if want_dense:
            assert qvec is not None
            if cand is not None:
                exact = self.dense.search_exact(qvec, cand)
                dense_hits = [h for h in exact if accept is None or accept(h[0])][:n]
            else:
                dense_hits = self.dense.search(qvec, n, accept)
        lexical_hits = self.lexical.search(qtext, n, accept, keys=cand) if want_lexical else []

        if staged is not None and len(staged.keys):
            if want_dense:
                assert qvec is not None
                dense_hits = _merge(dense_hits, staged.dense(qvec, accept), n)
            if want_lexical:
                docs = list(zip(staged.keys, staged.texts, strict=True))
                lexical_hits = _merge(lexical_hits, self.lexical.score_staged(qtext, docs, n, accept), n)

        if mode == "dense":
            return single(dense_hits, k)
        if mode == "lexical":
            return single(lexical_hits, k, lexical=True)
        return fuse(dense_hits, lexical_hits, k)

    # -- the single-list operations memosd.kernel.ports.CubeIndexPort uses --

    def add_dense(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Dense only (recovery: re-adding what ``dense_missing`` reported)."""
        self.dense.add(keys, vectors)

    def add_lexical(self, docs: Sequence[tuple[int, str]]) -> None:
        """Lexical only (recovery: re-adding what lies above ``lexical_watermark``)."""
        self.lexical.add(docs)

    def dense_search(self, query: npt.ArrayLike, k: int, accept: Accept | None = None) -> Hits:
        return self.dense.search(query, k, accept)

    def dense_exact(self, query: npt.ArrayLike, keys: npt.ArrayLike) -> Hits:
        return self.dense.search_exact(query, keys)

    def lexical_search(self, query: str, k: int, accept: Accept | None = None) -> Hits:
        return self.lexical.search(query, k, accept)

    def lexical_staged(self, query: str, docs: Sequence[tuple[int, str]], k: int) -> Hits:
        """BM25 of uncommitted docs on this index's scale (see LexicalIndex.score_staged)."""
        return self.lexical.score_staged(query, docs, k)

    # -- recovery and bookkeeping -----------------------------------------

    def dense_missing(self, keys: npt.ArrayLike) -> npt.NDArray[np.uint64]:
        """The subset of ``keys`` the dense index lacks (to re-embed at start)."""
        k = as_keys(keys)
        if k.size == 0:
            return k
        return k[~self.dense.contains_many(k)]

    @property
    def lexical_watermark(self) -> int:
        return self.lexical.watermark

    def bytes_on_disk(self) -> tuple[int, int]:
        """(dense file bytes, lexical directory bytes); 0 for what is not there."""
        dense_path = self.directory / DENSE_FILE
        lex_path = self.directory / LEXICAL_DIR
        return (
            _dir_bytes(dense_path) if dense_path.exists() else 0,
            _dir_bytes(lex_path) if lex_path.exists() else 0,
        )

    # -- lifecycle ---------------------------------------------------------

    def save(self) -> None:
        """Persist the dense index if it changed (lexical is always committed)."""
        self.dense.save()

    def close(self, save: bool = True) -> None:
        try:
            if save:
                self.dense.save()
        finally:
            self.dense.close()
            self.lexical.close()

    def destroy(self) -> None:
        """Close without saving and delete the directory (the cube was freed)."""
        self.close(save=False)
        shutil.rmtree(self.directory, ignore_errors=True)
