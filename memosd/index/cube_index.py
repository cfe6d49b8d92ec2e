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
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from memosd.index.dense import Accept, DenseIndex, as_keys
from memosd.index.fusion import FusedHit, fuse, single
from memosd.index.lexical import LexicalIndex

DENSE_FILE = "dense.usearch"
LEXICAL_DIR = "lexical"

Mode = Literal["hybrid", "dense", "lexical"]

# Each list is fetched this deep before fusion (see default_depth).
MIN_DEPTH = 50
DEPTH_FACTOR = 5


def default_depth(k: int) -> int:
    """Candidates per list for a top-``k`` hybrid search: max(5k, 50).

    RRF only needs a document's rank in each list; a document that one list
    ranks below ~50 adds < 1/110 and rarely moves into the top 10. On the eval
    sets depth 50 and 100 gave the same nDCG@10 to 3 decimals (100 costs more).
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
        lexical = LexicalIndex.open(directory / LEXICAL_DIR)
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
    ) -> list[FusedHit]:
        """Top ``k`` for a query given as a vector (dense) and text (lexical).

        ``accept(vkey)`` filters both lists before fusion, so k accepted hits
        come back whenever k exist. ``candidates``, when given, restricts the
        search to those vkeys: dense scores them exactly (the better plan when
        a filter leaves few items) and lexical accepts only them. ``depth`` is
        the per-list candidate depth for hybrid (default ``default_depth(k)``).
        In hybrid mode a missing query part (no qvec, or text with no words)
        leaves the other list alone, ranked by its RRF score.
        """
        if k <= 0:
            return []
        cand = np.unique(as_keys(candidates)) if candidates is not None else None
        if cand is not None:
            allowed = set(cand.tolist())
            outer = accept

            def accept_cand(key: int) -> bool:
                return key in allowed and (outer is None or outer(key))

            accept = accept_cand
        want_dense = mode in ("hybrid", "dense") and qvec is not None
        want_lexical = mode in ("hybrid", "lexical")
        n = k if mode != "hybrid" else (depth if depth is not None else default_depth(k))
        n = max(n, k)

        dense_hits: list[tuple[int, float]] = []
        if want_dense:
            assert qvec is not None
            if cand is not None:
                exact = self.dense.search_exact(qvec, cand)
                dense_hits = [h for h in exact if accept is None or accept(h[0])][:n]
            else:
                dense_hits = self.dense.search(qvec, n, accept)
        lexical_hits = self.lexical.search(qtext, n, accept) if want_lexical else []

        if mode == "dense":
            return single(dense_hits, k)
        if mode == "lexical":
            return single(lexical_hits, k, lexical=True)
        return fuse(dense_hits, lexical_hits, k)

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

    def save(self) -> bool:
        """Persist the dense index if it changed (lexical is always committed)."""
        return self.dense.save()

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
