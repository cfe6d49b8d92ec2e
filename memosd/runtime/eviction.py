"""The eviction order both pools (KV caches, resident adapters) share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

K = TypeVar("K")


def coldest(keys: Iterable[K], rank: Callable[[K], float] | None) -> K:
    """The eviction victim among ``keys`` (least recently used first, at least one): the first, or with
    ``rank``, the lowest ranked (ties: the least recently used). Both pools evict by this."""
    if rank is None:
        return next(iter(keys))
    return min(enumerate(keys), key=lambda pair: (rank(pair[1]), pair[0]))[1]
