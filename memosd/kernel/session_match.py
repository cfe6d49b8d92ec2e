"""Session match: how well each candidate session matches a query as one document.

A topic talked about over a whole session spreads its words over many turns: for
"Where did Sam go hiking with his dog?", one turn may say "hiking", the next
the place and another "dog", and no single turn matches them all. Turn
BM25 cannot see that; BM25 over the session's turns taken together can. So
Search scores each session among its hybrid candidates as one document (the
memory texts of all its turns the mount sees, concatenated) with tantivy's
BM25 (the index's ``en_stem`` analysis, k1 1.2, b 0.75), with the statistics
(document frequency, average length) of those sessions, and divides by the
best session's score: the best session gets 1.0, and kernel/turn_rank.py adds
``weight`` x this value to every turn inside.

On the LoCoMo dev conversations (scripts/bench_conversation.py, through gRPC)
this lifted any@1 34.1 -> 38.4, any@5 69.3 -> 73.3, any@10 79.7 -> 82.2 and
session any@3 85.7 -> 87.5 (BENCHMARKS.md, with bootstrap CIs). Summing the
turn scores per session instead (the BM25 list's, best 1..100 turns) did not
(any@10 -2.0..+0.9): a session's words counted once, with the session's length
normalization and idf, are what carries the signal.

The scored sessions are those of the candidates (never the whole cube), so the
cost grows with the candidates, not the cube: each turn is analyzed once and
its term counts cached by version (a version's text never changes), so a query
costs a sum over the candidate sessions, each merged once (and again only when
its turns change). The text is what the
mount sees (its base plus staging, without hidden turns), the same turns a
search's context shows, so nothing it cannot read moves its ranking.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from memosd.index.lexical import BM25_B, BM25_K1, analyze, query_terms

# A turn's analyzed terms with their counts, and its length in terms.
TurnTerms = tuple[dict[str, int], int]
Session = TypeVar("Session", bound=Hashable)
# Turns whose terms are cached, across cubes; past it the cache starts over (a bounded memory cost: about
# 1 KB a turn).
CACHE_TURNS = 200_000


def turn_terms(text: str) -> TurnTerms:
    """The terms of one turn's memory text (kernel/memory_text.py) as the lexical index analyzes them."""
    tokens = analyze(text)
    return dict(Counter(tokens)), len(tokens)


def session_scores(query: str, sessions: Mapping[Session, Sequence[TurnTerms]]) -> dict[Session, float]:
    """BM25 of each session (its turns as one document) for ``query``, over the statistics of ``sessions``
    alone, divided by the best session's score: values in [0, 1], the best 1.0. Sessions without a query
    term, and every session when none has one, are left out."""
    terms = query_terms(query)
    if not terms or not sessions:
        return {}
    tf: dict[Session, dict[str, int]] = {}
    length: dict[Session, int] = {}
    df: Counter[str] = Counter()
    for session, turns in sessions.items():
        counts: dict[str, int] = {}
        for counted, _ in turns:
            for term in terms:
                c = counted.get(term)
                if c:
                    counts[term] = counts.get(term, 0) + c
        tf[session] = counts
        length[session] = sum(n for _, n in turns)
        df.update(counts.keys())
    n_docs = len(sessions)
    avgdl = max(sum(length.values()) / n_docs, 1.0)
    weights = {t: boost * math.log(1.0 + (n_docs - df[t] + 0.5) / (df[t] + 0.5)) * (1.0 + BM25_K1)
               for t, boost in terms.items() if df[t]}
    scores: dict[Session, float] = {}
    for session, counts in tf.items():
        norm = BM25_K1 * (1.0 - BM25_B + BM25_B * length[session] / avgdl)
        score = sum(w * counts[t] / (counts[t] + norm) for t, w in weights.items() if t in counts)
        if score > 0.0:
            scores[session] = score
    best = max(scores.values(), default=0.0)
    return {s: v / best for s, v in scores.items()} if best > 0.0 else {}


def merge(turns: Sequence[TurnTerms]) -> TurnTerms:
    """Several turns' terms as one document's."""
    counts: Counter[str] = Counter()
    for counted, _ in turns:
        counts.update(counted)
    return dict(counts), sum(n for _, n in turns)


# The committed turns of a session as one mount sees them: (vkey, item id, born) each, in order.
Signature = tuple[tuple[int, str, int], ...]


class TermCache:
    """Turn terms by (cube id, vkey), checked against the version's item id and born revision (a cube freed
    and allocated again reuses vkeys), and each session's committed turns merged, by (cube id, session id),
    checked against the turns they were merged from (a mount at another revision, a new turn, a Forget all
    change them), so a query sums one document per session, not its turns. Thread-safe; each map is bounded
    by ``capacity`` entries (past it, it starts over)."""

    def __init__(self, capacity: int = CACHE_TURNS) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._terms: dict[tuple[str, int], tuple[str, int, TurnTerms]] = {}
        self._sessions: dict[tuple[str, str], tuple[Signature, TurnTerms]] = {}

    def get(self, cube_id: str, vkey: int, item_id: str, born: int) -> TurnTerms | None:
        entry = self._terms.get((cube_id, vkey))  # a dict read is atomic; writers hold the lock
        if entry is None or entry[0] != item_id or entry[1] != born:
            return None
        return entry[2]

    def put(self, cube_id: str, vkey: int, item_id: str, born: int, terms: TurnTerms) -> None:
        with self._lock:
            if len(self._terms) >= self._capacity:
                self._terms = {}
            self._terms[(cube_id, vkey)] = (item_id, born, terms)

    def session(self, cube_id: str, session_id: str, signature: Signature) -> TurnTerms | None:
        """The merged terms of a session's committed turns, if cached for exactly ``signature``."""
        entry = self._sessions.get((cube_id, session_id))
        return entry[1] if entry is not None and entry[0] == signature else None

    def put_session(self, cube_id: str, session_id: str, signature: Signature, terms: TurnTerms) -> None:
        with self._lock:
            if len(self._sessions) >= self._capacity:
                self._sessions = {}
            self._sessions[(cube_id, session_id)] = (signature, terms)

    def __len__(self) -> int:
        return len(self._terms)
