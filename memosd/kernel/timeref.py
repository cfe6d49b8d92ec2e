"""Time as memory: relative expressions in a turn resolved against the turn's time, and the dates a query names.

A turn says "yesterday" or "last week" relative to when it was said, a time no
index sees: asked "what did Caroline do on 7 May 2023?", BM25 cannot match
"I went to a support group yesterday" said on 8 May. ``resolve`` turns each
relative expression into the date or period it means (in UTC, from the turn's
event time), and ``annotate`` renders them as "[yesterday: 7 May 2023]" for
the memory text (kernel/memory_text.py), so the indexes and the model see the
resolved date. The resolution is a pure function of the stored text and event
time, so every reader (indexes, recovery, the memory block, training) derives
the same dates and nothing more needs storing: like the turn links, it cannot
go stale.

``query_periods`` finds the absolute dates and periods a query names
("on 7 May 2023", "in May 2023", "in June", "in 2022"); Search ranks the
items whose event time falls in one of them higher (kernel/search.py).

English only; an expression it does not know is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10, "a couple of": 2, "couple of": 2, "a few": 3, "few": 3}


def _day(d: date) -> str:
    return f"{d.day} {MONTHS[d.month - 1].capitalize()} {d.year}"


def _month(year: int, month: int) -> str:
    return f"{MONTHS[month - 1].capitalize()} {year}"


def _add_months(d: date, months: int) -> tuple[int, int]:
    index = d.year * 12 + d.month - 1 + months
    return index // 12, index % 12 + 1


def _week_of(d: date) -> str:
    monday = d - timedelta(days=d.weekday())
    return f"the week of {_day(monday)}"


_UNIT = r"(day|week|month|year)s?"
_COUNT = r"(\d+|a couple of|couple of|a few|few|an?|one|two|three|four|five|six|seven|eight|nine|ten)"
_RELATIVE = re.compile(
    r"\b(the day before yesterday|the day after tomorrow|yesterday|today|tonight|tomorrow|last night"
    rf"|(?:last|this|next) (?:week|weekend|month|year|{'|'.join(WEEKDAYS)})"
    rf"|{_COUNT} {_UNIT} ago)\b",
    re.IGNORECASE,
)


def _meaning(phrase: str, on: date) -> str | None:
    p = phrase.lower()
    fixed = {"the day before yesterday": -2, "yesterday": -1, "last night": -1, "today": 0, "tonight": 0,
             "tomorrow": 1, "the day after tomorrow": 2}
    if p in fixed:
        return _day(on + timedelta(days=fixed[p]))
    ago = re.fullmatch(rf"{_COUNT} {_UNIT} ago", p)
    if ago:
        n = int(ago.group(1)) if ago.group(1).isdigit() else _NUMBERS[ago.group(1)]
        unit = ago.group(2)
        if unit == "day":
            return _day(on - timedelta(days=n))
        if unit == "week":
            return _week_of(on - timedelta(weeks=n))
        if unit == "month":
            return _month(*_add_months(on, -n))
        return str(on.year - n)
    which, what = p.split(" ", 1)
    step = {"last": -1, "this": 0, "next": 1}[which]
    if what == "week":
        return _week_of(on + timedelta(weeks=step))
    if what == "weekend":
        saturday = on + timedelta(days=(5 - on.weekday()) % 7)  # this weekend: the coming (or current) one
        if on.weekday() == 6:
            saturday = on - timedelta(days=1)
        saturday += timedelta(weeks=step)
        return f"the weekend of {_day(saturday)}"
    if what == "month":
        return _month(*_add_months(on, step))
    if what == "year":
        return str(on.year + step)
    weekday = WEEKDAYS.index(what)
    if step < 0:  # the latest such day before ``on``
        return _day(on - timedelta(days=(on.weekday() - weekday - 1) % 7 + 1))
    if step > 0:  # the first such day after ``on``
        return _day(on + timedelta(days=(weekday - on.weekday() - 1) % 7 + 1))
    return _day(on + timedelta(days=weekday - on.weekday()))  # this <weekday>: in the current week


def resolve(text: str, event_ns: int) -> list[tuple[str, str]]:
    """The relative time expressions of ``text`` and what each means at ``event_ns`` (UTC), in order,
    without repeats: ``[("yesterday", "7 May 2023"), ("last week", "the week of 1 May 2023")]``."""
    if event_ns <= 0:
        return []
    on = datetime.fromtimestamp(event_ns / 1e9, tz=UTC).date()
    out: list[tuple[str, str]] = []
    for match in _RELATIVE.finditer(text):
        phrase = match.group(0).lower()
        meaning = _meaning(phrase, on)
        if meaning is not None and (phrase, meaning) not in out:
            out.append((phrase, meaning))
    return out


def annotate(text: str, event_ns: int) -> str:
    """``text`` followed by what its relative time expressions mean ("... yesterday [yesterday: 7 May
    2023]"); ``text`` itself when it has none."""
    resolved = resolve(text, event_ns)
    if not resolved:
        return text
    return f"{text} [" + "; ".join(f"{phrase}: {meaning}" for phrase, meaning in resolved) + "]"


@dataclass(frozen=True)
class Period:
    """A date or period a query names: a day, a month (of one year, or of any year when ``year`` is 0),
    or a year."""

    year: int = 0
    month: int = 0  # 1-12; 0: the whole year
    day: int = 0  # 0: the whole month

    def contains(self, event_ns: int) -> bool:
        d = datetime.fromtimestamp(event_ns / 1e9, tz=UTC).date()
        return ((not self.year or d.year == self.year) and (not self.month or d.month == self.month)
                and (not self.day or d.day == self.day))


_MONTH = "|".join(MONTHS)
_YEAR = r"(?:19|20)\d\d"
_QUERY_DATES = re.compile(
    rf"\b(?:(?P<d1>\d{{1,2}})(?:st|nd|rd|th)? (?P<m1>{_MONTH}),? (?P<y1>{_YEAR})"  # 7 May 2023, 1 February, 2023
    rf"|(?P<m2>{_MONTH}) (?P<d2>\d{{1,2}})(?:st|nd|rd|th)?,? (?P<y2>{_YEAR})"  # May 7, 2023
    rf"|(?P<m3>{_MONTH}),? (?P<y3>{_YEAR})"  # May 2023
    rf"|(?P<y4>{_YEAR})"  # 2023
    rf"|(?<=in )(?P<m4>{_MONTH}))\b",  # in June (any year); a bare "may" is too often the verb
    re.IGNORECASE,
)


def query_periods(query: str) -> list[Period]:
    """The absolute dates and periods ``query`` names, in order (empty: it names none)."""
    out: list[Period] = []
    for match in _QUERY_DATES.finditer(query):
        g = {k: v for k, v in match.groupdict().items() if v}
        month_name = g.get("m1") or g.get("m2") or g.get("m3") or g.get("m4")
        month = MONTHS.index(month_name.lower()) + 1 if month_name else 0
        year = int(g.get("y1") or g.get("y2") or g.get("y3") or g.get("y4") or 0)
        day = int(g.get("d1") or g.get("d2") or 0)
        if day > 31:
            continue
        period = Period(year, month, day)
        if period not in out:
            out.append(period)
    return out
