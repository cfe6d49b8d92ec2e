"""kernel/timeref.py: relative time expressions resolved against when they were said; dates a query names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from memosd.kernel.memory_text import memory_text
from memosd.kernel.timeref import Period, annotate, query_periods, resolve


def ns(year: int, month: int, day: int, hour: int = 13) -> int:
    return int(datetime(year, month, day, hour, 56, tzinfo=UTC).timestamp()) * 1_000_000_000


MONDAY_8_MAY_2023 = ns(2023, 5, 8)


@pytest.mark.parametrize(("text", "meaning"), [
    ("I went to a support group yesterday", "7 May 2023"),
    ("we met last night", "7 May 2023"),
    ("see you tomorrow", "9 May 2023"),
    ("the day before yesterday", "6 May 2023"),
    ("the day after tomorrow we fly", "10 May 2023"),
    ("Last week was hard", "the week of 1 May 2023"),
    ("two weeks ago I ran a race", "the week of 24 April 2023"),
    ("3 days ago", "5 May 2023"),
    ("last Friday I painted", "5 May 2023"),
    ("next Friday", "12 May 2023"),
    ("last month", "April 2023"),
    ("next month we move", "June 2023"),
    ("last year we went camping", "2022"),
    ("a few years ago", "2020"),
    ("this weekend", "the weekend of 13 May 2023"),
    ("last weekend", "the weekend of 6 May 2023"),
])
def test_relative_expressions_resolve_against_the_time_they_were_said(text: str, meaning: str) -> None:
    [(_, got)] = resolve(text, MONDAY_8_MAY_2023)
    assert got == meaning


def test_resolution_crosses_month_and_year_ends_and_needs_a_time() -> None:
    assert resolve("yesterday", ns(2023, 1, 1)) == [("yesterday", "31 December 2022")]
    assert resolve("last month and next month", ns(2023, 1, 15)) == [("last month", "December 2022"),
                                                                      ("next month", "February 2023")]
    assert resolve("yesterday", 0) == []  # no time: nothing to resolve against
    assert resolve("nothing relative here, just May", MONDAY_8_MAY_2023) == []


def test_the_memory_text_of_a_turn_carries_the_resolved_dates() -> None:
    text = "I went to a support group yesterday, and last week too"
    assert annotate(text, MONDAY_8_MAY_2023) == f"{text} [yesterday: 7 May 2023; last week: the week of 1 May 2023]"
    assert memory_text(text, "Caroline", MONDAY_8_MAY_2023) == (
        f"Caroline: {text} [yesterday: 7 May 2023; last week: the week of 1 May 2023]")
    assert memory_text("plain note yesterday", "", MONDAY_8_MAY_2023) == "plain note yesterday"  # not a turn
    assert memory_text("hello", "Caroline", MONDAY_8_MAY_2023) == "Caroline: hello"


def test_a_query_names_days_months_and_years() -> None:
    assert query_periods("What did Gina find on 1 February, 2023?") == [Period(2023, 2, 1)]
    assert query_periods("on May 23, 2023 and October 13th, 2023") == [Period(2023, 5, 23), Period(2023, 10, 13)]
    assert query_periods("What did Maria donate in December 2023?") == [Period(2023, 12)]
    assert query_periods("trips to the beach in 2023") == [Period(2023)]
    assert query_periods("When did Melanie go camping in June?") == [Period(0, 6)]
    assert query_periods("What may she do?") == []  # "may" the verb is no month
    june = Period(0, 6)
    assert june.contains(ns(2022, 6, 30)) and june.contains(ns(2023, 6, 1)) and not june.contains(ns(2023, 7, 1))
    assert Period(2023, 5, 7).contains(ns(2023, 5, 7, 23)) and not Period(2023, 5, 7).contains(ns(2023, 5, 8, 0))
