"""Purge: remove items from every revision of a cube, its indexes and KV caches, and from the disk.

Forget hides an item from later revisions and history keeps it; Purge deletes
it from history itself. The selection cascades: an item derived from a selected
one (a version or staged copy naming it in ``derived_from``: the MemReader's
facts from a turn) is purged with it, and so on down, and the receipt lists
them (``derived_item_ids``). For each selected item, one synced batch deletes every
version (all revisions) with its vector, its staged copies in the cube's open
mounts, every activation of the cube (with its KV cache chunks) whose block
holds it, and every KV block a paged engine stored for the cube (kv_blocks: a
block's key does not say which items its tokens came from, so all of the
cube's go, for every model and revision); marks tainted every adapter version
whose lineage lists it; and keeps a receipt (ids and counts only) in ``purges``. The catalog then forgets the
items, so no read, list, search, diff or rollback at any revision sees them
again; ``CubeState.purged`` keeps their ids (the tombstones). Revision records
stay as they were: their counts (added, item_count, ...) may now overstate
what a revision holds.

Order, for crash safety: the indexes are derived, but at start they are only
*added to* (what they lack), so an index that still held a purged version
would keep it forever. The cube's index files are therefore deleted (empty
indexes take their place) before the batch is written, and refilled from the
store after it. A crash before the batch leaves the store as it was and the
indexes are rebuilt from it at start; a crash after it rebuilds them without
the items. Last, Store.scrub compacts the deleted rows out of every file.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from memosd.config import LimitsConfig
from memosd.errors import CubeNotFound, InvalidField, ItemNotFound
from memosd.kernel import ids, validate
from memosd.kernel.checks import check_not_moving
from memosd.kernel.indexes import Indexes
from memosd.kernel.quotas import Quotas, staged_bytes
from memosd.kernel.requests import PURGED_DIGEST
from memosd.kernel.state import CubeState, MountState
from memosd.kernel.table import Tables
from memosd.logfmt import log_event
from memosd.store.records import (
    AdapterRecord,
    CubeRecord,
    PurgedActivation,
    PurgedVersion,
    PurgeReceipt,
    TaintedAdapter,
)
from memosd.store.rocks import Batch, Store

log = logging.getLogger("memosd.kernel")


@dataclass
class _Plan:
    receipt: PurgeReceipt
    batch: Batch
    record: CubeRecord  # the cube record after the purge
    tainted: list[AdapterRecord]
    kv_blocks: bool  # the cube had stored KV blocks: scrub must compact them away


@dataclass(frozen=True)
class PurgeParts:
    """What a purge reads and changes: the tables, the store, the indexes and the staged-bytes quotas."""

    tables: Tables
    store: Store
    indexes: Indexes
    quotas: Quotas
    limits: LimitsConfig


def run_purge(parts: PurgeParts, ref: str, item_ids: Sequence[str], source: str,
              tags: Sequence[str]) -> PurgeReceipt:
    """Kernel.purge (see the module doc)."""
    started = time.perf_counter()
    wanted_tags = frozenset(t for t in tags if t)
    if not item_ids and not source and not wanted_tags:
        raise InvalidField("nothing selects the items to purge: give item_ids, a source, or tags",
                           field="item_ids")
    validate.id_count(item_ids, parts.limits)
    cube = parts.tables.cube(ref)
    with cube.lock:
        if cube.freed:
            raise CubeNotFound(f"no cube with id or name {ref!r}", cube=ref)
        # A purge after a move's export would miss the copy it sends: refused until the move ends.
        check_not_moving(cube, "Purge")
        mounts = sorted(parts.tables.mounts_of(cube.cube_id), key=lambda m: m.mount_id)
        reset = False
        try:
            with contextlib.ExitStack() as held:
                for mount in mounts:  # no staging of the cube changes while we look and delete
                    held.enter_context(mount.lock)
                selected = _select(parts.store, cube, mounts, item_ids, source, wanted_tags)
                if not selected:
                    return PurgeReceipt("", cube.cube_id, time.time_ns())
                derived = _derived(cube, mounts, selected)
                targets = sorted({*selected, *derived})
                cube.purging = frozenset(targets)  # and mounts opened meanwhile cannot stage them
                plan = _plan(parts.store, cube, mounts, targets, derived)
                reset = True
                parts.indexes.reset(cube)
                parts.store.write(plan.batch, sync=True)
                # Durable from here on: now update memory.
                _apply(parts.quotas, cube, mounts, plan)
        finally:
            cube.purging = frozenset()
            if reset:  # from the store: without the items, or with them if the batch failed
                parts.indexes.refill(cube)
    parts.store.scrub(cube.cube_id, kv_chunks=bool(plan.receipt.activations), kv_blocks=plan.kv_blocks)
    receipt = plan.receipt
    log_event(log, "purge", cube=cube.cube_id, purge=receipt.purge_id, items=len(receipt.item_ids),
              versions=len(receipt.versions), staged=len(receipt.staged), activations=len(receipt.activations),
              adapters_tainted=len(receipt.adapters_tainted), kv_blocks_dropped=plan.kv_blocks,
              took_ms=int((time.perf_counter() - started) * 1000))
    return receipt


def _select(store: Store, cube: CubeState, mounts: Sequence[MountState], item_ids: Sequence[str], source: str,
            tags: frozenset[str]) -> list[str]:
    """The named items, and every item a version or staged copy of which has ``source`` or one of ``tags``."""
    staged_ids = {item_id for mount in mounts for item_id in mount.staging}
    # A source whose own versions compaction deleted is still purgeable while items derived from it remain:
    # they hold what it said.
    sources = cube.catalog.by_derived_source.keys() | {s for m in mounts for r in m.staging.values()
                                                       for s in r.derived_from}
    missing = [i for i in dict.fromkeys(item_ids)
               if i not in cube.catalog.by_item and i not in staged_ids and i not in sources]
    if missing:
        purged = sum(1 for i in missing if i in cube.purged)
        raise ItemNotFound(
            f"{len(missing)} item(s) are not in cube {cube.record.name!r}"
            + (f" ({purged} of them purged already)" if purged else "")
            + f": {', '.join(missing[:5])}; nothing was purged", items=",".join(missing[:100]))
    chosen = set(item_ids)
    if source or tags:
        def selected(item_source: str, item_tags: Sequence[str]) -> bool:
            return (bool(source) and item_source == source) or not tags.isdisjoint(item_tags)

        if source:  # the catalog does not keep sources: read the versions
            chosen.update(v.item_id for v in store.iter_versions(cube.cube_id) if selected(v.source, v.tags))
        else:  # by tag alone, the catalog's postings (every kept version's) answer without reading the store
            chosen.update(cube.catalog.by_vkey[vkey].item_id for tag in tags
                          for vkey in cube.catalog.by_tag.get(tag, ()))
        chosen.update(s.item_id for m in mounts for s in m.staging.values() if selected(s.source, s.tags))
    return sorted(chosen)


def _derived(cube: CubeState, mounts: Sequence[MountState], selected: Sequence[str]) -> list[str]:
    """The cascade: every item a version or staged copy of which was derived from a selected item, or from
    an item found so (a derived item may itself be a source), sorted; the selected ones left out."""
    found: set[str] = set()
    chosen, frontier = set(selected), set(selected)
    staged = [s for m in mounts for s in m.staging.values() if s.derived_from]
    while frontier:
        more = cube.catalog.derived_from_any(frontier)
        more.update(s.item_id for s in staged if frontier.intersection(s.derived_from))
        frontier = more - chosen
        chosen |= frontier
        found |= frontier
    return sorted(found)


def _plan(store: Store, cube: CubeState, mounts: Sequence[MountState], targets: list[str],
          derived: list[str]) -> _Plan:
    """Everything the purge removes and flags, as one batch and its receipt; changes nothing yet."""
    cube_id, purge_id, chosen = cube.cube_id, ids.new_id(ids.PURGE_PREFIX), set(targets)
    batch = store.batch()
    versions = [PurgedVersion(m.item_id, m.born, m.vkey) for i in targets for m in cube.catalog.by_item.get(i, ())]
    for version in versions:
        batch.delete_version(cube_id, version.item_id, version.born, version.vkey)
    vkeys = [v.vkey for v in versions]
    vectors = sum(1 for vec in store.get_vectors(cube_id, vkeys) if vec is not None)
    staged = [[m.mount_id, i] for m in mounts for i in targets if i in m.staging]
    for mount_id, item_id in staged:
        batch.delete_staged(mount_id, item_id)
    activations = [r for r in store.iter_activations(cube_id) if any(i in chosen for i, _born in r.items)]
    for activation in activations:
        batch.delete_activation(activation)
    # The range goes whether or not it holds a block (a tombstone is cheap); the scrub's costly blob GC
    # only where it did.
    kv_blocks = next(store.iter_kv_block_keys(cube_id), None) is not None
    batch.delete_kv_blocks(cube_id)
    for principal_id, request_id, request in store.iter_requests(cube_id):
        # A request's digest hashes the purged text: drop it. A retry under the id is then refused
        # (REQUEST_ID_REUSED), never applied again.
        if chosen.intersection(request.item_ids):
            batch.put_request(cube_id, principal_id, request_id,
                              replace(request, digest=f"{PURGED_DIGEST}{purge_id}"))
    tainted = [a for a in cube.adapters if chosen.intersection(a.lineage.get("source_item_ids", ()))]
    for adapter in tainted:
        batch.put_adapter(cube_id, replace(adapter, tainted=[*adapter.tainted, purge_id]))
    alive = sum(1 for i in targets if cube.catalog.visible(i, cube.head) is not None)
    record = replace(cube.record, item_count=cube.record.item_count - alive,
                     version_count=cube.record.version_count - len(versions))
    batch.put_cube(record)
    keys = np.array(vkeys, dtype=np.uint64)
    receipt = PurgeReceipt(
        purge_id, cube_id, time.time_ns(), targets, versions, vectors, staged,
        dense_entries_removed=len(keys) - len(cube.index.dense_missing(keys)),
        # The lexical index holds every version up to its watermark.
        lexical_entries_removed=sum(1 for k in vkeys if k <= cube.index.lexical_watermark),
        activations=[PurgedActivation(r.fingerprint, r.cache_key, r.revision, r.persisted_bytes)
                     for r in activations],
        adapters_tainted=[TaintedAdapter(a.digest, a.born) for a in tainted],
        derived_item_ids=derived)
    batch.put_purge(receipt)
    return _Plan(receipt, batch, record, tainted, kv_blocks)


def _apply(quotas: Quotas, cube: CubeState, mounts: Sequence[MountState], plan: _Plan) -> None:
    receipt = plan.receipt
    cube.record = plan.record
    for item_id in receipt.item_ids:
        cube.catalog.remove_item(item_id)
        cube.purged[item_id] = receipt.purge_id
    by_id = {m.mount_id: m for m in mounts}
    for mount_id, item_id in receipt.staged:
        mount = by_id[mount_id]
        # The staged copy leaves its principal's staged-bytes quota with it.
        quotas.unstaged(mount.record.principal, staged_bytes(mount.staging.pop(item_id, None),
                                                             mount.vectors.pop(item_id, None)))
    for adapter in plan.tainted:
        adapter.tainted = [*adapter.tainted, receipt.purge_id]

