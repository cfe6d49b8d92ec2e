#!/usr/bin/env python3
"""Several activated cubes in one Generate: time to first token through gRPC, by how the blocks are reused.

    .venv/bin/python scripts/bench_compose.py                              # both engines, 1-4 cubes
    .venv/bin/python scripts/bench_compose.py --engines transformers --reps 3
    .venv/bin/python scripts/bench_compose.py --engines vllm --cubes 3 --reps 3 --fractions 0.01

It starts one daemon per engine (embedded SmolLM2-135M-Instruct, greedy) on a
temporary data dir and fills four cubes of about ``--block-tokens`` tokens each
with the shared BEIR passages (../shared/data/retrieval), activating each. For
1, 2, 3 and 4 mounted cubes it asks a short question (``max_tokens=1``,
``retrieve_k=0``), in rounds, side by side:

  (a) full:    ``bypass_kv_cache``: every block prefilled;
  (b) exact:   the combination is not cached (the second cube was just Evicted,
      which drops every combination holding it): the first block's cache is
      reused and every later block computed, what exact mode does for a
      combination it has not seen (on vLLM, Evict empties the engine's cache,
      so the first block is loaded from the store too);
  (c) changed: the last cube was just changed (one item appended, committed
      and activated again, as a session cube is after every exchange): what
      comes before its new item is reused from the last combination;
  (d) seen:    the same request again: the combination was seen once, so every
      block is reused exactly (issue 13, point 1);
  (e) composed@f (``--fractions``, default 0.02 0.05 0.15): compose mode
      COMPOSED, each later block placed from its own cache, its first
      fraction f of tokens recomputed (issue 13, point 2): never needs the
      combination to have been seen. On vLLM each composed request follows an
      Evict (the engine's cache emptied: every block loaded from the store,
      as in (b)), since vLLM would otherwise keep the composition's own blocks
      (under its composed cache_salt) from the round before.

TTFT is the client's wall time to the end of the one-token stream; reused/prompt
tokens are the daemon's. Medians over the rounds; prints a table and writes JSON
(--json, default bench-out/bench_compose.json). Quality of composition:
scripts/bench_compose_quality.py.
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
CUBES = 4


def ask(client: Client, mounts: list[MountHandle], *, bypass: bool, fraction: float | None = None
        ) -> tuple[float, int, int, int]:
    """(client ms, reused tokens, prompt tokens, the first token) of a one-token reply; with ``fraction``,
    composed at that recompute fraction, else exact."""
    started = time.perf_counter()
    gen = client.generate(QUESTION, mounts, max_tokens=1, retrieve_k=0, bypass_kv_cache=bypass,
                          compose="exact" if fraction is None else "composed", compose_recompute=fraction)
    gen.text()
    wall = (time.perf_counter() - started) * 1000
    summary = gen.summary
    assert summary is not None
    return wall, summary.reused_tokens, summary.prompt_tokens, summary.token_ids[0] if summary.token_ids else -1


def blocks(client: Client, passages: list[str], block_tokens: int) -> list[MountHandle]:
    """CUBES cubes of about ``block_tokens`` tokens each, activated; their read-write mounts."""
    probe = client.activate(fill(client, "calibration", passages[:20]))
    chars_per_token = sum(len(p) + 3 for p in passages[:20]) / probe.tokens
    mounts: list[MountHandle] = []
    start = 20
    for i in range(CUBES):
        texts: list[str] = []
        chars = 0
        while chars < block_tokens * chars_per_token:
            texts.append(passages[start])
            chars += len(passages[start]) + 3
            start += 1
        mount = fill(client, f"cube-{i}", texts)
        client.activate(mount)
        mounts.append(mount)
    return mounts


def bench(client: Client, mounts: list[MountHandle], n: int, reps: int, fractions: list[float],
          engine: str) -> dict[str, Any]:
    used = mounts[:n]
    last = used[-1]
    runs: dict[str, list[tuple[float, int, int, int]]] = {"full": [], "exact": [], "changed": [], "seen": []}
    runs.update({f"composed@{f:g}": [] for f in fractions})
    ask(client, used, bypass=False)  # warm the code paths once
    for rep in range(reps):
        runs["full"].append(ask(client, used, bypass=True))
        for f in fractions:
            if engine == "vllm":  # cold, as exact's case: nothing of this composition left in the engine
                client.evict(used[1].cube_id if n > 1 else last.cube_id)
            runs[f"composed@{f:g}"].append(ask(client, used, bypass=False, fraction=f))
        # Every combination of 2+ blocks holds the second cube's: evicting it drops them all (on vLLM, Evict
        # empties the engine's cache). One cube: its own cache is the combination, put back from the store.
        client.evict(used[1].cube_id if n > 1 else last.cube_id)
        if n == 1:
            client.activate(last)
        runs["exact"].append(ask(client, used, bypass=False))
        last.write([f"Turn {n}.{rep}: the user said something new."])
        last.commit("turn")
        client.activate(last)
        runs["changed"].append(ask(client, used, bypass=False))
        runs["seen"].append(ask(client, used, bypass=False))
    row: dict[str, Any] = {"cubes": n, "prompt_tokens": runs["seen"][-1][2]}
    for case, values in runs.items():
        row[f"{case}_ttft_ms"] = statistics.median(v[0] for v in values)
        row[f"{case}_reused_tokens"] = statistics.median(v[1] for v in values)
        row[f"{case}_runs_ms"] = [round(v[0], 1) for v in values]
    # Exact reuse gives the full prefill's reply: the first token of every round agrees.
    row["first_token_agrees"] = all(s[3] == f[3] for s, f in zip(runs["seen"], runs["full"], strict=True))
    for case in runs:
        if case.startswith("composed@"):  # an approximation: whether its first token was the full prefill's
            row[f"{case}_agrees"] = all(c[3] == f[3] for c, f in zip(runs[case], runs["full"], strict=True))
    return row


def run_engine(engine: str, passages: list[str], args: argparse.Namespace) -> dict[str, Any]:
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": args.device,
           "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache), "MEMOSD_RUNTIME__POOL_BYTES": str(2 << 30),
           "MEMOSD_RUNTIME__ENGINE": engine}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                while client.stats().model.state == "loading":
                    time.sleep(0.5)
                mounts = blocks(client, passages, args.block_tokens)
                block_sizes = [client.activate(m).tokens for m in mounts]
                fractions = args.fractions
                rows = [bench(client, mounts, n, args.reps, fractions, engine) for n in range(1, args.cubes + 1)]
                model = client.stats().model
        finally:
            daemon.stop()
    return {"engine": model.engine, "model": model.name, "device": model.device, "dtype": model.dtype,
            "block_tokens": block_sizes, "fractions": fractions, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"])
    parser.add_argument("--block-tokens", type=int, default=700, help="about this many tokens per cube's block")
    parser.add_argument("--reps", type=int, default=5, help="rounds of the three cases per cube count")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.02, 0.05, 0.15],
                        help="recompute fractions of the composed cases")
    parser.add_argument("--cubes", type=int, default=CUBES, choices=range(1, CUBES + 1),
                        help="mount 1 up to this many cubes")
    parser.add_argument("--device", default="cpu", help="runtime.device: cpu, cuda, auto")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache",
                        help="where the dequantized model is kept between runs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_compose.json")
    args = parser.parse_args()

    passages = load_passages()
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "reps": args.reps, "question": QUESTION,
        "engines": [run_engine(engine, passages, args) for engine in args.engines],
    }
    print(f"\nmemosd composed-activation benchmark ({result['machine']}, {result['cpus']} CPUs), "
          f"median of {args.reps} rounds, one-token replies")
    for e in result["engines"]:
        print(f"\n{e['engine']} ({e['model']} on {e['device']}/{e['dtype']}), blocks of {e['block_tokens']} tokens")
        print(f"{'cubes':>5} {'prompt':>6} | {'TTFT ms: full':>13} {'exact':>7} {'changed':>7} {'seen':>7} | "
              f"{'reused: exact':>13} {'changed':>7} {'seen':>5} | {'full/seen':>9} {'seen vs 1 cube':>14} | agrees")
        one = e["rows"][0]["seen_ttft_ms"]
        for r in e["rows"]:
            print(f"{r['cubes']:>5} {r['prompt_tokens']:>6} | {r['full_ttft_ms']:>13.1f} {r['exact_ttft_ms']:>7.1f} "
                  f"{r['changed_ttft_ms']:>7.1f} {r['seen_ttft_ms']:>7.1f} | {r['exact_reused_tokens']:>13.0f} "
                  f"{r['changed_reused_tokens']:>7.0f} {r['seen_reused_tokens']:>5.0f} | "
                  f"{r['full_ttft_ms'] / r['seen_ttft_ms']:>9.1f} {r['seen_ttft_ms'] / one:>14.2f} | "
                  f"{r['first_token_agrees']}")
        if e["fractions"]:
            names = [f"composed@{f:g}" for f in e["fractions"]]
            print(f"\n{'cubes':>5} | " + " ".join(f"{n + ' ms':>17}" for n in names) + " | "
                  + " ".join(f"{n + ' vs 1 cube':>24}" for n in names) + " | first token = full's")
            for r in e["rows"]:
                print(f"{r['cubes']:>5} | " + " ".join(f"{r[n + '_ttft_ms']:>17.1f}" for n in names) + " | "
                      + " ".join(f"{r[n + '_ttft_ms'] / one:>24.2f}" for n in names) + " | "
                      + " ".join(str(r[n + "_agrees"]) for n in names))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
