#!/usr/bin/env python3
"""Plaintext memory benchmark, through gRPC against a real memosd.

    .venv/bin/python scripts/bench_plaintext.py                 # 10k and 100k items
    .venv/bin/python scripts/bench_plaintext.py --sizes 2000 --queries 50   # a quick run

It starts its own daemon on a temporary data dir (so nothing else shares it),
and measures, in one run:
  * the embedder alone on the same batches, in this process, before the daemon starts writing;
  * write throughput: Write (embeds) + Commit per batch, through gRPC;
  * search latency p50/p99 (hybrid, k=10, client-side round trip, query embedding included)
    once the cube holds each size in --sizes;
  * the daemon's RSS (Stats.rss_bytes, and peak VmHWM from /proc).
Prints a table and writes JSON (--json, default bench-out/bench_plaintext.json).
Item texts: the shared BEIR passages (../shared/data/retrieval), then
re-combinations of their sentences for sizes beyond them.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "retrieval"


def load_texts() -> tuple[list[str], list[str]]:
    passages: list[str] = []
    queries: list[str] = []
    for name in ("msmarco", "dbpedia"):
        with open(DATA / name / "corpus.jsonl") as f:
            for line in f:
                doc = json.loads(line)
                passages.append(f"{doc['title']}. {doc['text']}" if doc.get("title") else doc["text"])
        with open(DATA / name / "queries.jsonl") as f:
            queries += [json.loads(line)["text"] for line in f]
    return passages, queries


def corpus(passages: list[str], n: int, seed: int = 7) -> list[str]:
    """n texts of passage length: the real passages first, then sentence re-combinations."""
    rng = random.Random(seed)
    sentences = [s.strip() for p in passages for s in p.split(". ") if len(s.split()) > 3]
    out = passages[:n]
    while len(out) < n:
        out.append(". ".join(rng.sample(sentences, 3)) + f" (note {len(out)})")
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def embedder_alone(batches: list[list[str]]) -> float:
    from memosd.index.embedder import Embedder

    embedder = Embedder.load()
    embedder.embed(["warm up"])
    started = time.perf_counter()
    for batch in batches:
        embedder.embed(batch)
    return sum(map(len, batches)) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch", type=int, default=256, help="items per Write+Commit")
    parser.add_argument("--queries", type=int, default=300, help="timed searches per size")
    parser.add_argument("--baseline-batches", type=int, default=20, help="batches for the embedder-alone run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_plaintext.json")
    args = parser.parse_args()

    passages, queries = load_texts()
    texts = corpus(passages, max(args.sizes))
    batches = [texts[i:i + args.batch] for i in range(0, len(texts), args.batch)]
    baseline_ips = embedder_alone(batches[: args.baseline_batches])

    result: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": __import__("os").cpu_count(), "batch": args.batch, "embedder_alone_items_per_s": baseline_ips,
    }
    sizes: dict[str, dict[str, float]] = {}
    result["sizes"] = sizes
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"]).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=300) as client:
                client.alloc_cube("bench")
                mount = client.mount("bench", writable=True)
                written = 0
                write_seconds = 0.0
                first_window: float | None = None
                for size in sorted(args.sizes):
                    while written < size:
                        batch = batches[written // args.batch]
                        t0 = time.perf_counter()
                        mount.write(batch)
                        mount.commit(f"batch {written // args.batch}")
                        write_seconds += time.perf_counter() - t0
                        written += len(batch)
                        if written // args.batch == args.baseline_batches and first_window is None:
                            first_window = written / write_seconds
                    for q in queries[:10]:
                        mount.search(q, k=10)  # warm up
                    latencies = []
                    for i in range(args.queries):
                        t0 = time.perf_counter()
                        mount.search(queries[i % len(queries)], k=10)
                        latencies.append((time.perf_counter() - t0) * 1000)
                    stats = client.stats()
                    sizes[str(size)] = {
                        "items": stats.item_count,
                        "search_p50_ms": percentile(latencies, 50),
                        "search_p99_ms": percentile(latencies, 99),
                        "search_mean_ms": statistics.fmean(latencies),
                        "rss_mb": stats.rss_bytes / 2**20,
                        "peak_rss_mb": vm_hwm(daemon.proc.pid) / 2**20,
                        "dense_index_mb": stats.dense_index_bytes / 2**20,
                        "store_mb": stats.store_bytes / 2**20,
                    }
                result["write_items_per_s"] = written / write_seconds
                result["write_items_per_s_first_batches"] = first_window or written / write_seconds
                result["write_vs_embedder"] = (first_window or written / write_seconds) / baseline_ips
        finally:
            daemon.stop()

    print(f"\nmemosd plaintext benchmark ({result['machine']}, {result['cpus']} CPUs, batch {args.batch})")
    print(f"{'embedder alone (same batches)':<38}{baseline_ips:>10.0f} items/s")
    print(f"{'Write+Commit via gRPC, same batches':<38}{result['write_items_per_s_first_batches']:>10.0f} items/s"
          f"   ratio {result['write_vs_embedder']:.2f}")
    print(f"{'Write+Commit via gRPC, whole run':<38}{result['write_items_per_s']:>10.0f} items/s")
    print(f"\n{'items':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'RSS MB':>8} {'peak MB':>8} {'dense MB':>9}")
    for size, row in sizes.items():
        print(f"{size:>8} {row['search_p50_ms']:>8.1f} {row['search_p99_ms']:>8.1f} {row['search_mean_ms']:>8.1f} "
              f"{row['rss_mb']:>8.0f} {row['peak_rss_mb']:>8.0f} {row['dense_index_mb']:>9.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
