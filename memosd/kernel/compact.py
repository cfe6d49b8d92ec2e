"""Compaction: a cube's retention policy applied to its history.

The kept revisions are HEAD, the revisions open mounts read at, and those the
policy keeps (the last ``keep_last``, and those younger than
``keep_seconds``). They form a range ``[oldest, HEAD]`` (revision times only
grow), so compaction is a watermark: ``CubeRecord.compacted_below``. A version
is visible at some kept revision unless it died at or before ``oldest``; those
versions (rows and vectors) are deleted, and the revisions below ``oldest``
are marked ``compacted`` (their log entries stay). Reading, mounting, diffing
or rolling back to a compacted revision is REVISION_COMPACTED.

After the synced batch the dead versions' entries are removed from the
cube's indexes (no rebuild: the indexes are derived, and an entry a crash
leaves behind is never returned, as search accepts only versions the catalog
knows). Purge, which must leave no trace of what it erases, rebuilds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from memosd.kernel.catalog import VersionMeta
from memosd.kernel.checks import oldest_readable
from memosd.kernel.state import CubeState, MountState
from memosd.kernel.table import Tables
from memosd.logfmt import log_event
from memosd.store.rocks import Store

log = logging.getLogger("memosd.kernel")


@dataclass(frozen=True)
class CompactResult:
    cube_id: str
    revisions_compacted: int  # newly marked by this run
    versions_removed: int
    oldest_revision: int  # the oldest revision still readable


def oldest_kept(store: Store, cube: CubeState, mounts: Sequence[MountState], now_ns: int) -> int:
    """The oldest revision the retention policy, HEAD and the open mounts keep (never below the current
    watermark: compaction cannot be undone)."""
    head = cube.head
    policy = cube.record.retention
    keep_last = int(policy.get("keep_last") or 0)
    keep_seconds = float(policy.get("keep_seconds") or 0.0)
    current = oldest_readable(cube)
    if head == 0 or (not keep_last and not keep_seconds):
        return current
    candidates: list[int] = []
    if keep_last:
        candidates.append(max(1, head - keep_last + 1))
    if keep_seconds:
        cutoff = now_ns - int(keep_seconds * 1_000_000_000)
        oldest = head  # HEAD is kept however old it is
        for revision in store.iter_revisions(cube.cube_id, newest=head):
            if revision.create_ns < cutoff:
                break
            oldest = revision.number
        candidates.append(oldest)
    keep = min(candidates)  # a revision either rule keeps is kept
    bases = [m.record.base for m in mounts if m.record.base >= 1]
    return max(min([keep, *bases]), current)


def run_compact(store: Store, tables: Tables, cube: CubeState) -> CompactResult:
    """Kernel.compact (see the module doc). The caller checked that the cube is not frozen."""
    started = time.perf_counter()
    with cube.lock:
        mounts = tables.mounts_of(cube.cube_id)
        previous = oldest_readable(cube)
        keep = oldest_kept(store, cube, mounts, time.time_ns())
        if keep <= previous:
            return CompactResult(cube.cube_id, 0, 0, previous)
        dead: list[VersionMeta] = [m for versions in cube.catalog.by_item.values() for m in versions
                                   if m.died and m.died <= keep]
        batch = store.batch()
        for meta in dead:
            batch.delete_version(cube.cube_id, meta.item_id, meta.born, meta.vkey)
        marked = 0
        for revision in store.iter_revisions(cube.cube_id, newest=keep - 1):
            if revision.compacted:
                break  # older ones were marked by an earlier run
            batch.put_revision(cube.cube_id, replace(revision, compacted=True))
            marked += 1
        record = replace(cube.record, compacted_below=keep, version_count=cube.record.version_count - len(dead))
        batch.put_cube(record)
        store.write(batch, sync=True)
        # Durable from here on: now update memory. The indexes drop the dead versions' entries; one left
        # behind by a crash here is harmless, as search accepts only keys the catalog knows.
        cube.record = record
        cube.catalog.remove_versions(dead)
        if dead:
            cube.index.remove(np.array([m.vkey for m in dead], dtype=np.uint64))
            cube.index_dirty = True
    log_event(log, "compact", cube=cube.cube_id, oldest=keep, revisions=marked, versions=len(dead),
              took_ms=int((time.perf_counter() - started) * 1000))
    return CompactResult(cube.cube_id, marked, len(dead), keep)
