"""Reconcile planning (pure): what a run's supported candidates do to the cube's derived items.

Each candidate is compared with the cube's derived items of the same kind (and with what this run already
planned, so two turns saying the same thing add it once, and a later turn wins over an earlier one) on their
content words (words.py): ``old`` and ``new`` word sets, ``shared`` = old & new.

- **duplicate**: the same words (order and inflection aside), or the candidate says less than an item that
  already holds all its words, or (with vectors) a cosine of at least ``NEAR_DUPLICATE_COSINE`` to one:
  nothing is written;
- the rest compare only with items about the same **subject**, defined simply and stated as such: the same
  first content word (the subject of a third-person sentence, "Caroline ...") and at least
  ``FRAME_SHARE`` of the two word sets' union shared (the same statement frame);
- **restatement**: the candidate holds every word of the item and more (it adds detail): the item gets a new
  version with the candidate's text; its sources are the union of both (a purge of either turn removes it);
- **contradiction**: each side has words the other lacks (the same frame with a different value: "Caroline's
  favourite colour is blue" / "... green"), for facts and preferences only: the old item is retired (forgotten
  at this revision; still readable at older ones) and the candidate added. Two events with different details
  are both kept: events accumulate, so that shape means "another event", not a contradiction;
- anything else is added.

Honest limits: a contradiction stated with no shared frame ("Caroline moved to Paris" after "Caroline lives
in Rome") is not seen and both are kept; a paraphrase with different words is added beside the item unless the
vectors call it a near duplicate. Among several items of the subject, the one with the highest cosine (with
vectors) or share of words is compared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from memosd.reader.types import Candidate, ItemKind
from memosd.reader.words import content_words

FRAME_SHARE = 0.5
NEAR_DUPLICATE_COSINE = 0.98


@dataclass(frozen=True)
class Existing:
    """A derived item the cube holds now (at the mount's revision)."""

    item_id: str
    kind: ItemKind
    text: str
    sources: tuple[str, ...]
    vector: np.ndarray | None = None


@dataclass
class ReconcilePlan:
    adds: list[Candidate] = field(default_factory=list)
    updates: list[tuple[str, Candidate]] = field(default_factory=list)  # (item id, its new content)
    retires: list[str] = field(default_factory=list)  # item ids forgotten (each replaced by one of ``adds``)
    # One per candidate: add, update, retire (an existing item), duplicate, merged / superseded (into or over
    # an item this run adds: a restatement or a contradiction of it).
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class _Entry:
    """What a candidate is compared with: an existing item (``item_id``) or one this run adds (``add``)."""

    kind: ItemKind
    words: list[str]
    sources: tuple[str, ...]
    vector: np.ndarray | None
    item_id: str = ""
    add: int = -1  # index into the run's adds
    live: bool = True


def _cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na and nb else 0.0


def relation(kind: ItemKind, old: Sequence[str], new: Sequence[str], cosine: float = 0.0) -> str:
    """How a candidate's words ``new`` relate to an item's ``old`` of the same ``kind``: "duplicate",
    "restatement", "contradiction" or "" (unrelated)."""
    a, b = set(old), set(new)
    if a == b or cosine >= NEAR_DUPLICATE_COSINE:
        return "duplicate"
    if not a or not b:
        return ""
    if b <= a and old[0] == new[0]:
        return "duplicate"  # it says less than the item already does
    if old[0] != new[0] or len(a & b) / len(a | b) < FRAME_SHARE:
        return ""
    if a < b:
        return "restatement"
    return "contradiction" if kind in ("fact", "preference") else ""


def plan(candidates: Sequence[Candidate], existing: Sequence[Existing],
         vectors: np.ndarray | None = None) -> ReconcilePlan:
    """The plan for ``candidates`` (in the order their turns were said: later ones win) against
    ``existing``; ``vectors`` are the candidates' embeddings (row per candidate), to be compared with the
    existing items' ``vector``."""
    out = ReconcilePlan()
    pool = [_Entry(e.kind, content_words(e.text), e.sources, e.vector, item_id=e.item_id) for e in existing]
    updated: dict[str, Candidate] = {}
    for i, candidate in enumerate(candidates):
        words = content_words(candidate.text)
        vector = None if vectors is None else vectors[i]
        best: tuple[int, float, float, _Entry] | None = None  # (rank of relation, cosine, share, entry)
        for entry in pool:
            if not entry.live or entry.kind != candidate.kind:
                continue
            cos = _cosine(entry.vector, vector)
            rel = relation(candidate.kind, entry.words, words, cos)
            if not rel:
                continue
            share = len(set(entry.words) & set(words)) / max(1, len(set(entry.words) | set(words)))
            rank = ("contradiction", "restatement", "duplicate").index(rel)  # a duplicate wins over the rest
            key = (rank, cos, share, entry)
            if best is None or key[:3] > best[:3]:
                best = key
        if best is None:
            _add(out, pool, candidate, words, vector)
            out.outcomes["add"] += 1
            continue
        rank, _, _, entry = best
        rel = ("contradiction", "restatement", "duplicate")[rank]
        if rel == "duplicate":
            out.outcomes["duplicate"] += 1
            continue
        # On an existing item: "update" / "retire"; on one this run planned: "merged" / "superseded".
        out.outcomes[{("restatement", True): "update", ("contradiction", True): "retire",
                      ("restatement", False): "merged", ("contradiction", False): "superseded"}[
                          rel, bool(entry.item_id)]] += 1
        if rel == "restatement":
            merged = replace(candidate, sources=tuple(dict.fromkeys((*entry.sources, *candidate.sources))))
            entry.words, entry.sources, entry.vector = words, merged.sources, vector
            if entry.item_id:
                updated[entry.item_id] = merged
            else:
                out.adds[entry.add] = merged
            continue
        # A contradiction: the later statement replaces the earlier one.
        entry.live = False
        if entry.item_id:
            updated.pop(entry.item_id, None)
            out.retires.append(entry.item_id)
            _add(out, pool, candidate, words, vector)
        else:  # planned in this run: the earlier turn's statement is superseded before it is ever stored
            out.adds[entry.add] = candidate
            pool.append(_Entry(candidate.kind, words, candidate.sources, vector, add=entry.add))
    out.updates = list(updated.items())
    return out


def _add(out: ReconcilePlan, pool: list[_Entry], candidate: Candidate, words: list[str],
         vector: np.ndarray | None) -> None:
    out.adds.append(candidate)
    pool.append(_Entry(candidate.kind, words, candidate.sources, vector, add=len(out.adds) - 1))
