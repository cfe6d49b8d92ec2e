"""The MemReader's plain values: the turns it reads, the items an extractor proposes, and the counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

ItemKind = Literal["fact", "preference", "event"]
ITEM_KINDS: tuple[ItemKind, ...] = ("fact", "preference", "event")
KIND_TAG_PREFIX = "kind:"  # a derived item's kind is its tag "kind:<kind>" (filterable in Search)
# Speakers whose turns are context, not memory: a model's own replies (the speaker Generate's remember step
# gives them, services/remember.py). They are shown in the prompt, so a user's "yes" can be read, but they
# support no item: every word of a reply ("I'm sorry for your loss.") is in the reply, so a copy of it would
# pass the support check and be stored as the user's memory.
CONTEXT_SPEAKERS = frozenset({"assistant"})


def is_context(speaker: str) -> bool:
    """Whether a turn by ``speaker`` is context only (CONTEXT_SPEAKERS, case aside)."""
    return speaker.casefold() in CONTEXT_SPEAKERS


@dataclass(frozen=True)
class SourceTurn:
    """One conversation turn as the reader sees it; ``ref`` is its short name in the prompt ("t1")."""

    ref: str
    item_id: str
    speaker: str
    text: str
    event_ns: int


@dataclass(frozen=True)
class Candidate:
    """An item an extractor proposed that parsed: the schema held, every source is a given turn."""

    kind: ItemKind
    text: str
    date: date | None
    sources: tuple[str, ...]  # item ids of the source turns, in the order given, without repeats


@dataclass
class Counts:
    """What one read did to the extractor's output, by reason: every proposed item lands in exactly one of
    kept / dropped / refused, so ``proposed == kept + sum(dropped) + sum(refused)``. An answer that is not a
    JSON array of at most the bounded size proposes nothing and counts once in ``answers_dropped``."""

    turns: int = 0
    prompts: int = 0
    proposed: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # did not parse: reason -> count
    refused: Counter[str] = field(default_factory=Counter)  # parsed, but not supported by its sources
    answers_dropped: Counter[str] = field(default_factory=Counter)  # whole answers: reason -> count

    def merge(self, other: Counts) -> None:
        self.turns += other.turns
        self.prompts += other.prompts
        self.proposed += other.proposed
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.refused.update(other.refused)
        self.answers_dropped.update(other.answers_dropped)

    @property
    def balanced(self) -> bool:
        return self.proposed == self.kept + sum(self.dropped.values()) + sum(self.refused.values())
