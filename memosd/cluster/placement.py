"""Where a new cube goes: rendezvous (highest random weight) hashing of its id over the live members.

The rule, the whole of it: for a cube id ``c`` and each member name ``m``, the weight is the first 8
bytes of ``sha256(c + "\\0" + m)`` read as a big-endian unsigned integer; the cube goes to the member with
the highest weight (a tie, 2^-64 unlikely, goes to the greater name). The NUL keeps ("ab", "c") and
("a", "bc") apart; neither cube ids nor node names contain one.

Why rendezvous hashing: it is pure (every node computes the same answer from the same member list, with
no shared state), balanced (each member wins ~1/n of the ids), and moves the least when membership
changes: removing a member moves only the cubes it won, each to its runner-up; adding one moves only the
cubes it now wins. sha256, not Python's ``hash``: the answer must be the same in every process and
version.

Placement decides only where a *new* cube is claimed (directory.claim); a cube's owner afterwards is
what the directory says, until a move changes it. So a member joining or leaving never moves data by
itself: rebalancing, when it comes, compares each cube's owner with ``place`` and moves the difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# The rule's name in the cluster config (cluster/settings.py): every node must place by the same rule, so a
# change to it is a new name, and a node that places otherwise refuses to join.
RULE = "rendezvous-sha256-v1"


def weight(cube_id: str, member: str) -> int:
    """The member's weight for the cube: 64 bits of sha256(cube_id NUL member)."""
    digest = hashlib.sha256(cube_id.encode() + b"\0" + member.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def ranking(cube_id: str, members: Iterable[str]) -> list[str]:
    """The members from the most to the least preferred for the cube (its owner first, then the
    runner-up a move away from the owner would go to)."""
    unique = set(members)
    return sorted(unique, key=lambda m: (weight(cube_id, m), m), reverse=True)


def place(cube_id: str, members: Iterable[str]) -> str:
    """The member a new cube goes to. Raises ValueError when there is no member."""
    ranked = ranking(cube_id, members)
    if not ranked:
        raise ValueError(f"no live member to place cube {cube_id} on")
    return ranked[0]


__all__ = ["RULE", "place", "ranking", "weight"]
