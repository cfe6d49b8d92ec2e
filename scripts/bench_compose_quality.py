#!/usr/bin/env python3
"""How good is composed reuse (issue 13, point 2)? Against the full prefill of the same prompt.

    .venv/bin/python scripts/bench_compose_quality.py                     # both parts, ~15 min on 2 cores
    .venv/bin/python scripts/bench_compose_quality.py --prompts 120 --needles 0   # (a) only
    .venv/bin/python scripts/bench_compose_quality.py --prompts 0 --needles 96 --needle-fractions 0.01 \
        --skip exact first-cube-only                                               # a larger needle run
    .venv/bin/python scripts/bench_compose_quality.py --threads 1 --prompts 0 --needles 96 \
        --in-process 0.05 0.01+0.02 --replies-from docs/bench/compose-needle96-2026-12-05.json   # (c)

On the embedded SmolLM2-135M-Instruct, with memory blocks of about ``--block-tokens`` tokens of the shared
BEIR passages (../shared/data/retrieval), rendered as Activate renders them.

(a) **Next-token agreement**, in process: ``--prompts`` prompts, each of 2-4 blocks drawn in random order
    from a pool of 8 and a question about a passage of a later block. Each block's KV is computed once, on
    its own, from position 0 (as Activate computes it); the prompt is then composed exactly as the
    transformers engine composes it (``kvcompose.compose_prefill``: the first block's cache, each later block's
    first ``ceil(f x tokens)`` tokens recomputed over the prompt before them and the rest placed with its
    keys re-rotated; tests/unit/test_kvcompose.py checks the engine gives these very logits), for each
    recompute fraction ``f`` of ``--fractions``, and "first cube only" (the later blocks dropped). Top-1
    agreement and KL(full || composed) of the next-token distribution after the question.
(b) **Needle**, through gRPC (a daemon on ``--engine``, transformers by default): ``--needles`` facts ("The locker code
    of <name> is <4 digits>."), each planted at a random place in a cube of passages that is the 2nd or 3rd
    of 3 or 4 activated cubes (the others drawn from 4 filler cubes), and the question "What is the locker
    code of <name>?". Greedy replies of up to 24 tokens (SmolLM2 spells a code digit by digit, after "The locker code of X is"); a reply is right when it contains the code.
    Modes side by side: full prefill (bypass_kv_cache), exact (compose EXACT: the later blocks computed,
    so the full prefill's reply), composed at each fraction, and first cube only (the needle's cube and
    every other after the first unmounted: what is lost without the later blocks).

(c) **Needle, in process** (``--in-process`` with compositions): (b)'s questions, the same seed and
    construction, rendered as Generate renders them and composed with ``compose_prefill``: the replies are
    (b)'s word for word, at a fraction of the time (no daemon, and ``--replies-from`` a JSON of (b) or (c)
    reuses the replies of the modes it has). ``--needles-only`` splits a run over processes.

A composition is ``F`` (the first ``ceil(F x tokens)`` of each later block recomputed) or ``F+D`` (and
``ceil(D x tokens)`` more, those whose KV deviates most: ``Placement.deviating``), in (a) and (c), then
optionally ``,t=T`` and ``,s=S``: APE's temperature and scale on the placed keys (``PlacedAttention``,
``runtime.compose_temperature`` / ``compose_scale``; e.g. ``0.01,t=0.85``). In (b) they are the daemon's:
``--compose-temperature`` / ``--compose-scale``.
On a loaded machine pass ``--threads 1``: two threads on two shared cores spin against each other.

Prints tables and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from _bench_common import fill, load_passages  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from memosd.activation import render  # noqa: E402
from memosd.runtime.kvcache import KVCache, compute_prefix_cache, prepare_generation  # noqa: E402
from memosd.runtime.kvcompose import (  # noqa: E402
    PlacedAttention,
    Placement,
    compose_prefill,
    decode_mask,
    deviating_tokens,
    placed_keys,
    recompute_tokens,
)
from memosd.runtime.model import LoadedModel, ModelSpec, load_model  # noqa: E402
from memosd.runtime.transformers_engine import eos_token_ids  # noqa: E402

NAMES = ["Ada", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kwame", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tamar"]


def passages_of(passages: list[str], rng: random.Random, tokens: int, tokenizer: Any) -> list[str]:
    """Random passages until their block is about ``tokens`` tokens."""
    texts = [rng.choice(passages)]
    while len(render.block_token_ids(tokenizer, "cube", texts)) < tokens:
        texts.append(rng.choice(passages))
    return texts


# --- (a) next-token agreement, in process ---------------------------------------------------------

def next_logprobs(lm: LoadedModel, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
    model: Any = lm.model
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def variant(spec: str) -> tuple[float, float, PlacedAttention]:
    """A composition as the command line names it: ``F`` (each later block's first ``ceil(F x tokens)``
    recomputed) or ``F+D`` (and ``ceil(D x tokens)`` more, those whose KV deviates most), then optionally
    ``,t=T`` and ``,s=S``: APE's temperature and scale on the placed keys (``PlacedAttention``)."""
    first, *adjust = spec.split(",")
    fraction, _, deviation = first.partition("+")
    knobs = {"t": 1.0, "s": 1.0}
    for part in adjust:
        name, _, value = part.partition("=")
        if name not in knobs:
            raise SystemExit(f"composition {spec!r}: {part!r} is not t=T or s=S")
        knobs[name] = float(value)
    return float(fraction), float(deviation or 0), PlacedAttention(knobs["t"], knobs["s"])


def label(spec: str) -> str:
    fraction, deviation, attention = variant(spec)
    return f"composed@{fraction:g}" + (f"+dev{deviation:g}" if deviation else "") \
        + (f",T={attention.temperature:g}" if attention.temperature != 1 else "") \
        + (f",S={attention.scale:g}" if attention.scale != 1 else "")


def composed_prefill(lm: LoadedModel, caches: list[KVCache], prompt: list[int],
                     spec: str) -> tuple[DynamicCache, torch.Tensor, Callable[[DynamicCache], torch.Tensor | None]]:
    """``prompt`` prefilled as the transformers engine composes it: the first block's cache, then
    ``kvcompose.compose_prefill`` (the engine's own prefill of composed blocks). The cache, the logits and
    the mask each decoding step then needs (``kvcompose.decode_mask``, as the engine's steps)."""
    fraction, deviation, attention = variant(spec)
    dyn, _ = prepare_generation(lm, caches[0], prompt)
    placements, start = [], caches[0].n_tokens
    for cache in caches[1:]:
        first = recompute_tokens(cache.n_tokens, fraction)
        placements.append(Placement(start, cache, first, deviating_tokens(cache.n_tokens, deviation, first)))
        start += cache.n_tokens
    placed = placed_keys(caches[0].n_tokens, placements)
    logits = compose_prefill(lm, dyn, prompt, caches[0].n_tokens, placements, chunk=len(prompt),
                             attention=attention)
    dtype = next(lm.model.parameters()).dtype
    return dyn, logits, lambda d: decode_mask(attention, placed, d, dtype=dtype, device=lm.model.device)


def composed_logprobs(lm: LoadedModel, caches: list[KVCache], prompt: list[int], spec: str) -> torch.Tensor:
    _, logits, _ = composed_prefill(lm, caches, prompt, spec)
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


def agreement(lm: LoadedModel, passages: list[str], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    pool = [passages_of(passages, rng, args.block_tokens, lm.tokenizer) for _ in range(8)]
    blocks = [render.block_token_ids(lm.tokenizer, f"cube-{j}", texts) for j, texts in enumerate(pool)]
    own = [compute_prefix_cache(lm, ids, salt=f"cube-{j}".encode())[0] for j, ids in enumerate(blocks)]
    specs = {label(spec): spec for spec in args.fractions}
    cases = [*specs, "first cube only"]
    agree = dict.fromkeys(cases, 0)
    kls: dict[str, list[float]] = {c: [] for c in cases}
    started = time.perf_counter()
    for i in range(args.prompts):
        chosen = rng.sample(range(len(pool)), rng.choice([2, 3, 4]))
        about = rng.choice(pool[rng.choice(chosen[1:])])[:80]
        tail = render.tail_token_ids(lm.tokenizer, [], [{"role": "user", "content": f"What does the memory say "
                                                         f"about: {about}?"}], after_block=True)
        prompt = [t for j in chosen for t in blocks[j]] + tail
        # The full prefill, its first block from its own cache (exact: the same tokens at the same positions,
        # nothing before them): a third less to compute.
        dyn, rest = prepare_generation(lm, own[chosen[0]], prompt)
        full = next_logprobs(lm, dyn, rest)
        for case in cases:
            if case == "first cube only":
                dyn, _ = prepare_generation(lm, own[chosen[0]], blocks[chosen[0]] + tail)
                got = next_logprobs(lm, dyn, tail)
            else:
                got = composed_logprobs(lm, [own[j] for j in chosen], prompt, specs[case])
            agree[case] += int(got.argmax() == full.argmax())
            kls[case].append(float((full.exp() * (full - got)).sum()))
        if (i + 1) % 20 == 0:
            print(f"  (a) {i + 1}/{args.prompts} prompts, {time.perf_counter() - started:.0f} s", flush=True)
    return {"prompts": args.prompts, "pool_block_tokens": [len(b) for b in blocks],
            "seconds": round(time.perf_counter() - started, 1),
            "cases": {c: {"top1_agreement": agree[c] / args.prompts, "kl_mean": sum(kls[c]) / args.prompts,
                          "kl_p95": sorted(kls[c])[int(0.95 * (args.prompts - 1))], "kl_max": max(kls[c])}
                      for c in cases}}


# --- (c) the needle, in process --------------------------------------------------------------------

def no_mask(_dyn: DynamicCache) -> torch.Tensor | None:
    return None


def greedy(lm: LoadedModel, dyn: DynamicCache, logits: torch.Tensor, max_tokens: int,
           mask: Callable[[DynamicCache], torch.Tensor | None] = no_mask) -> list[int]:
    model: Any = lm.model
    eos, out = eos_token_ids(lm), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=dyn, use_cache=True,
                           attention_mask=mask(dyn)).logits
    return out


def needles_in_process(lm: LoadedModel, passages: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """(b)'s needles (the same construction and seed, so the same questions), prompts rendered as Generate
    renders them, in process: the full prefill (its first block from its own cache, which is exact: the
    same tokens at the same positions, nothing before them; the rest computed), then each composition of
    ``--in-process``, side by side, with the same greedy decoding (the replies are (b)'s, word for word).

    ``--replies-from`` a JSON of (b) or (c) takes its replies (greedy, so they do not change) for the modes
    it has instead of computing them again, checked to be the same questions. ``--needle-range`` computes
    (or ``--needles-only``) computes
    only those questions (the others are drawn and skipped), to split a run over processes."""
    rng = random.Random(args.seed + 1)
    tok = lm.tokenizer
    recorded: list[dict[str, Any]] = []
    if args.replies_from:
        data = json.loads(args.replies_from.read_text())
        recorded = (data.get("needle") or data["needle_in_process"])["samples"]

    def block(name: str, texts: list[str]) -> tuple[list[int], KVCache]:
        ids = render.block_token_ids(tok, name, texts)
        return ids, compute_prefix_cache(lm, ids, salt=name.encode())[0]

    fillers = [block(f"filler-{j}", passages_of(passages, rng, args.block_tokens, tok)) for j in range(4)]
    specs = {label(spec): spec for spec in args.in_process}
    modes = list(dict.fromkeys(["full", *specs]))
    first, last = args.needle_range or (0, args.needles)
    only = set(args.needles_only or range(first, last))
    last = min(last, max(only) + 1)
    prefill_ms: dict[str, list[float]] = {m: [] for m in modes}
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i in range(last):
        name, code = rng.choice(NAMES) + f" {rng.choice('BCDFGHKLMNPRST')}.", f"{rng.randrange(10000):04d}"
        texts = passages_of(passages, rng, args.block_tokens, tok)
        texts.insert(rng.randrange(len(texts) + 1), f"The locker code of {name} is {code}.")
        n = rng.choice([3, 4])
        others = rng.sample(fillers, n - 1)
        at = rng.choice([1, 2])
        if i not in only:
            continue
        needle = block(f"needle-{i}", texts)
        chosen = [*others[:at], needle, *others[at:]]
        question = f"What is the locker code of {name}? Reply with the code only."
        tail = render.tail_token_ids(tok, [], [{"role": "user", "content": question}], after_block=True)
        prompt = [t for ids, _ in chosen for t in ids] + tail
        sample: dict[str, Any] = {"index": i, "code": code, "cubes": n, "needle_at": at + 1}
        known = recorded[i] if i < len(recorded) else {}
        if known and (known["code"], known["cubes"], known["needle_at"]) != (code, n, at + 1):
            raise SystemExit(f"--replies-from: question {i} is not this run's")
        for mode in modes:
            if mode in known:
                sample[mode] = known[mode]
                continue
            clock = time.perf_counter()
            mask: Callable[[DynamicCache], torch.Tensor | None] = no_mask
            if mode == "full":
                dyn, rest = prepare_generation(lm, chosen[0][1], prompt)
                logits = next_logits(lm, dyn, rest)
            else:
                dyn, logits, mask = composed_prefill(lm, [cache for _, cache in chosen], prompt, specs[mode])
            prefill_ms[mode].append((time.perf_counter() - clock) * 1000)
            sample[mode] = tok.decode(greedy(lm, dyn, logits, 24, mask))
        samples.append(sample)
        done = len(samples)
        if done % 4 == 0 or i + 1 == last:
            print(f"  (c) {done}/{len(only)} needles, {time.perf_counter() - started:.0f} s: "
                  + ", ".join(f"{m} {sum(s['code'] in s[m] for s in samples)}" for m in modes), flush=True)
            # What is done so far, for a run cut short.
            args.json.with_suffix(".partial.json").write_text(json.dumps({"samples": samples}, indent=1))
    paired = {m: {"lost": sum(s["code"] in s["full"] and s["code"] not in s[m] for s in samples),
                  "gained": sum(s["code"] not in s["full"] and s["code"] in s[m] for s in samples)}
              for m in modes if m != "full"}
    return {"needles": len(samples), "only": sorted(only), "seconds": round(time.perf_counter() - started, 1),
            "accuracy": {m: sum(s["code"] in s[m] for s in samples) / len(samples) for m in modes},
            "paired_with_full": paired, "replies_from": str(args.replies_from or ""),
            "prefill_ms_median": {m: sorted(v)[len(v) // 2] if v else None for m, v in prefill_ms.items()},
            "samples": samples}


def next_logits(lm: LoadedModel, dyn: DynamicCache, ids: list[int]) -> torch.Tensor:
    model: Any = lm.model
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids]), past_key_values=dyn, use_cache=True,
                                     logits_to_keep=1).logits
    return logits


# --- (b) the needle, through gRPC ------------------------------------------------------------------

def needles(lm: LoadedModel, passages: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from daemon_proc import DaemonProcess
    from memosd_client import Client, MountHandle

    rng = random.Random(args.seed + 1)
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__DEVICE": "cpu",
           "MEMOSD_RUNTIME__CACHE_DIR": str(args.model_cache), "MEMOSD_RUNTIME__POOL_BYTES": str(2 << 30),
           "MEMOSD_RUNTIME__ENGINE": args.engine, "MEMOSD_SCHEDULER__ENABLED": "false",
           # APE's adjustment of the placed keys, daemon-wide (runtime.compose_temperature / compose_scale)
           "MEMOSD_RUNTIME__COMPOSE_TEMPERATURE": str(args.compose_temperature),
           "MEMOSD_RUNTIME__COMPOSE_SCALE": str(args.compose_scale)}
    modes = ["full", "exact"] + [f"composed@{f:g}" for f in args.needle_fractions] + ["first cube only"]
    modes = [m for m in modes if m.split("@")[0].replace(" ", "-") not in args.skip]
    right = dict.fromkeys(modes, 0)
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data", extra_args=["--log-level", "warning"], env=env).start()
        try:
            with Client(daemon.address, token=daemon.token, timeout=600) as client:
                while client.stats().model.state == "loading":
                    time.sleep(0.5)
                fillers = [fill(client, f"filler-{j}", passages_of(passages, rng, args.block_tokens, lm.tokenizer))
                           for j in range(4)]
                for m in fillers:
                    client.activate(m)
                for i in range(args.needles):
                    name, code = rng.choice(NAMES) + f" {rng.choice('BCDFGHKLMNPRST')}.", f"{rng.randrange(10000):04d}"
                    texts = passages_of(passages, rng, args.block_tokens, lm.tokenizer)
                    texts.insert(rng.randrange(len(texts) + 1), f"The locker code of {name} is {code}.")
                    needle = fill(client, f"needle-{i}", texts)
                    client.activate(needle)
                    n = rng.choice([3, 4])
                    others = rng.sample(fillers, n - 1)
                    at = rng.choice([1, 2])
                    mounts: list[MountHandle] = [*others[:at], needle, *others[at:]]
                    question = f"What is the locker code of {name}? Reply with the code only."
                    sample: dict[str, Any] = {"code": code, "cubes": n, "needle_at": at + 1}
                    for mode in modes:
                        options: dict[str, Any] = {"compose": "exact"}
                        if mode == "full":
                            options = {"bypass_kv_cache": True}
                        elif mode.startswith("composed@"):
                            options = {"compose": "composed", "compose_recompute": float(mode.split("@")[1])}
                        used = mounts[:1] if mode == "first cube only" else mounts
                        gen = client.generate(question, used, max_tokens=24, retrieve_k=0, **options)
                        reply = gen.text()
                        sample[mode] = reply
                        right[mode] += int(code in reply)
                    samples.append(sample)
                    needle.unmount()
                    client.free_cube(needle.cube_id)  # its KV leaves the pool: the fillers' stay
                    if (i + 1) % 10 == 0:
                        print(f"  (b) {i + 1}/{args.needles} needles, {time.perf_counter() - started:.0f} s",
                              flush=True)
        finally:
            daemon.stop()
    # Paired against the full prefill (the same questions): the ones a mode lost and the ones it gained.
    paired = {m: {"lost": sum(s["code"] in s["full"] and s["code"] not in s[m] for s in samples),
                  "gained": sum(s["code"] not in s["full"] and s["code"] in s[m] for s in samples)}
              for m in modes if m != "full" and "full" in modes}
    return {"needles": args.needles, "engine": args.engine, "seconds": round(time.perf_counter() - started, 1),
            "compose_temperature": args.compose_temperature, "compose_scale": args.compose_scale,
            "accuracy": {m: right[m] / args.needles for m in modes}, "paired_with_full": paired,
            "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=120, help="(a): prompts of 2-4 blocks")
    parser.add_argument("--needles", type=int, default=40, help="(b): needle questions through the daemon")
    parser.add_argument("--fractions", nargs="+", default=["0", "0.005", "0.01", "0.02", "0.05"],
                        help="(a): compositions, F (recompute fraction) or F+D (and a deviation fraction)")
    parser.add_argument("--needle-fractions", type=float, nargs="+", default=[0.0, 0.01, 0.05],
                        help="(b): recompute fractions")
    parser.add_argument("--in-process", nargs="*", default=[],
                        help="(c): the needles in process instead of (b), with these compositions (F or F+D)")
    parser.add_argument("--replies-from", type=Path, help="(c): take the replies of the modes this JSON has")
    parser.add_argument("--needle-range", type=int, nargs=2, metavar=("FIRST", "END"), help="(c): only these")
    parser.add_argument("--needles-only", type=int, nargs="+", help="(c): only these questions (0-based)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine: two "
                        "threads on two shared cores spin against each other, 10x slower)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["full", "exact", "first-cube-only"],
                        help="(b): modes left out (exact gives the full prefill's reply by construction)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="(b): the daemon's engine (vLLM composes whole engine blocks: see ARCHITECTURE)")
    parser.add_argument("--compose-temperature", type=float, default=1.0,
                        help="(b): the daemon's runtime.compose_temperature (1: no adjustment)")
    parser.add_argument("--compose-scale", type=float, default=1.0,
                        help="(b): the daemon's runtime.compose_scale (1: no adjustment)")
    parser.add_argument("--block-tokens", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "bench_compose_quality.json")
    args = parser.parse_args()

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    lm = load_model(ModelSpec(device="cpu"), args.model_cache)
    passages = load_passages()
    result: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                              "model": lm.name, "block_tokens": args.block_tokens}
    if args.prompts:
        result["agreement"] = agreement(lm, passages, args)
    if args.needles and args.in_process:
        result["needle_in_process"] = needles_in_process(lm, passages, args)
    elif args.needles:
        result["needle"] = needles(lm, passages, args)
    if "agreement" in result:
        a = result["agreement"]
        print(f"\n(a) next token after the question, against the full prefill: {a['prompts']} prompts of 2-4 "
              f"blocks of ~{args.block_tokens} tokens, {lm.name}")
        print(f"{'case':>16} | {'top-1 agreement':>15} | {'KL mean':>8} | {'KL p95':>7} | {'KL max':>7}")
        for case, r in a["cases"].items():
            print(f"{case:>16} | {r['top1_agreement']:>15.1%} | {r['kl_mean']:>8.4f} | {r['kl_p95']:>7.4f} | "
                  f"{r['kl_max']:>7.4f}")
    if "needle" in result:
        b = result["needle"]
        print(f"\n(b) needle in cube 2 or 3 of 3-4 activated cubes, through gRPC on {b['engine']}: {b['needles']} "
              "questions")
        print(f"{'mode':>16} | {'accuracy':>8} | lost / gained against full")
        for mode, acc in b["accuracy"].items():
            pair = b["paired_with_full"].get(mode)
            print(f"{mode:>16} | {acc:>8.1%} | " + (f"{pair['lost']} / {pair['gained']}" if pair else ""))
    if "needle_in_process" in result:
        c = result["needle_in_process"]
        print(f"\n(c) needle in cube 2 or 3 of 3-4 blocks, in process: {c['needles']} questions")
        print(f"{'mode':>22} | {'accuracy':>8} | {'prefill ms (median)':>19} | lost / gained against full")
        for mode, acc in c["accuracy"].items():
            pair = c["paired_with_full"].get(mode)
            print(f"{mode:>22} | {acc:>8.1%} | {c['prefill_ms_median'][mode] or 0:>19.0f} | "
                  + (f"{pair['lost']} / {pair['gained']}" if pair else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
