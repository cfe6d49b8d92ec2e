"""Usage: which cubes and items Search, Read and Generate used, how often and how lately.

Cheap: recording is a few dict updates under one lock; nothing touches disk on
the call's path. Bounded: at most ``max_items`` items are tracked per cube; past
that, the least recently used tenth is dropped (their rows too), so a cube that
is searched over millions of items costs a bounded amount of memory. Durable
enough: a background thread writes what changed in one unsynced batch every
``flush_seconds`` and at close, so a crash loses at most that window of
counts, which are statistics, not memory.

Rows (column family ``usage``): ``{cube_id}/#`` -> the cube's counters,
``{cube_id}/{item_id}`` -> [hits, last_used_ns]; both in the cube's key range,
so FreeCube's range delete takes them.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from memosd.errors import DiskFull
from memosd.periodic import Periodic
from memosd.store import schema
from memosd.store.rocks import Store

log = logging.getLogger("memosd.usage")
CUBE_ROW = "#"  # sorts before "itm_": the cube's own counters
KINDS = ("search", "read", "generate", "activate")
HEAT_HALF_LIFE_SECONDS = 600.0


@dataclass
class CubeUsage:
    searches: int = 0
    reads: int = 0
    generations: int = 0
    item_hits: int = 0
    last_used_ns: int = 0
    items_tracked: int = 0
    # A decayed count of calls (Search, Read, Generate, Activate): +1 per call, halved every half-life.
    # The scheduler ranks cubes by it: frequency and recency together, unlike last_used_ns alone.
    heat: float = 0.0

    def heat_at(self, now_ns: int, half_life_s: float = HEAT_HALF_LIFE_SECONDS) -> float:
        return self.heat * _decay(now_ns - self.last_used_ns, half_life_s)


def _decay(age_ns: int, half_life_s: float) -> float:
    return math.exp(-math.log(2) * max(0, age_ns) / 1e9 / half_life_s)


@dataclass
class ItemUsage:
    hits: int = 0
    last_used_ns: int = 0

    def score(self, now_ns: int, half_life_s: float) -> float:
        """Frequency and recency blended: each hit counts, halved every ``half_life_s`` since the last use.
        (An approximation of a decayed hit count that needs only the last use time.)"""
        age = max(0.0, (now_ns - self.last_used_ns) / 1e9)
        return self.hits * math.exp(-math.log(2) * age / half_life_s)


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
        for key, raw in store.scan_rows(schema.CF_USAGE):
            cube_id, _, item_id = bytes(key).decode().partition("/")
            if item_id == CUBE_ROW:
                self._cubes[cube_id] = CubeUsage(**json.loads(raw))
            else:
                hits, last = json.loads(raw)
                self._items.setdefault(cube_id, {})[item_id] = ItemUsage(int(hits), int(last))

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
            rows: list[tuple[bytes, bytes]] = []
            for cube_id, item_id in dirty:
                if item_id == CUBE_ROW:
                    cube = self._cubes.get(cube_id)
                    if cube is not None:
                        rows.append((schema.usage_key(cube_id, CUBE_ROW), json.dumps(asdict(cube)).encode()))
                else:
                    usage = self._items.get(cube_id, {}).get(item_id)
                    if usage is not None:
                        rows.append((schema.usage_key(cube_id, item_id),
                                     json.dumps([usage.hits, usage.last_used_ns]).encode()))
        if not rows and not dropped:
            return 0
        batch = self.store.batch()
        for key, value in rows:
            batch.put_row(schema.CF_USAGE, key, value)
        for cube_id, item_id in dropped:
            batch.delete_row(schema.CF_USAGE, schema.usage_key(cube_id, item_id))
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
