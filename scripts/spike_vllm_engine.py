#!/usr/bin/env python3
"""Spike for issue 12: prove memosd's vLLM engine and KV connector on SmolLM2 (fp32, CPU).

Runs in the vLLM venv (docs/engine-notes.md), not the project's: two phases,
each in its own process, sharing a directory block store:

* ``seed``: Activate (prefill + persist) ~700- and ~2,000-token memory blocks,
  the full-prefill reference generations, an incremental activation, cube
  salt isolation, a LoRA request alone and batched with a base request, abort;
* ``fresh``: a new engine in a new process: the same generations with the
  blocks loaded from the store (tokens and logprobs against the reference),
  after an eviction of the engine cache, after a damaged block, TTFT from the
  store vs full prefill vs the engine's cache, and tokens/s at 1, 4 and 8
  concurrent requests.

Prints a table and writes every measurement as JSON to ``--out``. Timings on
a shared 2-core machine are noisy: compare them within one run only.

    .venv/bin/python scripts/spike_vllm_engine.py --model-dir DIR --out spike.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOGPROB_TOL = 1e-3  # |logprob(stored KV) - logprob(full prefill)| per token, fp32
SIZES = (700, 2000)
FINGERPRINT = "spike-smollm2-fp32"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="SmolLM2 HF directory (memosd's model cache)")
    p.add_argument("--work", type=Path, default=Path("/tmp/memosd-vllm-spike"), help="block store, LoRA, phases")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--phase", choices=("seed", "fresh"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        result = seed(args) if args.phase == "seed" else fresh(args)
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: kB
        (args.work / f"{args.phase}.json").write_text(json.dumps(result, indent=1))
        return 0

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    make_lora(args.model_dir, args.work / "lora")
    results: dict[str, Any] = {"threads": args.threads, "logprob_tolerance": LOGPROB_TOL}
    for phase in ("seed", "fresh"):
        started = time.perf_counter()
        cmd = [sys.executable, __file__, "--model-dir", str(args.model_dir), "--work", str(args.work),
               "--out", str(args.out), "--threads", str(args.threads), "--phase", phase]
        with open(args.work / f"{phase}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            print(f"phase {phase} failed (rc {rc}); see {args.work / (phase + '.log')}", file=sys.stderr)
            return 1
        results[phase] = json.loads((args.work / f"{phase}.json").read_text())
        results[phase]["process_s"] = round(time.perf_counter() - started, 1)
    results["checks"] = checks(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0 if all(c["ok"] for c in results["checks"]) else 1


# -- fixtures -------------------------------------------------------------------------------------

def make_lora(model_dir: Path, out: Path) -> None:
    """A random rank-8 LoRA on q/v projections: random B too (peft's default B is zero, i.e. a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))


def block_ids(engine: Any, n: int) -> list[int]:
    """A memory block of exactly ``n`` tokens: numbered memory lines, as memosd renders items."""
    lines = [f"- Caroline: on day {i} I wrote note {i * 7 % 97} about the garden and the number {i}."
             for i in range(1, 400)]
    ids: list[int] = engine.tokenize("Memory:\n" + "\n".join(lines))
    assert len(ids) >= n, len(ids)
    return ids[:n]


def tail_ids(engine: Any, i: int = 0) -> list[int]:
    return list(engine.tokenize(f"\nQuestion {i}: what did Caroline write about on day {3 + i}?\nAnswer:"))


def open_engine(args: argparse.Namespace) -> tuple[Any, float]:
    from memosd.runtime.kvblocks import DirBlockStore, OneStore
    from memosd.runtime.vllm_engine import VllmConfig, VllmEngine

    started = time.perf_counter()
    engine = VllmEngine(VllmConfig(model_dir=args.model_dir, fingerprint=FINGERPRINT, kv_cache_bytes=1 << 30,
                                   threads=args.threads, max_model_len=4096, max_num_seqs=16, max_loras=2,
                                   max_lora_rank=8), OneStore(DirBlockStore(args.work / "blocks")))
    return engine, round(time.perf_counter() - started, 1)


def run(engine: Any, ids: list[int], salt: str, *, max_tokens: int = 24, adapter: Any = None,
        reuse: bool = True) -> dict[str, Any]:
    from memosd.runtime.engine import Finished, Sampling, Token

    events = engine.generate(ids, Sampling(max_tokens=max_tokens), salt=salt, adapter=adapter,
                             reuse=reuse).events(900)
    tokens = [e for e in events if isinstance(e, Token)]
    done = events[-1]
    assert isinstance(done, Finished)
    return {"tokens": [t.token_id for t in tokens], "logprobs": [t.logprob for t in tokens],
            "text": "".join(t.text for t in tokens), "cached": done.cached_tokens, "prompt": done.prompt_tokens,
            "ttft_ms": done.ttft_us / 1000, "total_ms": done.total_us / 1000, "reason": done.reason}


def adapter(args: argparse.Namespace) -> Any:
    from memosd.runtime.engine import Adapter

    return Adapter(digest="0" * 63 + "1", path=args.work / "lora")


def stats(engine: Any) -> dict[str, Any]:
    s = engine.stats()
    return {"blocks_loaded": s.blocks_loaded, "blocks_saved": s.blocks_saved, "load_errors": s.load_errors,
            **s.extra}


# -- phases ---------------------------------------------------------------------------------------

def seed(args: argparse.Namespace) -> dict[str, Any]:
    from memosd.runtime.engine import Sampling, Token

    engine, load_s = open_engine(args)
    out: dict[str, Any] = {"load_s": load_s}
    import torch

    out["torch_threads"] = torch.get_num_threads()
    run(engine, engine.tokenize("Hello, warm up."), "warm", max_tokens=4)
    for n in SIZES:
        block, tail = block_ids(engine, n), tail_ids(engine)
        act = engine.prefill(block, salt=f"cube-{n}").result(900)
        ref = run(engine, block + tail, f"cube-{n}", reuse=False)
        hot = run(engine, block + tail, f"cube-{n}")
        out[f"n{n}"] = {"activate": vars(act), "reference": ref, "hot": hot}

    # Incremental activation: the 700-token block plus 100 appended tokens computes only what is new
    # (its last partial block and the appended tokens).
    longer = block_ids(engine, 800)
    out["incremental"] = vars(engine.prefill(longer, salt="cube-700").result(900))

    # Salt isolation: the same text in another cube shares nothing, in the engine or the store.
    other = engine.prefill(block_ids(engine, 700), salt="cube-other").result(900)
    out["isolation"] = {"activate_other": vars(other)}

    # LoRA: alone, then batched with a base request; KV of the base model is not reused under it.
    block, tail = block_ids(engine, 700), tail_ids(engine)
    lora = run(engine, block + tail, "cube-700", adapter=adapter(args))
    before = stats(engine)["max_requests_per_step"]
    base_stream = engine.generate(block + tail, Sampling(max_tokens=24), salt="cube-700")
    lora_stream = engine.generate(block + tail, Sampling(max_tokens=24), salt="cube-700", adapter=adapter(args))
    base_b = [e.token_id for e in base_stream.events(900) if isinstance(e, Token)]
    lora_b = [e.token_id for e in lora_stream.events(900) if isinstance(e, Token)]
    out["lora"] = {"alone": lora, "batched_base_tokens": base_b, "batched_lora_tokens": lora_b,
                   "max_requests_per_step_before": before,
                   "max_requests_per_step_after": stats(engine)["max_requests_per_step"]}

    # Abort: a long generation cancelled after its first token.
    from memosd.runtime.engine import Finished

    stream = engine.generate(block + tail, Sampling(max_tokens=400, ignore_eos=True), salt="cube-700")
    first = stream.next().result(900)
    stream.abort()
    rest = stream.events(60)
    time.sleep(1.0)
    done = rest[-1]
    assert isinstance(done, Finished) and isinstance(first, Token)
    out["abort"] = {"reason": done.reason, "completion_tokens": done.completion_tokens,
                    "engine_unfinished": bool(engine._llm.has_unfinished_requests()),
                    "running": engine.stats().generations}
    after = run(engine, block + tail, "cube-700")
    out["abort"]["next_request_ok"] = after["tokens"] == out["n700"]["hot"]["tokens"]
    out["stats"] = stats(engine)
    out["stored_blocks"] = sum(1 for p in (args.work / "blocks").iterdir() if not p.name.startswith("."))
    engine.close()
    return out


def fresh(args: argparse.Namespace) -> dict[str, Any]:
    engine, load_s = open_engine(args)
    out: dict[str, Any] = {"load_s": load_s}
    seeded = json.loads((args.work / "seed.json").read_text())
    run(engine, engine.tokenize("Hello, warm up."), "warm", max_tokens=4)
    for n in SIZES:
        block, tail = block_ids(engine, n), tail_ids(engine)
        loaded_before = engine.stats().blocks_loaded
        stored = run(engine, block + tail, f"cube-{n}")
        loaded = engine.stats().blocks_loaded - loaded_before
        full = run(engine, block + tail, f"cube-{n}", reuse=False)
        hot = run(engine, block + tail, f"cube-{n}")
        out[f"n{n}"] = {"from_store": stored, "blocks_loaded": loaded, "full": full, "hot": hot,
                        "reference": seeded[f"n{n}"]["reference"]}

    # Eviction: the engine's cache dropped, the blocks come from the store again.
    block, tail = block_ids(engine, 700), tail_ids(engine)
    out["forget_ok"] = engine.forget().result(60)
    loaded_before = engine.stats().blocks_loaded
    again = run(engine, block + tail, "cube-700")
    out["after_evict"] = {"run": again, "blocks_loaded": engine.stats().blocks_loaded - loaded_before}

    # A damaged block is recomputed, never loaded (kv_load_failure_policy = recompute).
    from memosd.runtime.kvblocks import block_keys

    keys = block_keys(block_ids(engine, 2000), fingerprint=FINGERPRINT, salt=b"cube-2000")
    (args.work / "blocks" / keys[5]).write_bytes(b"\0" * 64)
    engine.forget().result(60)
    errors_before = engine.stats().load_errors
    damaged = run(engine, block_ids(engine, 2000) + tail_ids(engine), "cube-2000")
    out["damaged"] = {"run": damaged, "load_errors": engine.stats().load_errors - errors_before}

    # Priorities: an interactive Generate that arrives behind queued background activations goes first.
    # Five 2,000-token prefills fill five steps (max_num_batched_tokens 2048); first come, first served,
    # the Generate's first token would come with the last of them.
    from memosd.runtime.engine import PRIORITY_BACKGROUND

    started = time.perf_counter()
    done_at: dict[str, float] = {}
    for i in range(5):
        future = engine.prefill(block_ids(engine, 2000), salt=f"background-{i}", priority=PRIORITY_BACKGROUND)
        future.add_done_callback(lambda _f, name=f"background-{i}": done_at.setdefault(name, time.perf_counter()))
    time.sleep(0.5)  # the first background prefill is in its step
    submitted = time.perf_counter()
    interactive = run(engine, block + tail, "cube-700", max_tokens=1)
    done_at["interactive first token"] = submitted + interactive["ttft_ms"] / 1000
    while len(done_at) < 6:
        time.sleep(0.1)
    out["priority"] = {"at_s": {k: round(v - started, 2) for k, v in sorted(done_at.items(), key=lambda x: x[1])}}

    # Throughput with the prefix cached: c requests, distinct questions, 32 greedy tokens each.
    from memosd.runtime.engine import Sampling, Token

    out["throughput"] = {}
    for c in (1, 4, 8):
        started = time.perf_counter()
        streams = [engine.generate(block + tail_ids(engine, i + 1), Sampling(max_tokens=32, ignore_eos=True),
                                   salt="cube-700") for i in range(c)]
        n_tokens = sum(sum(1 for e in s.events(900) if isinstance(e, Token)) for s in streams)
        wall = time.perf_counter() - started
        out["throughput"][str(c)] = {"tokens": n_tokens, "wall_s": round(wall, 2),
                                     "tokens_per_s": round(n_tokens / wall, 1)}
    out["stats"] = stats(engine)
    engine.close()
    return out


# -- report ---------------------------------------------------------------------------------------

def max_diff(a: list[float | None], b: list[float | None]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True) if x is not None and y is not None), default=0.0)


def checks(r: dict[str, Any]) -> list[dict[str, Any]]:
    s, f = r["seed"], r["fresh"]
    out: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append({"check": name, "ok": bool(ok), "detail": detail})

    for n in SIZES:
        ref, st = f[f"n{n}"]["reference"], f[f"n{n}"]["from_store"]
        full_blocks = (n // 64) * 64
        check(f"(a) n={n}: stored KV in a fresh process = full prefill", st["tokens"] == ref["tokens"]
              and max_diff(st["logprobs"], ref["logprobs"]) <= LOGPROB_TOL and st["cached"] == full_blocks,
              f"tokens equal {st['tokens'] == ref['tokens']}, max |dlogprob| "
              f"{max_diff(st['logprobs'], ref['logprobs']):.2e}, cached {st['cached']} of {st['prompt']} "
              f"(loaded {f[f'n{n}']['blocks_loaded']} blocks)")
        check(f"(a) n={n}: engine-cache hit = full prefill (seed)", s[f"n{n}"]["hot"]["tokens"] == ref["tokens"],
              f"cached {s[f'n{n}']['hot']['cached']}")
    inc = s["incremental"]
    check("incremental activation computes only the new tokens", inc["computed_tokens"] == 800 - 640,
          f"computed {inc['computed_tokens']} of {inc['tokens']}, saved {inc['blocks_saved']} new blocks")
    iso = s["isolation"]["activate_other"]
    check("(b) cache_salt: same text in another cube shares no block", iso["cached_tokens"] == 0
          and iso["blocks_saved"] == 700 // 64, f"cached {iso['cached_tokens']}, saved {iso['blocks_saved']}")
    lo = s["lora"]
    base = s["n700"]["hot"]["tokens"]
    check("(c) LoRA changes the tokens and reuses no base KV", lo["alone"]["tokens"] != base
          and lo["alone"]["cached"] == 0, f"cached {lo['alone']['cached']}, first tokens "
          f"{lo['alone']['tokens'][:6]} vs base {base[:6]}")
    check("(c) LoRA and base batch together, same tokens as alone", lo["batched_lora_tokens"] == lo["alone"]["tokens"]
          and lo["batched_base_tokens"] == base and lo["max_requests_per_step_after"] >= 2,
          f"max requests per step {lo['max_requests_per_step_after']}")
    ab = s["abort"]
    check("(d) abort frees the request", ab["reason"] == "aborted" and not ab["engine_unfinished"]
          and ab["running"] == 0 and ab["next_request_ok"] and ab["completion_tokens"] < 400,
          f"{ab['completion_tokens']} tokens before the abort")
    ev, ref7 = f["after_evict"], f["n700"]["reference"]
    check("after the engine cache is dropped, blocks load from the store", ev["blocks_loaded"] == 700 // 64
          and ev["run"]["tokens"] == ref7["tokens"] and max_diff(ev["run"]["logprobs"], ref7["logprobs"]) <= LOGPROB_TOL,
          f"loaded {ev['blocks_loaded']} blocks")
    dm, ref2 = f["damaged"], f["n2000"]["reference"]
    # vLLM still reports the tokens it planned to load as cached; the TTFT shows the recompute.
    check("a damaged block is recomputed, not loaded", dm["load_errors"] == 1
          and dm["run"]["tokens"] == ref2["tokens"] and max_diff(dm["run"]["logprobs"], ref2["logprobs"]) <= LOGPROB_TOL,
          f"load errors {dm['load_errors']}, max |dlogprob| {max_diff(dm['run']['logprobs'], ref2['logprobs']):.2e}, "
          f"TTFT {dm['run']['ttft_ms']:.0f} ms vs {f['n2000']['from_store']['ttft_ms']:.0f} ms all loaded")
    pr = f["priority"]["at_s"]
    after = sum(1 for k, v in pr.items() if k.startswith("background") and v > pr["interactive first token"])
    check("interactive work goes ahead of queued background prefills", after >= 3,
          f"{after} of 5 background prefills finished after the interactive first token: {pr}")
    return out


def print_table(r: dict[str, Any]) -> None:
    s, f = r["seed"], r["fresh"]
    print(f"engine load: seed {s['load_s']} s, fresh {f['load_s']} s; torch threads {s['torch_threads']}; "
          f"max RSS seed {s['max_rss_mb']} MB, fresh {f['max_rss_mb']} MB; {s['stored_blocks']} blocks stored")
    print(f"{'prefix':>8} {'activate ms':>12} {'TTFT store ms':>14} {'TTFT full ms':>13} {'TTFT hot ms':>12}")
    for n in SIZES:
        a, x = s[f"n{n}"]["activate"], f[f"n{n}"]
        print(f"{n:>8} {a['took_us'] / 1000:>12.0f} {x['from_store']['ttft_ms']:>14.0f} {x['full']['ttft_ms']:>13.0f} "
              f"{x['hot']['ttft_ms']:>12.0f}")
    print(f"{'concurrent':>10} {'tokens':>7} {'wall s':>7} {'tok/s':>7}")
    for c, t in f["throughput"].items():
        print(f"{c:>10} {t['tokens']:>7} {t['wall_s']:>7} {t['tokens_per_s']:>7}")
    for c in r["checks"]:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
