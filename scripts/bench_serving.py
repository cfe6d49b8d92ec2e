#!/usr/bin/env python3
"""Serving benchmark: N concurrent Generate streams, memosd on vLLM vs on transformers vs bare vLLM.

    .venv/bin/python scripts/bench_serving.py                                   # all three legs, N=1,4,8,16
    .venv/bin/python scripts/bench_serving.py --engines transformers,bare --streams 1,4 --rounds 1

Every stream has its own cube holding a memory block of about --block-tokens
tokens (the shared BEIR passages of ../shared/data/retrieval, different
passages per cube), activated, and asks its own short question for
--max-tokens greedy tokens with ``retrieve_k=0``. A round starts N streams at
once (one thread and one ``memosd_client.Client``, so one gRPC channel, per stream:
N agents, each with its own connection, which is what a shared daemon serves;
a shared channel would multiplex the streams over one HTTP/2 connection and
measure that instead) and ends when the last one does.

Legs, each in its own subprocess (their memory and threads never mix), one at
a time:

  vllm          a daemon with MEMOSD_RUNTIME__ENGINE=vllm, over gRPC;
  transformers  a daemon with MEMOSD_RUNTIME__ENGINE=transformers, over gRPC;
  bare          vLLM's LLMEngine in process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
                no memosd: the ceiling. Built with the settings memosd's engine
                uses (its block size, the model's dtype, enforce_eager, prefix
                caching, the same KV space and max_num_batched_tokens), fed
                exactly the token ids memosd builds (``render.block_token_ids`` +
                ``render.tail_token_ids`` with the model's tokenizer, each cube's
                name as ``cache_salt``), prefixes warmed (cached) first.

Generate has no ignore-eos option, so a reply may end before --max-tokens:
throughput is computed from the completion tokens each stream reports (the
bare leg stops at the end token too, so it does the same work). Reported per
leg and N: aggregate completion tokens/s (sum over the streams / the round's
wall time; median over rounds), TTFT p50 and p99 (client side: the call to the
first non-empty delta, over all streams of all rounds; the daemon's
``ttft_us`` beside it), and per-stream tokens/s p50 (completion tokens / the
stream's wall time). A leg that fails is reported with its error; the others
still run. Prints a table and the issue's target ratios, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _bench_common import fill, load_passages  # noqa: E402

ENGINES = ("vllm", "transformers", "bare")
Record = dict[str, Any]  # one stream of one round: ttft_ms, daemon_ttft_ms (None: bare), wall_s, tokens...
POOL_BYTES = 1 << 30  # the KV budget of every leg: runtime.pool_bytes, and the bare engine's KV space
PREFILL_CHUNK = 512  # runtime.prefill_chunk's default: memosd's engine steps max(it, 256) tokens at most
QUESTIONS = (
    "In one sentence, what is the first memory about?",
    "Which place does the memory mention first?",
    "Name one person or thing the memory talks about.",
    "What is the main topic of these memories?",
)


def question(i: int) -> str:
    # Distinct per stream, so no two requests share their tail.
    return f"{QUESTIONS[i % len(QUESTIONS)]} (Question {i + 1}.)"


# -- the plan: the same cubes, texts, questions and token ids for every leg ---------------------------------

def model_dir(cache: Path) -> Path:
    """The dequantized builtin model (the directory the daemons serve and vLLM loads), built if missing."""
    from memosd.runtime.model import builtin_gguf_path, ensure_gguf_cache

    return ensure_gguf_cache(builtin_gguf_path(), cache)[0]


def load_tokenizer(path: Path) -> Any:
    from memosd.offline import force_offline

    force_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def make_plan(tokenizer: Any, streams: int, block_tokens: int) -> list[dict[str, Any]]:
    """One cube per stream: its name, texts (consecutive passages, none shared), question and prompt ids.

    Passages are added while the rendered block gets closer to ``block_tokens`` (at least one), counted with
    the tokenizer and the renderer the daemon uses, so the ids here are the ones the daemon will build."""
    from memosd.activation.render import block_token_ids, tail_token_ids

    passages = iter(load_passages())
    plan: list[dict[str, Any]] = []
    for i in range(streams):
        name = f"serve-{i:02d}"
        texts: list[str] = []
        block: list[int] = []
        for p in passages:
            candidate = block_token_ids(tokenizer, name, [*texts, p])
            if texts and abs(len(candidate) - block_tokens) >= abs(len(block) - block_tokens):
                break  # farther from the target with it: dropped, not carried on (keeps cubes disjoint)
            texts.append(p)
            block = candidate
        tail = tail_token_ids(tokenizer, [], [{"role": "user", "content": question(i)}], after_block=True)
        plan.append({"cube": name, "texts": texts, "question": question(i), "block_ids": block, "tail_ids": tail})
    return plan


# -- measurements --------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); p99 of a few values is near their max."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(n: int, rounds: list[tuple[float, list[Record]]]) -> dict[str, Any]:
    """A leg's row for N streams from its rounds: (wall s, per-stream records) each."""
    streams = [s for _, ss in rounds for s in ss]
    aggregates = [sum(s["completion_tokens"] for s in ss) / wall for wall, ss in rounds]
    ttft = [s["ttft_ms"] for s in streams]
    daemon_ttft = [s["daemon_ttft_ms"] for s in streams if s.get("daemon_ttft_ms") is not None]
    return {
        "streams": n, "rounds": len(rounds),
        "aggregate_tok_s": statistics.median(aggregates), "aggregate_tok_s_runs": [round(a, 2) for a in aggregates],
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99), "ttft_max_ms": max(ttft),
        "daemon_ttft_p50_ms": percentile(daemon_ttft, 50) if daemon_ttft else None,
        "daemon_ttft_p99_ms": percentile(daemon_ttft, 99) if daemon_ttft else None,
        "stream_tok_s_p50": percentile([s["completion_tokens"] / s["wall_s"] for s in streams], 50),
        "completion_tokens_mean": statistics.fmean(s["completion_tokens"] for s in streams),
        "prompt_tokens_mean": statistics.fmean(s["prompt_tokens"] for s in streams),
        "reused_tokens_mean": statistics.fmean(s["reused_tokens"] for s in streams),
    }


def run_concurrently(n: int, one: Callable[[int], Record]) -> tuple[float, list[Record]]:
    """Start ``one(i)`` for i < n on n threads at once (a barrier); (wall s to the last end, their records)."""
    results: list[Record | None] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = one(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall, [r for r in results if r is not None]


# -- the daemon legs -----------------------------------------------------------------------------------------

def knows_engine_key() -> bool:
    """Whether this checkout's daemon has ``runtime.engine`` (an unknown key is a config error at start)."""
    import dataclasses

    from memosd.config import RuntimeConfig

    return any(f.name == "engine" for f in dataclasses.fields(RuntimeConfig))


def daemon_leg(engine: str, plan: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from daemon_proc import DaemonProcess
    from memosd_client import Client, MountHandle

    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": "cpu",
           "MEMOSD_RUNTIME__ENGINE": engine, "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache),
           "MEMOSD_RUNTIME__POOL_BYTES": str(POOL_BYTES)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if engine == "transformers" and not knows_engine_key():
        del env["MEMOSD_RUNTIME__ENGINE"]  # a daemon from before runtime.engine: it serves on transformers
    out: dict[str, Any] = {"env": env}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            clients = [Client(daemon.address, token=daemon.token, timeout=600) for _ in plan]
            try:
                mounts: list[MountHandle] = []
                for c, p in zip(clients, plan, strict=True):
                    mounts.append(fill(c, p["cube"], p["texts"]))
                    act = c.activate(mounts[-1])
                    if act.tokens != len(p["block_ids"]):
                        raise RuntimeError(f"cube {p['cube']}: the daemon's block is {act.tokens} tokens, the "
                                           f"plan's {len(p['block_ids'])}: the prompts would not be the same work")
                # Warm each cube's path (its cache hot, the code paths run) with a one-token reply.
                for c, m, p in zip(clients, mounts, plan, strict=True):
                    c.generate(p["question"], [m], max_tokens=1, retrieve_k=0).text()

                def one(i: int) -> Record:
                    started = time.perf_counter()
                    gen = clients[i].generate(plan[i]["question"], [mounts[i]], max_tokens=args.max_tokens,
                                              retrieve_k=0)
                    first: float | None = None
                    for delta in gen:
                        if delta and first is None:
                            first = time.perf_counter()
                    ended = time.perf_counter()
                    s = gen.summary
                    assert s is not None
                    return {"ttft_ms": ((first or ended) - started) * 1000, "daemon_ttft_ms": s.ttft_us / 1000,
                            "wall_s": ended - started, "completion_tokens": s.completion_tokens,
                            "prompt_tokens": s.prompt_tokens, "reused_tokens": s.reused_tokens}

                out["rows"] = [summarize(n, [run_concurrently(n, one) for _ in range(args.rounds)])
                               for n in args.streams]
                model = clients[0].stats().model
                out["model"] = {"name": model.name, "fingerprint": model.fingerprint, "device": model.device,
                                "dtype": model.dtype, "engine": getattr(model, "engine", "")}
            finally:
                for c in clients:
                    c.close()
        except BaseException:
            out["daemon_log_tail"] = daemon.full_log()[-4000:] if daemon.log_path else ""
            raise
        finally:
            daemon.stop()
    for row, n in zip(out["rows"], args.streams, strict=True):
        expected = statistics.fmean(len(p["block_ids"]) + len(p["tail_ids"]) for p in plan[:n])
        row["prompt_tokens_expected"] = expected  # the plan's: equal to prompt_tokens_mean, or not the same work
    return out


# -- the bare vLLM leg ---------------------------------------------------------------------------------------

def bare_leg(plan: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """vLLM in process, no memosd, on the plan's token ids: the ceiling memosd on vLLM is measured against."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    import torch

    if args.threads:  # as memosd's engine does with its threads: OMP_NUM_THREADS, before vLLM is imported
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from memosd.runtime.vllm_engine import engine_block_size

    block_size = engine_block_size("cpu")  # memosd's engine's
    path = model_dir(args.model_cache)
    ctx = json.loads((path / "config.json").read_text()).get("max_position_embeddings", 8192)
    engine_args = EngineArgs(model=str(path), dtype="float32", enforce_eager=True, enable_prefix_caching=True,
                             block_size=block_size, max_model_len=ctx, max_num_seqs=16,
                             max_num_batched_tokens=max(PREFILL_CHUNK, 256), kv_cache_memory_bytes=POOL_BYTES,
                             disable_log_stats=True)
    built = time.perf_counter()
    llm = LLMEngine.from_engine_args(engine_args)
    out: dict[str, Any] = {"engine_start_s": time.perf_counter() - built, "torch_threads": torch.get_num_threads(),
                           "engine_args": {"block_size": block_size, "dtype": "float32", "enforce_eager": True,
                                           "enable_prefix_caching": True, "max_model_len": ctx,
                                           "max_num_batched_tokens": max(PREFILL_CHUNK, 256),
                                           "kv_cache_memory_bytes": POOL_BYTES}}
    ids = iter(range(1 << 30))

    def submit(i: int, max_tokens: int) -> str:
        rid = f"r{next(ids)}"
        prompt: Any = {"prompt_token_ids": plan[i]["block_ids"] + plan[i]["tail_ids"], "cache_salt": plan[i]["cube"]}
        llm.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                    output_kind=RequestOutputKind.DELTA))
        return rid

    def drain(live: dict[str, int], started: float) -> list[Record]:
        first: dict[str, float] = {}
        ended: dict[str, float] = {}
        tokens: dict[str, int] = dict.fromkeys(live, 0)
        cached: dict[str, int] = {}
        while llm.has_unfinished_requests():
            step: list[Any] = llm.step()
            for o in step:
                now = time.perf_counter()
                got = len(o.outputs[0].token_ids)
                tokens[o.request_id] += got
                if got and o.request_id not in first:
                    first[o.request_id] = now
                if o.finished:
                    ended[o.request_id] = now
                    cached[o.request_id] = int(o.num_cached_tokens or 0)
                    # vLLM counts the end-of-sequence token in token_ids; memosd's completion_tokens does not.
                    done = o.outputs[0]
                    if str(done.finish_reason) == "stop" and done.stop_reason is None:
                        tokens[o.request_id] -= 1
        return [{"ttft_ms": (first.get(r, ended[r]) - started) * 1000, "daemon_ttft_ms": None,
                 "wall_s": ended[r] - started, "completion_tokens": tokens[r],
                 "prompt_tokens": len(plan[i]["block_ids"]) + len(plan[i]["tail_ids"]),
                 "reused_tokens": cached[r]} for r, i in live.items()]

    # Warm: each prompt once, so its blocks are in the prefix cache (memosd's Activate + warm-up reply).
    for i in range(len(plan)):
        drain({submit(i, 1): i}, time.perf_counter())
    rows = []
    for n in args.streams:
        rounds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            live = {submit(i, args.max_tokens): i for i in range(n)}
            records = drain(live, started)
            rounds.append((time.perf_counter() - started, records))
        rows.append(summarize(n, rounds))
    out["rows"] = rows
    return out


# -- orchestration -------------------------------------------------------------------------------------------

def leg_main(args: argparse.Namespace) -> int:
    """In a leg's subprocess: run it on the plan file, write its result (or its error) to --leg-out."""
    plan = json.loads(args.plan.read_text())[: max(args.streams)]
    started = time.perf_counter()
    try:
        result = bare_leg(plan, args) if args.leg == "bare" else daemon_leg(args.leg, plan, args)
        result["ok"] = True
    except BaseException as e:  # reported, not raised: the parent records a failed leg and goes on
        import traceback

        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.perf_counter() - started
    args.leg_out.write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def run_leg(engine: str, plan_path: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"leg-{engine}.json"
    cmd = [sys.executable, __file__, "--leg", engine, "--plan", str(plan_path), "--leg-out", str(out),
           "--streams", ",".join(map(str, args.streams)), "--max-tokens", str(args.max_tokens),
           "--rounds", str(args.rounds), "--model-cache", str(args.model_cache), "--threads", str(args.threads)]
    print(f"== leg {engine} ...", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.leg_timeout, check=False)
        stderr = proc.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        return {"ok": False, "error": f"timed out after {args.leg_timeout} s", "stderr_tail": err[-4000:]}
    if out.exists():
        result: dict[str, Any] = json.loads(out.read_text())
    else:
        result = {"ok": False, "error": f"the leg exited {proc.returncode} without a result"}
    if not result["ok"]:
        result["stderr_tail"] = stderr[-4000:]
    print(f"   {'ok' if result['ok'] else 'FAILED: ' + result['error']} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(legs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The issue's target ratios, where the run has their rows (None where a leg or N is missing)."""
    def value(engine: str, n: int, key: str) -> float | None:
        leg = legs.get(engine, {})
        row = next((r for r in leg.get("rows", []) if r["streams"] == n), None) if leg.get("ok") else None
        return row[key] if row is not None else None

    return {
        "vllm_over_transformers_aggregate_n8": ratio(value("vllm", 8, "aggregate_tok_s"),
                                                     value("transformers", 8, "aggregate_tok_s")),
        "vllm_over_bare_aggregate_n8": ratio(value("vllm", 8, "aggregate_tok_s"), value("bare", 8, "aggregate_tok_s")),
        "vllm_ttft_p50_n8_over_n1": ratio(value("vllm", 8, "ttft_p50_ms"), value("vllm", 1, "ttft_p50_ms")),
        "transformers_ttft_p50_n8_over_n1": ratio(value("transformers", 8, "ttft_p50_ms"),
                                                  value("transformers", 1, "ttft_p50_ms")),
        "bare_ttft_p50_n8_over_n1": ratio(value("bare", 8, "ttft_p50_ms"), value("bare", 1, "ttft_p50_ms")),
    }


def machine() -> dict[str, Any]:
    import torch

    return {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}


def print_table(result: dict[str, Any]) -> None:
    print(f"\nmemosd serving benchmark: {result['block_tokens']}-token blocks, {result['max_tokens']} greedy tokens, "
          f"{result['rounds']} round(s); {result['machine']['cpus']} CPUs, load "
          f"{result['machine']['load_average']} at start, {result['load_average_end']} at end")
    print(f"{'engine':>12} {'N':>3} | {'agg tok/s':>9} {'TTFT p50':>9} {'p99':>8} {'max':>8} | "
          f"{'daemon p50':>10} {'p99':>8} | {'stream tok/s':>12} {'tokens':>6} {'prompt':>6} {'reused':>6}")
    for engine, leg in result["legs"].items():
        if not leg["ok"]:
            print(f"{engine:>12}   - | FAILED: {leg['error'][:150]}")
            continue
        for r in leg["rows"]:
            d50 = f"{r['daemon_ttft_p50_ms']:>10.0f} {r['daemon_ttft_p99_ms']:>8.0f}" \
                if r["daemon_ttft_p50_ms"] is not None else f"{'-':>10} {'-':>8}"
            print(f"{engine:>12} {r['streams']:>3} | {r['aggregate_tok_s']:>9.1f} {r['ttft_p50_ms']:>9.0f} "
                  f"{r['ttft_p99_ms']:>8.0f} {r['ttft_max_ms']:>8.0f} | {d50} | {r['stream_tok_s_p50']:>12.1f} "
                  f"{r['completion_tokens_mean']:>6.1f} {r['prompt_tokens_mean']:>6.0f} {r['reused_tokens_mean']:>6.0f}")
    print("\ntargets (issue 12, at N=8):")
    names = {"vllm_over_transformers_aggregate_n8": ("vllm / transformers aggregate", ">= 8"),
             "vllm_over_bare_aggregate_n8": ("vllm / bare aggregate", ">= 0.85"),
             "vllm_ttft_p50_n8_over_n1": ("vllm TTFT p50 N=8 / N=1", "<= 2"),
             "transformers_ttft_p50_n8_over_n1": ("transformers TTFT p50 N=8 / N=1", ""),
             "bare_ttft_p50_n8_over_n1": ("bare TTFT p50 N=8 / N=1", "")}
    for key, (label, goal) in names.items():
        v = result["targets"][key]
        print(f"  {label:<34} {'n/a (no N=8 row for both)' if v is None else f'{v:.2f}':>8}  {goal}")


def streams_arg(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive stream counts, e.g. 1,4,8,16")
    return values


def engines_arg(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ENGINES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(ENGINES)}; not {bad}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=engines_arg, default=list(ENGINES), help="legs, in order (default %(default)s)")
    parser.add_argument("--streams", type=streams_arg, default=[1, 4, 8, 16], help="concurrent streams per round")
    parser.add_argument("--block-tokens", type=int, default=700, help="memory block tokens per cube (the nearest)")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per reply (fewer if it ends)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache",
                        help="where the dequantized model is kept between runs")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for every leg (0: unset, each engine's own choice, as the daemon's)")
    parser.add_argument("--leg-timeout", type=float, default=1800, help="seconds a leg may take")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_serving.json")
    # Internal: run one leg (the parent starts these).
    parser.add_argument("--leg", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--leg-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.leg:
        return leg_main(args)

    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "block_tokens": args.block_tokens, "max_tokens": args.max_tokens,
                              "rounds": args.rounds, "streams": args.streams, "engines": args.engines, "threads": args.threads,
                              "pool_bytes": POOL_BYTES}
    plan = make_plan(load_tokenizer(model_dir(args.model_cache)), max(args.streams), args.block_tokens)
    result["plan"] = [{"cube": p["cube"], "items": len(p["texts"]), "block_tokens": len(p["block_ids"]),
                       "tail_tokens": len(p["tail_ids"]), "question": p["question"]} for p in plan]
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        result["legs"] = {engine: run_leg(engine, plan_path, args, Path(tmp)) for engine in args.engines}
    result["targets"] = targets(result["legs"])
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = time.perf_counter() - started
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0 if all(leg["ok"] for leg in result["legs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
