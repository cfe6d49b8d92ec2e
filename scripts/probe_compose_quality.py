#!/usr/bin/env python3
"""Groundwork for composed activation (issue 13, point 2): how close does moving a block's KV get?

    .venv/bin/python scripts/probe_compose_quality.py --prompts 24      # ~4 min on 2 cores

In process, on the embedded SmolLM2-135M (no daemon; composed reuse is not built into memosd yet). Each
prompt is 2 or 3 memory blocks of 4 random BEIR passages (../shared/data/retrieval), rendered as Activate
renders them, and a question. Each block's KV is computed on its own, from position 0, as an activation
is. The blocks are then *composed*: the first block as it is, and each later block's keys rotated to the
block's place in the prompt (RoPE: ``k cos(o) + rotate_half(k) sin(o)`` for offset ``o``, with the model's
own ``rotary_emb``), its values as they are, and its first ``r`` tokens recomputed over everything before
them (they make up for the missing cross-block attention and re-anchor the block, as APE, EPIC and
CacheBlend do). The next-token distribution after the question is compared with the full prefill's: top-1
agreement and KL(full || composed). "first cube only" drops the later blocks altogether (what is lost
without them). Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from _bench_common import load_passages  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from memosd.activation import render  # noqa: E402
from memosd.runtime.kvcache import KVCache, compute_prefix_cache  # noqa: E402
from memosd.runtime.model import LoadedModel, ModelSpec, load_model  # noqa: E402


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(model: Any, keys: torch.Tensor, offset: int) -> torch.Tensor:
    """Keys rotated as if computed ``offset`` positions later (RoPE rotations compose by adding angles)."""
    cos, sin = model.model.rotary_emb(keys, torch.tensor([[offset]]))
    shifted: torch.Tensor = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    return shifted


def cache_of(caches: list[KVCache]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(caches[0].keys, caches[0].values, strict=True)):
        cache.update(k.clone(), v.clone(), i)
    return cache


def compose(lm: LoadedModel, caches: list[KVCache], recompute: int) -> DynamicCache:
    model: Any = lm.model
    cache = cache_of(caches)
    for block in caches[1:]:
        offset = cache.get_seq_length()
        if recompute:
            with torch.no_grad():
                model(input_ids=torch.tensor([list(block.token_ids[:recompute])]), past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        for i, (k, v) in enumerate(zip(block.keys, block.values, strict=True)):
            layer: Any = cache.layers[i]
            layer.keys = torch.cat([layer.keys, shift_keys(model, k[:, :, recompute:], offset)], dim=2)
            layer.values = torch.cat([layer.values, v[:, :, recompute:]], dim=2)
    return cache


def next_token_logprobs(lm: LoadedModel, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
    model: Any = lm.model
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--recompute", type=int, nargs="+", default=[0, 4, 16, 64], help="tokens per later block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", type=Path, default=ROOT / "bench-out" / "model-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "probe_compose_quality.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    lm = load_model(ModelSpec(device="cpu"), args.model_cache)
    passages = load_passages()
    rng = random.Random(args.seed)
    cases = [f"recompute {r}" for r in args.recompute] + ["first cube only"]
    agree = dict.fromkeys(cases, 0)
    kls: dict[str, list[float]] = {c: [] for c in cases}
    started = time.perf_counter()
    for _ in range(args.prompts):
        texts = [rng.sample(passages, 4) for _ in range(rng.choice([2, 3]))]
        blocks = [render.block_token_ids(lm.tokenizer, f"cube{j}", t) for j, t in enumerate(texts)]
        question = rng.choice(texts[-1])[:80]
        tail = render.tail_token_ids(lm.tokenizer, [], [{"role": "user", "content": f"What does the memory say "
                                                         f"about: {question}?"}], after_block=True)
        caches = [compute_prefix_cache(lm, ids, salt=b"probe")[0] for ids in blocks]
        full = next_token_logprobs(lm, DynamicCache(), [t for b in blocks for t in b] + tail)
        for case in cases:
            cache = cache_of(caches) if case == "first cube only" else compose(lm, caches, int(case.split()[-1]))
            got = next_token_logprobs(lm, cache, tail)
            agree[case] += int(got.argmax() == full.argmax())
            kls[case].append(float((full.exp() * (full - got)).sum()))
    result: dict[str, Any] = {"prompts": args.prompts, "seconds": round(time.perf_counter() - started, 1), "model": lm.name,
              "cases": {c: {"top1_agreement": agree[c] / args.prompts, "kl_mean": sum(kls[c]) / args.prompts,
                            "kl_max": max(kls[c])} for c in cases}}
    print(f"\ncomposed KV against the full prefill: {args.prompts} prompts of 2-3 blocks, {lm.name}")
    print(f"{'case':>16} | {'top-1 agreement':>15} | {'KL mean':>8} | {'KL max':>7}")
    for case, r in result["cases"].items():
        print(f"{case:>16} | {r['top1_agreement']:>15.1%} | {r['kl_mean']:>8.4f} | {r['kl_max']:>7.4f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
