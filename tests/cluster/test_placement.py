"""memosd.cluster.placement: rendezvous hashing, pure (no etcd)."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter

import pytest

from memosd.cluster.placement import place, ranking, weight
from memosd.kernel.ids import CUBE_ID_RE

N = 3000


def _ids(n: int) -> list[str]:
    """Cube ids of the daemon's shape, the same in every run (a test must not pass by luck)."""
    out = []
    for i in range(n):
        raw = hashlib.sha256(f"cube {i}".encode()).digest()[:12]
        out.append("cube_" + base64.b32encode(raw).decode().rstrip("=").lower())
    assert all(CUBE_ID_RE.fullmatch(c) for c in out)
    return out


IDS = _ids(N)


def test_the_rule_is_the_documented_one() -> None:
    # 64 bits of sha256(cube NUL member), big-endian: written out, so a change to the rule is seen here.
    digest = hashlib.sha256(b"cube_x\0node-a").digest()
    assert weight("cube_x", "node-a") == int.from_bytes(digest[:8], "big")
    assert weight("ab", "c") != weight("a", "bc")
    members = ["node-a", "node-b", "node-c"]
    assert place("cube_x", members) == max(members, key=lambda m: weight("cube_x", m))


def test_pure_and_independent_of_order_and_duplicates() -> None:
    members = ["a", "b", "c"]
    for cube in IDS[:200]:
        first = place(cube, members)
        assert place(cube, reversed(members)) == first
        assert place(cube, ["c", "a", "b", "a"]) == first
        assert ranking(cube, members)[0] == first
        assert sorted(ranking(cube, members)) == members
    with pytest.raises(ValueError, match="no live member"):
        place("cube_x", [])


def test_balanced_over_three_members() -> None:
    counts = Counter(place(c, ["node-1", "node-2", "node-3"]) for c in IDS)
    # Each member should win N/3 = 1000; the stated tolerance is 10% (about 4 standard deviations of a
    # fair split, so a biased rule fails and a fair one passes).
    assert set(counts) == {"node-1", "node-2", "node-3"}
    for member, count in counts.items():
        assert abs(count - N / 3) <= 0.10 * N / 3, f"{member} won {count} of {N}"


def test_a_member_leaving_moves_only_its_own_cubes_to_their_runner_up() -> None:
    before_members = ["a", "b", "c", "d"]
    after_members = ["a", "b", "d"]
    moved = 0
    for cube in IDS:
        before, after = place(cube, before_members), place(cube, after_members)
        if before != "c":
            assert after == before, f"{cube} moved from {before}, which did not leave"
        else:
            moved += 1
            assert after == ranking(cube, before_members)[1]
    assert abs(moved - N / 4) <= 0.10 * N / 4


def test_a_member_joining_takes_only_the_cubes_it_now_wins() -> None:
    before_members = ["a", "b", "c"]
    after_members = ["a", "b", "c", "e"]
    taken = 0
    for cube in IDS:
        before, after = place(cube, before_members), place(cube, after_members)
        if after != before:
            assert after == "e"
            taken += 1
    assert abs(taken - N / 4) <= 0.10 * N / 4  # the newcomer's fair share, and no other cube moved
