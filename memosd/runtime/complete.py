"""Greedy chat completion on the in-process model, for the MemReader's extractor, in short steps.

Greedy (deterministic: the same turns give the same answer), bounded in new tokens, on the base model
(the caller puts the adapter pool in its base state before each step). The chat goes through
``chat_token_ids``, so a turn's text is encoded as text and cannot forge the template's control tokens.

Why steps: one prompt's whole answer is ~30 s of SmolLM2 on a CPU, and the runtime worker runs one task at a
time, so a prompt done in one task would hold every Generate behind it. ``GreedyDecode.step`` does one
prefill chunk, or a few tokens, and the caller hands each step to the worker as its own task (as
runtime/transformers_engine.py does for Generate), so other callers' tasks interleave between steps; the
caller may also stop between steps. Its tensors are touched only inside ``step``, i.e. on the worker.

With ``schema`` (a JSON schema's text) the decode is constrained to it (runtime/grammar.py): each pick is
the likeliest token the schema allows next, and the answer ends once its value is whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memosd.runtime.grammar import JsonConstraint
from memosd.runtime.model import LoadedModel
from memosd.runtime.tokens import chat_token_ids, encode_text

PREFILL_CHUNK = 256  # prompt tokens one step encodes (~1 s of SmolLM2 on a CPU)
TOKENS_PER_STEP = 4  # new tokens one step decodes (~0.3 s of SmolLM2 on a CPU)


class PromptTooLong(Exception):
    """The chat and its answer budget do not fit in the model's context."""


class GreedyDecode:
    """The model's answer to ``messages`` ((role, content) pairs), greedy, at most ``max_new_tokens``, built by
    calling ``step`` until ``done``; with ``prefix``, the answer is made to start with it (its tokens follow the
    prompt, and ``text`` returns it too): "[" keeps a small model on a JSON array instead of a preamble; with
    ``schema`` the answer is held to that JSON schema (no prefix is needed then: the schema says how it
    starts). Raises PromptTooLong at once when the prompt and the budget exceed the model's context."""

    def __init__(self, loaded: LoadedModel, messages: Sequence[tuple[str, str]], max_new_tokens: int,
                 prefix: str = "", *, schema: str = "", prefill_chunk: int = PREFILL_CHUNK,
                 tokens_per_step: int = TOKENS_PER_STEP) -> None:
        if prefix and schema:
            raise ValueError("a constrained answer starts as its schema says: give a prefix or a schema")
        ids = chat_token_ids(loaded.tokenizer, [{"role": r, "content": c} for r, c in messages],
                             generation_prompt=True)
        ids += encode_text(loaded.tokenizer, prefix) if prefix else []
        if len(ids) + max_new_tokens > loaded.context_length:
            raise PromptTooLong(f"{len(ids)} prompt tokens + {max_new_tokens} > {loaded.context_length}")
        self._loaded, self._prefix, self._budget = loaded, prefix, max_new_tokens
        self._prefill_chunk, self._tokens_per_step = prefill_chunk, tokens_per_step
        self._pending = ids  # prompt tokens not yet encoded
        self._cache: Any = None  # transformers' DynamicCache, made on the worker at the first step
        self._next: int | None = None  # the token picked last, not yet fed to the model
        self._out: list[int] = []
        self._constraint = JsonConstraint(loaded.tokenizer, _vocab_size(loaded), schema) if schema else None
        self.steps = 0
        self.done = max_new_tokens <= 0

    def step(self) -> None:
        """One prefill chunk, or up to ``tokens_per_step`` new tokens (on the worker thread)."""
        import torch
        from transformers import DynamicCache

        if self.done:
            return
        model: Any = self._loaded.model
        eos = self._loaded.tokenizer.eos_token_id
        self.steps += 1
        with torch.inference_mode():
            if self._cache is None:
                self._cache = DynamicCache()
            if self._pending:
                piece, self._pending = self._pending[:self._prefill_chunk], self._pending[self._prefill_chunk:]
                logits = self._forward(model, piece)
                if not self._pending:
                    self._pick(self._choose(logits), eos)
                return
            for _ in range(self._tokens_per_step):
                if self.done or self._next is None:
                    return
                logits = self._forward(model, [self._next])
                self._pick(self._choose(logits), eos)

    def _choose(self, logits: Any) -> int:
        """The greedy pick: the likeliest token, of those the schema allows next when there is one."""
        if self._constraint is None:
            return int(logits.argmax())
        token = int(self._constraint.mask(logits).argmax())
        self._constraint.accept(token)
        return token

    def _forward(self, model: Any, tokens: list[int]) -> Any:
        import torch

        piece = torch.tensor([tokens], dtype=torch.long, device=model.device)
        out = model(input_ids=piece, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def _pick(self, token: int, eos: int | None) -> None:
        """Take the picked token: the end at the end-of-text token or at the budget."""
        if token == eos:
            self._finish()
            return
        self._out.append(token)
        self._next = token
        if len(self._out) >= self._budget:
            self._finish()

    def _finish(self) -> None:
        self.done, self._next, self._cache = True, None, None  # the KV cache is freed at once

    @property
    def new_tokens(self) -> list[int]:
        """The answer's token ids so far (the prefix's aside; no end-of-text token)."""
        return list(self._out)

    def text(self) -> str:
        return self._prefix + str(self._loaded.tokenizer.decode(self._out, skip_special_tokens=True))


def _vocab_size(loaded: LoadedModel) -> int:
    """The rows of the model's logits (its config's vocabulary; the tokenizer's may be shorter)."""
    size = getattr(loaded.structure.config, "vocab_size", None)
    return int(size) if size else len(loaded.tokenizer)


def greedy_complete(loaded: LoadedModel, messages: Sequence[tuple[str, str]], max_new_tokens: int,
                    prefix: str = "", *, schema: str = "") -> str:
    """The whole answer in one call (on the worker thread): ``GreedyDecode`` stepped to its end."""
    decode = GreedyDecode(loaded, messages, max_new_tokens, prefix, schema=schema)
    while not decode.done:
        decode.step()
    return decode.text()
