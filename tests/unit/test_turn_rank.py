"""kernel/turn_rank.py: the reply and session lifts over fused scores."""

from __future__ import annotations

import pytest

from memosd.kernel.turn_rank import lift


def test_the_reply_to_a_matching_turn_enters_the_ranking_with_a_share_of_its_score() -> None:
    # key 1 matches; key 2 (its reply) was found by neither list.
    out = lift({1: 1.0, 3: 0.5}, {1: "s", 2: "s", 3: "t"}, {1: 2}, next_weight=0.3, session_weight=0.0)
    assert out == {1: 1.0, 2: pytest.approx(0.3), 3: 0.5}


def test_a_session_that_matches_as_a_whole_lifts_its_turns_above_a_stray_match() -> None:
    # Three middling turns of session "a" against one slightly better turn of session "b".
    scores = {1: 0.4, 2: 0.4, 3: 0.4, 9: 0.5}
    out = lift(scores, {1: "a", 2: "a", 3: "a", 9: "b"}, {}, next_weight=0.0, session_weight=0.2, session_top=3)
    assert out[1] == pytest.approx(0.4 + 0.2 * 1.2)
    assert out[9] == pytest.approx(0.5 + 0.2 * 0.5)
    assert min(out[1], out[2], out[3]) > out[9]


def test_items_that_are_not_turns_are_untouched_and_lifts_read_the_scores_before_lifting() -> None:
    scores = {1: 1.0, 2: 0.5, 7: 0.8}
    out = lift(scores, {1: "s", 2: "s"}, {1: 2, 2: 1}, next_weight=0.5, session_weight=0.0)
    assert out[7] == 0.8  # no session: a plain memory
    assert out[2] == pytest.approx(0.5 + 0.5 * 1.0) and out[1] == pytest.approx(1.0 + 0.5 * 0.5)
    assert lift(scores, {}, {}) == scores


def test_session_match_lifts_every_turn_of_the_matching_session_by_its_share() -> None:
    scores = {1: 0.3, 2: 0.1, 9: 0.35}
    out = lift(scores, {1: "a", 2: "a", 9: "b"}, {}, next_weight=0.0, session_weight=0.0,
               session_match={"a": 1.0, "b": 0.25}, match_weight=0.2)
    assert out[1] == pytest.approx(0.3 + 0.2) and out[2] == pytest.approx(0.1 + 0.2)
    assert out[9] == pytest.approx(0.35 + 0.05)
    assert out[1] > out[9]  # the session that matches as a whole wins over the better stray turn
    assert lift(scores, {1: "a", 2: "a", 9: "b"}, {}, next_weight=0.0, session_weight=0.0,
                session_match={"a": 1.0}, match_weight=0.0) == scores  # weight 0: off
