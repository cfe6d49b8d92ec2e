"""kernel/session_match.py: BM25 of a session as one document, relative to the best session."""

from __future__ import annotations

import math

import pytest

from memosd.index.lexical import BM25_B, BM25_K1, score_adhoc
from memosd.kernel.session_match import TermCache, merge, session_scores, turn_terms

# Two sessions: in "trip" the query's words are spread over three turns, none holding them all; in "chat"
# one turn holds two of them.
TRIP = ["Sam: We went hiking on Saturday.", "Ana: Where did you go?", "Sam: Up to Lake Tahoe, the dog loved it."]
CHAT = ["Ana: My dog went hiking with the neighbours.", "Sam: Nice!", "Ana: Then we had pizza.",
        "Sam: What kind?", "Ana: Margherita, always."]
QUERY = "Where did Sam go hiking with his dog at Lake Tahoe?"


def docs() -> dict[str, list[tuple[dict[str, int], int]]]:
    return {"trip": [turn_terms(t) for t in TRIP], "chat": [turn_terms(t) for t in CHAT]}


def test_a_session_scores_as_the_bm25_of_its_turns_concatenated_relative_to_the_best() -> None:
    out = session_scores(QUERY, docs())
    # The same documents scored by the index's own BM25 (tantivy's formula over these two documents).
    reference = dict(score_adhoc(QUERY, [(0, " ".join(TRIP)), (1, " ".join(CHAT))], 2))
    assert out["trip"] == 1.0
    assert out["chat"] == pytest.approx(reference[1] / reference[0])
    assert 0.0 < out["chat"] < 1.0


def test_the_session_words_count_together_not_turn_by_turn() -> None:
    # Summed per turn, "chat"'s one turn with "dog" and "hiking" would rival "trip"; as documents, "trip"
    # holds every query word and wins by a margin.
    out = session_scores("hiking dog lake", docs())
    assert out["trip"] == 1.0 and out["chat"] < 0.7


def test_no_query_term_in_any_session_gives_no_scores() -> None:
    assert session_scores("quantum chromodynamics", docs()) == {}
    assert session_scores("", docs()) == {}
    assert session_scores(QUERY, {}) == {}


def test_length_normalization_follows_tantivy() -> None:
    one = {"a": [({"dog": 1}, 4)], "b": [({"dog": 1}, 12)], "c": [({"cat": 1}, 8)]}
    out = session_scores("dog", one)
    avgdl = 8.0
    tf_part = [1 / (1 + BM25_K1 * (1 - BM25_B + BM25_B * n / avgdl)) for n in (4, 12)]
    assert out["a"] == 1.0 and out["b"] == pytest.approx(tf_part[1] / tf_part[0])
    assert "c" not in out
    assert math.isfinite(out["b"])


def test_the_cache_checks_the_version_and_stays_bounded() -> None:
    cache = TermCache(capacity=2)
    cache.put("c", 1, "item-a", 3, ({"dog": 1}, 1))
    assert cache.get("c", 1, "item-a", 3) == ({"dog": 1}, 1)
    assert cache.get("c", 1, "item-b", 3) is None  # the vkey of another version (a cube allocated again)
    assert cache.get("c", 1, "item-a", 4) is None
    cache.put("c", 2, "item-b", 3, ({}, 0))
    cache.put("c", 3, "item-c", 3, ({}, 0))
    assert len(cache) <= 2


def test_a_sessions_merged_terms_are_kept_for_exactly_the_turns_they_came_from() -> None:
    cache = TermCache()
    turns = [turn_terms(t) for t in TRIP]
    merged = merge(turns)
    assert merged == turn_terms(" ".join(TRIP))
    signature = ((1, "item-a", 3), (2, "item-b", 3))
    cache.put_session("c", "trip", signature, merged)
    assert cache.session("c", "trip", signature) == merged
    assert cache.session("c", "trip", signature[:1]) is None  # a turn fewer (forgotten, another revision)
    assert cache.session("c", "trip", (*signature, (3, "item-c", 4))) is None  # a turn more
    assert cache.session("d", "trip", signature) is None
