"""Conversation structure in the ranking: a turn's reply and its session count as evidence for it.

A question about a conversation rarely matches the one turn that answers it:
"What did Caroline adopt?" matches her friend's "Did you adopt anyone?" and
the answer is the *next* turn; a topic talked about over a whole session
spreads its words over many turns, each matching a little. Two lifts, over the
fused scores of a hybrid search (always >= 0):

- **Reply lift**: each turn adds ``NEXT_WEIGHT`` x its score to the turn after
  it in its session (a turn the lists did not find enters the ranking this
  way).
- **Session lift**: each turn adds ``SESSION_WEIGHT`` x the sum of the best
  ``SESSION_TOP`` scores of its session, so turns inside a session that
  matches as a whole rise above a stray match elsewhere, and a short
  acknowledgement ("Thanks!") of a session that does not match no longer
  crowds out content.

- **Session match** (issue 14, second pass): each turn adds ``MATCH_WEIGHT`` x
  its session's BM25 as one document, relative to the best session's
  (kernel/session_match.py). The session lift above sees only the turns the
  lists found, each scored alone; this one sees the session's words together.

All lifts read the scores *before* lifting (one pass, order-independent).

The weights were chosen on the LoCoMo dev conversations
(scripts/bench_conversation.py; a sweep of next 0.1..0.5, previous 0..0.3,
session 0.05..0.5 over the fused lists): any@10 67.0 -> 77.0 through gRPC
with RRF k=10, next 0.3, session 0.2 over the top 3; a lift of the previous
turn added nothing beyond noise (+0.6 any@10, -0.4 any@1) and is left out. Items that are
not turns (no session) are untouched, so plain memories rank as before.

The session match weight, 0.2, was chosen the same way, with the other lifts as they were
(offline over the lists of a gRPC run; scripts/bench_conversation.py --k 100 --dump): any@10
82.0 / 82.4 / 82.2 / 81.4 / 81.3 at 0.1 / 0.15 / 0.2 / 0.25 / 0.3, any@5 highest at 0.2 (73.3).
With it, the session lift over the best 1, 2 or 5 turns instead of 3, at 0 or 0.3 instead of 0.2,
and the reply lift at 0.2 or 0.4 moved every column by at most 1.7 points (within the noise), so
they stay. A rank-based match (0.2 / (1 + the session's BM25 rank)) was a point or two lower on
any@1 and any@5, and has one constant more.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

NEXT_WEIGHT = 0.3
SESSION_WEIGHT = 0.2
SESSION_TOP = 3
MATCH_WEIGHT = 0.2  # search.session_match_weight, the daemon's default
# Only the best this-many fused candidates lift their neighbours: deeper ones carry little score, and each
# lifted turn costs a session ordering.
LIFT_DEPTH = 50


def lift(scores: Mapping[int, float], sessions: Mapping[int, Hashable], next_of: Mapping[int, int], *,
         next_weight: float = NEXT_WEIGHT, session_weight: float = SESSION_WEIGHT,
         session_top: int = SESSION_TOP, session_match: Mapping[Any, float] | None = None,
         match_weight: float = MATCH_WEIGHT) -> dict[int, float]:
    """``scores`` (key -> fused score) with the reply and session lifts added.

    ``sessions[key]`` is the session of each turn among the keys (any hashable: the mount and session
    id; keys without one are not turns);
    ``next_of[key]`` is the key of the turn after ``key`` in its session, which may be absent from
    ``scores`` (it then enters with the lift alone); ``session_match[session]`` is the session's match
    in [0, 1] (kernel/session_match.py; a session absent from it adds nothing). Returns a score for every
    key of ``scores`` and ``next_of``'s values."""
    out = dict(scores)
    for key, nxt in next_of.items():
        out[nxt] = out.get(nxt, 0.0) + next_weight * scores.get(key, 0.0)
    if session_match and match_weight:
        for key in out:
            session = sessions.get(key)
            if session is not None:
                out[key] += match_weight * session_match.get(session, 0.0)
    if session_weight:
        by_session: dict[Hashable, list[float]] = {}
        for key, score in scores.items():
            session = sessions.get(key)
            if session is not None:
                by_session.setdefault(session, []).append(score)
        evidence = {s: sum(sorted(v, reverse=True)[:session_top]) for s, v in by_session.items()}
        for key in out:
            session = sessions.get(key)
            if session is not None:
                out[key] += session_weight * evidence.get(session, 0.0)
    return out
