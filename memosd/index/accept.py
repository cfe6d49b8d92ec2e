"""Filtered top-k over a ranked candidate stream, shared by the dense and lexical indexes.

Neither USearch nor tantivy (from Python) takes a per-key predicate, so both
indexes oversample and keep the accepted keys. `decided` memoizes the
predicate across the doubling rounds of one search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Accept = Callable[[int], bool]
Hits = list[tuple[int, float]]


def take_accepted(ranked: Iterable[tuple[int, float]], k: int, accept: Accept | None,
                  decided: dict[int, bool]) -> Hits:
    """Up to k (key, score) pairs from `ranked` (best first) that `accept` keeps,
    each key once, sorted best first with ties broken by key (deterministic)."""
    hits: Hits = []
    seen: set[int] = set()
    for key, score in ranked:
        if key in seen:
            continue
        seen.add(key)
        if accept is not None:
            ok = decided.get(key)
            if ok is None:
                ok = decided[key] = bool(accept(key))
            if not ok:
                continue
        hits.append((key, score))
        if len(hits) >= k:
            break
    hits.sort(key=lambda h: (-h[1], h[0]))
    return hits
