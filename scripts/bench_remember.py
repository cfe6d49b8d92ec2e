#!/usr/bin/env python3
"""What remembering costs a Generate: the same short chats with options.remember_mount_id off and on.

    .venv/bin/python scripts/bench_remember.py                  # 12 chats of each, 8 tokens a reply
    .venv/bin/python scripts/bench_remember.py --chats 4        # a quick run

Starts a daemon with the embedded SmolLM2 on a temporary data dir, seeds a memory cube with a few facts,
then asks the same questions with remember off and on, interleaved (so machine noise falls on both), greedy,
retrieve_k 2, with memosd_client.Client as a user would. Per call it times, client side:
  * the whole call (request to summary);
  * the tail: the last text delta to the summary, which is where the remember step (two turns embedded,
    indexed and committed as one synced revision) runs;
and reads the daemon's own total_us (the generation alone: it is reported before the remember step).
Prints a table of medians and p90s and writes JSON (--json, default bench-out/bench_remember.json).
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

from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client, MountHandle  # noqa: E402

FACTS = ["My car is a red Volvo.", "I live in Lisbon.", "My sister Maria is a pilot.", "I am allergic to peanuts."]
QUESTIONS = ["What colour is my car?", "Where do I live?", "What does my sister do?", "What am I allergic to?"]


def one_chat(client: Client, memory: MountHandle, question: str, remember: MountHandle | None,
             max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    gen = client.generate(question, memory, max_tokens=max_tokens, retrieve_k=2, remember_mount=remember,
                          session_id="bench" if remember is not None else "")
    last = started
    for _delta in gen:
        last = time.perf_counter()
    ended = time.perf_counter()
    summary = gen.summary
    assert summary is not None, "the stream ended without its summary"
    assert (remember is not None) == summary.HasField("remembered")
    return {"wall_ms": (ended - started) * 1e3, "tail_ms": (ended - last) * 1e3,
            "generation_ms": summary.total_us / 1e3}


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=12, help="chats of each kind (off, on)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="runtime.device: cpu, cuda, auto")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache",
                        help="where the dequantized model is kept between runs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_remember.json")
    args = parser.parse_args()
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": args.device,
           "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache), "MEMOSD_RUNTIME__ENGINE": "transformers"}
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    result: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                              "chats": args.chats, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                while client.stats().model.state == "loading":
                    time.sleep(0.2)
                client.alloc_cube("memory")
                client.alloc_cube("notes")
                with client.mount("memory", writable=True) as m:
                    m.write(FACTS)
                    m.commit("facts")
                with client.mount("memory") as memory, client.mount("notes", writable=True) as notes:
                    one_chat(client, memory, QUESTIONS[0], notes, args.max_tokens)  # warm: model, embedder, cube
                    for i in range(args.chats):
                        question = QUESTIONS[i % len(QUESTIONS)]
                        for kind in (("off", "on") if i % 2 == 0 else ("on", "off")):
                            runs[kind].append(one_chat(client, memory, question, notes if kind == "on" else None,
                                                       args.max_tokens))
                    result["notes_revisions"] = client.stat_cube("notes").head_revision
                model = client.stats().model
                result.update(model=model.name, device=model.device, engine=model.engine)
        finally:
            daemon.stop()
    for kind, rows in runs.items():
        result[kind] = {metric: stats([r[metric] for r in rows]) for metric in ("wall_ms", "tail_ms", "generation_ms")}
    result["remember_cost_ms"] = result["on"]["tail_ms"]["median"] - result["off"]["tail_ms"]["median"]
    print(f"{result['model']} on {result['device']} ({result['engine']}), {args.chats} chats of each, "
          f"{args.max_tokens} tokens, {result['cpus']} cpus")
    print(f"{'remember':<9} {'wall ms p50':>12} {'p90':>8} {'tail ms p50':>12} {'p90':>8} {'gen ms p50':>11}")
    for kind in ("off", "on"):
        r = result[kind]
        print(f"{kind:<9} {r['wall_ms']['median']:>12.1f} {r['wall_ms']['p90']:>8.1f} {r['tail_ms']['median']:>12.1f} "
              f"{r['tail_ms']['p90']:>8.1f} {r['generation_ms']['median']:>11.1f}")
    print(f"remember step (tail on - off, medians): {result['remember_cost_ms']:.1f} ms; "
          f"notes cube at revision {result['notes_revisions']} (one per remembered chat)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
