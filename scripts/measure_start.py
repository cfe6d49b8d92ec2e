"""A daemon's start on each engine: seconds to a ready model, its RSS then, and around a Train job.

A measurement, not a test (issue 12, step 2 of docs/engine-notes.md section 6: the transformers weights are no
longer loaded beside vLLM). Each round starts a daemon with the builtin model on a fresh data dir (the model
cache is shared, and warmed by an uncounted first start, so every counted start loads from it) and records:

- ``serving_s``: from starting the process to its gRPC port serving (the model loads after that);
- ``ready_s``: from starting the process to Stats' model state "ready" (for vllm: the engine started and
  warmed up);
- ``rss_ready_mb``: the daemon's RSS then (Stats' ``rss_bytes``), and ``peak_ready_mb``, its peak so far
  (``VmHWM`` in /proc/<pid>/status);
- with ``--train``: ``rss_train_mb``, the RSS after a 2-step Train job has succeeded (on vllm the job loads a
  transformers copy and drops it when it ends), and ``peak_train_mb``.

Prints a table (median over rounds, with the range) and writes JSON. Run it against any checkout: PYTHONPATH
picks the memosd measured, and so does the working directory, which ``python -m memosd`` puts first on the
path, so run it from outside every checkout:

    cd /tmp && PYTHONPATH=<checkout>:<checkout>/clients/python python <this checkout>/scripts/measure_start.py \
        [--engines vllm,transformers | --engines none] [--rounds 3] [--train] --out <checkout>/bench-out/measure_start.json

RSS counts the file-backed pages of mapped weights too (transformers maps a float32 safetensors file and
uses it in place): Stats' ``rss_bytes`` is ``/proc/<pid>/statm``'s resident size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memosd_client import Client
from memosd_client.v1 import types_pb2 as t

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_proc import DaemonProcess

READY_SECONDS = 900.0
NO_MODEL = "none"  # --engines none: a daemon with no model, timed to serving (the embedder's load is most of it)
FACTS = ["Q: What is the capital of Vellmora?\nA: Quistarn", "My car is a red Volvo.", "Owls hunt at night."]


def peak_mb(pid: int) -> float:
    """The process's peak RSS (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_start(engine: str, cache_dir: Path, data: Path, train: bool) -> dict[str, Any]:
    no_model = engine == NO_MODEL
    env = {"MEMOSD_RUNTIME__MODEL": "none" if no_model else "SmolLM2-135M-Instruct",
           "MEMOSD_RUNTIME__CACHE_DIR": str(cache_dir), "MEMOSD_RUNTIME__ENGINE": "transformers" if no_model else engine}
    started = time.perf_counter()
    daemon = DaemonProcess(data, env=env).start()
    serving_s = time.perf_counter() - started  # daemon.json written: the gRPC port is serving
    assert daemon.proc is not None
    pid = daemon.proc.pid
    try:
        with Client(daemon.address, token=daemon.token, timeout=600) as client:
            if no_model:
                time.sleep(1.0)
                return {"engine": NO_MODEL, "serving_s": serving_s, "rss_serving_mb": client.stats().rss_bytes / 2**20,
                        "peak_serving_mb": peak_mb(pid)}
            deadline = time.monotonic() + READY_SECONDS
            while (model := client.stats().model).state == "loading" and time.monotonic() < deadline:
                time.sleep(0.1)
            ready_s = time.perf_counter() - started
            if model.state != "ready":
                raise RuntimeError(f"the model is {model.state}: {model.error}\n{daemon.log()}")
            time.sleep(1.0)  # let the start's last allocations settle before reading RSS
            row: dict[str, Any] = {"engine": model.engine, "serving_s": serving_s, "ready_s": ready_s,
                                   "rss_ready_mb": client.stats().rss_bytes / 2**20, "peak_ready_mb": peak_mb(pid)}
            if train:
                client.alloc_cube("trained")
                mount = client.mount("trained", writable=True)
                mount.write(FACTS)
                mount.commit("facts")
                job = client.wait_job(client.train(mount, steps=2, rank=4).job_id)
                if job.state != t.JOB_STATE_SUCCEEDED:
                    raise RuntimeError(f"the Train job ended {job.state}: {job.error}")
                time.sleep(1.0)
                row.update(rss_train_mb=client.stats().rss_bytes / 2**20, peak_train_mb=peak_mb(pid))
            return row
    finally:
        daemon.stop()


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also run a 2-step Train job and measure after it")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the model cache (default: a temporary one)")
    parser.add_argument("--label", default="", help="names the checkout measured in the JSON and the table")
    parser.add_argument("--out", type=Path, default=Path("bench-out/measure_start.json"))
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        if engines != [NO_MODEL]:
            one_start("transformers", cache, Path(tmp) / "warm" / "data", train=False)  # builds the cache
        for r in range(args.rounds):
            for engine in engines:
                row = one_start(engine, cache, Path(tmp) / f"{engine}-{r}" / "data", args.train)
                rows.append({**row, "round": r})
                print(f"round {r} {engine}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                          if isinstance(v, float)), flush=True)
    model_keys = ["serving_s", "ready_s", "rss_ready_mb", "peak_ready_mb"]
    model_keys += ["rss_train_mb", "peak_train_mb"] if args.train else []
    keys = ["serving_s", "rss_serving_mb", "peak_serving_mb"] if engines == [NO_MODEL] else model_keys
    print(f"\n{args.label or 'this checkout'}, median (range) over {args.rounds} rounds")
    print("| engine | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for engine in engines:
        mine = [row for row in rows if row["engine"] == engine]
        print(f"| {engine} | " + " | ".join(summary([row[k] for row in mine]) if k in mine[0] else "-"
                                           for k in keys) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    args.out.write_text(json.dumps({"label": args.label, "rows": rows, "cores": os.cpu_count(),
                                    "load_average_end": load}, indent=2) + "\n")
    print(f"\nJSON: {args.out}; load average at the end {load[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
