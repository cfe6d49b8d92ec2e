"""JSON-schema-constrained greedy decoding on the transformers engine (xgrammar's matcher and token bitmask).

The vllm engine constrains decoding itself (``Sampling.json_schema`` -> vLLM's structured outputs, which
uses xgrammar too); this is the same constraint for runtime/complete.GreedyDecode, which decodes the
MemReader's prompts on transformers weights. Before each pick the logits of every token the schema does not
allow next are set to -inf; the picked token is then fed to the matcher. When the schema's value is complete
the only allowed token is the end of text, so a constrained answer ends as soon as it is whole.

Compiled grammars are cached per (tokenizer, schema text): the MemReader asks for at most
``MAX_TURNS_PER_PROMPT`` distinct schemas (one per number of turns in a prompt).
"""

from __future__ import annotations

import threading
from typing import Any

_CACHE_SIZE = 64
_lock = threading.Lock()
_infos: dict[int, tuple[Any, Any]] = {}  # id(tokenizer) -> (tokenizer, xgrammar.GrammarCompiler)
_compiled: dict[tuple[int, str], Any] = {}  # (id(tokenizer), schema text) -> xgrammar.CompiledGrammar


def _compile(tokenizer: Any, vocab_size: int, schema: str) -> Any:
    import xgrammar

    with _lock:
        held = _infos.get(id(tokenizer))
        if held is None or held[0] is not tokenizer:
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            held = (tokenizer, xgrammar.GrammarCompiler(info))
            _infos[id(tokenizer)] = held
            _compiled.clear()  # keyed by the id of a tokenizer that may be gone
        key = (id(tokenizer), schema)
        grammar = _compiled.get(key)
        if grammar is None:
            # One line, ", " and ": " between elements: the compact form the prompt's worked example shows.
            grammar = held[1].compile_json_schema(schema, any_whitespace=False)
            if len(_compiled) >= _CACHE_SIZE:
                _compiled.clear()
            _compiled[key] = grammar
        return grammar


class JsonConstraint:
    """One answer's constraint: ``mask`` the logits before a pick, ``accept`` the token picked."""

    def __init__(self, tokenizer: Any, vocab_size: int, schema: str) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(_compile(tokenizer, vocab_size, schema))
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    def mask(self, logits: Any) -> Any:
        """``logits`` (1-D, the vocabulary) with every token the schema does not allow next at -inf."""
        import xgrammar

        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.float().unsqueeze(0)
        if row.shape[-1] > self._vocab_size:  # padding rows of the embedding: never allowed
            row[:, self._vocab_size:] = float("-inf")
        xgrammar.apply_token_bitmask_inplace(row, self._bitmask.to(row.device), vocab_size=self._vocab_size)
        return row[0]

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} is not allowed by the answer's schema")  # the mask picked it
