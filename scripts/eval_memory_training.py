#!/usr/bin/env python3
"""Memory training, measured: closed-book recall of trained facts and perplexity on unrelated text.

One command, deterministic (seeded facts, seeded training):

    .venv/bin/python scripts/eval_memory_training.py                 # 50 facts, default settings
    .venv/bin/python scripts/eval_memory_training.py --facts 25 100  # several runs
    .venv/bin/python scripts/eval_memory_training.py --facts 50 --epochs 2 4 8
    .venv/bin/python scripts/eval_memory_training.py --item-format qa

For each run: make N facts about fictional countries (invented names, e.g.
"Vellmora"), each with a sentence (the cube item), a question and a short
answer; ask the base model every question with no context (greedy, the
model's chat template, as the daemon renders a plain conversation); train an
adapter with ``memosd.runtime.lora_train.LoraTrainer`` on the items only;
export it, remove it, check the base model's logits are unchanged; load the
exported adapter back through peft and ask again; and measure perplexity on
held-out BEIR passages (msmarco and dbpedia, read from the shared data
directory) with and without the adapter.

Scores, over the questions:
* ``contains``: the normalized answer occurs (whole words) in the normalized reply;
* ``strict``: it occurs in the reply's first sentence, and no *other* value of
  the same attribute that the fact set uses does (a reply that lists several
  candidate rivers does not count).

``--item-format``: ``sentence`` (default; items are plain sentences) or
``qa`` (items are "Q: <a question of our own wording>\\nA: <answer>"; the
training question is worded differently from the evaluation question so that
the evaluation question is never trained on).

Writes a JSON report (default bench-out/memory_training.json) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memosd.runtime.lora_train import (  # noqa: E402
    LoraTrainer,
    TrainSettings,
    attached_adapter,
)
from memosd.runtime.model import LoadedModel, ModelSpec, load_model  # noqa: E402

DATA = Path("/work/shared/data/retrieval")
PPL_SOURCES = ("msmarco", "dbpedia")

# --- the synthetic facts ---------------------------------------------------------------------------

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "qu", "r", "s", "st",
           "t", "th", "tr", "v", "vr", "z", "h", "j"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rn", "sk", "x"]
_COLORS = ["crimson", "teal", "amber", "violet", "olive", "indigo", "scarlet", "silver", "ochre",
           "turquoise", "maroon", "saffron", "emerald", "cobalt", "ivory", "magenta"]  # fmt: skip
_ANIMALS = ["otter", "lynx", "heron", "ibex", "badger", "falcon", "tortoise", "wolverine", "pelican",
            "jackal", "marten", "osprey", "gazelle", "walrus", "tapir", "condor"]  # fmt: skip


@dataclass(frozen=True)
class Attribute:
    name: str
    sentence: str  # the cube item
    question: str  # the evaluation question: never trained on
    qa_question: str  # the training question for --item-format qa, worded differently
    kind: str  # how the value is made


ATTRIBUTES = (
    Attribute("capital", "The capital of {e} is {v}.", "What is the capital of {e}?",
              "Which city is the capital of {e}?", "place"),
    Attribute("founder", "{e} was founded by {v}.", "Who founded {e}?",
              "Who was the founder of {e}?", "person"),
    Attribute("year", "{e} declared independence in {v}.", "In what year did {e} declare independence?",
              "When did {e} become independent?", "year"),
    Attribute("flag", "The flag of {e} is {v}.", "What color is the flag of {e}?",
              "What is the color of the flag of {e}?", "color"),
    Attribute("river", "The {v} River flows through {e}.", "Which river flows through {e}?",
              "What is the name of the river in {e}?", "place"),
    Attribute("language", "The people of {e} speak {v}.", "What language is spoken in {e}?",
              "What language do people in {e} speak?", "language"),
    Attribute("animal", "The national animal of {e} is the {v}.", "What is the national animal of {e}?",
              "Which animal is the national animal of {e}?", "animal"),
    Attribute("mountain", "The highest mountain in {e} is Mount {v}.", "What is the highest mountain in {e}?",
              "Which mountain is the tallest in {e}?", "place"),
)  # fmt: skip


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str
    sentence: str
    question: str
    qa_item: str


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def make_facts(n: int, seed: int = 0, per_entity: int = 3) -> list[Fact]:
    """``n`` facts about ``ceil(n / per_entity)`` invented countries, distinct attributes per country.

    Every name (countries, cities, rivers, people, languages) is invented and
    used once; years, colors and animals are drawn from fixed pools.
    """
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            name = _name(rng, syllables)
            if name not in used and len(name) >= 4:
                used.add(name)
                return name

    def value(kind: str) -> str:
        if kind == "place":
            return fresh(rng.choice((2, 3)))
        if kind == "person":
            return f"{fresh(2)} {fresh(rng.choice((2, 3)))}"
        if kind == "year":
            return str(rng.randint(1100, 1950))
        if kind == "color":
            return rng.choice(_COLORS)
        if kind == "animal":
            return rng.choice(_ANIMALS)
        if kind == "language":
            return fresh(2) + rng.choice(("ish", "ese", "ic", "ian"))
        raise ValueError(kind)

    facts: list[Fact] = []
    while len(facts) < n:
        entity = fresh(3)
        for attr in rng.sample(ATTRIBUTES, min(per_entity, n - len(facts))):
            v = value(attr.kind)
            facts.append(
                Fact(
                    entity=entity,
                    attribute=attr.name,
                    value=v,
                    sentence=attr.sentence.format(e=entity, v=v),
                    question=attr.question.format(e=entity),
                    qa_item=f"Q: {attr.qa_question.format(e=entity)}\nA: {v}",
                )
            )
    return facts


# --- scoring ---------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _has(haystack: str, needle: str) -> bool:
    return f" {needle} " in f" {haystack} "


def first_sentence(text: str) -> str:
    m = re.search(r"(?<![A-Z])[.!?](\s|$)", text.strip())
    return text.strip()[: m.start() + 1] if m else text.strip()


def score(reply: str, fact: Fact, others: set[str]) -> tuple[bool, bool]:
    """(contains, strict) for one reply; ``others``: the other values of the same attribute."""
    answer = normalize(fact.value)
    contains = _has(normalize(reply), answer)
    head = normalize(first_sentence(reply))
    strict = _has(head, answer) and not any(
        _has(head, normalize(o)) for o in others if normalize(o) != answer
    )
    return contains, strict


def ask(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy closed-book replies, each question alone in a fresh chat (batched, left-padded)."""
    import torch

    from memosd.runtime.tokens import encode, render_chat

    replies: list[str] = []
    prompts = [encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": q}], generation_prompt=True))
               for q in questions]  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        replies.extend(tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out)
    return replies


def recall(model: Any, tokenizer: Any, facts: list[Fact]) -> dict[str, Any]:
    by_attr: dict[str, set[str]] = {}
    for f in facts:
        by_attr.setdefault(f.attribute, set()).add(f.value)
    t0 = time.perf_counter()
    replies = ask(model, tokenizer, [f.question for f in facts])
    rows: list[dict[str, Any]] = []
    for f, r in zip(facts, replies, strict=True):
        c, s = score(r, f, by_attr[f.attribute])
        rows.append({"question": f.question, "answer": f.value, "reply": r, "contains": c, "strict": s})
    n = len(rows)
    return {
        "contains": sum(r["contains"] for r in rows) / n,
        "strict": sum(r["strict"] for r in rows) / n,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


# --- perplexity ------------------------------------------------------------------------------------


def heldout_passages(n: int, seed: int = 0) -> list[str]:
    """``n`` passages, half from each BEIR corpus, picked by a seeded sample of the lines (not copied)."""
    rng = random.Random(seed)
    out: list[str] = []
    for i, name in enumerate(PPL_SOURCES):
        want = n // len(PPL_SOURCES) + (1 if i < n % len(PPL_SOURCES) else 0)
        with (DATA / name / "corpus.jsonl").open(encoding="utf-8") as fh:
            texts = [t for line in fh if len(t := json.loads(line)["text"].strip()) >= 200]
        out.extend(rng.sample(texts, want))
    return out


def perplexity(model: Any, tokenizer: Any, passages: list[str], max_tokens: int = 192) -> float:
    """exp(mean token NLL) over all passages, each cut to ``max_tokens`` tokens, as plain text."""
    import torch

    from memosd.runtime.tokens import encode

    total, count = 0.0, 0
    with torch.no_grad():
        for text in passages:
            ids = torch.tensor([encode(tokenizer, text)[:max_tokens]])
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[1] - 1
            total += float(loss) * n
            count += n
    return math.exp(total / count)


def probe_logits(lm: LoadedModel) -> Any:
    import torch

    ids = torch.tensor([lm.tokenizer("A probe of the base model's logits.")["input_ids"]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits.clone()


# --- one run ---------------------------------------------------------------------------------------


def run_one(
    lm: LoadedModel,
    n_facts: int,
    settings: TrainSettings,
    args: argparse.Namespace,
    base_cache: dict[int, Any],
) -> dict[str, Any]:
    import torch

    facts = make_facts(n_facts, seed=args.fact_seed)
    items = [f.qa_item if args.item_format == "qa" else f.sentence for f in facts]
    tok = lm.tokenizer
    if n_facts not in base_cache:
        base_cache[n_facts] = recall(lm.model, tok, facts)
    base = base_cache[n_facts]
    before_logits = probe_logits(lm)

    trainer = LoraTrainer(lm, items, settings)
    info = trainer.describe()
    print(
        f"  train: {info['examples']} examples ({info['chat_examples']} chat), "
        f"{info['total_steps']} steps max, {info['trainable_params']:,} LoRA params",
        flush=True,
    )
    t0 = time.perf_counter()
    losses: list[float] = []
    step_seconds: list[float] = []
    curve: list[dict[str, Any]] = []
    eval_s = 0.0
    while not trainer.done:
        res = trainer.step()
        losses.append(res.loss)
        step_seconds.append(res.seconds)
        epoch_end = res.step % trainer.steps_per_epoch == 0 or trainer.done
        if epoch_end:
            print(f"    step {res.step:4d} epoch {res.epoch} loss {res.loss:.4f} "
                  f"epoch loss {trainer.last_epoch_loss or 0:.4f} ({res.seconds:.2f}s)", flush=True)  # fmt: skip
        if epoch_end and args.eval_epochs and not trainer.done:
            e0 = time.perf_counter()
            with trainer.adapter_enabled() as model:
                mid = recall(model, tok, facts)
                mid_ppl = perplexity(model, tok, args.passages)
            curve.append({"step": res.step, "epoch": res.epoch + 1, "contains": mid["contains"],
                          "strict": mid["strict"], "ppl": mid_ppl,
                          "ppl_change_pct": 100 * (mid_ppl / args.ppl_base - 1)})  # fmt: skip
            print(f"      eval: {mid['contains']:.0%}/{mid['strict']:.0%}, ppl {mid_ppl:.2f}", flush=True)
            eval_s += time.perf_counter() - e0
    train_s = time.perf_counter() - t0 - eval_s
    adapter = trainer.export()
    trainer.close()
    after_logits = probe_logits(lm)
    unchanged = bool(torch.equal(before_logits, after_logits))

    with attached_adapter(lm, adapter) as model:
        trained = recall(model, tok, facts)
        ppl_after = perplexity(model, tok, args.passages)
    steps = len(losses)
    curve.append({"step": steps, "epoch": trainer.epoch, "contains": trained["contains"],
                  "strict": trained["strict"], "ppl": ppl_after,
                  "ppl_change_pct": 100 * (ppl_after / args.ppl_base - 1)})  # fmt: skip
    return {
        "facts": n_facts,
        "item_format": args.item_format,
        "settings": asdict(settings),
        "examples": info["examples"],
        "trainable_params": info["trainable_params"],
        "steps": steps,
        "stopped_early": trainer.stopped_early,
        "train_seconds": train_s,
        "seconds_per_step": train_s / max(1, steps),
        "step_seconds": [round(x, 3) for x in step_seconds],
        "step_seconds_median": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None,
        "curve": curve,
        "final_loss": losses[-1] if losses else None,
        "last_epoch_loss": trainer.last_epoch_loss,
        "base": {k: v for k, v in base.items() if k != "rows"},
        "trained": {k: v for k, v in trained.items() if k != "rows"},
        "ppl_base": args.ppl_base,
        "ppl_trained": ppl_after,
        "ppl_change_pct": 100 * (ppl_after / args.ppl_base - 1),
        "base_logits_unchanged": unchanged,
        "adapter_tensors": len(adapter.state_dict),
        "adapter_params": adapter.n_params,
        "replies": [
            {**t, "base_reply": b["reply"]} for t, b in zip(trained["rows"], base["rows"], strict=True)
        ][: args.keep_replies],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, nargs="+", default=[50], help="fact-set sizes (one run each)")
    ap.add_argument("--epochs", type=int, nargs="+", default=None, help="epoch counts (one run each)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="max_steps caps (one run each)")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--alpha", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--early-stop", type=float, default=None, help="early_stop_loss (0 = off)")
    ap.add_argument("--views", default=None, help="comma list of sentence views (text,cloze,about,recall)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other TrainSettings field, e.g. --set kl_weight=1 --set target_modules=up_proj,down_proj",
    )
    ap.add_argument("--item-format", choices=("sentence", "qa"), default="sentence")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--fact-seed", type=int, default=0)
    ap.add_argument("--eval-epochs", action="store_true", help="also evaluate after every epoch (a curve)")
    ap.add_argument("--ppl-passages", type=int, default=50)
    ap.add_argument("--keep-replies", type=int, default=20, help="sample replies kept in the JSON")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/mcache"))
    ap.add_argument("--json", type=Path, default=ROOT / "bench-out" / "memory_training.json")
    args = ap.parse_args()

    import torch

    settings = TrainSettings(seed=args.seed)
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "rank": args.rank, "alpha": args.alpha, "lr": args.lr, "batch_size": args.batch_size,
            "early_stop_loss": args.early_stop,
            "views": tuple(args.views.split(",")) if args.views else None,
        }.items()
        if v is not None
    }  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    for kv in args.set:
        key, _, raw = kv.partition("=")
        if key not in fields:
            ap.error(f"--set: no TrainSettings field {key!r}")
        current = getattr(settings, key)
        overrides[key] = tuple(raw.split(",")) if isinstance(current, tuple) else type(current)(raw)
    if "rank" in overrides and "alpha" not in overrides:
        overrides["alpha"] = 2 * overrides["rank"]
    settings = replace(settings, **overrides)
    variants = [settings]
    if args.epochs:
        variants = [replace(settings, epochs=e) for e in args.epochs]
    if args.steps:
        variants = [replace(v, max_steps=s) for v in variants for s in args.steps]

    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    lm = load_model(ModelSpec(device="cpu"), args.cache_dir)
    args.passages = heldout_passages(args.ppl_passages)
    t0 = time.perf_counter()
    args.ppl_base = perplexity(lm.model, lm.tokenizer, args.passages)
    print(f"model {lm.name} {lm.fingerprint}; base perplexity {args.ppl_base:.3f} "
          f"on {len(args.passages)} passages ({time.perf_counter() - t0:.1f}s)", flush=True)  # fmt: skip

    runs: list[dict[str, Any]] = []
    base_cache: dict[int, Any] = {}
    for n in args.facts:
        for s in variants:
            print(f"run: {n} facts, epochs {s.epochs}, max_steps {s.max_steps or '-'}, rank {s.rank}, "
                  f"lr {s.lr}, views {','.join(s.views)}, items {args.item_format}", flush=True)  # fmt: skip
            r = run_one(lm, n, s, args, base_cache)
            runs.append(r)
            print(f"  -> base {r['base']['contains']:.0%}/{r['base']['strict']:.0%}, trained "
                  f"{r['trained']['contains']:.0%}/{r['trained']['strict']:.0%} (contains/strict), "
                  f"ppl {r['ppl_base']:.2f} -> {r['ppl_trained']:.2f} ({r['ppl_change_pct']:+.1f}%), "
                  f"{r['steps']} steps in {r['train_seconds']:.0f}s, base unchanged {r['base_logits_unchanged']}",
                  flush=True)  # fmt: skip

    header = f"{'facts':>5} {'epochs':>6} {'steps':>5} {'s/step':>6} {'train s':>7} " \
             f"{'base c/s':>9} {'trained c/s':>11} {'ppl base':>8} {'ppl tr':>7} {'dppl':>6}"  # fmt: skip
    print("\n" + header)
    for r in runs:
        print(
            f"{r['facts']:>5} {r['settings']['epochs']:>6} {r['steps']:>5} {r['seconds_per_step']:>6.2f} "
            f"{r['train_seconds']:>7.0f} {r['base']['contains']:>4.0%}/{r['base']['strict']:<4.0%} "
            f"{r['trained']['contains']:>6.0%}/{r['trained']['strict']:<4.0%} {r['ppl_base']:>8.2f} "
            f"{r['ppl_trained']:>7.2f} {r['ppl_change_pct']:>+5.1f}%"
        )
    report = {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "torch_threads": torch.get_num_threads(),
        "item_format": args.item_format,
        "ppl_passages": len(args.passages),
        "ppl_base": args.ppl_base,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
