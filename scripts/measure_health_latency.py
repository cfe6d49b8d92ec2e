"""Health-check latency while streams are open (issue 15, point 2): a measurement, not a test.

Starts a daemon with the builtin model, opens 16 idle ImportAdapter streams and
30 Generate streams, and times grpc.health.v1 Check calls meanwhile; prints
p50/p99. Run it against any checkout (PYTHONPATH picks the memosd measured):

    python scripts/measure_health_latency.py [--checks 200] [--generations 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from memosd_client.v1 import memos_pb2, memos_pb2_grpc, types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_proc import DaemonProcess


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--idle", type=int, default=16)
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct"}
    try:  # a checkout with per-principal quotas: let the one admin open every stream
        from memosd.config import QuotasConfig  # noqa: F401
        env["MEMOSD_QUOTAS__MAX_GENERATIONS_PER_PRINCIPAL"] = str(args.generations + 1)
        env["MEMOSD_QUOTAS__MAX_UPLOADS_PER_PRINCIPAL"] = str(args.idle + 1)
        env["MEMOSD_QUOTAS__MAX_STREAMS_PER_PRINCIPAL"] = str(args.idle + args.generations + 1)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", env=env).start()
        try:
            return measure(daemon, args)
        finally:
            daemon.stop()


def measure(daemon: DaemonProcess, args: Any) -> int:
    channel = grpc.insecure_channel(daemon.address)
    stub, health = memos_pb2_grpc.MemOSStub(channel), health_pb2_grpc.HealthStub(channel)
    md = daemon.metadata
    while stub.Stats(memos_pb2.StatsRequest(), metadata=md).model.state == "loading":
        time.sleep(0.5)
    release = threading.Event()

    def nothing() -> Iterator[memos_pb2.ImportAdapterRequest]:
        release.wait()
        return
        yield

    calls: list[Any] = [stub.ImportAdapter.future(nothing(), metadata=md) for _ in range(args.idle)]
    request = memos_pb2.GenerateRequest(messages=[types_pb2.ChatMessage(role="user", content="Tell me a story.")])
    request.options.max_tokens = args.max_tokens
    generations = [stub.Generate(request, metadata=md) for _ in range(args.generations)]
    def drain(generation: Any) -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for _ in generation:
                pass

    drained = [threading.Thread(target=drain, args=(g,), daemon=True) for g in generations]
    for thread in drained:
        thread.start()
    time.sleep(1.0)  # let every stream reach the daemon
    seconds: list[float] = []
    failures = 0
    for _ in range(args.checks):
        started = time.perf_counter()
        try:
            health.Check(health_pb2.HealthCheckRequest(), timeout=15)
            seconds.append(time.perf_counter() - started)
        except grpc.RpcError:
            failures += 1
        time.sleep(0.02)
    busy = sum(thread.is_alive() for thread in drained)
    release.set()
    for call in calls + generations:
        call.cancel()
    seconds.sort()
    p50 = statistics.median(seconds) * 1000 if seconds else float("nan")
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000 if seconds else float("nan")
    print(f"health checks: {len(seconds)} ok, {failures} failed; p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {seconds[-1] * 1000 if seconds else float('nan'):.1f} ms; {args.idle} idle uploads, "
          f"{args.generations} generations ({busy} still running at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
