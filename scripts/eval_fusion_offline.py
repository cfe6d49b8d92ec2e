#!/usr/bin/env python3
"""Index-level retrieval eval: dense vs BM25 vs hybrid, nDCG@10 and recall@10.

Reads BEIR-style subsets from /work/shared/data/retrieval/<name>/
(corpus.jsonl, queries.jsonl, qrels/test.tsv with graded relevance, 0 = not
relevant), indexes each corpus with memosd.index's own classes (the builtin
embedder, a CubeIndex in a temp dir) and scores every query that has at least
one relevant document. The data is read in place, never copied.

    python scripts/eval_fusion_offline.py [--json out.json] [--variants] [--compare-dtypes]

nDCG uses linear gain (rel / log2(rank + 1)), as trec_eval and BEIR do.
``--variants`` also prints fusion alternatives (RRF depths and weights, linear
min-max combination, z-score CombSUM / CombMNZ, DBSF, TM2C2); ``--compare-dtypes`` checks f16 against f32 vectors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Run from a checkout without installing: the repo root holds the memosd package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memosd.index.cube_index import CubeIndex, default_depth
from memosd.index.dense import DenseIndex
from memosd.index.embedder import Embedder
from memosd.index.fusion import FusedHit, fuse

DATA = Path("/work/shared/data/retrieval")
K = 10


@dataclass
class Dataset:
    name: str
    doc_ids: list[str]
    texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_dataset(root: Path) -> Dataset:
    doc_ids: list[str] = []
    texts: list[str] = []
    with (root / "corpus.jsonl").open() as fh:
        for line in fh:
            d = json.loads(line)
            title = (d.get("title") or "").strip()
            body = d.get("text") or ""
            doc_ids.append(str(d["_id"]))
            texts.append(f"{title}. {body}" if title else body)
    queries: dict[str, str] = {}
    with (root / "queries.jsonl").open() as fh:
        for line in fh:
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    with (root / "qrels" / "test.tsv").open() as fh:
        for i, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or (i == 0 and parts[0] == "query-id"):
                continue  # some subsets have a header, some do not
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return Dataset(root.name, doc_ids, texts, queries, qrels)


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def embed_corpus(emb: Embedder, ds: Dataset, cache: Path | None) -> npt.NDArray[np.float32]:
    """Corpus vectors, cached by (embedder fingerprint, corpus bytes) when a cache dir is given."""
    path: Path | None = None
    if cache is not None:
        h = hashlib.sha256(emb.fingerprint.encode())
        for t in ds.texts:
            h.update(t.encode())
            h.update(b"\0")
        path = cache / f"{ds.name}-{h.hexdigest()[:16]}.npy"
        if path.exists():
            vecs: npt.NDArray[np.float32] = np.load(path)
            return vecs
    t0 = time.perf_counter()
    vecs = emb.embed(ds.texts)
    print(f"  embedded {len(ds.texts)} docs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
    return vecs


def fused(
    dense: list[tuple[int, float]], lexical: list[tuple[int, float]], depth: int, **kw: Any
) -> list[FusedHit]:
    return fuse(dense[:depth], lexical[:depth], K, **kw)


def evaluate(
    emb: Embedder, ds: Dataset, vecs: npt.NDArray[np.float32], variants: bool, compare_dtypes: bool
) -> dict[str, dict[str, float]]:
    keys = np.arange(1, len(ds.doc_ids) + 1, dtype=np.uint64)
    key_to_doc = {int(k): d for k, d in zip(keys.tolist(), ds.doc_ids, strict=True)}
    qids = [q for q in ds.queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
    qtexts = [ds.queries[q] for q in qids]
    qvecs = emb.embed(qtexts)
    depth = default_depth(K)
    max_depth = 200

    results: dict[str, dict[str, float]] = {}

    def score(name: str, runs: Sequence[Sequence[FusedHit]]) -> None:
        nd, rc = [], []
        for qid, run in zip(qids, runs, strict=True):
            ranked = [key_to_doc[h.key] for h in run]
            nd.append(ndcg_at(ranked, ds.qrels[qid], K))
            rc.append(recall_at(ranked, ds.qrels[qid], K))
        results[name] = {"ndcg@10": float(np.mean(nd)), "recall@10": float(np.mean(rc))}

    with tempfile.TemporaryDirectory(prefix="memosd-eval-") as tmp:
        cube = CubeIndex.open(Path(tmp) / "cube", emb.dim)
        t0 = time.perf_counter()
        cube.add(keys, vecs, ds.texts)
        print(f"  indexed {len(keys)} docs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

        dense_lists: list[list[tuple[int, float]]] = []
        lex_lists: list[list[tuple[int, float]]] = []
        t_dense = t_lex = 0.0
        for qv, qt in zip(qvecs, qtexts, strict=True):
            t0 = time.perf_counter()
            dense_lists.append(cube.dense.search(qv, max_depth))
            t1 = time.perf_counter()
            lex_lists.append(cube.lexical.search(qt, max_depth))
            t_dense += t1 - t0
            t_lex += time.perf_counter() - t1
        n = max(len(qids), 1)
        print(
            f"  search depth {max_depth}: dense {1000 * t_dense / n:.2f} ms/q, lexical {1000 * t_lex / n:.2f} ms/q",
            file=sys.stderr,
        )
        pairs = list(zip(dense_lists, lex_lists, strict=True))

        score("dense", [fused(d, [], K) for d, _ in pairs])
        score("lexical", [fused([], lx, K) for _, lx in pairs])
        # The shipped path, end to end: CubeIndex.search with its defaults.
        score("hybrid", [cube.search(qv, qt, K) for qv, qt in zip(qvecs, qtexts, strict=True)])

        if variants:
            for dd in (20, 50, 100, 200):
                score(f"rrf k=60 depth={dd}", [fused(d, lx, dd) for d, lx in pairs])
            for kr in (10, 30, 100):
                score(f"rrf k={kr} depth={depth}", [fused(d, lx, depth, rrf_k=kr) for d, lx in pairs])
            for wd in (0.5, 1.5, 2.0, 3.0):
                score(
                    f"rrf dense_weight={wd} depth={depth}",
                    [fused(d, lx, depth, dense_weight=wd) for d, lx in pairs],
                )
            for a in (0.5, 0.6, 0.7, 0.8, 0.9):
                score(
                    f"linear minmax alpha={a} depth=50",
                    [
                        fused(d, lx, 50, method="linear", dense_weight=a, lexical_weight=1 - a)
                        for d, lx in pairs
                    ],
                )
            # Score-distribution fusions at the shipped depth, parameters from their papers.
            for method in ("combsum", "combmnz", "dbsf"):
                score(f"{method} depth={depth}", [fused(d, lx, depth, method=method) for d, lx in pairs])
            score(
                f"tm2c2 alpha=0.8 depth={depth}",
                [
                    fused(d, lx, depth, method="tm2c2", dense_weight=0.8, lexical_weight=0.2)
                    for d, lx in pairs
                ],
            )

        if compare_dtypes:
            f32 = DenseIndex.open(Path(tmp) / "f32.usearch", emb.dim, dtype="f32")
            f32.add(keys, vecs)
            f32_lists = [f32.search(qv, max_depth) for qv in qvecs]
            same = sum(
                [h[0] for h in a[:K]] == [h[0] for h in b[:K]]
                for a, b in zip(f32_lists, dense_lists, strict=True)
            )
            exact = [cube.dense.search_exact(qv, keys, K) for qv in qvecs]
            overlap = np.mean(
                [
                    len({h[0] for h in a[:K]} & {h[0] for h in b}) / K
                    for a, b in zip(dense_lists, exact, strict=True)
                ]
            )
            print(
                f"  f16 vs f32: identical top-10 for {same}/{len(qids)} queries; "
                f"f16 HNSW recall@10 vs exact scan {overlap:.3f}",
                file=sys.stderr,
            )
            score("dense f32", [fused(d, [], K) for d in f32_lists])
            score("hybrid f32", [fused(d, lx, depth) for d, (_, lx) in zip(f32_lists, pairs, strict=True)])
            f32.close()
        cube.close(save=False)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--datasets", nargs="+", default=["msmarco", "dbpedia"])
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--cache", type=Path, help="cache corpus embeddings here (outside the repo)")
    ap.add_argument("--variants", action="store_true", help="also score fusion alternatives")
    ap.add_argument("--compare-dtypes", action="store_true", help="also compare f16 with f32 vectors")
    args = ap.parse_args(argv)

    emb = Embedder.load(args.model)
    print(f"embedder {emb.name} dim={emb.dim} fingerprint={emb.fingerprint}", file=sys.stderr)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.datasets:
        print(f"[{name}]", file=sys.stderr)
        ds = load_dataset(args.data / name)
        vecs = embed_corpus(emb, ds, args.cache)
        out[name] = evaluate(emb, ds, vecs, args.variants, args.compare_dtypes)

    width = max(len(m) for r in out.values() for m in r)
    print(f"{'dataset':<10} {'method':<{width}}  nDCG@10  recall@10")
    for name, res in out.items():
        for method, m in res.items():
            print(f"{name:<10} {method:<{width}}  {m['ndcg@10']:.4f}   {m['recall@10']:.4f}")
    ok = all(
        r["hybrid"][m] > max(r["dense"][m], r["lexical"][m])
        for r in out.values()
        for m in ("ndcg@10", "recall@10")
    )
    print(f"hybrid beats dense and lexical on both metrics everywhere: {ok}")
    if args.json:
        args.json.write_text(json.dumps({"k": K, "depth": default_depth(K), "results": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
