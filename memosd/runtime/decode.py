"""Token selection and streamed text: the pieces of a decode loop that are not the model.

``Sampler`` picks the next token from last-position logits: greedy at
temperature 0, otherwise temperature plus nucleus (top-p) sampling from a
seeded generator, so a request with a seed is reproducible. ``TextStream``
turns generated token ids into text deltas: it decodes the whole completion
each step (a token may be half of a UTF-8 character, and tokenizers merge
spaces across tokens), holds back an incomplete character, and holds back any
tail that could be the start of a stop string, so a stop string is never
streamed before it is known to be one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Sampler:
    def __init__(self, *, temperature: float, top_p: float, seed: int, device: Any) -> None:
        import torch

        self.temperature = temperature
        self.top_p = top_p if 0 < top_p < 1 else 1.0
        self.seed = seed or secrets.randbits(63)
        self._generator: torch.Generator | None = None
        if temperature > 0:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self._generator is None

    def pick(self, logits: torch.Tensor) -> int:
        """The next token id from a 1-D tensor of logits."""
        import torch

        if self._generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            choice = torch.multinomial(sorted_probs, 1, generator=self._generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self._generator))


class TextStream:
    """Incremental detokenization with stop strings."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stops if s]
        self._ids: list[int] = []
        self._emitted = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to stream (maybe empty)."""
        self._ids.append(token_id)
        self.text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        end = len(self.text)
        hit = self._first_stop()
        if hit is not None:
            self.text = self.text[:hit]
            self.stopped = True
            end = hit
        else:
            if self.text.endswith("\ufffd"):  # half a character: wait for the rest
                end -= 1
            end -= self._stop_prefix_len(self.text[:end])
        return self._emit(max(end, self._emitted))

    def flush(self) -> str:
        """The held-back tail, at the end of generation (unless a stop string cut it)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _first_stop(self) -> int | None:
        # Only text after what was streamed can hold a new stop (minus its length, for straddling).
        longest = max((len(s) for s in self._stops), default=0)
        start = max(0, self._emitted - longest)
        found = [i for s in self._stops if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
