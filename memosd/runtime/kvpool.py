"""The KV pool: activated caches kept in memory, least recently used dropped first.

The pool is a cache of a cache: every entry is also persisted by the kernel,
so dropping one loses only time. ``put`` evicts least recently used entries
until the new one fits and returns what it dropped, so the caller can log it
or count it. A cache larger than the whole budget can never fit:
``PoolTooSmall`` (RESOURCE_EXHAUSTED at the API). Sizes are the tensors' bytes
as held (``KVCache.nbytes``), on whatever device they live.

The pool holds references only and never touches tensor data, so it is safe
from any thread (one lock); the tensors themselves are used on the runtime
worker.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from memosd.runtime.eviction import coldest
from memosd.runtime.kvcache import KVCache, KVCacheError


class PoolTooSmall(KVCacheError):
    """A cache is larger than the pool's whole budget."""


@dataclass(frozen=True)
class PoolStats:
    entries: int
    bytes_used: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int


class KVPool:
    """An LRU of ``KVCache`` by key, within a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self._budget = budget_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, KVCache] = OrderedDict()  # oldest first
        self._used = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        # Eviction order: None is least recently used; the scheduler installs a rank (its cube heat) so the
        # coldest cube's cache goes first, whoever triggers the eviction.
        self.rank: Callable[[KVCache], float] | None = None

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or the counters."""
        with self._lock:
            return key in self._entries

    def __iter__(self) -> Iterator[str]:
        """Iterates over a snapshot of the keys, least recently used first."""
        return iter(self.keys())

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[tuple[str, KVCache]]:
        """(key, cache) pairs, least recently used first, without touching recency or the counters."""
        with self._lock:
            return list(self._entries.items())

    def get(self, key: str) -> KVCache | None:
        """The cache under ``key`` (now the most recently used), or None. Counts a hit or a miss."""
        with self._lock:
            cache = self._entries.get(key)
            if cache is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return cache

    def put(self, key: str, cache: KVCache) -> list[tuple[str, KVCache]]:
        """Store ``cache`` under ``key`` as the most recently used; returns the entries evicted for room.

        Replacing an entry under the same key frees the old one first (it is
        not reported as evicted). Raises ``PoolTooSmall`` if ``cache`` alone
        exceeds the budget; the pool is then unchanged.
        """
        size = cache.nbytes
        if size > self._budget:
            raise PoolTooSmall(
                f"a {size}-byte KV cache ({cache.n_tokens} tokens) does not fit in a {self._budget}-byte pool"
            )
        dropped: list[tuple[str, KVCache]] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.nbytes
            while self._used + size > self._budget:
                victim_key = self._victim()
                victim = self._entries.pop(victim_key)
                self._used -= victim.nbytes
                self._evictions += 1
                dropped.append((victim_key, victim))
            self._entries[key] = cache
            self._used += size
        return dropped

    def _victim(self) -> str:
        """The entry to evict: the least recently used, or, with ``rank`` set, the lowest ranked (ties: the
        least recently used). Called with the lock held and at least one entry."""
        rank = self.rank
        return coldest(self._entries, None if rank is None else lambda key: rank(self._entries[key]))

    def peek(self, key: str) -> KVCache | None:
        """The cache under ``key``, without touching recency or the counters (background work looking)."""
        with self._lock:
            return self._entries.get(key)

    def evict(self, key: str) -> KVCache | None:
        """Drop ``key``; returns the dropped cache, or None if it was not pooled."""
        with self._lock:
            cache = self._entries.pop(key, None)
            if cache is not None:
                self._used -= cache.nbytes
                self._evictions += 1
            return cache

    def evict_if(self, predicate: Callable[[str, KVCache], bool]) -> list[tuple[str, KVCache]]:
        """Drop every entry for which ``predicate(key, cache)`` holds (e.g. all caches of one cube's salt)."""
        with self._lock:
            doomed = [(k, c) for k, c in self._entries.items() if predicate(k, c)]
            for k, c in doomed:
                del self._entries[k]
                self._used -= c.nbytes
            self._evictions += len(doomed)
            return doomed

    def clear(self) -> list[tuple[str, KVCache]]:
        """Drop everything; returns what was pooled, least recently used first."""
        with self._lock:
            dropped = list(self._entries.items())
            self._entries.clear()
            self._used = 0
            self._evictions += len(dropped)
            return dropped

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                entries=len(self._entries),
                bytes_used=self._used,
                budget_bytes=self._budget,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )
