#!/usr/bin/env python3
"""What authentication plus the audit log cost in syscall throughput, through gRPC.

    .venv/bin/python scripts/bench_governance.py              # ~2 min on 2 cores
    .venv/bin/python scripts/bench_governance.py --seconds 5 --rounds 5

Two daemons (no model) run side by side on the same data: one as shipped
(security.auth and security.audit on), one with both off. Each holds the same
cube of --items items. For each syscall (StatCube: the cheapest call, where
the overhead shows most; Read of 10 items; a lexical Search), --threads
clients call it as fast as they can for --seconds, alternating between the
daemons for --rounds rounds so that drift on a shared machine hits both alike.
Reports calls/s of each and the ratio, and the audit records written. Prints a
table, writes JSON (--json).
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client  # noqa: E402


def throughput(make_call: Callable[[Client], Callable[[], object]], address: str, token: str, threads: int,
               seconds: float) -> float:
    """Calls per second of ``threads`` clients, each with its own channel, for ``seconds``."""
    counts = [0] * threads
    stop = threading.Event()

    def worker(index: int) -> None:
        with Client(address, token=token, timeout=30) as client:
            call = make_call(client)
            call()  # connect and warm up outside the window
            barrier.wait()
            while not stop.is_set():
                call()
                counts[index] += 1

    barrier = threading.Barrier(threads + 1)
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def seed(client: Client, items: int) -> tuple[str, list[str]]:
    client.alloc_cube("bench")
    with client.mount("bench", writable=True) as m:
        ids = m.write([f"note {i}: the meeting about project {i % 17} moved to room {i % 5}" for i in range(items)])
        m.commit("seed")
    return "bench", list(ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_governance.json")
    args = parser.parse_args()

    result: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(), "items": args.items,
        "threads": args.threads, "seconds": args.seconds, "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        quiet = ["--log-level", "warning"]
        secured = DaemonProcess(Path(tmp) / "secured", extra_args=quiet).start()
        env = {"MEMOSD_SECURITY__AUTH": "false", "MEMOSD_SECURITY__AUDIT": "false"}
        open_daemon = DaemonProcess(Path(tmp) / "open", extra_args=quiet, env=env).start()
        try:
            daemons = {"secured": (secured.address, secured.token), "open": (open_daemon.address, "")}
            mounts: dict[str, tuple[str, list[str]]] = {}
            for name, (address, token) in daemons.items():
                with Client(address, token=token, timeout=60) as client:
                    cube, ids = seed(client, args.items)
                    mounts[name] = (cube, ids)

            def stat(name: str) -> Callable[[Client], Callable[[], object]]:
                return lambda c: (lambda: c.stat_cube(mounts[name][0]))

            def read(name: str) -> Callable[[Client], Callable[[], object]]:
                def make(c: Client) -> Callable[[], object]:
                    mount = c.mount(mounts[name][0])
                    return lambda: mount.read(mounts[name][1][:10])
                return make

            def search(name: str) -> Callable[[Client], Callable[[], object]]:
                def make(c: Client) -> Callable[[], object]:
                    mount = c.mount(mounts[name][0])
                    return lambda: mount.search("project meeting room", k=10, mode="lexical")
                return make

            workloads = {"StatCube": stat, "Read (10 items)": read, "Search (lexical, k=10)": search}
            rows = {}
            for label, workload in workloads.items():
                runs: dict[str, list[float]] = {"secured": [], "open": []}
                for _ in range(args.rounds):
                    for name in ("secured", "open"):
                        address, token = daemons[name]
                        runs[name].append(throughput(workload(name), address, token, args.threads, args.seconds))
                secured_rate, open_rate = statistics.median(runs["secured"]), statistics.median(runs["open"])
                rows[label] = {"secured_per_s": secured_rate, "open_per_s": open_rate,
                               "ratio": secured_rate / open_rate, "runs": runs}
            with Client(secured.address, token=secured.token, timeout=120) as client:
                result["audit_records"] = sum(1 for _ in client.audit())
            result["workloads"] = rows
        finally:
            secured.stop()
            open_daemon.stop()

    print(f"\nmemosd governance cost ({result['machine']}, {result['cpus']} CPUs), {args.threads} client threads, "
          f"median of {args.rounds} alternating rounds of {args.seconds:g} s")
    print(f"{'syscall':<26}{'auth+audit on':>16}{'both off':>12}{'ratio':>8}")
    for label, row in rows.items():
        print(f"{label:<26}{row['secured_per_s']:>12,.0f}/s {row['open_per_s']:>9,.0f}/s {row['ratio']:>7.2f}")
    print(f"audit records written by the secured daemon: {result['audit_records']:,}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
