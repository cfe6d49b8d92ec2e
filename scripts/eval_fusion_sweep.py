#!/usr/bin/env python3
"""Can any fusion of dense and BM25 beat both on the BEIR subsets? A sweep over exact scores.

``eval_fusion_offline.py`` scores the index layer as shipped: HNSW and tantivy
top-``depth`` lists, fused. This script removes every approximation that
could hide a better fusion, so that what it finds is a property of the two
signals and not of the plumbing:

- dense is the exact cosine of the query with *every* passage (no HNSW);
- BM25 is computed for *every* passage, in numpy, with the index's own
  analyzer (``memosd.index.lexical.analyze``) and idf; with tantivy's k1 and b
  its BM25-alone nDCG@10 is within 0.001 of tantivy's (which quantizes
  document lengths);
- so every fused candidate has both scores: nothing is imputed for a document
  missing from one list.

It then sweeps weighted RRF (dense weight x k) and TM2C2 (Bruch et al., TOIS
2023: convex combination, theoretical-min / max normalization) for two BM25
settings (tantivy's k1=1.2 b=0.75; Anserini's k1=0.9 b=0.4), and reports for
each setting the change from dense alone on nDCG@10 and recall@10 and
whether it beats dense *and* BM25 on both metrics of both sets. For the
shipped RRF and for TM2C2 alpha=0.8 it adds a paired bootstrap of the
per-query difference from dense, and the share of that difference owed to
the single worst query.

    python scripts/eval_fusion_sweep.py [--cache DIR] [--json out.json]

Corpus embeddings take ~1 min per set on 2 cores; ``--cache`` keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval_fusion_offline import DATA, Dataset, K, embed_corpus, load_dataset, ndcg_at, recall_at

from memosd.index.embedder import Embedder
from memosd.index.lexical import analyze, query_terms

Matrix = npt.NDArray[np.float64]
BM25_SETTINGS = {"tantivy k1=1.2 b=0.75": (1.2, 0.75), "anserini k1=0.9 b=0.4": (0.9, 0.4)}
RRF_WEIGHTS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
RRF_KS = (10, 30, 60, 100)
TM2C2_ALPHAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
BOOTSTRAP = 2000
# The shipped default and the TM2C2 paper's alpha get a bootstrap and a worst-query line.
EXPLAINED = ("rrf dense_weight=1 k=60", "tm2c2 alpha=0.8")


@dataclass
class Scored:
    """Per-query nDCG@10 and recall@10 of one ranking function on one dataset."""

    ndcg: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]


@dataclass
class Signals:
    ds: Dataset
    qids: list[str]
    cosine: Matrix  # (queries, passages)
    bm25: dict[str, Matrix]  # setting -> (queries, passages)


def bm25_all(tokens: list[list[str]], queries: list[Counter[str]], k1: float, b: float) -> Matrix:
    """BM25 of every passage for every query: tantivy's formula (idf ln(1 + (N - df + .5) / (df + .5)))."""
    n = len(tokens)
    lengths = np.array([len(t) for t in tokens], np.float64)
    norm = k1 * (1.0 - b + b * lengths / max(lengths.mean(), 1.0))
    postings: dict[str, tuple[list[int], list[int]]] = {}
    for i, toks in enumerate(tokens):
        for term, count in Counter(toks).items():
            docs, tfs = postings.setdefault(term, ([], []))
            docs.append(i)
            tfs.append(count)
    out = np.zeros((len(queries), n))
    for qi, terms in enumerate(queries):
        for term, count in terms.items():
            if term not in postings:
                continue
            docs, tfs = postings[term]
            at, freq = np.array(docs), np.array(tfs, np.float64)
            idf = math.log(1.0 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            out[qi, at] += count * idf * (1.0 + k1) * freq / (freq + norm[at])
    return out


def ranks(scores: Matrix) -> Matrix:
    """1-based rank of every passage per query, ties broken by passage order."""
    out = np.empty_like(scores)
    cols = np.arange(scores.shape[1])
    for qi in range(scores.shape[0]):
        out[qi, np.lexsort((cols, -scores[qi]))] = cols + 1
    return out


def score(sig: Signals, fused: Matrix) -> Scored:
    nd, rc = [], []
    cols = np.arange(fused.shape[1])
    for qi, qid in enumerate(sig.qids):
        top = np.lexsort((cols, -fused[qi]))[:K]
        ranked = [sig.ds.doc_ids[i] for i in top]
        nd.append(ndcg_at(ranked, sig.ds.qrels[qid], K))
        rc.append(recall_at(ranked, sig.ds.qrels[qid], K))
    return Scored(np.array(nd), np.array(rc))


def rrf(cos_ranks: Matrix, bm: Matrix, bm_ranks: Matrix, weight: float, k: int) -> Matrix:
    # A passage with BM25 0 shares no term with the query: it is not in the lexical list.
    fused: Matrix = weight / (k + cos_ranks) + np.where(bm > 0, 1.0 / (k + bm_ranks), 0.0)
    return fused


def tm2c2(cos: Matrix, bm: Matrix, alpha: float) -> Matrix:
    dense = np.maximum(cos, 0.0) / np.maximum(cos.max(axis=1, keepdims=True), 1e-9)
    lexical = bm / np.maximum(bm.max(axis=1, keepdims=True), 1e-9)
    fused: Matrix = alpha * dense + (1.0 - alpha) * lexical
    return fused


def bootstrap(diff: npt.NDArray[np.float64], seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def load_signals(emb: Embedder, name: str, data: Path, cache: Path | None) -> Signals:
    ds = load_dataset(data / name)
    qids = [q for q in ds.queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
    docs = embed_corpus(emb, ds, cache).astype(np.float64)
    queries = emb.embed([ds.queries[q] for q in qids]).astype(np.float64)
    tokens = [analyze(t) for t in ds.texts]
    terms = [query_terms(ds.queries[q]) for q in qids]
    bm = {label: bm25_all(tokens, terms, k1, b) for label, (k1, b) in BM25_SETTINGS.items()}
    return Signals(ds, qids, queries @ docs.T, bm)


@dataclass
class Explained:
    """Why a setting loses or wins against dense: the paired bootstrap and the single worst query."""

    ci_low: float
    ci_high: float
    worst_query: str
    worst_diff: float  # that query's nDCG@10 minus dense's
    worst_share: float  # its part of the mean difference (worst_diff / number of queries)


@dataclass
class Row:
    """One fusion setting: its mean metrics per dataset, and the change from dense alone."""

    bm25: str
    method: str
    metrics: dict[str, dict[str, float]]  # dataset -> {"ndcg", "recall", "ndcg vs dense", "recall vs dense"}
    beats_both: bool
    notes: dict[str, Explained]  # dataset -> bootstrap and worst query (EXPLAINED settings only)


def explain(sig: Signals, got: Scored, dense: Scored) -> Explained:
    diff = got.ndcg - dense.ndcg
    lo, hi = bootstrap(diff)
    worst = int(np.argmin(diff))
    return Explained(
        lo, hi, sig.ds.queries[sig.qids[worst]], float(diff[worst]), float(diff[worst] / len(diff))
    )


def sweep(signals: dict[str, Signals]) -> tuple[dict[str, Scored], list[Row]]:
    dense = {n: score(s, s.cosine) for n, s in signals.items()}
    cos_ranks = {n: ranks(s.cosine) for n, s in signals.items()}
    rows: list[Row] = []
    for label in BM25_SETTINGS:
        lexical = {n: score(s, s.bm25[label]) for n, s in signals.items()}
        bm_ranks = {n: ranks(s.bm25[label]) for n, s in signals.items()}
        methods: list[tuple[str, dict[str, Matrix]]] = [
            ("bm25 alone", {n: s.bm25[label] for n, s in signals.items()})
        ]
        for w in RRF_WEIGHTS:
            for k in RRF_KS:
                fused = {n: rrf(cos_ranks[n], s.bm25[label], bm_ranks[n], w, k) for n, s in signals.items()}
                methods.append((f"rrf dense_weight={w:g} k={k}", fused))
        for a in TM2C2_ALPHAS:
            methods.append(
                (f"tm2c2 alpha={a:g}", {n: tm2c2(s.cosine, s.bm25[label], a) for n, s in signals.items()})
            )
        for method, fused in methods:
            row = Row(label, method, {}, method != "bm25 alone", {})
            for n, sig in signals.items():
                got = score(sig, fused[n])
                m: dict[str, float] = {}
                for metric in ("ndcg", "recall"):
                    mine, base = float(getattr(got, metric).mean()), float(getattr(dense[n], metric).mean())
                    m[metric], m[f"{metric} vs dense"] = mine, mine - base
                    row.beats_both &= mine > max(base, float(getattr(lexical[n], metric).mean()))
                row.metrics[n] = m
                if method in EXPLAINED:
                    row.notes[n] = explain(sig, got, dense[n])
            rows.append(row)
    return dense, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--datasets", nargs="+", default=["msmarco", "dbpedia"])
    ap.add_argument("--cache", type=Path, help="cache corpus embeddings here (outside the repo)")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args(argv)

    emb = Embedder.load("all-MiniLM-L6-v2")
    signals = {n: load_signals(emb, n, args.data, args.cache) for n in args.datasets}
    dense, rows = sweep(signals)
    names = list(signals)
    print(
        "dense alone (exact): "
        + "  ".join(f"{n} {d.ndcg.mean():.4f} / {d.recall.mean():.4f}" for n, d in dense.items())
    )
    head = "  ".join(f"{n + ' nDCG':>14} {n + ' R@10':>14}" for n in names)
    print(f"{'bm25':<22} {'method':<26} {head}  (change from dense alone)")
    for row in rows:
        cells = "  ".join(
            f"{row.metrics[n]['ndcg vs dense']:>+14.4f} {row.metrics[n]['recall vs dense']:>+14.4f}"
            for n in names
        )
        print(f"{row.bm25:<22} {row.method:<26} {cells}{'  BEATS BOTH' if row.beats_both else ''}")
    for row in rows:
        for n, note in row.notes.items():
            print(
                f"{row.bm25} | {row.method} | {n}: nDCG@10 minus dense, 95% CI "
                f"[{note.ci_low:+.3f}, {note.ci_high:+.3f}]; worst query {note.worst_query!r} "
                f"{note.worst_diff:+.3f}, {note.worst_share:+.4f} of the mean"
            )
    fusions = [r for r in rows if r.method != "bm25 alone"]
    print(
        f"fusion settings that beat dense and BM25 on both metrics of every set: "
        f"{sum(r.beats_both for r in fusions)} of {len(fusions)}"
    )
    if args.json:
        out = {
            "k": K,
            "dense exact": {
                n: {"ndcg": float(d.ndcg.mean()), "recall": float(d.recall.mean())} for n, d in dense.items()
            },
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
