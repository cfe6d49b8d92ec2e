#!/usr/bin/env python3
"""Interactive priority: how long a Generate waits while the scheduler activates a cube in the background.

    .venv/bin/python scripts/bench_priority.py          # ~2 min on 2 cores

One daemon (embedded SmolLM2-135M-Instruct, CPU). A cube of --items items
(about --tokens tokens of memory block) is activated, in turns:
  * in the background: its policy is set to auto (working set = every item),
    so the scheduler encodes it one prefill chunk (runtime.prefill_chunk, 512
    tokens) per worker job at background priority;
  * in the foreground: an explicit Activate, one interactive job;
and while each runs, a client issues short Generates (no memory, one token)
back to back. Reports their TTFT against the same Generate on an idle
daemon: with background work it should grow by at most about one chunk.
Prints a table, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client  # noqa: E402
from memosd_client.v1 import types_pb2 as t  # noqa: E402

QUESTION = "Say hello."


def ttft_ms(client: Client) -> float:
    started = time.perf_counter()
    client.generate(QUESTION, [], max_tokens=1, retrieve_k=0).text()
    return (time.perf_counter() - started) * 1000


def during(client: Client, busy: threading.Event) -> list[float]:
    """TTFTs of Generates issued back to back while ``busy`` is set (after it is first set)."""
    busy.wait(120)
    out = []
    while busy.is_set():
        out.append(ttft_ms(client))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_priority.json")
    args = parser.parse_args()

    texts = [f"Note {i}: the committee of district {i} moved its weekly meeting about the harbour budget, the "
             f"ferry timetable and the repair of bridge number {i} to the old library on Thursday evening."
             for i in range(args.items)]
    result: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache),
               "MEMOSD_SCHEDULER__INTERVAL_SECONDS": "0.2"}
        daemon = DaemonProcess(Path(tmp) / "data", env=env, extra_args=["--log-level", "warning"]).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as c, \
                    Client(daemon.address, token=daemon.token, timeout=600) as asker:
                idle = [ttft_ms(asker) for _ in range(10)][2:]  # the first ones warm up (and wait for the model)
                background: list[float] = []
                foreground: list[float] = []
                tokens = 0
                for round_ in range(args.rounds):
                    name = f"bg{round_}"
                    c.alloc_cube(name)
                    with c.mount(name, writable=True) as m:
                        m.write(texts)
                        m.commit("seed")
                    busy = threading.Event()
                    thread = threading.Thread(target=lambda ev=busy: background.extend(during(asker, ev)))
                    thread.start()
                    before = c.scheduler_status().activations
                    c.set_cube_policy(name, schedule="auto", working_set_size=args.items)
                    busy.set()
                    deadline = time.monotonic() + 300
                    while c.scheduler_status().activations == before and time.monotonic() < deadline:
                        time.sleep(0.05)
                    busy.clear()
                    thread.join()
                    fg = f"fg{round_}"
                    c.alloc_cube(fg)
                    with c.mount(fg, writable=True) as m:
                        m.write(texts)
                        m.commit("seed")
                    busy = threading.Event()
                    thread = threading.Thread(target=lambda ev=busy: foreground.extend(during(asker, ev)))
                    thread.start()
                    busy.set()
                    with c.mount(fg) as m:
                        activation = m.activate()
                    busy.clear()
                    thread.join()
                    tokens = activation.tokens
                    assert activation.source == t.ACTIVATION_SOURCE_COMPUTED
        finally:
            daemon.stop()
    rows = {"idle": idle, "background activation": background, "foreground Activate": foreground}
    result.update({"block_tokens": tokens, "ttft_ms": rows})
    print(f"\nmemosd interactive priority ({result['machine']}, {result['cpus']} CPUs): Generate (1 token, no memory) "
          f"TTFT while a {tokens}-token block is encoded; {args.rounds} rounds")
    print(f"{'while':<24}{'n':>5}{'p50 ms':>10}{'max ms':>10}")
    for label, values in rows.items():
        if values:
            print(f"{label:<24}{len(values):>5}{statistics.median(values):>10.1f}{max(values):>10.1f}")
        else:
            print(f"{label:<24}{0:>5}{'-':>10}{'-':>10}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
