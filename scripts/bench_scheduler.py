#!/usr/bin/env python3
"""The MemScheduler under a skewed workload: TTFT and KV pool hit rate with the scheduler on and off.

    .venv/bin/python scripts/bench_scheduler.py               # 12 cubes, 200 measured requests each; ~3 min
    .venv/bin/python scripts/bench_scheduler.py --cubes 24 --pool-caches 6 --requests 400
    .venv/bin/python scripts/bench_scheduler.py --think-ms 500    # idle gaps between requests

Two daemons (embedded SmolLM2-135M-Instruct, CPU) run side by side on the same
data: --cubes cubes of --items BEIR passages each (../shared/data/retrieval),
with the same working-set size N (--working-set) in their cube policy:

  on:  scheduler enabled, every cube's policy "auto" (keep the working set
       activated at HEAD, evicting caches of colder cubes for room);
  off: scheduler disabled, every cube "manual": the KV pool is a plain LRU.

Setup: both daemons are filled, and every cube's working set is Activated once
(so the store holds every cache in both, and the size of one cache is measured).
Then both restart with a KV pool budget of --pool-caches times the mean cache
size (default 4 of 12: a third of the cubes) and the scheduler on or off.

Each request picks a cube with a Zipf-like law (P(rank r) ~ 1/r^s, --zipf;
the ranks are shuffled over the cubes with --seed) and does what an app does
in both modes: ``Activate(mount, working_set=0)`` (the policy's N), then
``Generate(question, [mount], max_tokens=1, retrieve_k=--retrieve-k)``.
TTFT is the client's wall time of both calls: the Activate, plus the Generate
to the end of its one-token stream (which includes the summary message). Both
daemons get the same sequence of cubes: --warmup requests (usage builds up,
the scheduler gets its intervals), then --requests measured ones, in rounds of
--round requests that alternate between the daemons (the order flips every
round), so drift on a shared machine hits both alike. While one daemon runs a
round the other is idle, and an enabled scheduler works in that idle time.

Reported per daemon over the measured phase: TTFT p50/p99/mean (and its
Activate and Generate parts, and its median for pool hits and store loads
apart), where the Activate found the cache (pool, store, computed; "request
hit rate" = served from the pool), the pool hit rate from Stats deltas (every
pool lookup: the Activate's, the Generate's and, when on, the scheduler's
own), pool evictions, the scheduler's activations and decisions (whether the
next request for a cube it activated found it pooled, whether one it evicted
then missed, and evictions it undid within the same pass), and the daemon's
CPU seconds. For reference, the hit rates that a plain LRU and a pool pinned
to the hottest cubes would have on the same sequence are simulated. Prints a
table and writes JSON (--json, default bench-out/bench_scheduler.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_proc import DaemonProcess  # noqa: E402
from memosd_client import Client, MountHandle  # noqa: E402
from memosd_client.v1 import types_pb2 as t  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "retrieval"
QUESTION = "In one word, what is the first memory about?"
MODES = ("on", "off")
SOURCES = {t.ACTIVATION_SOURCE_POOL: "pool", t.ACTIVATION_SOURCE_STORE: "store",
           t.ACTIVATION_SOURCE_COMPUTED: "computed"}


def load_passages(min_chars: int = 200, max_chars: int = 500) -> list[str]:
    """BEIR passages of moderate length, so that every cube's cache has about the same size."""
    passages: list[str] = []
    for name in ("msmarco", "dbpedia"):
        with open(DATA / name / "corpus.jsonl") as f:
            for line in f:
                doc = json.loads(line)
                text = f"{doc['title']}. {doc['text']}" if doc.get("title") else doc["text"]
                if min_chars <= len(text) <= max_chars:
                    passages.append(text)
    return passages


def zipf_sequence(cubes: int, count: int, s: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(rank -> cube index, the cube indexes of ``count`` requests), P(rank r) ~ 1 / r^s."""
    order = list(range(cubes))
    rng.shuffle(order)
    weights = [1 / (rank + 1) ** s for rank in range(cubes)]
    ranks = rng.choices(range(cubes), weights=weights, k=count)
    return order, [order[r] for r in ranks]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Side:
    """One daemon of the comparison, with a client and one read-only mount per cube."""

    def __init__(self, mode: str, data_dir: Path, env: dict[str, str]) -> None:
        self.mode = mode
        self.data_dir = data_dir
        self.env = env
        self.daemon: DaemonProcess | None = None
        self.client: Client | None = None
        self.mounts: list[MountHandle] = []
        self.decisions: dict[tuple[int, str, str, str], Any] = {}

    def start(self, extra_env: dict[str, str]) -> Side:
        self.daemon = DaemonProcess(self.data_dir, extra_args=["--log-level", "warning"],
                                    env={**self.env, **extra_env}).start()
        self.client = Client(self.daemon.address, token=self.daemon.token, timeout=600)
        return self

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    @property
    def pid(self) -> int:
        assert self.daemon is not None and self.daemon.proc is not None
        pid: int = self.daemon.proc.pid
        return pid

    def stop(self) -> None:
        for mount in self.mounts:
            with contextlib.suppress(Exception):  # the daemon may already be gone: nothing to clean up then
                mount.unmount()
        self.mounts = []
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def collect_decisions(self) -> None:
        """Merge the scheduler's recent decisions (it keeps the last 100) into ``self.decisions``."""
        status = self.c.scheduler_status()
        for d in status.decisions:
            self.decisions[(d.time.ToNanoseconds(), d.cube_id, d.action, d.reason)] = d

    def request(self, cube: int, retrieve_k: int) -> dict[str, Any]:
        mount = self.mounts[cube]
        wall_ns = time.time_ns()
        started = time.perf_counter()
        act = self.c.activate(mount, working_set=0)
        activated = time.perf_counter()
        gen = self.c.generate(QUESTION, [mount], max_tokens=1, retrieve_k=retrieve_k)
        gen.text()
        done = time.perf_counter()
        summary = gen.summary
        assert summary is not None
        return {"cube": cube, "time_ns": wall_ns, "source": SOURCES.get(act.source, str(act.source)),
                "activate_ms": (activated - started) * 1000, "generate_ms": (done - activated) * 1000,
                "ttft_ms": (done - started) * 1000, "daemon_ttft_ms": summary.ttft_us / 1000,
                "reused_tokens": summary.reused_tokens, "prompt_tokens": summary.prompt_tokens,
                "block_source": SOURCES.get(summary.memory[0].cache_source, "") if summary.memory else ""}


def setup(side: Side, names: list[str], texts: list[list[str]], working_set: int) -> list[dict[str, Any]]:
    """Fill the cubes, set their policy, Activate every working set once; (tokens, pool bytes) per cube."""
    c = side.c
    schedule = "auto" if side.mode == "on" else "manual"
    caches = []
    for name, items in zip(names, texts, strict=True):
        c.alloc_cube(name)
        with c.mount(name, writable=True) as m:
            m.write(items)
            m.commit("bench seed")
        c.set_cube_policy(name, schedule=schedule, working_set_size=working_set)
        with c.mount(name) as m:
            act = m.activate(working_set=0)
        caches.append({"cube": name, "tokens": act.tokens, "items": act.item_count, "pool_bytes": act.pool_bytes,
                       "persisted_bytes": act.persisted_bytes, "selector": act.selector})
    return caches


def simulate_lru(sizes: list[int], budget: int, sequence: list[int], measured_from: int) -> float:
    """The hit rate a byte-budget LRU pool (the "off" daemon's) would have on ``sequence[measured_from:]``."""
    pool: OrderedDict[int, int] = OrderedDict()
    hits = 0
    for index, cube in enumerate(sequence):
        if cube in pool:
            pool.move_to_end(cube)
            hits += index >= measured_from
            continue
        while pool and sum(pool.values()) + sizes[cube] > budget:
            pool.popitem(last=False)
        pool[cube] = sizes[cube]
    return hits / max(1, len(sequence) - measured_from)


def pinned_hit_rate(sizes: list[int], budget: int, rank_to_cube: list[int], measured: list[int]) -> tuple[float, int]:
    """The hit rate of a pool that held only the hottest cubes' caches (by true rank) that fit, and how many."""
    kept: set[int] = set()
    used = 0
    for cube in rank_to_cube:
        if used + sizes[cube] > budget:
            break
        kept.add(cube)
        used += sizes[cube]
    return sum(cube in kept for cube in measured) / max(1, len(measured)), len(kept)


def judge_decisions(decisions: list[dict[str, Any]], runs: list[dict[str, Any]], ids: list[str],
                    interval: float) -> dict[str, int]:
    """Whether the next request for a cube after a scheduler activation found it in the pool (the activation
    was used), and after a scheduler eviction had to load it (the eviction cost a miss); and how many
    evictions the same pass (within half an interval) undid by activating the evicted cube again."""
    out = Counter[str]()
    for index, d in enumerate(decisions):
        # An eviction followed, within the same pass, by the activation of the very cache it evicted.
        if d["action"] == "evict" and any(e["action"] == "activate" and e["cube"] == d["cube"]
                                          and e["time_ns"] - d["time_ns"] < interval * 5e8 for e in decisions[index + 1:]):
            out["evict_undone_in_same_pass"] += 1
        if d["action"] not in ("activate", "evict") or d["cube"] not in ids:
            continue
        cube = ids.index(d["cube"])
        following = [r for r in runs if r["cube"] == cube and r["time_ns"] > d["time_ns"]]
        if not following:
            out[f"{d['action']}_unused"] += 1
        elif d["action"] == "activate":
            out["activate_then_hit" if following[0]["source"] == "pool" else "activate_then_miss"] += 1
        else:
            out["evict_then_miss" if following[0]["source"] != "pool" else "evict_then_hit"] += 1
    return dict(out)


def to_json(value: Any, depth: int = 0) -> str:
    """Indented JSON, except that a list of plain values, or each object in a list, takes one line."""
    pad = "  " * (depth + 1)
    if isinstance(value, dict) and value:
        inner = ",\n".join(f"{pad}{json.dumps(str(k))}: {to_json(v, depth + 1)}" for k, v in value.items())
        return "{\n" + inner + "\n" + "  " * depth + "}"
    if isinstance(value, list | tuple) and any(isinstance(v, dict | list | tuple) for v in value):
        return "[\n" + ",\n".join(pad + json.dumps(v) for v in value) + "\n" + "  " * depth + "]"
    return json.dumps(value)


def snapshot(side: Side) -> dict[str, Any]:
    pool = side.c.stats().kv_pool
    status = side.c.scheduler_status()
    return {"hits": pool.hits, "misses": pool.misses, "evictions": pool.evictions, "entries": pool.entries,
            "bytes_used": pool.bytes_used, "budget_bytes": pool.budget_bytes, "ticks": status.ticks,
            "activations": status.activations, "cpu_s": cpu_seconds(side.pid), "time": time.perf_counter()}


def summarize(runs: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any], hot: set[int],
              decisions: list[Any]) -> dict[str, Any]:
    def part(key: str) -> dict[str, float]:
        values = [r[key] for r in runs]
        return {"p50": pct(values, 50), "p99": pct(values, 99), "mean": statistics.fmean(values)}

    sources = Counter(r["source"] for r in runs)
    by_source = {source: {"p50": pct([r["ttft_ms"] for r in runs if r["source"] == source], 50),
                          "activate_p50": pct([r["activate_ms"] for r in runs if r["source"] == source], 50),
                          "generate_p50": pct([r["generate_ms"] for r in runs if r["source"] == source], 50)}
                 for source in sources}
    hot_runs = [r for r in runs if r["cube"] in hot]
    cold_runs = [r for r in runs if r["cube"] not in hot]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {
        "requests": len(runs), "ttft_ms": part("ttft_ms"), "activate_ms": part("activate_ms"),
        "generate_ms": part("generate_ms"), "daemon_ttft_ms": part("daemon_ttft_ms"),
        "activate_source": dict(sources), "ttft_ms_by_source": by_source,
        "request_hit_rate": sources["pool"] / len(runs),
        "request_hit_rate_hot": sum(r["source"] == "pool" for r in hot_runs) / max(1, len(hot_runs)),
        "request_hit_rate_rest": sum(r["source"] == "pool" for r in cold_runs) / max(1, len(cold_runs)),
        "generate_block_source": dict(Counter(r["block_source"] for r in runs)),
        "pool_hits": hits, "pool_misses": misses, "pool_hit_rate": hits / max(1, hits + misses),
        "pool_evictions": after["evictions"] - before["evictions"],
        "scheduler_ticks": after["ticks"] - before["ticks"],
        "scheduler_activations": after["activations"] - before["activations"],
        "scheduler_decisions": dict(Counter(d.action for d in decisions)),
        "daemon_cpu_s": after["cpu_s"] - before["cpu_s"],
        "wall_s": after["time"] - before["time"],
    }


def run_rounds(sides: dict[str, Side], sequence: list[int], round_size: int, retrieve_k: int, think_s: float,
               runs: dict[str, list[dict[str, Any]]], label: str) -> None:
    for index, start in enumerate(range(0, len(sequence), round_size)):
        chunk = sequence[start:start + round_size]
        for mode in (MODES if index % 2 == 0 else MODES[::-1]):
            for cube in chunk:
                runs[mode].append(sides[mode].request(cube, retrieve_k))
                if think_s:
                    time.sleep(think_s)
            sides["on"].collect_decisions()  # it keeps its last 100 only
        done = min(start + round_size, len(sequence))
        print(f"  {label}: {done}/{len(sequence)} requests", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cubes", type=int, default=12)
    parser.add_argument("--items", type=int, default=16, help="passages per cube")
    parser.add_argument("--working-set", type=int, default=8, help="N of every cube's policy")
    parser.add_argument("--pool-caches", type=float, default=4, help="KV pool budget, in mean cache sizes")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per daemon")
    parser.add_argument("--warmup", type=int, default=60, help="warm-up requests per daemon")
    parser.add_argument("--round", type=int, default=20, help="requests per daemon per alternating round")
    parser.add_argument("--zipf", type=float, default=1.1, help="exponent s: P(rank r) ~ 1/r^s")
    parser.add_argument("--retrieve-k", type=int, default=0,
                        help="items Generate retrieves (their prefill is the same cost in both modes)")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause after each request")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="scheduler.interval_seconds of the 'on' daemon (0: the daemon's default)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="runtime.device: cpu, cuda, auto")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache",
                        help="where the dequantized model is kept between runs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_scheduler.json")
    args = parser.parse_args()
    if args.cubes < 2 or args.items < 1 or args.working_set < 1 or args.requests < 1:
        parser.error("need at least 2 cubes, 1 item, a working set of 1 and 1 request")

    rng = random.Random(args.seed)
    passages = load_passages()
    if len(passages) < args.cubes * args.items:
        parser.error(f"only {len(passages)} passages for {args.cubes} x {args.items} items")
    rng.shuffle(passages)
    names = [f"cube-{i:02d}" for i in range(args.cubes)]
    texts = [passages[i * args.items:(i + 1) * args.items] for i in range(args.cubes)]
    rank_to_cube, sequence = zipf_sequence(args.cubes, args.warmup + args.requests, args.zipf, rng)
    hot = set(rank_to_cube[:max(1, round(args.pool_caches))])  # the cubes a perfect pool would hold

    base_env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": args.device,
                "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache)}
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "load_before": os.getloadavg(), "question": QUESTION,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rank_to_cube": [names[i] for i in rank_to_cube],
        "requests_per_cube": {names[i]: n for i, n in Counter(sequence[args.warmup:]).most_common()},
    }
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {mode: Side(mode, Path(tmp) / mode, base_env) for mode in MODES}
        try:
            # 1. Setup with a roomy pool and no scheduler: the same cubes, every working set activated once.
            setup_env = {"MEMOSD_RUNTIME__POOL_BYTES": str(4 << 30), "MEMOSD_SCHEDULER__ENABLED": "false"}
            caches: dict[str, list[dict[str, Any]]] = {}
            for mode, side in sides.items():
                side.start(setup_env)
                print(f"setup ({mode}): {args.cubes} cubes x {args.items} items", file=sys.stderr, flush=True)
                caches[mode] = setup(side, names, texts, args.working_set)
                model = side.c.stats().model
                result.update(model=model.name, fingerprint=model.fingerprint, device=model.device,
                              dtype=model.dtype)
                side.stop()
            if [c["tokens"] for c in caches["on"]] != [c["tokens"] for c in caches["off"]]:
                raise RuntimeError("the two daemons built different memory blocks")
            sizes = [c["pool_bytes"] for c in caches["on"]]
            budget = int(args.pool_caches * statistics.fmean(sizes))
            result["caches"] = caches["on"]
            result["pool_budget_bytes"] = budget
            pinned, pinned_count = pinned_hit_rate(sizes, budget, rank_to_cube, sequence[args.warmup:])
            result["reference"] = {"lru_simulated_hit_rate": simulate_lru(sizes, budget, sequence, args.warmup),
                                   "pinned_hottest_hit_rate": pinned, "pinned_hottest_cubes": pinned_count}

            # 2. Restart with the small pool, the scheduler on or off; mount every cube.
            run_env = {"on": {"MEMOSD_RUNTIME__POOL_BYTES": str(budget), "MEMOSD_SCHEDULER__ENABLED": "true"},
                       "off": {"MEMOSD_RUNTIME__POOL_BYTES": str(budget), "MEMOSD_SCHEDULER__ENABLED": "false"}}
            if args.interval:
                run_env["on"]["MEMOSD_SCHEDULER__INTERVAL_SECONDS"] = str(args.interval)
            for mode, side in sides.items():
                side.start(run_env[mode])
                side.mounts = [side.c.mount(name) for name in names]
            interval = sides["on"].c.scheduler_status().interval_seconds
            result["scheduler_interval_s"] = interval

            # 3. Warm-up, then give the scheduler two intervals; then the measured rounds.
            warm: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            run_rounds(sides, sequence[:args.warmup], args.round, args.retrieve_k, args.think_ms / 1000, warm,
                       "warm-up")
            time.sleep(2 * interval)
            sides["on"].decisions.clear()
            sides["on"].collect_decisions()
            seen = set(sides["on"].decisions)
            before = {mode: snapshot(side) for mode, side in sides.items()}
            run_rounds(sides, sequence[args.warmup:], args.round, args.retrieve_k, args.think_ms / 1000, runs,
                       "measured")
            after = {mode: snapshot(side) for mode, side in sides.items()}
            sides["on"].collect_decisions()
            measured_decisions = [d for key, d in sides["on"].decisions.items() if key not in seen]
            result["load_after"] = os.getloadavg()
            result["modes"] = {
                mode: summarize(runs[mode], before[mode], after[mode], hot,
                                measured_decisions if mode == "on" else []) for mode in MODES}
            # The decisions that moved a cache (skips and defers are only counted), by cube name.
            by_id = {m.cube_id: names[i] for i, m in enumerate(sides["on"].mounts)}

            def named(reason: str) -> str:
                for cube_id, name in by_id.items():
                    reason = reason.replace(f"cube_{cube_id}", name).replace(cube_id, name)
                return reason

            result["scheduler_decisions"] = [
                {"time_ns": d.time.ToNanoseconds(), "cube": by_id.get(d.cube_id, d.cube_id), "action": d.action,
                 "reason": named(d.reason), "tokens_reused": d.tokens_reused, "tokens_computed": d.tokens_computed}
                for d in sorted(measured_decisions, key=lambda d: d.time.ToNanoseconds())
                if d.action not in ("skip", "defer")]
            result["modes"]["on"]["scheduler_effect"] = judge_decisions(
                result["scheduler_decisions"], runs["on"], names, interval)
            result["runs"] = {mode: {key: [names[r[key]] if key == "cube" else
                                           round(r[key], 1) if isinstance(r[key], float) else r[key] for r in rs]
                                     for key in rs[0]} for mode, rs in runs.items()}
        finally:
            for side in sides.values():
                side.stop()

    on, off = result["modes"]["on"], result["modes"]["off"]
    effect = on["scheduler_effect"]
    mean_mib = statistics.fmean(sizes) / 2**20
    print(f"\nmemosd scheduler benchmark: {result['model']} on {result['device']}/{result['dtype']} "
          f"({result['machine']}, {result['cpus']} CPUs; load {result['load_before'][0]:.2f} before)")
    print(f"{args.cubes} cubes x {args.items} items, working set {args.working_set} "
          f"(~{statistics.fmean(c['tokens'] for c in result['caches']):.0f} tokens, {mean_mib:.1f} MiB a cache), "
          f"pool {budget / 2**20:.0f} MiB (~{args.pool_caches:g} caches), Zipf s={args.zipf}, "
          f"{args.requests} measured requests each after {args.warmup} warm-up, retrieve_k={args.retrieve_k}")

    def ms(mode: dict[str, Any], key: str, stat: str) -> str:
        return f"{mode[key][stat]:.1f}"

    def share(value: float) -> str:
        return f"{100 * value:.1f}%"

    def served(mode: dict[str, Any]) -> str:
        return " / ".join(str(mode["activate_source"].get(s, 0)) for s in ("pool", "store", "computed"))

    def by_source(mode: dict[str, Any], key: str = "p50") -> str:
        parts = mode["ttft_ms_by_source"]
        return " / ".join(f"{parts[s][key]:.1f}" if s in parts else "-" for s in ("pool", "store"))

    rows = [
        ("TTFT p50 (Activate + Generate), ms", ms(on, "ttft_ms", "p50"), ms(off, "ttft_ms", "p50")),
        ("TTFT p99, ms", ms(on, "ttft_ms", "p99"), ms(off, "ttft_ms", "p99")),
        ("TTFT mean, ms", ms(on, "ttft_ms", "mean"), ms(off, "ttft_ms", "mean")),
        ("  Activate p50 / p99, ms", f"{ms(on, 'activate_ms', 'p50')} / {ms(on, 'activate_ms', 'p99')}",
         f"{ms(off, 'activate_ms', 'p50')} / {ms(off, 'activate_ms', 'p99')}"),
        ("  Generate p50 / p99, ms", f"{ms(on, 'generate_ms', 'p50')} / {ms(on, 'generate_ms', 'p99')}",
         f"{ms(off, 'generate_ms', 'p50')} / {ms(off, 'generate_ms', 'p99')}"),
        ("TTFT p50 of a pool hit / a store load, ms", by_source(on), by_source(off)),
        ("  their Generate part, p50, ms", by_source(on, "generate_p50"), by_source(off, "generate_p50")),
        ("Activate served from pool / store / computed", served(on), served(off)),
        ("request hit rate (Activate from the pool)", share(on["request_hit_rate"]), share(off["request_hit_rate"])),
        (f"  on the {len(hot)} hottest cubes / the rest",
         f"{share(on['request_hit_rate_hot'])} / {share(on['request_hit_rate_rest'])}",
         f"{share(off['request_hit_rate_hot'])} / {share(off['request_hit_rate_rest'])}"),
        ("pool hit rate (Stats: hits / lookups)",
         f"{share(on['pool_hit_rate'])} ({on['pool_hits']}/{on['pool_hits'] + on['pool_misses']})",
         f"{share(off['pool_hit_rate'])} ({off['pool_hits']}/{off['pool_hits'] + off['pool_misses']})"),
        ("pool evictions", str(on["pool_evictions"]), str(off["pool_evictions"])),
        ("scheduler activations", str(on["scheduler_activations"]), "-"),
        ("scheduler decisions", ", ".join(f"{k} {v}" for k, v in sorted(on["scheduler_decisions"].items())) or "-",
         "-"),
        ("  next request for the cube: activate -> hit / miss",
         f"{effect.get('activate_then_hit', 0)} / {effect.get('activate_then_miss', 0)}", "-"),
        ("  next request for the cube: evict -> miss / hit",
         f"{effect.get('evict_then_miss', 0)} / {effect.get('evict_then_hit', 0)}", "-"),
        ("  evictions undone by an activation in the same pass", str(effect.get("evict_undone_in_same_pass", 0)),
         "-"),
        ("daemon CPU during the measured phase, s", f"{on['daemon_cpu_s']:.1f}", f"{off['daemon_cpu_s']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'scheduler on':>28}  {'scheduler off':>28}")
    for label, a, b in rows:
        print(f"{label:<{width}}  {a:>28}  {b:>28}")
    ref = result["reference"]
    print(f"request hit rate on the same sequence, simulated without a daemon: a plain LRU pool "
          f"{share(ref['lru_simulated_hit_rate'])}; a pool that held only the {ref['pinned_hottest_cubes']} "
          f"hottest cubes {share(ref['pinned_hottest_hit_rate'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(to_json(result) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
