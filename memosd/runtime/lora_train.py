"""Memory training: distill a cube's plaintext items into a LoRA adapter.

A cube's items are strings. Training turns them into supervised examples
(``expand_item``), tokenizes them once, and fits a peft LoRA adapter on the
shared in-process model so that the model can answer questions about the items
with no prompt context (closed-book). ``LoraTrainer`` does it one optimizer
step at a time (``step``), so the daemon can interleave other work on the
runtime worker between steps; ``export`` returns the adapter as peft's state
dict plus its ``adapter_config.json``; ``close`` takes the LoRA layers out of
the model again.

**What an item becomes** (the item convention; ``expand_item``):

* ``"Q: <question>\\nA: <answer>"`` (also ``Question:``/``Answer:``): one chat
  turn, user = question, assistant = answer.
* Any other item is a fact sentence. A small model trained on a sentence as
  plain text learns to continue that text, but does not learn to *answer a
  question* about it (knowledge stored in one surface form is not
  extractable from another). So each sentence is also rewritten into chat
  turns whose reply is the sentence itself, under prompts built from the
  sentence alone, never from any evaluation question:

  - ``text``: the sentence as plain text (loss on every token);
  - ``cloze``: for each *key span* (a run of capitalized words, a number, the
    last word), user = "Fill in the blank: <sentence with the span as ___>";
  - ``about``: for each key span, user = "What do you know about <span>?";
  - ``recall``: user = "State the fact that begins: <first words>".

  The replies are the full sentence, because the instruct model answers a
  question by restating it ("The capital of X is ..."): a sentence-shaped
  reply puts the memorized continuation right where the answer goes.
  Prompt wordings rotate through a few fixed templates, chosen by a hash of
  the item, so the expansion is deterministic.

Chat turns are rendered with the model's chat template exactly as inference
renders a plain conversation (``memosd.runtime.tokens.render_chat``; for
SmolLM2 that includes the template's default system prompt), and the loss
covers only the reply tokens and the end-of-turn token. The ``text`` view is
off by default: without it recall is as good, and plain-text training is what
moves the model's behaviour on unrelated plain text most.

**Keeping the base model's behaviour** (``kl_weight``). Fitting the facts
alone raises perplexity on unrelated text a lot (measured: x3 to x6): the
adapter learns to put invented names after any "the capital of", "in the
province of". So every step also adds ``kl_weight`` x KL(base || adapted) of
the next-token distributions at positions where nothing new should be
learned, against the base model's own predictions (its top ``kl_topk``
tokens plus one bucket for the rest, computed once per sequence with the
LoRA layers off and cached):

* up to ``kl_positions`` prompt positions of each chat example (system
  prompt, question: everything before the reply);
* *replay text*: ``replay_samples`` sequences of ``replay_tokens`` tokens
  that the base model itself samples (seeded) from each sentence item's
  opening words before its first name ("The capital of", "The flag of"),
  ``replay_per_step`` of them per step. They are base-model text about other
  capitals and flags, exactly where a new fact leaks. No text from outside the
  items and the model is used.

**The shared model.** The daemon has one model. ``LoraTrainer`` wraps it with
LoRA layers in place (a named adapter, ``add_adapter``), but keeps them *disabled*
outside ``step`` (and outside ``adapter_enabled()``), so any work the daemon
runs between steps sees the base model's exact outputs. ``close`` unloads the
LoRA layers without merging and restores every parameter's ``requires_grad``
and the train/eval mode: the base weights are never written (the optimizer
only holds LoRA parameters), which the unit tests check on logits.

Threading: everything that touches the model (construction, ``step``,
``export``, ``close``) runs on the runtime worker thread. Nothing here starts
a thread; the data order comes from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from memosd.runtime.model import LoadedModel

# Views of a plain-sentence item; see the module docstring.
VIEWS = ("text", "cloze", "about", "recall")
# "text" is off by default: see TrainSettings.
DEFAULT_VIEWS = ("cloze", "about", "recall")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_QA = re.compile(r"^\s*(?:Q|Question)\s*:\s*(?P<q>.+?)\s*\n\s*(?:A|Answer)\s*:\s*(?P<a>.+?)\s*$", re.S | re.I)
# Key spans: runs of capitalized words (with inner '-'/'''), numbers.
_SPAN = re.compile(r"\b(?:[A-Z][\w'-]*)(?:\s+[A-Z][\w'-]*)*|\b\d[\d.,]*\d\b|\b\d\b")
_LAST_WORD = re.compile(r"([\w'-]+)\W*$")
# Capitalized words that only start a sentence or clause; never a key span on their own.
_STOP = frozenset((
    "The", "A", "An", "In", "On", "At", "Of", "For", "From", "By", "To", "And", "Or", "But", "It", "Its",
    "This", "That", "These", "Those", "There", "He", "She", "They", "We", "I", "You", "His", "Her",
    "Their", "Our", "My", "Your", "Is", "Was", "Are", "Were",
))  # fmt: skip
_CLOZE_PROMPTS = (
    "Fill in the blank: {masked}",
    "Complete the fact by filling in the blank: {masked}",
    "What goes in the blank? {masked}",
)
_ABOUT_PROMPTS = (
    "What do you know about {span}?",
    "Tell me a fact about {span}.",
    "What do you remember about {span}?",
)
_RECALL_PROMPTS = (
    "State the fact that begins: {prefix} ...",
    "Finish this sentence: {prefix} ...",
)


@dataclass(frozen=True)
class TrainSettings:
    """How an adapter is trained. The defaults are the ones measured in BENCHMARKS (memory training).

    ``rank``/``alpha``: LoRA rank and scale (alpha/rank multiplies the update).
    ``target_modules``: the linear layers that get LoRA (attention and MLP of
    Llama-style models). ``lr``: AdamW learning rate, linear warmup over
    ``warmup_steps`` then cosine decay to 10% over ``total_steps``.
    ``epochs``: passes over the examples; ``max_steps`` caps the step count
    (0 = no cap). ``batch_size`` examples per step, each cut to ``max_len``
    tokens. ``early_stop_loss``: training is done once the mean loss of the
    last full epoch is below it (0 disables). ``views``: which rewrites of a
    plain-sentence item are trained (see ``expand_item``). ``kl_weight``,
    ``kl_positions``, ``kl_topk``, ``replay_samples``, ``replay_tokens``,
    ``replay_per_step``: the regularizer that keeps unrelated behaviour (module
    docstring); ``kl_weight=0`` turns it off, ``replay_samples=0`` keeps only
    the prompt positions.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 6
    max_steps: int = 0
    batch_size: int = 8
    max_len: int = 96
    warmup_steps: int = 10
    early_stop_loss: float = 0.02
    kl_weight: float = 1.0
    kl_positions: int = 16
    kl_topk: int = 64
    replay_samples: int = 16
    replay_tokens: int = 48
    replay_per_step: int = 2
    seed: int = 0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    views: tuple[str, ...] = DEFAULT_VIEWS

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError("rank and alpha must be >= 1")
        if self.epochs < 1 or self.batch_size < 1 or self.max_len < 8 or self.max_steps < 0:
            raise ValueError("epochs and batch_size must be >= 1, max_len >= 8, max_steps >= 0")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        unknown = set(self.views) - set(VIEWS)
        if unknown or not self.views:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {self.views}")
        if not self.target_modules:
            raise ValueError("target_modules must not be empty")


@dataclass(frozen=True)
class Example:
    """One training example before tokenization.

    ``messages`` set: a chat (the last message is the assistant reply, the
    only part with loss). Otherwise ``text``: plain text, loss on all of it.
    """

    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: its 1-based number, mean loss over the batch's reply tokens, wall time."""

    step: int
    loss: float
    seconds: float
    epoch: int
    lr: float


@dataclass(frozen=True)
class AdapterExport:
    """A trained adapter: peft's state dict (tensors on the CPU) and the ``adapter_config.json`` content."""

    state_dict: dict[str, Any] = field(repr=False)
    config: dict[str, Any]

    @property
    def n_params(self) -> int:
        return sum(int(t.numel()) for t in self.state_dict.values())


# --- items -> examples -----------------------------------------------------------------------------


def parse_qa(item: str) -> tuple[str, str] | None:
    """``(question, answer)`` for a ``Q: ...\\nA: ...`` item, else None."""
    m = _QA.match(item)
    if m is None:
        return None
    return " ".join(m["q"].split()), " ".join(m["a"].split())


def key_spans(sentence: str) -> list[str]:
    """The spans of a sentence worth asking about: capitalized runs, numbers, the last word. In order, unique.

    A generic heuristic, not a parser: names and numbers are what facts
    hinge on, and English puts the new information of a sentence at its
    end. A leading sentence-opener ("The", "In") is stripped from a run.
    """
    spans: list[str] = []
    for m in _SPAN.finditer(sentence):
        words = m.group(0).split()
        while words and words[0] in _STOP:
            words = words[1:]
        if words:
            spans.append(" ".join(words))
    last = _LAST_WORD.search(sentence)
    if last is not None and not any(last.group(1) in s.split() for s in spans):
        spans.append(last.group(1))
    out: list[str] = []
    for s in spans:
        if s not in out:
            out.append(s)
    return out


def _pick(templates: Sequence[str], item: str, salt: str) -> str:
    digest = hashlib.sha256(f"{salt}\0{item}".encode()).digest()
    return templates[digest[0] % len(templates)]


def expand_item(item: str, views: Sequence[str] = VIEWS) -> list[Example]:
    """The training examples of one cube item (see the module docstring for the convention)."""
    text = " ".join(item.split()) if parse_qa(item) is None else item.strip()
    if not text:
        return []
    qa = parse_qa(text)
    if qa is not None:
        return [Example(messages=(("user", qa[0]), ("assistant", qa[1])))]
    out: list[Example] = []
    if "text" in views:
        out.append(Example(text=text))
    spans = key_spans(text)

    def chat(prompt: str) -> Example:
        return Example(messages=(("user", prompt), ("assistant", text)))

    if "cloze" in views:
        for span in spans:
            masked = text.replace(span, "___", 1)
            if masked != text:
                out.append(chat(_pick(_CLOZE_PROMPTS, text, "cloze" + span).format(masked=masked)))
    if "about" in views:
        for span in spans:
            out.append(chat(_pick(_ABOUT_PROMPTS, text, "about" + span).format(span=span)))
    if "recall" in views:
        words = text.split()
        if len(words) >= 4:
            prefix = " ".join(words[: max(2, len(words) // 2)])
            out.append(chat(_pick(_RECALL_PROMPTS, text, "recall").format(prefix=prefix)))
    return out


def replay_seeds(items: Sequence[str]) -> list[str]:
    """Where replay text starts: each sentence item's words before its first key span, deduplicated.

    "The capital of Vellmora is Quistarn." gives "The capital of": the base
    model's continuations of it are about *other* capitals, which is where a
    new fact leaks into unrelated text. "The" when no item gives a prefix.
    """
    seeds: list[str] = []
    for item in items:
        if parse_qa(item) is not None:
            continue
        text = " ".join(item.split())
        spans = key_spans(text)
        cut = min((text.find(sp) for sp in spans if sp in text), default=0)
        prefix = text[:cut].strip()  # empty when the sentence starts with a span (a name)
        if prefix and prefix not in seeds:
            seeds.append(prefix)
    return seeds or ["The"]


def build_examples(items: Sequence[str], views: Sequence[str] = VIEWS) -> list[Example]:
    """All items' examples, in item order."""
    return [ex for item in items for ex in expand_item(item, views)]


def tokenize_example(tokenizer: Any, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with -100 where there is no loss; cut to ``max_len`` tokens.

    A chat is rendered as inference renders a conversation: the prompt with
    the generation prompt, then the reply and whatever the template closes a
    turn with. The two parts are tokenized separately, so the prompt tokens
    are exactly the ones inference feeds.
    """
    from memosd.runtime.tokens import chat_token_ids, encode, encode_text, render_chat

    # Item text is tokenized as text, as inference does (runtime/tokens.py): it never trains on forged control tokens.
    if not example.is_chat:
        ids = encode_text(tokenizer, example.text)
        eos = tokenizer.eos_token_id
        if isinstance(eos, int) and not getattr(tokenizer, "chat_template", None):
            ids = [*ids, eos]
        ids = ids[:max_len]
        return ids, list(ids)
    messages = [{"role": r, "content": c} for r, c in example.messages]
    prompt = render_chat(tokenizer, messages[:-1], generation_prompt=True)
    whole = render_chat(tokenizer, messages, generation_prompt=False)
    if not whole.startswith(prompt):  # a template that renders the last turn differently
        raise ValueError("the chat template does not render a reply as a continuation of its prompt")
    reply = whole[len(prompt) :].rstrip("\n")  # the turn's end token, not the newline after it
    content = messages[-1]["content"]
    if not reply.startswith(content):
        raise ValueError("the chat template does not render a reply's content as given")
    p_ids = chat_token_ids(tokenizer, messages[:-1], generation_prompt=True)
    r_ids = encode_text(tokenizer, content) + encode(tokenizer, reply[len(content):])
    ids = (p_ids + r_ids)[:max_len]
    labels = ([-100] * len(p_ids) + r_ids)[:max_len]
    return ids, labels


# --- training --------------------------------------------------------------------------------------


class LoraTrainer:
    """Fits a LoRA adapter on ``lm.model`` to a cube's items, one optimizer step per ``step`` call.

    Construction wraps the model with peft (LoRA layers disabled until a
    step runs); ``close`` (or the context manager) removes them. Use one
    trainer at a time per model.
    """

    def __init__(self, lm: LoadedModel, items: Sequence[str], settings: TrainSettings | None = None) -> None:
        import torch
        from peft import LoraConfig

        self.settings = s = settings or TrainSettings()
        self._lm = lm
        self.examples = build_examples(items, s.views)
        if not self.examples:
            raise ValueError("no training examples: the items are empty")
        tok = lm.tokenizer
        self._tokenized = [tokenize_example(tok, ex, s.max_len) for ex in self.examples]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._pad = int(pad) if pad is not None else 0
        self.steps_per_epoch = math.ceil(len(self._tokenized) / s.batch_size)
        full = self.steps_per_epoch * s.epochs
        self.total_steps = min(full, s.max_steps) if s.max_steps else full

        model = lm.model
        self._was_training = bool(model.training)
        self._requires_grad = _grad_flags(model)
        self.lora_config = LoraConfig(
            r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=list(s.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # A named adapter added through transformers' PEFT integration, not a PeftModel wrapper: the
        # daemon's model may hold resident adapters (memosd.runtime.adapters) beside it, which a
        # wrapper's unload() would destroy. Only this adapter's weights are trained.
        self._name = f"memosd_train_{secrets.token_hex(4)}"
        # LoRA A matrices are initialised from the global generator: seed it for this init only, so the
        # process's RNG (the daemon's, other tests') is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model.add_adapter(self.lora_config, adapter_name=self._name)
        self._peft: Any = model
        self._params = [p for n, p in model.named_parameters() if f".{self._name}." in n]
        for p in self._params:
            p.requires_grad_(True)
        self.trainable_params = sum(int(p.numel()) for p in self._params)
        # Off between steps, so whatever runs between steps sees the model as it was.
        model.disable_adapters()
        self._optim = torch.optim.AdamW(self._params, lr=s.lr, weight_decay=s.weight_decay, foreach=False)
        self._gen = torch.Generator().manual_seed(s.seed)
        self._order: list[int] = []
        self._teacher: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}
        # Replay rows live after the examples: row len(self._tokenized) + j is replay text j.
        self._replay: list[list[int]] = []
        self._replay_seeds = replay_seeds(items)
        self._epoch_losses: list[float] = []
        self.last_epoch_loss: float | None = None
        self.step_count = 0
        self.epoch = 0
        self.stopped_early = False
        self._closed = False

    # -- state --

    @property
    def done(self) -> bool:
        """All steps run, or stopped early on a tiny epoch loss."""
        return self.stopped_early or self.step_count >= self.total_steps

    @property
    def model(self) -> Any:
        """The peft-wrapped model (its LoRA layers are enabled only inside ``step``/``adapter_enabled``)."""
        return self._peft

    def _lr_at(self, step: int) -> float:
        s = self.settings
        if s.warmup_steps and step <= s.warmup_steps:
            return s.lr * step / s.warmup_steps
        span = max(1, self.total_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _next_batch(self) -> list[int]:
        import torch

        if not self._order:
            self._order = torch.randperm(len(self._tokenized), generator=self._gen).tolist()
        n = min(self.settings.batch_size, len(self._order))
        batch, self._order = self._order[:n], self._order[n:]
        return batch

    def _collate(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        import torch

        rows = [self._row(i) for i in batch]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        device = self._lm.device
        return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}

    # -- training --

    def step(self) -> StepResult:
        """Run one optimizer step on the next batch. Raises RuntimeError when ``done`` or closed.

        Anything random in a step (LoRA dropout) draws from the global generator seeded by (seed, step)
        inside a fork, so steps are reproducible and the process's RNG is left alone."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed * 1_000_003 + self.step_count)
            return self._step()

    def _step(self) -> StepResult:
        import torch

        if self._closed:
            raise RuntimeError("the trainer is closed")
        if self.done:
            raise RuntimeError("training is done")
        start = time.perf_counter()
        use_kl = self.settings.kl_weight > 0
        rows = self._next_batch()
        if use_kl and self.settings.replay_samples > 0:
            rows = rows + self._replay_rows()
        batch = self._collate(rows)
        if use_kl:
            self._fill_teacher(rows, batch)
        self.step_count += 1
        lr = self._lr_at(self.step_count)
        for group in self._optim.param_groups:
            group["lr"] = lr
        with self.adapter_enabled(train=True):
            hidden = self._hidden(batch)
            head = self._head()
            labels = batch["labels"][:, 1:]
            where = (labels != -100).nonzero(as_tuple=True)
            loss = torch.nn.functional.cross_entropy(head(hidden[:, :-1][where]).float(), labels[where])
            total = loss
            if use_kl:
                kl = self._kl(rows, hidden, head)
                if kl is not None:
                    total = loss + self.settings.kl_weight * kl
            self._optim.zero_grad(set_to_none=True)
            torch.autograd.backward(total)
            self._optim.step()
        self._optim.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self._epoch_losses.append(value)
        epoch = self.epoch
        if not self._order:  # the epoch ended with this batch
            self.last_epoch_loss = sum(self._epoch_losses) / len(self._epoch_losses)
            self._epoch_losses = []
            self.epoch += 1
            es = self.settings.early_stop_loss
            if es > 0 and self.last_epoch_loss < es:
                self.stopped_early = True
        return StepResult(self.step_count, value, time.perf_counter() - start, epoch, lr)

    # The loss is computed from the decoder's last hidden state and the output
    # embedding on the positions that need logits only (the reply tokens, the
    # KL positions): the full [batch, seq, vocab] logits of a 49k vocabulary
    # would cost more than the LoRA layers. This assumes logits = head(hidden),
    # true of Llama-style models (no logit scaling or soft-capping).

    def _hidden(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        decoder = self._peft.get_decoder()
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def _head(self) -> Any:
        return self._peft.get_output_embeddings()

    def _row(self, index: int) -> tuple[list[int], list[int]]:
        if index < len(self._tokenized):
            return self._tokenized[index]
        ids = self._replay[index - len(self._tokenized)]
        return ids, [-100] * len(ids)

    def _replay_rows(self) -> list[int]:
        """This step's replay rows, sampling more replay text first while there is less than asked for.

        Replay text is sampled from the base model (LoRA off) a few
        sequences per step, so no single step is long; seeds and sampling
        are deterministic (``seed``), and the global torch RNG is left as it was.
        """
        import torch

        s = self.settings
        if len(self._replay) < s.replay_samples:
            n = min(max(4, s.replay_per_step), s.replay_samples - len(self._replay))
            tok = self._lm.tokenizer
            from memosd.runtime.tokens import encode_text

            seeds = [encode_text(tok, self._replay_seeds[(len(self._replay) + i) % len(self._replay_seeds)])
                     for i in range(n)]  # fmt: skip
            width = max(len(x) for x in seeds)
            ids = torch.tensor([[self._pad] * (width - len(x)) + x for x in seeds], device=self._lm.device)
            mask = torch.tensor(
                [[0] * (width - len(x)) + [1] * len(x) for x in seeds], device=self._lm.device
            )
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(s.seed * 7919 + len(self._replay))
                out = self._peft.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.95, temperature=1.0, top_k=0,
                    max_new_tokens=s.replay_tokens, min_new_tokens=s.replay_tokens, pad_token_id=self._pad,
                )  # fmt: skip
            for seed_ids, row in zip(seeds, out, strict=True):
                self._replay.append(seed_ids + [int(t) for t in row[width:]])
        k = min(s.replay_per_step, len(self._replay))
        base = len(self._tokenized)
        return [base + (self.step_count * k + i) % len(self._replay) for i in range(k)]

    def _kl_positions(self, index: int) -> list[int]:
        """Up to ``kl_positions`` positions (evenly spaced) whose next token is a prompt token of example ``index``."""
        ids, labels = self._row(index)
        if index >= len(self._tokenized):  # replay text: every position
            return list(range(len(ids) - 1))
        pos = [t for t in range(len(labels) - 1) if labels[t + 1] == -100]
        k = self.settings.kl_positions
        if len(pos) > k:
            pos = [pos[round(i * (len(pos) - 1) / (k - 1))] for i in range(k)] if k > 1 else pos[-1:]
        return pos

    def _fill_teacher(self, rows: Sequence[int], batch: Mapping[str, torch.Tensor]) -> None:
        """The base model's top-k next-token log-probs at each KL position, computed once per example.

        Computed the first time an example is in a batch (the first epoch),
        with the LoRA layers off, and kept: later epochs pay no base forward.
        """
        import torch

        todo = [r for r in rows if r not in self._teacher]
        if not todo:
            return
        with torch.no_grad():
            hidden = self._hidden(batch)  # LoRA layers are disabled outside adapter_enabled
            head = self._head()
            for b, r in enumerate(rows):
                if r not in todo:
                    continue
                pos = self._kl_positions(r)
                if not pos:
                    self._teacher[r] = None
                    continue
                logp = torch.log_softmax(head(hidden[b, pos]).float(), dim=-1)
                top = logp.topk(self.settings.kl_topk, dim=-1)
                self._teacher[r] = (torch.tensor(pos), top.indices, top.values)

    def _kl(self, rows: Sequence[int], hidden: torch.Tensor, head: Any) -> torch.Tensor | None:
        """KL(base || adapted) at the KL positions, over the base's top-k tokens plus one bucket for the rest."""
        import torch

        rb, rp, ids, tlogp = [], [], [], []
        for b, r in enumerate(rows):
            entry = self._teacher.get(r)
            if entry is None:
                continue
            pos, top_ids, top_logp = entry
            rb.append(torch.full_like(pos, b))
            rp.append(pos)
            ids.append(top_ids)
            tlogp.append(top_logp)
        if not rb:
            return None
        slogp_all = torch.log_softmax(head(hidden[torch.cat(rb), torch.cat(rp)]).float(), dim=-1)
        t_logp = torch.cat(tlogp)
        s_logp = slogp_all.gather(-1, torch.cat(ids))
        t_p = t_logp.exp()
        t_rest = (1 - t_p.sum(-1)).clamp_min(1e-8)
        s_rest = (1 - s_logp.exp().sum(-1)).clamp_min(1e-8)
        kl = (t_p * (t_logp - s_logp)).sum(-1) + t_rest * (t_rest.log() - s_rest.log())
        return kl.mean()

    def run(self) -> list[StepResult]:
        """Step until ``done`` (the whole run in one call; the daemon calls ``step`` instead)."""
        results = []
        while not self.done:
            results.append(self.step())
        return results

    @contextmanager
    def adapter_enabled(self, *, train: bool = False) -> Iterator[Any]:
        """The peft model with the LoRA layers on (in train or eval mode); off again and eval mode after."""
        if self._closed:
            raise RuntimeError("the trainer is closed")
        self._peft.enable_adapters()
        self._peft.set_adapter(self._name)  # the active one, and the only one with gradients
        self._peft.train(train)
        try:
            yield self._peft
        finally:
            self._peft.train(False)
            self._peft.disable_adapters()

    def export(self) -> AdapterExport:
        """The adapter as peft saves it: ``adapter_model`` state dict (CPU copies) and ``adapter_config.json``."""
        from peft import get_peft_model_state_dict

        if self._closed:
            raise RuntimeError("the trainer is closed")
        state = get_peft_model_state_dict(self._peft, adapter_name=self._name)
        # Keys as PeftModel.save_pretrained writes them (the integration's own lack the prefix).
        state = {k if k.startswith("base_model.model.") else "base_model.model." + k: v for k, v in state.items()}
        tensors = {k: v.detach().to("cpu").clone() for k, v in state.items()}
        return AdapterExport(state_dict=tensors, config=adapter_config_dict(self.lora_config))

    def close(self) -> None:
        """Remove the LoRA layers (no merge) and restore the model's flags; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._optim.state.clear()
        model = self._peft
        # Removes this adapter only; other adapters' LoRA weights stay, and with the last one
        # transformers forgets its PEFT config too.
        model.delete_adapter(self._name)
        _restore_grad_flags(model, self._requires_grad)
        model.train(self._was_training)
        self._params = []

    def __enter__(self) -> LoraTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """Settings and sizes, for logs and reports."""
        n_chat = sum(1 for e in self.examples if e.is_chat)
        return {
            "settings": asdict(self.settings),
            "examples": len(self.examples),
            "chat_examples": n_chat,
            "text_examples": len(self.examples) - n_chat,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "trainable_params": self.trainable_params,
        }


def _grad_flags(model: Any) -> dict[str, bool]:
    """``requires_grad`` of every parameter by its base name.

    peft's LoRA wrappers rename a base weight ``x.weight`` to
    ``x.base_layer.weight``, and deleting the last adapter leaves the
    (empty) wrappers in place, so names are compared without that part.
    """
    return {n.replace(".base_layer", ""): p.requires_grad for n, p in model.named_parameters()}


def _restore_grad_flags(model: Any, flags: Mapping[str, bool]) -> None:
    for name, p in model.named_parameters():
        flag = flags.get(name.replace(".base_layer", ""))
        if flag is not None:
            p.requires_grad_(flag)


def adapter_config_dict(config: Any) -> dict[str, Any]:
    """A ``LoraConfig`` as the JSON object peft writes to ``adapter_config.json``."""
    raw: Mapping[str, Any] = config.to_dict()
    return {k: _jsonable(v) for k, v in raw.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, str | int | float | bool):  # enums
        return value.value
    return value


@contextmanager
def attached_adapter(lm: LoadedModel, adapter: AdapterExport) -> Iterator[Any]:
    """``lm.model`` with an exported adapter loaded and active, in eval mode; deleted again on exit.

    The round trip of ``export``, the way ``memosd.runtime.adapters`` loads an
    adapter: a ``LoraConfig`` from the config dict and transformers'
    ``load_adapter`` with the state dict (keys with or without peft's
    ``base_model.model.`` prefix). Other adapters on the model are left alone.
    """
    from peft import LoraConfig

    model: Any = lm.model
    was_training = bool(model.training)
    flags = _grad_flags(model)
    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in adapter.config.items() if k in known and k != "peft_type"})
    config.inference_mode = True
    tensors = {k.removeprefix("base_model.model."): v for k, v in adapter.state_dict.items()}
    name = f"memosd_eval_{secrets.token_hex(4)}"
    model.load_adapter(adapter_name=name, peft_config=config, adapter_state_dict=tensors)
    try:
        model.set_adapter(name)
        model.enable_adapters()
        model.train(False)
        yield model
    finally:
        model.delete_adapter(name)
        _restore_grad_flags(model, flags)
        model.train(was_training)


PEFT_PREFIX = "base_model.model."  # how peft names the keys of a saved adapter


def serialize(exported: Any, loaded: LoadedModel) -> tuple[bytes, bytes]:
    """adapter_config.json and adapter_model.safetensors bytes, as PeftModel.save_pretrained writes them.

    Here, beside the trainer, because it is torch work (a Train job runs it on the worker)."""
    from safetensors.torch import save

    config = dict(exported.config)
    config["base_model_name_or_path"] = loaded.name
    tensors = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v.contiguous()
               for k, v in exported.state_dict.items()}
    return json.dumps(config, indent=2, sort_keys=True).encode(), save(tensors, metadata={"format": "pt"})
