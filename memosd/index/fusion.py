"""Fuse a dense and a lexical ranking into one.

The default is reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR
2009) with the paper's k = 60 and equal weights:

    score(d) = w_dense / (k + rank_dense(d)) + w_lexical / (k + rank_lexical(d))

RRF looks only at ranks, so it needs no calibration between cosine
similarities and unbounded BM25 scores, and it has no weight tuned to any one
corpus: the daemon serves conversation memories, not the eval corpora.
A convex combination of min-max normalized scores (Bruch et al., TOIS 2023)
is kept as an option, ``method="convex"``, for comparison; on our eval it
needs a corpus-dependent alpha to beat RRF (see scripts/eval_fusion_offline.py).

Each input list is (key, score) best first, as the indexes return them; a
key's rank is its 1-based position. A key seen twice in one list keeps its
first (best) position. Ties in the fused score break by key, ascending, so the
output is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RRF_K = 60
# Convex combination weight of the dense side; 0.5 is the unbiased prior.
CONVEX_ALPHA = 0.5

Method = Literal["rrf", "convex"]


@dataclass(frozen=True)
class FusedHit:
    """One fused result. Ranks are 1-based; 0 means the key was not in that list.

    A score from a list the key was not in is 0.0.
    """

    key: int
    score: float
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int


def _positions(hits: list[tuple[int, float]]) -> dict[int, tuple[int, float]]:
    """key -> (1-based rank, score), first occurrence wins."""
    out: dict[int, tuple[int, float]] = {}
    for i, (key, score) in enumerate(hits):
        out.setdefault(int(key), (i + 1, float(score)))
    return out


def _minmax(values: dict[int, tuple[int, float]]) -> dict[int, float]:
    if not values:
        return {}
    scores = [s for _, s in values.values()]
    lo, hi = min(scores), max(scores)
    span = hi - lo
    # A single hit (or all equal) carries full weight: it is the best of its list.
    return {key: ((s - lo) / span if span > 0 else 1.0) for key, (_, s) in values.items()}


def fuse(
    dense: list[tuple[int, float]],
    lexical: list[tuple[int, float]],
    k: int,
    *,
    method: Method = "rrf",
    k_rrf: int = RRF_K,
    w_dense: float = 1.0,
    w_lexical: float = 1.0,
    alpha: float = CONVEX_ALPHA,
) -> list[FusedHit]:
    """Top ``k`` of the union of ``dense`` and ``lexical`` (each best first).

    method "rrf": weighted reciprocal rank fusion with ``k_rrf``, ``w_dense``,
    ``w_lexical``. method "convex": ``alpha * minmax(dense) + (1 - alpha) *
    minmax(lexical)``, a missing score counting as 0 (the list's minimum).
    """
    if k <= 0:
        return []
    if k_rrf < 0:
        raise ValueError("k_rrf must be >= 0")
    d = _positions(dense)
    lx = _positions(lexical)
    keys = set(d) | set(lx)
    if method == "rrf":
        fused = {
            key: (w_dense / (k_rrf + d[key][0]) if key in d else 0.0)
            + (w_lexical / (k_rrf + lx[key][0]) if key in lx else 0.0)
            for key in keys
        }
    elif method == "convex":
        dn, ln = _minmax(d), _minmax(lx)
        fused = {key: alpha * dn.get(key, 0.0) + (1.0 - alpha) * ln.get(key, 0.0) for key in keys}
    else:
        raise ValueError(f"unknown fusion method {method!r}")
    ranked = sorted(keys, key=lambda key: (-fused[key], key))[:k]
    return [
        FusedHit(
            key=key,
            score=fused[key],
            dense_score=d[key][1] if key in d else 0.0,
            lexical_score=lx[key][1] if key in lx else 0.0,
            dense_rank=d[key][0] if key in d else 0,
            lexical_rank=lx[key][0] if key in lx else 0,
        )
        for key in ranked
    ]


def single(hits: list[tuple[int, float]], k: int, *, lexical: bool = False) -> list[FusedHit]:
    """Wrap one list as FusedHits (score = that list's score), for single-mode search."""
    out: list[FusedHit] = []
    for rank, (key, (_, s)) in enumerate(_positions(hits).items(), start=1):
        if rank > k:
            break
        if lexical:
            out.append(FusedHit(key, s, 0.0, s, 0, rank))
        else:
            out.append(FusedHit(key, s, s, 0.0, rank, 0))
    return out
