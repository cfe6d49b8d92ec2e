"""The sweep script's exact scorers agree with the shipped ones, so its table speaks for the daemon."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from eval_fusion_sweep import bm25_all, ranks, rrf, tm2c2

from memosd.index.fusion import fuse
from memosd.index.lexical import BM25_B, BM25_K1, analyze, query_terms, score_adhoc

DOCS = [
    "The cat sat on the mat with another cat.",
    "Dogs chase cats in the park.",
    "A cat.",
    "Nothing relevant here at all, just words words words",
    "cat cat cat dog",
    "Parks and recreation: a show about a park department.",
]
QUERIES = ["cat", "cats and dogs", "the cat the cat", "park dog", "recreation words"]


def test_bm25_all_equals_the_daemon_scorer() -> None:
    got = bm25_all([analyze(t) for t in DOCS], [query_terms(q) for q in QUERIES], BM25_K1, BM25_B)
    for qi, query in enumerate(QUERIES):
        want = dict(score_adhoc(query, list(enumerate(DOCS)), len(DOCS)))
        assert {i for i in range(len(DOCS)) if got[qi, i] > 0} == set(want)
        for i, score in want.items():
            assert got[qi, i] == pytest.approx(score, rel=1e-9)


def test_rrf_and_tm2c2_rank_like_fuse_over_complete_lists() -> None:
    rng = np.random.default_rng(7)
    cos = rng.uniform(-0.2, 0.9, (3, 12))
    bm = np.where(rng.uniform(size=(3, 12)) < 0.5, rng.uniform(0.5, 9.0, (3, 12)), 0.0)
    fused_rrf = rrf(ranks(cos), bm, ranks(bm), 1.0, 60)
    fused_tm = tm2c2(cos, bm, 0.8)
    for qi in range(3):
        dense = sorted(((i, float(cos[qi, i])) for i in range(12)), key=lambda h: -h[1])
        lexical = sorted(((i, float(bm[qi, i])) for i in range(12) if bm[qi, i] > 0), key=lambda h: -h[1])
        want_rrf = [h.key for h in fuse(dense, lexical, 12, rrf_k=60)]
        assert want_rrf == sorted(range(12), key=lambda i: (-fused_rrf[qi, i], i))
        want_tm = [h.key for h in fuse(dense, lexical, 12, method="tm2c2", dense_weight=0.8, lexical_weight=0.2)]
        assert want_tm == sorted(range(12), key=lambda i: (-fused_tm[qi, i], i))
