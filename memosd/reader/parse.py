"""Strict parsing of an extractor's answer: an exact schema, bounded sizes, nothing guessed.

The answer must be one JSON array (surrounding whitespace aside) of at most ``MAX_EXTRACTED_ITEMS`` objects,
each with exactly the keys ``kind``, ``text``, ``date`` and ``sources``:

- ``kind``: "fact", "preference" or "event";
- ``text``: a string, not blank, at most ``MAX_EXTRACTED_TEXT_CHARS`` characters, printable (newlines
  aside, no control characters);
- ``date``: null or a real calendar day "YYYY-MM-DD";
- ``sources``: a non-empty list of at most ``MAX_EXTRACTED_SOURCES`` strings, each the ref of a turn the
  prompt showed (repeats collapse).

No repair is attempted (no code fences stripped, no trailing text skipped, no key renamed): an answer a
repair would rescue is one the model did not give, and storing a guess at it is what this step exists to
prevent. A whole answer that fails counts once in ``answers_dropped`` (``not_json``, ``not_array``,
``too_large``); an element that fails is dropped and counted by its first failing rule; elements past the
bound count as ``too_many``. Bounds live in kernel/validate.py.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from memosd.kernel import validate
from memosd.reader.types import ITEM_KINDS, Candidate

KEYS = frozenset({"kind", "text", "date", "sources"})
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass
class Parsed:
    candidates: list[Candidate] = field(default_factory=list)
    proposed: int = 0  # elements of the array (0 when the answer itself was dropped)
    dropped: Counter[str] = field(default_factory=Counter)  # element reason -> count
    answer_dropped: str = ""  # why the whole answer was dropped; "" when it was an array


class _DuplicateKeys(dict[str, Any]):
    """An object that named a key twice (json.loads keeps the last silently; we refuse it)."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    return _DuplicateKeys(pairs) if len(set(keys)) != len(keys) else dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_answer(answer: str, refs: Mapping[str, str]) -> Parsed:
    """The candidates in ``answer``; ``refs`` maps each prompt ref ("t1") to its turn's item id."""
    out = Parsed()
    if len(answer.encode()) > validate.MAX_EXTRACT_OUTPUT_BYTES:
        out.answer_dropped = "too_large"
        return out
    try:
        value = json.loads(answer, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting a RecursionError
        out.answer_dropped = "not_json"
        return out
    if not isinstance(value, list):
        out.answer_dropped = "not_array"
        return out
    out.proposed = len(value)
    for position, element in enumerate(value):
        if position >= validate.MAX_EXTRACTED_ITEMS:
            out.dropped["too_many"] += 1
            continue
        candidate, reason = _element(element, refs)
        if candidate is None:
            out.dropped[reason] += 1
        else:
            out.candidates.append(candidate)
    return out


def _element(element: object, refs: Mapping[str, str]) -> tuple[Candidate | None, str]:
    if not isinstance(element, dict):
        return None, "not_object"
    if isinstance(element, _DuplicateKeys):
        return None, "duplicate_key"
    keys = set(element)
    if keys - KEYS:
        return None, "unknown_key"
    if KEYS - keys:
        return None, "missing_key"
    kind, text, day, sources = element["kind"], element["text"], element["date"], element["sources"]
    if not isinstance(kind, str) or kind not in ITEM_KINDS:
        return None, "bad_kind"
    if (not isinstance(text, str) or not text.strip() or len(text) > validate.MAX_EXTRACTED_TEXT_CHARS
            or not text.replace("\n", " ").isprintable()):
        return None, "bad_text"
    day_ok, parsed_day = _day(day)
    if not day_ok:
        return None, "bad_date"
    if (not isinstance(sources, list) or not sources or len(sources) > validate.MAX_EXTRACTED_SOURCES
            or not all(isinstance(s, str) for s in sources)):
        return None, "bad_sources"
    if any(s not in refs for s in sources):
        return None, "unknown_source"
    item_ids = tuple(dict.fromkeys(refs[s] for s in sources))
    return Candidate(kind, text.strip(), parsed_day, item_ids), ""  # ``in ITEM_KINDS`` narrowed kind


def _day(value: object) -> tuple[bool, date | None]:
    """(whether ``value`` is null or a real day "YYYY-MM-DD", that day or None)."""
    if value is None:
        return True, None
    if not isinstance(value, str) or not _DATE.match(value):
        return False, None
    try:
        return True, date.fromisoformat(value)
    except ValueError:  # "2023-02-30"
        return False, None
