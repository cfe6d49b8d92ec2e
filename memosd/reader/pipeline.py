"""One read, pure given its extractor: turns -> prompts -> answers -> parsed, supported candidates, counted.

The extractor is anything that answers a chat (``Extractor``): the in-process model on the runtime worker,
an OpenAI-compatible endpoint, or a test double. Whatever it answers goes through the same strict parse
(parse.py) and support check (support.py): the safeguards do not depend on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from memosd.kernel import validate
from memosd.reader.parse import parse_answer
from memosd.reader.prompt import extraction_messages, refs_for
from memosd.reader.schema import answer_schema
from memosd.reader.support import refusal
from memosd.reader.types import Candidate, Counts, SourceTurn


class Extractor(Protocol):
    def complete(self, messages: Sequence[tuple[str, str]], schema: Mapping[str, Any] | None = None) -> str:
        """The model's answer to a chat of (role, content) pairs; ``schema`` is the JSON schema the answer
        should follow (schema.py), which an extractor that can constrain its decoding holds it to (the
        in-process model does; an endpoint may ignore it: the answer is parsed strictly either way). Raises
        AnswerUnavailable when this prompt gets no answer (counted, the read goes on); any other error ends
        the read."""
        ...


class AnswerUnavailable(Exception):
    """One prompt got no answer (``reason``: e.g. "prompt_too_long", the model's context is too short)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    """A conversation turn to read (a committed item with a speaker)."""

    item_id: str
    speaker: str
    text: str
    event_ns: int


def chunks(turns: Sequence[Turn], size: int = validate.MAX_TURNS_PER_PROMPT) -> list[list[SourceTurn]]:
    """The turns in prompts of at most ``size``, each turn with its ref in its prompt."""
    out = []
    for start in range(0, len(turns), size):
        part = turns[start:start + size]
        refs = refs_for([t.item_id for t in part])
        out.append([SourceTurn(ref, t.item_id, t.speaker, t.text, t.event_ns) for ref, t in zip(refs, part, strict=True)])
    return out


def read_chunk(chunk: Sequence[SourceTurn], extractor: Extractor) -> tuple[list[Candidate], Counts]:
    """The supported candidates of one prompt's answer, and its counts."""
    counts = Counts(turns=len(chunk), prompts=1)
    try:
        answer = extractor.complete(extraction_messages(chunk), answer_schema([t.ref for t in chunk]))
    except AnswerUnavailable as unavailable:
        counts.answers_dropped[unavailable.reason] += 1
        return [], counts
    parsed = parse_answer(answer, {t.ref: t.item_id for t in chunk})
    if parsed.answer_dropped:
        counts.answers_dropped[parsed.answer_dropped] += 1
    counts.proposed = parsed.proposed
    counts.dropped.update(parsed.dropped)
    by_id = {t.item_id: t for t in chunk}
    kept = []
    for candidate in parsed.candidates:
        why = refusal(candidate, [by_id[s] for s in candidate.sources])
        if why:
            counts.refused[why] += 1
        else:
            kept.append(candidate)
    counts.kept = len(kept)
    return kept, counts


def read_turns(turns: Sequence[Turn], extractor: Extractor,
               progress: Callable[[Counts], None] | None = None) -> tuple[list[Candidate], Counts]:
    """Every supported candidate of ``turns``, ordered by when their latest source turn was said (so
    reconcile lets a later statement win), and the counts; ``progress`` sees the counts after each prompt
    (a job publishes them, and may raise there to stop)."""
    when = {t.item_id: t.event_ns for t in turns}
    total = Counts()
    kept: list[Candidate] = []
    for chunk in chunks(turns):
        found, counts = read_chunk(chunk, extractor)
        kept.extend(found)
        total.merge(counts)
        if progress is not None:
            progress(total)
    kept.sort(key=lambda c: max(when[s] for s in c.sources))
    return kept, total
