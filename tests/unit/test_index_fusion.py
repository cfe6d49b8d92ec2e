"""Fusion: reciprocal rank fusion (default) and the linear (min-max convex) option."""

from __future__ import annotations

import pytest

from memosd.index.fusion import RRF_K, FusedHit, fuse, single


def test_rrf_scores_and_ranks() -> None:
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    lexical = [(3, 12.0), (4, 9.0)]
    hits = fuse(dense, lexical, 10)
    by_key = {h.key: h for h in hits}
    assert set(by_key) == {1, 2, 3, 4}
    assert by_key[3].score == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert by_key[3].dense_rank == 3 and by_key[3].lexical_rank == 1
    assert by_key[3].dense_score == 0.7 and by_key[3].lexical_score == 12.0
    assert by_key[4].dense_rank == 0 and by_key[4].dense_score == 0.0
    assert by_key[1].lexical_rank == 0 and by_key[1].lexical_score == 0.0
    assert hits[0].key == 3  # in both lists beats top of one
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_ties_break_by_key() -> None:
    # Same rank in the other list: identical RRF scores.
    hits = fuse([(9, 0.5)], [(4, 3.0)], 10)
    assert [h.key for h in hits] == [4, 9]
    assert hits[0].score == hits[1].score
    hits = fuse([(7, 0.5), (5, 0.4)], [(5, 3.0), (7, 2.0)], 10)
    assert [h.key for h in hits] == [5, 7]


def test_k_truncates_and_zero() -> None:
    dense = [(i, 1.0 - i / 100) for i in range(1, 21)]
    assert len(fuse(dense, [], 5)) == 5
    assert fuse(dense, [], 0) == []
    assert fuse([], [], 5) == []


def test_single_list_keeps_order() -> None:
    dense = [(5, 0.9), (3, 0.8), (8, 0.1)]
    assert [h.key for h in fuse(dense, [], 10)] == [5, 3, 8]
    assert [h.key for h in fuse([], dense, 10)] == [5, 3, 8]


def test_duplicates_keep_first_position() -> None:
    hits = fuse([(1, 0.9), (1, 0.1), (2, 0.5)], [], 10)
    assert [h.key for h in hits] == [1, 2]
    assert hits[0].dense_rank == 1 and hits[0].dense_score == 0.9


def test_weights() -> None:
    dense = [(1, 0.9)]
    lexical = [(2, 5.0)]
    assert fuse(dense, lexical, 2, dense_weight=2.0)[0].key == 1
    assert fuse(dense, lexical, 2, lexical_weight=2.0)[0].key == 2


def test_linear() -> None:
    dense = [(1, 0.9), (2, 0.5), (3, 0.1)]
    lexical = [(3, 10.0), (2, 6.0), (1, 2.0)]
    hits = fuse(dense, lexical, 3, method="linear")
    by_key = {h.key: h.score for h in hits}
    assert by_key[1] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
    assert by_key[2] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert by_key[3] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert [h.key for h in hits] == [1, 2, 3]  # all 0.5: ties by key
    assert fuse(dense, lexical, 1, method="linear", lexical_weight=0.0)[0].key == 1
    assert fuse(dense, lexical, 1, method="linear", dense_weight=0.0)[0].key == 3
    three_to_one = {h.key: h.score for h in fuse(dense, lexical, 3, method="linear", dense_weight=3.0)}
    assert three_to_one[2] == pytest.approx(0.5)
    assert three_to_one[1] == pytest.approx(0.75)


def test_bad_args() -> None:
    with pytest.raises(ValueError):
        fuse([(1, 1.0)], [], 1, method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fuse([(1, 1.0)], [], 1, rrf_k=-1)
    with pytest.raises(ValueError):
        fuse([(1, 1.0)], [], 1, dense_weight=-1.0)


def test_single_helper() -> None:
    d = single([(3, 0.7), (1, 0.6)], 1)
    assert d == [FusedHit(3, 0.7, 0.7, 0.0, 1, 0)]
    lx = single([(3, 7.0), (1, 6.0)], 5, lexical=True)
    assert lx[1] == FusedHit(1, 6.0, 0.0, 6.0, 0, 2)


def test_frozen() -> None:
    h = fuse([(1, 0.5)], [], 1)[0]
    with pytest.raises(AttributeError):
        h.score = 1.0  # type: ignore[misc]


# -- score-distribution fusions (non-default methods) --------------------------

DENSE = [(1, 0.9), (2, 0.6), (3, 0.3)]
LEXICAL = [(3, 12.0), (4, 6.0), (5, 3.0)]


@pytest.mark.parametrize("method", ["combsum", "combmnz", "dbsf", "tm2c2"])
def test_score_methods_cover_union_and_are_sorted(method: str) -> None:
    hits = fuse(DENSE, LEXICAL, 10, method=method)  # type: ignore[arg-type]
    assert {h.key for h in hits} == {1, 2, 3, 4, 5}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert fuse(DENSE, LEXICAL, 2, method=method) == hits[:2]  # type: ignore[arg-type]
    # One list alone keeps that list's order.
    assert [h.key for h in fuse(DENSE, [], 10, method=method)] == [1, 2, 3]  # type: ignore[arg-type]
    assert [h.key for h in fuse([], LEXICAL, 10, method=method)] == [3, 4, 5]  # type: ignore[arg-type]


def test_combsum_zscore_values() -> None:
    hits = {h.key: h.score for h in fuse(DENSE, LEXICAL, 10, method="combsum")}
    # dense z: (1.2247, 0, -1.2247); lexical z: (1.3363, -0.2673, -1.0690); missing -> list minimum.
    assert hits[3] == pytest.approx(-1.2247449 + 1.3363062, abs=1e-6)
    assert hits[1] == pytest.approx(1.2247449 - 1.0690450, abs=1e-6)


def test_combmnz_rewards_both_lists() -> None:
    hits = {h.key: h.score for h in fuse(DENSE, LEXICAL, 10, method="combmnz")}
    # key 3: (0 + (1.3363 + 1.0690)) * 2
    assert hits[3] == pytest.approx(2 * (1.3363062 + 1.0690450), abs=1e-6)
    assert hits[5] == 0.0  # bottom of its only list


def test_dbsf_clips_to_unit_interval() -> None:
    hits = fuse(DENSE, LEXICAL, 10, method="dbsf")
    by_key = {h.key: h.score for h in hits}
    # 3 sigma covers the list: dense key 1 -> 0.5 + 1.2247 / 6
    assert by_key[1] == pytest.approx(0.5 + 1.2247449 / 6, abs=1e-6)
    assert all(0.0 <= h.score <= 2.0 for h in hits)
    # A single hit (no spread) counts fully.
    assert fuse([(7, 0.4)], [], 1, method="dbsf")[0].score == 1.0


def test_tm2c2_theoretical_floor() -> None:
    hits = {
        h.key: h.score for h in fuse(DENSE, LEXICAL, 10, method="tm2c2", dense_weight=0.8, lexical_weight=0.2)
    }
    # dense: s / 0.9 (floor 0); BM25: s / 12 (floor 0); missing -> 0.
    assert hits[1] == pytest.approx(0.8 * 1.0)
    assert hits[3] == pytest.approx(0.8 * 0.3 / 0.9 + 0.2 * 1.0)
    assert hits[5] == pytest.approx(0.2 * 3.0 / 12.0)
    # Unlike min-max, the bottom of a list keeps a share of its score.
    linear = {
        h.key: h.score
        for h in fuse(DENSE, LEXICAL, 10, method="linear", dense_weight=0.8, lexical_weight=0.2)
    }
    assert linear[5] == 0.0


def test_methods_match_config() -> None:
    from memosd.config import FUSION_METHODS
    from memosd.index.fusion import METHODS

    assert tuple(FUSION_METHODS) == METHODS


def test_a_clear_first_of_one_list_survives_documents_middling_in_both() -> None:
    """The default k keeps a single-list win: one list's #1, absent from the other list, stays above every
    document both lists rank 8th or lower (with k = 60 it fell below all of those ranked up to 60th)."""
    middling = list(range(100, 140))  # ranked 13..52 in both lists
    dense = [(7, 0.9)] + [(key, 0.7) for key in range(300, 311)] + [(key, 0.5) for key in middling]
    lexical = [(key, 9.0) for key in range(200, 212)] + [(key, 3.0) for key in middling]
    fused = [h.key for h in fuse(dense, lexical, 80)]
    assert fused.index(7) < min(fused.index(key) for key in middling)
    # And the same the other way round: lexical's #1, absent from dense.
    fused = [h.key for h in fuse(lexical, [(7, 12.0), *dense[1:]], 80)]
    assert fused.index(7) < min(fused.index(key) for key in middling)
    # The paper's k = 60 loses it: this is the property the default buys.
    old = [h.key for h in fuse(dense, lexical, 80, rrf_k=60)]
    assert old.index(7) > max(old.index(key) for key in middling)
