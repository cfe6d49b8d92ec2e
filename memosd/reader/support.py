"""The support check: an extracted item is kept only if its source turns say it.

The rule: at least ``SUPPORT_THRESHOLD`` (0.8) of the item's content words (kernel-independent, see words.py:
lowercased, stemmed, function words dropped, negations kept) must occur among the content words of its
source turns, read as memory (``"<speaker>: <words> [yesterday: 7 May 2023]"``, kernel/memory_text.py) plus
each turn's own date; an item with no content word at all is refused too. An item's ``date``, when given,
must be a day the sources name: a turn's own date, a relative expression timeref resolves to one day
("yesterday", "last Friday"), or an absolute day written in a turn. A period ("last week", "in May") names
no single day, so a day inside it is a guess and is refused. Only the user's side counts: a turn by a context
speaker (the assistant, types.CONTEXT_SPEAKERS) supports no word and no day, and an item whose sources are all
such turns is refused as ``assistant_only`` (a copy of the assistant's reply is not the user's memory).
An item must also be a statement: a question ("Are they yours?") or a transcript line ("Gina: Wow, ...", a
source turn copied with its speaker) passes the word check, since every word is the turn's, yet it records
nothing the turn asserts; both are refused as ``not_a_statement``. Measured: the one item the embedded
135M model got past the word check on the LoCoMo subset was such a copy (BENCHMARKS, the MemReader).

Why this is defensible as a gate (not as a judge of truth):
- what an extractor invents (a name, a place, a number, a "not") is content words the turns do not hold, so
  an invented item falls below the share, whatever model produced it, and the check is deterministic and
  cheap enough to run on every item;
- it errs toward refusing: a fair paraphrase built from many synonyms is refused and counted, which costs a
  memory the turns still hold, while a kept fabrication would be served back as memory;
- its known blind spot is recombination: words all taken from the sources but put together into a claim
  they do not make ("Caroline adopted Melanie's dog" from two turns) pass. Items name their sources, and
  a purge of a source removes them, so such an item stays traceable and erasable.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime

from memosd.kernel import timeref
from memosd.kernel.memory_text import memory_text
from memosd.reader.types import Candidate, SourceTurn, is_context
from memosd.reader.words import content_words

# With at most 4 content words (most items), every word must be supported; 5 to 9 allow one that is not
# (an inflection the stemmer misses, a connective), 10 to 14 two. Swapping the value of a short statement
# ("... colour is green" from "my favourite colour is blue": 3 of 4) is refused.
SUPPORT_THRESHOLD = 0.8
_DAY = re.compile(r"^\d{1,2} [A-Z][a-z]+ \d{4}$")  # what timeref renders a single day as: "7 May 2023"


def _turn_day(event_ns: int) -> date | None:
    return datetime.fromtimestamp(event_ns / 1e9, tz=UTC).date() if event_ns > 0 else None


def _render_day(day: date) -> str:
    return f"{day.day} {timeref.MONTHS[day.month - 1].capitalize()} {day.year}"


def support_words(turns: Iterable[SourceTurn]) -> set[str]:
    """The content words the turns support: their memory text and their own dates."""
    words: set[str] = set()
    for turn in turns:
        words.update(content_words(memory_text(turn.text, turn.speaker, turn.event_ns)))
        day = _turn_day(turn.event_ns)
        if day is not None:
            words.update(content_words(_render_day(day)))
    return words


def supported_days(turns: Iterable[SourceTurn]) -> set[date]:
    """Every single day the turns name: their own dates, resolved relative days, absolute days written."""
    days: set[date] = set()
    for turn in turns:
        own = _turn_day(turn.event_ns)
        if own is not None:
            days.add(own)
        for _phrase, meaning in timeref.resolve(turn.text, turn.event_ns):
            if _DAY.match(meaning):
                days.add(datetime.strptime(meaning, "%d %B %Y").date())
        for period in timeref.query_periods(turn.text):
            if period.year and period.month and period.day:
                with contextlib.suppress(ValueError):  # "31 February 2023" names no day
                    days.add(date(period.year, period.month, period.day))
    return days


def share_supported(text: str, turns: Sequence[SourceTurn]) -> tuple[float, list[str]]:
    """The share of ``text``'s content words the turns support, and the words they do not (0.0 and [] when
    ``text`` has no content word)."""
    words = content_words(text)
    if not words:
        return 0.0, []
    have = support_words(turns)
    missing = [w for w in words if w not in have]
    return 1 - len(missing) / len(words), missing


def is_statement(text: str, speakers: Iterable[str]) -> bool:
    """Whether ``text`` asserts something: not a question, and not a line of the transcript (one of the
    ``speakers``' names followed by a colon)."""
    if "?" in text:
        return False
    head, colon, _rest = text.partition(":")
    return not (colon and head.strip().casefold() in {s.strip().casefold() for s in speakers if s.strip()})


def refusal(candidate: Candidate, turns: Sequence[SourceTurn]) -> str:
    """Why ``candidate`` is refused ("" when its source ``turns`` support it): ``no_content``,
    ``not_a_statement`` (a question, or a copied transcript line), ``assistant_only`` (every source is a
    context speaker's turn), ``unsupported`` (too few of its words in the user's sources) or
    ``unsupported_date``."""
    if not content_words(candidate.text):
        return "no_content"
    if not is_statement(candidate.text, (t.speaker for t in turns)):
        return "not_a_statement"
    turns = [t for t in turns if not is_context(t.speaker)]
    if not turns:
        return "assistant_only"
    share, _missing = share_supported(candidate.text, turns)
    if share < SUPPORT_THRESHOLD:
        return "unsupported"
    if candidate.date is not None and candidate.date not in supported_days(turns):
        return "unsupported_date"
    return ""
