#!/usr/bin/env python3
"""Activation memory benchmark: time to first token through gRPC, with and without the KV cache.

    .venv/bin/python scripts/bench_activation.py                       # 500, 2000, 4000 tokens, CPU
    .venv/bin/python scripts/bench_activation.py --device cuda         # the CUDA path
    .venv/bin/python scripts/bench_activation.py --sizes 500 --reps 3  # a quick run

It starts its own daemon (embedded SmolLM2-135M-Instruct, greedy) on a
temporary data dir. For each memory-block size it fills a cube with the shared
BEIR passages (../shared/data/retrieval) up to about that many tokens, commits,
and Activates it (the build: time, pool bytes, persisted bytes). Then, in
rounds, side by side, it asks a short question with ``max_tokens=1`` and
``retrieve_k=0``, in three cases:

  (a) none: ``bypass_kv_cache``: the same prompt, the block prefilled in full;
  (b) hot:  the cache is in the KV pool;
  (c) cold: the cube was just Evicted from the pool, so the cache is loaded
      from RocksDB (fp16 chunks) before the prefill of the question.

TTFT is the client's wall time from the call to the end of the one-token
stream (so it includes gRPC and the summary message); the daemon's own
``ttft_us`` is reported beside it. Medians over the rounds; ratios are none/hot
and none/cold from the same run. Prints a table and writes JSON (--json,
default bench-out/bench_activation.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _bench_common import fill, load_passages  # noqa: E402
from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client, MountHandle  # noqa: E402

QUESTION = "In one word, what is the first memory about?"


def ttft(client: Client, mount: MountHandle, *, bypass: bool) -> tuple[float, float, int, int]:
    """(client ms, daemon ms, reused tokens, prompt tokens) of a one-token reply."""
    started = time.perf_counter()
    gen = client.generate(QUESTION, [mount], max_tokens=1, retrieve_k=0, bypass_kv_cache=bypass)
    gen.text()
    wall = (time.perf_counter() - started) * 1000
    summary = gen.summary
    assert summary is not None
    return wall, summary.ttft_us / 1000, summary.reused_tokens, summary.prompt_tokens


def bench_size(client: Client, passages: list[str], target: int, chars_per_token: float, reps: int
               ) -> dict[str, Any]:
    texts: list[str] = []
    chars = 0
    for p in passages:
        if chars >= target * chars_per_token:
            break
        texts.append(p)
        chars += len(p) + 3
    mount = fill(client, f"block-{target}", texts)
    t0 = time.perf_counter()
    act = client.activate(mount)
    build_ms = (time.perf_counter() - t0) * 1000
    cases: dict[str, list[tuple[float, float, int, int]]] = {"none": [], "hot": [], "cold": []}
    ttft(client, mount, bypass=False)  # warm the code paths once
    for _ in range(reps):
        cases["none"].append(ttft(client, mount, bypass=True))
        cases["hot"].append(ttft(client, mount, bypass=False))
        client.evict(mount.cube_id)
        cases["cold"].append(ttft(client, mount, bypass=False))
    row: dict[str, Any] = {
        "target_tokens": target, "block_tokens": act.tokens, "items": act.item_count,
        "build_ms": build_ms, "build_daemon_ms": act.took_us / 1000, "pool_bytes": act.pool_bytes,
        "persisted_bytes": act.persisted_bytes, "prompt_tokens": cases["hot"][0][3],
        "reused_tokens": {case: runs[0][2] for case, runs in cases.items()},
    }
    for case, runs in cases.items():
        row[f"{case}_ttft_ms"] = statistics.median(r[0] for r in runs)
        row[f"{case}_daemon_ttft_ms"] = statistics.median(r[1] for r in runs)
        row[f"{case}_runs_ms"] = [round(r[0], 2) for r in runs]
    row["hot_speedup"] = row["none_ttft_ms"] / row["hot_ttft_ms"]
    row["cold_speedup"] = row["none_ttft_ms"] / row["cold_ttft_ms"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 4000], help="memory block tokens")
    parser.add_argument("--reps", type=int, default=5, help="rounds of the three cases per size")
    parser.add_argument("--device", default="cpu", help="runtime.device: cpu, cuda, auto")
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"],
                        help="runtime.engine (auto: vllm where installed)")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache",
                        help="where the dequantized model is kept between runs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_activation.json")
    args = parser.parse_args()

    passages = load_passages()
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": args.device,
           "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache), "MEMOSD_RUNTIME__POOL_BYTES": str(4 << 30),
           "MEMOSD_RUNTIME__ENGINE": args.engine}
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "reps": args.reps, "question": QUESTION,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                # Calibrate characters per token on a few passages (the block adds a header).
                probe = client.activate(fill(client, "calibration", passages[:20]))
                chars_per_token = sum(len(p) + 3 for p in passages[:20]) / probe.tokens
                for size in args.sizes:
                    rows.append(bench_size(client, passages, size, chars_per_token, args.reps))
                model = client.stats().model
                result.update(model=model.name, fingerprint=model.fingerprint, device=model.device,
                              dtype=model.dtype, engine=model.engine)
        finally:
            daemon.stop()
    result["sizes"] = rows

    print(f"\nmemosd activation benchmark: {result['model']} on {result['device']}/{result['dtype']} "
          f"({result['machine']}, {result['cpus']} CPUs), median of {args.reps} rounds")
    print(f"{'block':>6} {'items':>5} {'build ms':>9} {'pool MB':>8} {'disk MB':>8} | {'TTFT ms: none':>13} "
          f"{'hot':>7} {'cold':>7} | {'hot x':>6} {'cold x':>6} | {'daemon ms: none':>15} {'hot':>6} {'cold':>6}")
    for r in rows:
        print(f"{r['block_tokens']:>6} {r['items']:>5} {r['build_ms']:>9.0f} {r['pool_bytes'] / 2**20:>8.1f} "
              f"{r['persisted_bytes'] / 2**20:>8.1f} | {r['none_ttft_ms']:>13.1f} {r['hot_ttft_ms']:>7.1f} "
              f"{r['cold_ttft_ms']:>7.1f} | {r['hot_speedup']:>6.1f} {r['cold_speedup']:>6.1f} | "
              f"{r['none_daemon_ttft_ms']:>15.1f} {r['hot_daemon_ttft_ms']:>6.1f} {r['cold_daemon_ttft_ms']:>6.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
