"""Fuse a dense and a lexical ranking into one.

The default is reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR
2009) with k = 5 (the paper's is 60) and equal weights:

    score(d) = dense_weight / (rrf_k + rank_dense(d)) + lexical_weight / (rrf_k + rank_lexical(d))

Why k = 5: a small k keeps a strong single-list hit. With k = 60 the curve is
so flat that a clear #1 of one list (1/61) loses to any document ranked 60th
or better in both (2/120); with k = 5 the #1 of one list (1/6) beats every
document both lists rank 8th or lower (2/13). On the LoCoMo dev conversations
(scripts/bench_conversation.py, BENCHMARKS.md) re-fusing main's lists gave
any@10 67.5 (k=60), 70.0 (k=20), 71.4 (k=10), 70.9 (k=5), 70.0 (k=1); with
the conversation lifts of kernel/turn_rank.py on top, k=5 beat k=10 on
any@1 (34.1 vs 32.0) and any@5 (69.3 vs 67.5) and tied the rest. The BEIR
subsets (scripts/bench_retrieval.py) moved within their noise (BENCHMARKS.md).
The older BEIR-only analysis below was made at k = 60.

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

Score-distribution fusions are available as ``method`` values too, for the
same reason (kept off by default; see the table in ``_FUSION_EVAL`` below):
``"combsum"`` / ``"combmnz"`` (CombSUM / CombMNZ over z-score normalized
lists, Fox & Shaw 1994; Montague & Aslam, CIKM 2001), ``"dbsf"`` (Qdrant's
distribution-based score fusion: each list mapped by mean +- 3 sigma to [0, 1],
clipped, summed) and ``"tm2c2"`` (Bruch, Gai & Ingber, TOIS 2023: convex
combination with theoretical-min / observed-max normalization; cosine floor 0,
BM25 floor 0, dense share ``dense_weight / (dense_weight + lexical_weight)``,
the paper's alpha = 0.8 when called with ``dense_weight=0.8,
lexical_weight=0.2``).

_FUSION_EVAL (scripts/eval_fusion_offline.py --variants, depth 100, nDCG@10 /
recall@10; dense alone msmarco 0.798 / 0.220, dbpedia 0.515 / 0.347; BM25
alone msmarco 0.720 / 0.220, dbpedia 0.381 / 0.276):

    rrf k=60              msmarco 0.785 / 0.222   dbpedia 0.489 / 0.343
    combsum (z-score)     msmarco 0.782 / 0.223   dbpedia 0.475 / 0.317
    combmnz (z-score)     msmarco 0.784 / 0.221   dbpedia 0.477 / 0.322
    dbsf                  msmarco 0.788 / 0.221   dbpedia 0.475 / 0.321
    tm2c2 alpha=0.8       msmarco 0.802 / 0.222   dbpedia 0.502 / 0.336

scripts/eval_fusion_sweep.py repeats this over exact scores (every passage's
cosine and BM25, so nothing is imputed for a key missing from one list): 0 of
68 RRF / TM2C2 settings beat dense and BM25 on both metrics of both sets, and
one dbpedia question accounts for all of TM2C2's loss there (BENCHMARKS.md).

None beats dense on dbpedia; the per-query paired differences from dense are
well inside noise on 40 queries (RRF - dense, dbpedia nDCG@10: -0.026, 95%
bootstrap CI [-0.071, +0.016]), and msmarco's recall@10 is capped at 0.2237
by its ~75 judged-relevant documents per query, so no method can beat dense
(0.2197) there by more than 0.004. RRF stays the default: it needs no score
calibration, which matters most where the daemon merges BM25 lists from
several cubes with different statistics.

Each input list is (key, score) best first, as the indexes return them; a
key's rank is its 1-based position. A key seen twice in one list keeps its
first (best) position. Ties in the fused score break by key, ascending, so the
output is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

RRF_K = 5  # see the module docstring

# Names as in memosd.config (search.fusion).
Method = Literal["rrf", "linear", "combsum", "combmnz", "dbsf", "tm2c2"]
METHODS: tuple[str, ...] = ("rrf", "linear", "combsum", "combmnz", "dbsf", "tm2c2")
# DBSF maps each list's mean +- DBSF_SIGMAS standard deviations to [0, 1] (Qdrant uses 3).
DBSF_SIGMAS = 3.0
# TM2C2 lower bounds: cosine similarity of sentence embeddings, and BM25 (never negative).
TM2C2_DENSE_FLOOR = 0.0
TM2C2_LEXICAL_FLOOR = 0.0


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


def _zscore(values: dict[int, tuple[int, float]]) -> tuple[dict[int, float], float]:
    """key -> (score - mean) / std over the list, and the list's lowest z (the value for a missing key)."""
    if not values:
        return {}, 0.0
    scores = [s for _, s in values.values()]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if std <= 0:
        return {key: 0.0 for key in values}, 0.0
    z = {key: (s - mean) / std for key, (_, s) in values.items()}
    return z, min(z.values())


def _dbsf(values: dict[int, tuple[int, float]]) -> dict[int, float]:
    """Qdrant's DBSF normalization: [mean - 3 sigma, mean + 3 sigma] -> [0, 1], clipped."""
    if not values:
        return {}
    scores = [s for _, s in values.values()]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    lo, hi = mean - DBSF_SIGMAS * std, mean + DBSF_SIGMAS * std
    if hi <= lo:
        return {key: 1.0 for key in values}
    return {key: min(max((s - lo) / (hi - lo), 0.0), 1.0) for key, (_, s) in values.items()}


def _theoretical_minmax(values: dict[int, tuple[int, float]], floor: float) -> dict[int, float]:
    """TM2C2 normalization: (score - floor) / (max observed - floor), a missing key counting as 0."""
    if not values:
        return {}
    hi = max(s for _, s in values.values())
    span = hi - floor
    return {key: (max(s - floor, 0.0) / span if span > 0 else 1.0) for key, (_, s) in values.items()}


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

    method "combsum": sum of the weighted z-scores of the two lists, a key
    missing from a list getting that list's lowest z. "combmnz": the same
    with each list's z shifted to start at 0, times the number of lists the
    key is in. "dbsf": weighted sum of DBSF-normalized scores (0 when
    missing). "tm2c2": like "linear" but normalized from the theoretical
    floors (TM2C2_DENSE_FLOOR, TM2C2_LEXICAL_FLOOR) to the observed maximum.
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
    elif method in ("combsum", "combmnz"):
        zd, dmin = _zscore(d)
        zl, lmin = _zscore(lx)
        if method == "combsum":
            fused = {
                key: dense_weight * zd.get(key, dmin) + lexical_weight * zl.get(key, lmin) for key in keys
            }
        else:
            fused = {
                key: (
                    dense_weight * (zd[key] - dmin if key in zd else 0.0)
                    + lexical_weight * (zl[key] - lmin if key in zl else 0.0)
                )
                * ((key in zd) + (key in zl))
                for key in keys
            }
    elif method == "dbsf":
        dn, ln = _dbsf(d), _dbsf(lx)
        fused = {key: dense_weight * dn.get(key, 0.0) + lexical_weight * ln.get(key, 0.0) for key in keys}
    elif method == "tm2c2":
        dn = _theoretical_minmax(d, TM2C2_DENSE_FLOOR)
        ln = _theoretical_minmax(lx, TM2C2_LEXICAL_FLOOR)
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
