"""Usage: which cubes and items Search, Read and Generate used, how often and how lately.

Cheap: recording is a few dict updates under one lock; nothing touches disk on
the call's path. Bounded: at most ``max_items`` items are tracked per cube; past
that, the least recently used tenth is dropped (their rows too), so a cube that
is searched over millions of items costs a bounded amount of memory. Durable
enough: a background thread writes what changed in one unsynced batch every
``flush_seconds`` and at close, so a crash loses at most that window of
counts, which are statistics, not memory.

The rows (column family ``usage``, see store/schema.py) are the cube's
counters (CubeUsage) and one ItemUsage per tracked item, all in the cube's key
range, so FreeCube's range delete takes them. The record types live in
store/records.py, beside the store's accessors; they are re-exported here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace

from memosd.errors import DiskFull
from memosd.periodic import Periodic
from memosd.store import schema
from memosd.store.records import HEAT_HALF_LIFE_SECONDS, CubeUsage, ItemUsage
from memosd.store.rocks import Store

__all__ = ["CUBE_ROW", "HEAT_HALF_LIFE_SECONDS", "KINDS", "CubeUsage", "ItemUsage", "UsageTracker"]

log = logging.getLogger("memosd.usage")
CUBE_ROW = schema.USAGE_CUBE_ROW
KINDS = ("search", "read", "generate", "activate")


class UsageTracker:
    def __init__(self, store: Store, *, max_items: int = 100_000, flush_seconds: float = 5.0) -> None:
        self.store = store
        self.max_items = max_items
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._cubes: dict[str, CubeUsage] = {}
        self._items: dict[str, dict[str, ItemUsage]] = {}
        self._dirty: set[tuple[str, str]] = set()  # (cube_id, item_id or CUBE_ROW)
        self._dropped: set[tuple[str, str]] = set()
        self._loop = Periodic(self.flush, flush_seconds, "usage_flush", log)
        for cube_id, item_id, stored in store.iter_usage():
            if isinstance(stored, CubeUsage):
                self._cubes[cube_id] = stored
            else:
                self._items.setdefault(cube_id, {})[item_id] = stored

    # -- recording ------------------------------------------------------------------
    def record(self, kind: str, cube_ids: Iterable[str], items: Iterable[tuple[str, str]] = ()) -> None:
        """One call of ``kind`` over ``cube_ids`` used ``items`` ((cube_id, item_id) pairs)."""
        now = time.time_ns()
        field = {"search": "searches", "read": "reads", "generate": "generations"}.get(kind)
        with self._lock:
            for cube_id in set(cube_ids):
                cube = self._cubes.setdefault(cube_id, CubeUsage())
                if field is not None:  # "activate" heats the cube but is not a use of its items
                    setattr(cube, field, getattr(cube, field) + 1)
                cube.heat = cube.heat_at(now) + 1
                cube.last_used_ns = now
                self._dirty.add((cube_id, CUBE_ROW))
            for cube_id, item_id in items:
                tracked = self._items.setdefault(cube_id, {})
                usage = tracked.setdefault(item_id, ItemUsage())
                usage.hits += 1
                usage.last_used_ns = now
                self._cubes.setdefault(cube_id, CubeUsage()).item_hits += 1
                self._dirty.add((cube_id, item_id))
                self._dirty.add((cube_id, CUBE_ROW))
                if len(tracked) > self.max_items:
                    self._shed(cube_id, tracked)

    def _shed(self, cube_id: str, tracked: dict[str, ItemUsage]) -> None:
        """Drop the least recently used tenth of a cube's tracked items."""
        doomed = sorted(tracked, key=lambda i: tracked[i].last_used_ns)[: max(1, len(tracked) // 10)]
        for item_id in doomed:
            del tracked[item_id]
            self._dirty.discard((cube_id, item_id))
            self._dropped.add((cube_id, item_id))

    # -- reading ------------------------------------------------------------------------
    def cube(self, cube_id: str) -> CubeUsage:
        with self._lock:
            usage = replace(self._cubes.get(cube_id, CubeUsage()))
            usage.items_tracked = len(self._items.get(cube_id, {}))
        return usage

    def heat(self, cube_id: str, now_ns: int | None = None) -> float:
        with self._lock:
            cube = self._cubes.get(cube_id)
            return cube.heat_at(now_ns if now_ns is not None else time.time_ns()) if cube else 0.0

    def item(self, cube_id: str, item_id: str) -> ItemUsage:
        with self._lock:
            found = self._items.get(cube_id, {}).get(item_id)
            return replace(found) if found else ItemUsage()

    def items(self, cube_id: str) -> dict[str, ItemUsage]:
        with self._lock:
            return {k: replace(v) for k, v in self._items.get(cube_id, {}).items()}

    # -- forgetting -----------------------------------------------------------------------
    def forget_cube(self, cube_id: str) -> None:
        """FreeCube: the rows went with the cube's key range."""
        with self._lock:
            self._cubes.pop(cube_id, None)
            self._items.pop(cube_id, None)
            self._dirty = {d for d in self._dirty if d[0] != cube_id}
            self._dropped = {d for d in self._dropped if d[0] != cube_id}

    def forget_items(self, cube_id: str, item_ids: Iterable[str]) -> None:
        """Purge: the items are gone, so is their usage."""
        with self._lock:
            tracked = self._items.get(cube_id, {})
            for item_id in item_ids:
                if tracked.pop(item_id, None) is not None:
                    self._dirty.discard((cube_id, item_id))
                    self._dropped.add((cube_id, item_id))

    # -- persistence ------------------------------------------------------------------------
    def flush(self) -> int:
        """Write what changed since the last flush in one batch; returns the rows written or deleted."""
        with self._lock:
            dirty, dropped = self._dirty, self._dropped
            self._dirty, self._dropped = set(), set()
            # Copies, taken under the lock: the batch is built outside it while calls go on counting.
            rows: list[tuple[str, str, CubeUsage | ItemUsage]] = []
            for cube_id, item_id in dirty:
                found = (self._cubes.get(cube_id) if item_id == CUBE_ROW
                         else self._items.get(cube_id, {}).get(item_id))
                if found is not None:
                    rows.append((cube_id, item_id, replace(found)))
        if not rows and not dropped:
            return 0
        batch = self.store.batch()
        for cube_id, item_id, usage in rows:
            if isinstance(usage, CubeUsage):
                batch.put_cube_usage(cube_id, usage)
            else:
                batch.put_item_usage(cube_id, item_id, usage)
        for cube_id, item_id in dropped:
            batch.delete_item_usage(cube_id, item_id)
        try:
            self.store.write(batch, sync=False)
        except DiskFull:  # keep the counts for the next flush, once the disk has room again
            with self._lock:
                self._dirty |= dirty - self._dropped
                self._dropped |= dropped - self._dirty
            raise
        return len(rows) + len(dropped)

    def start(self) -> None:
        self._loop.start()

    def close(self) -> None:
        self._loop.close()
        self.flush()
