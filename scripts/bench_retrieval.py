#!/usr/bin/env python3
"""Retrieval quality through the whole system: gRPC -> kernel -> indexes.

    .venv/bin/python scripts/bench_retrieval.py

Starts a daemon on a temporary data dir, writes each BEIR subset in
../shared/data/retrieval (msmarco, dbpedia) into its own cube through the
client (item source = the corpus doc id), commits, and runs every judged query
through Search in hybrid, dense and lexical mode (k=10). Prints nDCG@10 and
recall@10 per dataset and mode, says whether hybrid beats both, and writes
JSON (--json, default bench-out/bench_retrieval.json). The data is read in
place, never copied.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from daemon_proc import DaemonProcess  # noqa: E402
from eval_fusion_offline import load_dataset, ndcg_at, recall_at  # noqa: E402
from memosd_client import Client  # noqa: E402

MODES = ("hybrid", "dense", "lexical")
K = 10


def evaluate(client: Client, root: Path) -> dict[str, dict[str, float]]:
    ds = load_dataset(root)
    cube = f"beir-{ds.name}"
    client.alloc_cube(cube)
    started = time.perf_counter()
    with client.mount(cube, writable=True) as mount:
        mount.write_many(({"text": text, "source": doc_id} for doc_id, text in zip(ds.doc_ids, ds.texts,
                                                                                    strict=True)),
                         batch_size=256)
        mount.commit(f"{ds.name} corpus")
        print(f"{ds.name}: wrote {len(ds.doc_ids)} docs in {time.perf_counter() - started:.0f} s", flush=True)
        judged = [q for q in ds.queries if any(r > 0 for r in ds.qrels.get(q, {}).values())]
        scores: dict[str, dict[str, float]] = {}
        for mode in MODES:
            ndcg = recall = 0.0
            for qid in judged:
                hits = mount.search(ds.queries[qid], k=K, mode=mode)
                ranked = [h.item.source for h in hits]
                ndcg += ndcg_at(ranked, ds.qrels[qid], K)
                recall += recall_at(ranked, ds.qrels[qid], K)
            scores[mode] = {"ndcg@10": ndcg / len(judged), "recall@10": recall / len(judged),
                            "queries": len(judged)}
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "retrieval")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_retrieval.json")
    args = parser.parse_args()

    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"]).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                for name in ("msmarco", "dbpedia"):
                    results[name] = evaluate(client, args.data / name)
        finally:
            daemon.stop()

    print(f"\n{'dataset':<10}{'mode':<9}{'nDCG@10':>9}{'recall@10':>11}")
    verdicts = []
    for name, scores in results.items():
        for mode in MODES:
            print(f"{name:<10}{mode:<9}{scores[mode]['ndcg@10']:>9.4f}{scores[mode]['recall@10']:>11.4f}")
        for metric in ("ndcg@10", "recall@10"):
            margin = scores["hybrid"][metric] - max(scores["dense"][metric], scores["lexical"][metric])
            verdicts.append(margin > 0)
            print(f"{'':<10}hybrid - best single on {metric}: {margin:+.4f}")
    print("hybrid beats both on every metric and dataset:", "YES" if all(verdicts) else "NO")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
