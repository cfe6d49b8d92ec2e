"""Dense (embedding) index of one cube: USearch HNSW, cosine, keyed by vkey.

A vkey ("version key") is the uint64 the store assigns to one version of one
item. The index is derived data: the store is the truth, and a missing or
corrupt index file is rebuilt by the caller from it (see ``DenseIndex.open``).

Vectors are stored as f16: half the RAM and file of f32 (100k x 384-d: 92 MB
on disk with the graph) at no measurable cost in quality. On the offline eval
(scripts/eval_fusion_offline.py --compare-dtypes: MiniLM, 5k docs per set) f16
and f32 gave the same top-10 for 81 of 83 queries, dense nDCG@10 within 0.001,
and f16 HNSW top-10 matched an exact scan 99.7% of the time. MiniLM vectors
are unit-norm with small components, well inside f16's range and precision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from usearch.compiled import MetricKind
from usearch.index import Index

from memosd.fsutil import fsync_path
from memosd.index.accept import Accept, Hits, take_accepted

log = logging.getLogger(__name__)

DEFAULT_DTYPE = "f16"



class RWLock:
    """Many readers or one writer, writer-preferring.

    Searches share the index; add/remove take it alone. Writer preference keeps
    a steady stream of searches from starving a commit's index update.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def as_keys(keys: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """Coerce to a 1-d contiguous uint64 array (vkeys are never negative)."""
    arr = np.asarray(keys)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError("vkeys must be non-negative")
    return np.ascontiguousarray(arr, dtype=np.uint64).reshape(-1)


def _new_usearch(dim: int, dtype: str) -> Index:
    return Index(ndim=dim, metric="cos", dtype=dtype)


def _load_usearch(path: Path, dim: int) -> Index | None:
    """The index stored at ``path``, or None (logged) if it is unusable for ``dim``."""
    try:
        meta = Index.metadata(str(path))
        if meta is None:
            raise ValueError("not a USearch index")
        # Index.load silently adopts the file's dimensions, so check them first:
        # a file written for another embedder must be rebuilt, not served.
        if int(meta["dimensions"]) != dim or meta["kind_metric"] != MetricKind.Cos:
            raise ValueError(f"index is {meta['dimensions']}-d {meta['kind_metric']}, want {dim}-d cos")
        index = Index.restore(str(path))
        if index is None:
            raise ValueError("not a USearch index")
        return index
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        log.warning("dense index %s is unusable (%s); starting empty, caller must rebuild", path, exc)
        return None


class DenseIndex:
    """One cube's vectors. Thread-safe: searches run concurrently, writes alone."""

    def __init__(self, path: Path, dim: int, index: Index) -> None:
        self.path = path
        self.dim = dim
        self._index: Index | None = index
        self._rw = RWLock()
        # save() only reads the index, so searches may go on meanwhile, but two
        # saves must not write the same temp file.
        self._save_lock = threading.Lock()
        self._dirty = False

    @classmethod
    def open(cls, path: Path, dim: int, dtype: str = DEFAULT_DTYPE) -> DenseIndex:
        """Load the index at ``path``, or start empty if there is none or it is unusable."""
        path = Path(path)
        index = _load_usearch(path, dim) if path.exists() else None
        fresh = index is None
        if index is None:
            index = _new_usearch(dim, dtype)
        dense = cls(path, dim, index)
        # An unusable file stays until the first save replaces it; mark dirty so
        # that a save happens even if nothing is added.
        dense._dirty = fresh and path.exists()
        return dense

    # -- internals ---------------------------------------------------------

    def _idx(self) -> Index:
        if self._index is None:
            raise RuntimeError(f"dense index {self.path} is closed")
        return self._index

    def _query(self, query: npt.ArrayLike) -> npt.NDArray[np.float32]:
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dims, index has {self.dim}")
        return q

    # -- writes ------------------------------------------------------------

    def add(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Insert or replace the vectors of ``keys`` (an upsert: re-adding is harmless)."""
        k = as_keys(keys)
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v.reshape(1, -1)
        if v.shape != (k.shape[0], self.dim):
            raise ValueError(f"vectors shape {v.shape} does not match {k.shape[0]} keys x {self.dim} dims")
        if k.size == 0:
            return
        # USearch refuses duplicate keys; within one batch the last one wins.
        uniq, last = np.unique(k[::-1], return_index=True)
        if uniq.size != k.size:
            rows = k.size - 1 - last
            k, v = k[rows], v[rows]
        with self._rw.write():
            index = self._idx()
            present = np.asarray(index.contains(k), dtype=bool).reshape(-1)
            if present.any():
                index.remove(k[present])
            index.add(k, v)
            self._dirty = True

    def remove(self, keys: npt.ArrayLike) -> int:
        """Remove ``keys`` (absent ones are ignored); return how many were removed."""
        k = as_keys(keys)
        if k.size == 0:
            return 0
        with self._rw.write():
            index = self._idx()
            present = np.asarray(index.contains(k), dtype=bool).reshape(-1)
            if not present.any():
                return 0
            removed = index.remove(np.unique(k[present]))
            self._dirty = True
            return int(np.sum(removed))

    # -- reads -------------------------------------------------------------

    def contains_many(self, keys: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        k = as_keys(keys)
        if k.size == 0:
            return np.zeros(0, dtype=bool)
        with self._rw.read():
            return np.asarray(self._idx().contains(k), dtype=bool).reshape(-1)

    def __len__(self) -> int:
        with self._rw.read():
            return len(self._idx())

    def search(self, query: npt.ArrayLike, k: int, accept: Accept | None = None) -> Hits:
        """Up to ``k`` accepted (vkey, cosine similarity) pairs, best first.

        USearch's Python API has no predicate filter, so filtered search
        oversamples: fetch 4k, keep the accepted ones, double until k are
        accepted or the whole index has been asked for. The cost grows with
        how much the filter rejects (100k vectors, k=10: ~0.4 ms unfiltered,
        ~9 ms when 1% is accepted, ~90 ms at 0.1%), so for very selective
        filters the caller should pass the few candidate keys to
        ``search_exact`` instead (~3.5 us per key). An exact scan is no way
        out here: USearch's exact search costs ~380 ms for a full 100k ranking.
        """
        if k <= 0:
            return []
        q = self._query(query)
        decided: dict[int, bool] = {}
        with self._rw.read():
            index = self._idx()
            n = len(index)
            if n == 0:
                return []
            want = k if accept is None else 4 * k
            while True:
                count = min(want, n)
                hits = self._collect(index.search(q, count), k, accept, decided)
                if len(hits) >= k or count >= n:
                    return hits
                want *= 2

    @staticmethod
    def _collect(matches: Any, k: int, accept: Accept | None, decided: dict[int, bool]) -> Hits:
        keys = np.asarray(matches.keys, dtype=np.uint64).reshape(-1).tolist()
        dists = np.asarray(matches.distances, dtype=np.float64).reshape(-1).tolist()
        # Cosine distance -> similarity; HNSW returns them best first.
        ranked = ((int(key), 1.0 - float(dist)) for key, dist in zip(keys, dists, strict=True))
        return take_accepted(ranked, k, accept, decided)

    def search_exact(self, query: npt.ArrayLike, keys: npt.ArrayLike, k: int | None = None) -> Hits:
        """Brute-force cosine over ``keys`` (absent ones skipped), best first, up to ``k``.

        For selective filters the caller knows the few candidate keys; scoring
        them directly is exact and cheaper than oversampling the graph.
        """
        q = self._query(query)
        cand = np.unique(as_keys(keys))
        if cand.size == 0 or (k is not None and k <= 0):
            return []
        with self._rw.read():
            index = self._idx()
            present = np.asarray(index.contains(cand), dtype=bool).reshape(-1)
            cand = cand[present]
            if cand.size == 0:
                return []
            # A tuple of rows (one per key); all present, checked above.
            got = index.get(cand, dtype="f32")
        vecs = np.asarray(got, dtype=np.float32).reshape(cand.size, self.dim)
        norms = np.linalg.norm(vecs, axis=1)
        qn = float(np.linalg.norm(q)) or 1.0
        sims = (vecs @ q) / (np.where(norms > 0, norms, 1.0) * qn)
        order = np.lexsort((cand, -sims))
        if k is not None:
            order = order[:k]
        return [(int(cand[i]), float(sims[i])) for i in order]

    # -- lifecycle ---------------------------------------------------------

    def save(self) -> bool:
        """Persist atomically (temp file, fsync, rename). Returns False if nothing changed."""
        with self._save_lock:
            with self._rw.read():
                index = self._idx()
                if not self._dirty:
                    return False
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                index.save(str(tmp))
                # Cleared under the read lock: no write can slip in between the
                # snapshot and the flag, so a later add always re-dirties.
                self._dirty = False
            try:
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
                fsync_path(self.path.parent)
            except BaseException:
                self._dirty = True
                raise
            return True

    @property
    def dirty(self) -> bool:
        """True if there are changes that ``save`` has not yet written."""
        return self._dirty

    def close(self) -> None:
        """Release the index's memory. Does not save: call ``save`` first if wanted."""
        with self._rw.write():
            # Dropping the last reference frees the native index.
            self._index = None
