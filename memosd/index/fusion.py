"""Fuse a dense and a lexical ranking into one.

The default is reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR
2009) with the paper's k = 60 and equal weights:

    score(d) = dense_weight / (rrf_k + rank_dense(d)) + lexical_weight / (rrf_k + rank_lexical(d))

RRF looks only at ranks, so it needs no calibration between cosine
similarities and unbounded BM25 scores, and no weight fitted to a corpus: the
daemon serves conversation memories, not the eval corpora, and there names,
dates and rare words are exactly what BM25 matches and a small embedder blurs.

Why not something else (scripts/eval_fusion_offline.py --variants, and a
sweep of 448 weighted-RRF / min-max linear settings, rrf_k 1..100, dense
weight 1..5, dense share 0.5..0.975, depth 10..100): on the two offline subsets
dense MiniLM is far ahead of BM25 (dbpedia nDCG@10 0.515 vs 0.381; msmarco is
MiniLM's training domain), and no setting beat dense on nDCG@10 on both sets by
more than noise (best margin +0.0004, at weights that all but switch BM25 off).
On dbpedia the whole loss comes from four natural-language questions on which
BM25 scores nDCG@10 <= 0.23 (on the other 36 queries RRF beats dense by +0.013
on average); tuning weights to those two sets would only move the default away
from the lexical evidence that conversation memory needs. A convex
combination of min-max normalized scores (Bruch et al., TOIS 2023) is kept as
``method="linear"`` for such experiments.

Each input list is (key, score) best first, as the indexes return them; a
key's rank is its 1-based position. A key seen twice in one list keeps its
first (best) position. Ties in the fused score break by key, ascending, so the
output is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RRF_K = 60

# Names as in memosd.config (search.fusion).
Method = Literal["rrf", "linear"]


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
    rrf_k: int = RRF_K,
    dense_weight: float = 1.0,
    lexical_weight: float = 1.0,
) -> list[FusedHit]:
    """Top ``k`` of the union of ``dense`` and ``lexical`` (each best first).

    method "rrf": weighted reciprocal rank fusion. method "linear":
    ``(dense_weight * minmax(dense) + lexical_weight * minmax(lexical)) /
    (dense_weight + lexical_weight)``, min-max over each list as given, a key
    missing from a list counting as that list's minimum (0).
    """
    if k <= 0:
        return []
    if rrf_k < 0 or dense_weight < 0 or lexical_weight < 0:
        raise ValueError("rrf_k and the weights must be >= 0")
    d = _positions(dense)
    lx = _positions(lexical)
    keys = set(d) | set(lx)
    if method == "rrf":
        fused = {
            key: (dense_weight / (rrf_k + d[key][0]) if key in d else 0.0)
            + (lexical_weight / (rrf_k + lx[key][0]) if key in lx else 0.0)
            for key in keys
        }
    elif method == "linear":
        dn, ln = _minmax(d), _minmax(lx)
        total = (dense_weight + lexical_weight) or 1.0
        fused = {
            key: (dense_weight * dn.get(key, 0.0) + lexical_weight * ln.get(key, 0.0)) / total for key in keys
        }
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
