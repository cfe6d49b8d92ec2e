"""Usage tracking: counts per cube and per item, bounded, flushed in batches, reloaded at open."""

from __future__ import annotations

import time
from pathlib import Path

from memosd.kernel.usage import ItemUsage, UsageTracker
from memosd.store import schema
from memosd.store.rocks import Store


def test_calls_count_per_cube_and_items_per_use(tmp_path: Path) -> None:
    usage = UsageTracker(Store(tmp_path / "s"))
    usage.record("search", ["c1", "c2"], [("c1", "i1"), ("c1", "i2"), ("c2", "j1")])
    usage.record("read", ["c1"], [("c1", "i1")])
    usage.record("generate", ["c1"], [("c1", "i1")])
    c1 = usage.cube("c1")
    assert (c1.searches, c1.reads, c1.generations, c1.item_hits, c1.items_tracked) == (1, 1, 1, 4, 2)
    assert usage.cube("c2").searches == 1 and usage.cube("c3").searches == 0
    assert usage.item("c1", "i1").hits == 3 and usage.item("c1", "i2").hits == 1
    assert usage.item("c1", "i1").last_used_ns >= usage.item("c1", "i2").last_used_ns > 0


def test_usage_survives_a_restart_through_batched_flushes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    usage = UsageTracker(store, flush_seconds=0.05)
    usage.start()
    usage.record("read", ["c1"], [("c1", "i1"), ("c1", "i1")])
    deadline = time.monotonic() + 5
    while not list(store.scan_rows(schema.CF_USAGE)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(store.scan_rows(schema.CF_USAGE)), "the background flush wrote nothing"
    usage.record("search", ["c1"], [("c1", "i2")])
    usage.close()  # flushes the rest
    store.close()
    again = UsageTracker(Store(tmp_path / "s"))
    assert again.item("c1", "i1").hits == 2 and again.item("c1", "i2").hits == 1
    assert (again.cube("c1").reads, again.cube("c1").searches, again.cube("c1").item_hits) == (1, 1, 3)


def test_tracking_is_bounded_and_sheds_the_least_recently_used(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    usage = UsageTracker(store, max_items=20)
    for i in range(50):
        usage.record("search", ["c"], [("c", f"i{i:02d}")])
    tracked = usage.items("c")
    assert len(tracked) <= 20 and "i49" in tracked and "i00" not in tracked
    usage.flush()
    rows = [k for k, _ in store.scan_rows(schema.CF_USAGE)]
    assert len(rows) == len(tracked) + 1  # the items kept, plus the cube's row


def test_forgotten_cubes_and_purged_items_leave_no_usage(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    usage = UsageTracker(store)
    usage.record("read", ["a", "b"], [("a", "i1"), ("a", "i2"), ("b", "j1")])
    usage.flush()
    usage.forget_items("a", ["i1"])
    usage.flush()
    assert usage.item("a", "i1").hits == 0 and usage.item("a", "i2").hits == 1
    assert schema.usage_key("a", "i1") not in {bytes(k) for k, _ in store.scan_rows(schema.CF_USAGE)}
    usage.forget_cube("b")
    assert usage.cube("b").reads == 0 and usage.items("b") == {}


def test_the_score_blends_frequency_and_recency() -> None:
    now = time.time_ns()
    hour = 3600 * 10**9
    often_long_ago = ItemUsage(hits=8, last_used_ns=now - 4 * hour)
    once_now = ItemUsage(hits=1, last_used_ns=now)
    twice_now = ItemUsage(hits=2, last_used_ns=now)
    assert twice_now.score(now, 3600) > once_now.score(now, 3600)
    assert once_now.score(now, 3600) > often_long_ago.score(now, 3600)  # 8 / 2**4 = 0.5
    assert often_long_ago.score(now, 4 * 3600) > twice_now.score(now, 4 * 3600)  # slower decay: frequency wins
