"""The KV pool: LRU order, byte budget, PoolTooSmall, counters, thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from memosd.runtime import KVCache, KVPool, PoolTooSmall


def _cache(n_tokens: int, salt: bytes = b"cube") -> KVCache:
    """A 1-layer cache of ``n_tokens`` tokens: 2 tensors x 1 head x 4 dims x 4 bytes = 32 B per token."""
    k = torch.zeros(1, 1, n_tokens, 4)
    return KVCache(
        keys=(k,), values=(k.clone(),), token_ids=tuple(range(n_tokens)), fingerprint="fp", salt=salt
    )


def test_lru_within_budget() -> None:
    pool = KVPool(budget_bytes=32 * 30)
    a, b, c = _cache(10), _cache(10, b"b"), _cache(10, b"c")
    assert a.nbytes == 320
    assert pool.put("a", a) == [] and pool.put("b", b) == [] and pool.put("c", c) == []
    assert pool.bytes_used == 960 and len(pool) == 3
    assert pool.get("a") is a  # a is now the most recent: b is the oldest
    dropped = pool.put("d", _cache(10, b"d"))
    assert [k for k, _ in dropped] == ["b"] and dropped[0][1] is b
    assert pool.keys() == ["c", "a", "d"]
    assert pool.get("b") is None
    big = pool.put("e", _cache(20, b"e"))  # needs two slots: the two oldest go
    assert [k for k, _ in big] == ["c", "a"]
    assert pool.bytes_used == 960 and pool.keys() == ["d", "e"]
    s = pool.stats()
    assert (s.entries, s.bytes_used, s.budget_bytes, s.hits, s.misses, s.evictions) == (2, 960, 960, 1, 1, 3)


def test_replace_evict_clear() -> None:
    pool = KVPool(budget_bytes=1000)
    pool.put("a", _cache(10))
    assert pool.put("a", _cache(20)) == []  # a replacement frees the old entry first
    assert pool.bytes_used == 640 and len(pool) == 1
    assert "a" in pool and "zz" not in pool
    assert pool.stats().hits == 0 and pool.stats().misses == 0  # `in` does not count
    assert pool.evict("zz") is None
    gone = pool.evict("a")
    assert gone is not None and gone.n_tokens == 20
    assert pool.bytes_used == 0
    pool.put("x", _cache(5, b"cube-1"))
    pool.put("y", _cache(5, b"cube-2"))
    pool.put("z", _cache(5, b"cube-1"))
    assert [k for k, _ in pool.evict_if(lambda _k, c: c.salt == b"cube-1")] == ["x", "z"]
    assert pool.keys() == ["y"] and pool.bytes_used == 160
    assert [k for k, _ in pool.clear()] == ["y"]
    assert pool.bytes_used == 0 and len(pool) == 0


def test_pool_too_small_leaves_pool_unchanged() -> None:
    pool = KVPool(budget_bytes=500)
    pool.put("a", _cache(10))
    with pytest.raises(PoolTooSmall, match="does not fit"):
        pool.put("big", _cache(16))  # 512 B > 500 B
    assert pool.keys() == ["a"] and pool.bytes_used == 320
    with pytest.raises(PoolTooSmall):
        KVPool(budget_bytes=0).put("a", _cache(1))
    with pytest.raises(ValueError):
        KVPool(budget_bytes=-1)


def test_thread_safety() -> None:
    pool = KVPool(budget_bytes=32 * 10 * 8)  # room for 8 of the 10-token caches
    caches = [_cache(10, bytes([i])) for i in range(32)]
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for round_ in range(200):
                i = (offset + round_) % len(caches)
                pool.put(str(i), caches[i])
                pool.get(str((i + 3) % len(caches)))
                if round_ % 17 == 0:
                    pool.evict(str((i + 5) % len(caches)))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(t * 7,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.bytes_used == sum(caches[int(k)].nbytes for k in pool) <= pool.budget_bytes


def test_a_rank_evicts_the_lowest_ranked_first_and_peek_counts_nothing() -> None:
    pool = KVPool(budget_bytes=32 * 30)
    heat = {b"hot": 5.0, b"warm": 2.0, b"cold": 0.5, b"new": 0.1}
    pool.rank = lambda cache: heat[cache.salt]
    for salt in (b"cold", b"hot", b"warm"):
        pool.put(salt.decode(), _cache(10, salt))
    assert pool.get("cold") is not None  # the most recently used now, and still the first to go
    dropped = pool.put("new", _cache(10, b"new"))
    assert [k for k, _ in dropped] == ["cold"] and set(pool.keys()) == {"hot", "warm", "new"}
    dropped = pool.put("hot2", _cache(10, b"hot"))  # ties with "hot": the new entry is never its own victim
    assert [k for k, _ in dropped] == ["new"]
    before = pool.stats()
    assert pool.peek("warm") is not None and pool.peek("cold") is None
    after = pool.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses) and pool.keys()[-1] == "hot2"
