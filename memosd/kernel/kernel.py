"""The kernel: cube, mount, staging and revision semantics, behind one facade.

Each method is one syscall's meaning, in plain Python values. Durable changes
are built as one store Batch and written before memory (catalog, indexes) is
touched, so a crash at any point leaves either the old or the new state; the
derived indexes catch up from the store at the next start.

The facade puts the kernel's parts together, and code outside ``kernel/``
reaches them only through it: the tables and the one lock order (table.py),
index upkeep (indexes.py), cube and mount changes (cubes.py), staging
(staging.py), revisions (revisions.py), item states (item_states.py), reads
(reads.py), compaction (compact.py) and purge (purge.py). Outside code uses
the methods here, never the tables, the store or a cube's lock and catalog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Literal

from memosd.config import LimitsConfig, QuotasConfig
from memosd.kernel import totals
from memosd.kernel.catalog import VersionMeta
from memosd.kernel.checks import check_thawed, mount_not_found
from memosd.kernel.compact import CompactResult, run_compact
from memosd.kernel.cubes import CubeAdmin
from memosd.kernel.indexes import Indexes
from memosd.kernel.item_states import ItemStates
from memosd.kernel.portable import CubePorter, ImportResult
from memosd.kernel.ports import NO_DIRECTORY, DirectoryPort, EmbedderPort, IndexFactory
from memosd.kernel.purge import PurgeParts, run_purge
from memosd.kernel.quotas import Quotas
from memosd.kernel.reads import Reads
from memosd.kernel.requests import Claim, RequestIdentity, RequestIds, RequestRef
from memosd.kernel.revisions import Revisions
from memosd.kernel.staging import Staging
from memosd.kernel.state import CubeState as CubeState  # the handle types callers name
from memosd.kernel.state import MountState as MountState
from memosd.kernel.table import Tables
from memosd.kernel.totals import KernelTotals
from memosd.kernel.types import (
    CommitResult,
    CubeInfo,
    FreeResult,
    IngestResult,
    ItemChange,
    ItemInput,
    ItemView,
    Message,
    MountInfo,
    Page,
)
from memosd.logfmt import log_event
from memosd.store.archive import ArchiveSummary
from memosd.store.records import (
    AdapterRecord,
    CubeRecord,
    GenerationProvenance,
    PurgeReceipt,
    RevisionRecord,
    VersionRecord,
)
from memosd.store.rocks import Batch, Store

log = logging.getLogger("memosd.kernel")

# What write_unless_gone did: wrote the batch, or dropped it because the cube was freed or items purged.
WriteOutcome = Literal["written", "freed", "purged"]


class Kernel:
    def __init__(
        self, store: Store, embedder: EmbedderPort, index_factory: IndexFactory, index_root: Path,
        limits: LimitsConfig, *, sync_commits: bool = True, quotas: QuotasConfig | None = None,
        directory: DirectoryPort = NO_DIRECTORY,
    ) -> None:
        self.node_tag = directory.node_tag  # in this node's mount and job ids (a cluster routes by it)
        self.store = store  # kernel/ and tests only: outside code is handed the Store by the daemon
        self.embedder = embedder
        self.limits = limits
        self.quotas = Quotas(quotas or QuotasConfig())  # told of every mount and staging change
        self.requests = RequestIds(store, limits.request_id_ttl_seconds)
        self._tables = Tables(store, self.quotas)
        # The tables themselves, for kernel/ (search) and white-box tests; the dicts are never replaced.
        self.cubes: dict[str, CubeState] = self._tables.cubes
        self.mounts: dict[str, MountState] = self._tables.mounts
        self._indexes = Indexes(store, embedder, index_factory, index_root)
        self._admin = CubeAdmin(self._tables, store, self._indexes, self.quotas, sync=sync_commits,
                                directory=directory)
        self._staging = Staging(self._tables, store, embedder, limits, self.quotas, self.requests)
        self._revisions = Revisions(self._tables, self._staging, store, embedder, limits, self.quotas,
                                    self.requests, sync=sync_commits)
        self._states = ItemStates(self._tables, self._revisions, store, limits)
        self._reads = Reads(self._tables, store, limits)
        self._purge = PurgeParts(self._tables, store, self._indexes, self.quotas, limits)
        self._porter = CubePorter(self._tables, store, self._indexes, embedder, sync=sync_commits,
                                  directory=directory)

    # -- start and stop -------------------------------------------------
    def open(self) -> None:
        """Load every cube and mount and bring the derived indexes up to the store (kernel/indexes.py), after
        deleting the rows of imports a crash cut short (kernel/portable.py)."""
        orphans = self.store.sweep_orphans()
        if orphans:
            log_event(log, "orphan_rows_deleted", cubes=",".join(orphans),
                      hint="an ImportCube was cut short; nothing of it was visible")
        self._indexes.open(self._tables, self.quotas)

    def save_indexes(self) -> None:
        Indexes.save(self.cubes.values())

    def set_quotas(self, quotas: QuotasConfig) -> None:
        """New limits for the next check (a cluster node's cluster config changed); what is held stays held."""
        self.quotas.config = quotas

    def close(self) -> None:
        Indexes.close(self.cubes.values())
        self.store.close()

    def reset_index(self, cube: CubeState) -> None:
        self._indexes.reset(cube)

    def refill_index(self, cube: CubeState) -> None:
        self._indexes.refill(cube)

    # -- lookups --------------------------------------------------------
    def cube(self, ref: str) -> CubeState:
        """A cube by id or name (CUBE_NOT_FOUND when there is none, or it was freed)."""
        return self._tables.cube(ref)

    def mount_state(self, mount_id: str) -> MountState:
        return self._tables.mount_state(mount_id)

    def cube_of(self, mount: MountState) -> CubeState:
        return self._tables.cube_of(mount)

    def cube_info(self, cube: CubeState) -> CubeInfo:
        return self._tables.cube_info(cube)

    def mount_info(self, mount: MountState) -> MountInfo:
        return self._tables.mount_info(mount)

    def cube_ids(self) -> list[str]:
        """The ids of every open cube."""
        return list(self.cubes)

    def has_cube(self, cube_id: str) -> bool:
        """Whether ``cube_id`` names an open cube (False once it was freed)."""
        return cube_id in self.cubes

    def open_cubes(self) -> list[CubeState]:
        """Every open cube (a snapshot), for loops that visit them all (the scheduler)."""
        return [c for c in list(self.cubes.values()) if not c.freed]

    def head(self, cube_id: str) -> int:
        """The cube's HEAD revision; 0 for a cube that is gone (freed meanwhile)."""
        cube = self.cubes.get(cube_id)
        return cube.head if cube is not None else 0

    def cube_record(self, cube_id: str) -> CubeRecord | None:
        """The cube's record (None for a cube that is gone)."""
        cube = self.cubes.get(cube_id)
        return cube.record if cube is not None else None

    def cube_records(self) -> list[CubeRecord]:
        return [c.record for c in list(self.cubes.values())]

    def mounts_of(self, cube_id: str = "", *, principal: str = "") -> list[MountInfo]:
        """The open mounts of a cube ("": of every cube), of one principal if ``principal`` is given."""
        return [self._tables.mount_info(m) for m in list(self.mounts.values())
                if (not cube_id or m.record.cube_id == cube_id) and (not principal or m.record.principal == principal)]

    def mount_count(self) -> int:
        return len(self.mounts)

    def totals(self) -> KernelTotals:
        """What the kernel holds, for Stats (cubes, mounts, items, index, store and adapter bytes, disk)."""
        return totals.count(list(self.cubes.values()), len(self.mounts), self.store)

    def visible_items(self, cube_id: str, revision: int, now_ns: int) -> list[VersionMeta]:
        """The items alive at ``revision`` and neither archived nor expired at ``now_ns``, read under the
        cube's lock (what activation, training and the scheduler take as the cube's memory)."""
        return Reads.visible_items(self.cube(cube_id), revision, now_ns)

    def versions(self, cube_id: str, refs: Sequence[tuple[str, int]]) -> list[VersionRecord | None]:
        """The stored versions (item_id, born) of the cube, in order; None for one that is gone."""
        return self.store.get_versions(cube_id, list(refs))

    def revisions(self, cube_id: str, newest: int) -> Iterator[RevisionRecord]:
        """The cube's revisions from ``newest`` down."""
        return self.store.iter_revisions(cube_id, newest=newest)

    def write_unless_gone(self, cube: CubeState, batch: Batch, items: Collection[str] = (), *, sync: bool = True,
                          then: Callable[[], None] | None = None) -> WriteOutcome:
        """Write ``batch`` (rows a layer keeps of the cube: activations) under the cube's lock, unless the
        cube was freed or one of ``items`` purged meanwhile (FreeCube and Purge take that lock to delete
        those rows: a batch written after them would bring the rows back). ``then`` runs under the lock
        after the write."""
        with cube.lock:
            if cube.freed:
                return "freed"
            if any(item_id in cube.purged for item_id in items):
                return "purged"
            self.store.write(batch, sync=sync)
            if then is not None:
                then()
            return "written"

    def still_holds(self, cube: CubeState, items: Collection[str]) -> bool:
        """Whether the cube is not freed and none of ``items`` is purged, checked under the cube's lock: a
        copy of them made elsewhere (a pooled KV cache) before this returns True was made before any
        FreeCube or Purge that would have to remove it, which then does."""
        with cube.lock:
            return not cube.freed and not any(item_id in cube.purged for item_id in items)

    # -- cubes and mounts -----------------------------------------------
    def alloc_cube(self, name: str, description: str, labels: dict[str, str], owner: str = "",
                   cube_id: str = "") -> CubeInfo:
        """A new cube; ``cube_id`` is one placement chose (a cluster's router), else a new id."""
        return self._admin.alloc_cube(name, description, labels, owner, cube_id)

    def free_cube(self, ref: str, *, local: bool = False) -> FreeResult:
        """FreeCube; ``local``: this node's copy only, the cluster directory left alone (cluster/move.py)."""
        return self._admin.free_cube(ref, local=local)

    def set_policy(self, ref: str, policy: dict[str, object]) -> CubeInfo:
        return self._admin.set_policy(ref, policy)

    def set_frozen(self, ref: str, frozen: bool) -> CubeInfo:
        return self._admin.set_frozen(ref, frozen)

    def set_retention(self, ref: str, keep_last: int, keep_seconds: float) -> CubeInfo:
        return self._admin.set_retention(ref, keep_last, keep_seconds)

    def export_cube(self, ref: str, out: IO[bytes], *, with_kv: bool) -> tuple[CubeInfo, ArchiveSummary]:
        """Write the cube as a memosd-cube archive to ``out`` (kernel/portable.py)."""
        return self._porter.export_cube(ref, out, with_kv=with_kv)

    def import_cube(self, path: Path, name: str, owner: str, accept_kv: Callable[[str], bool],
                    kv_unavailable: str = "", *, moved_from: str = "", cube_id: str = "") -> ImportResult:
        """Recreate a cube from the archive at ``path`` under ``name``, all or nothing (kernel/portable.py);
        ``moved_from``: cube ``cube_id`` arriving by a cluster move (its id, name and owner kept, not claimed)."""
        return self._porter.import_cube(path, name, owner, accept_kv, kv_unavailable, moved_from=moved_from,
                                        cube_id=cube_id)

    # -- moves between cluster nodes (the protocol is cluster/move.py) --
    def begin_move(self, ref: str, node: str) -> CubeState:
        """New read-write mounts of the cube are refused (CUBE_MOVING) from now on; the open ones drain."""
        return self._admin.begin_move(ref, node)

    def freeze_move(self, cube: CubeState) -> bool:
        """No change to the cube from now on, unless a read-write mount is still open (then False)."""
        return self._admin.freeze_move(cube)

    def end_move(self, cube: CubeState) -> None:
        """The cube takes changes again (a move given up, or a received cube this node now owns)."""
        self._admin.end_move(cube)

    def moving(self) -> list[str]:
        """The ids of the cubes a move is sending from, or bringing to, this node now."""
        return [c.cube_id for c in list(self.cubes.values()) if c.moving]

    def read_write_mounts(self, cube_id: str) -> int:
        return sum(1 for m in list(self.mounts.values()) if m.record.cube_id == cube_id and m.record.mode == "rw")

    def compact(self, ref: str) -> CompactResult:
        """Apply the cube's retention policy now (kernel/compact.py); refused on a frozen cube."""
        cube = self.cube(ref)
        with cube.lock:  # reentrant: run_compact takes it again
            check_thawed(cube, "compaction")
            return run_compact(self.store, self._tables, cube)

    def list_cubes(self, page_size: int, token: str, visible: Callable[[CubeRecord], bool] = lambda _: True
                   ) -> Page[CubeInfo]:
        return self._admin.list_cubes(page_size, token, visible)

    def mount(self, ref: str, revision: int, writable: bool, principal: str = "") -> MountInfo:
        return self._admin.mount(ref, revision, writable, principal)

    def unmount(self, mount_id: str) -> tuple[MountInfo, int]:
        return self._admin.unmount(mount_id)

    # -- staging --------------------------------------------------------
    def write(self, mount_id: str, inputs: Sequence[ItemInput], request: RequestRef | None = None
              ) -> tuple[list[str], MountInfo]:
        return self._staging.write(mount_id, inputs, request)

    def forget(self, mount_id: str, item_ids: Sequence[str], adapter: bool = False) -> MountInfo:
        return self._staging.forget(mount_id, item_ids, adapter)

    def stage_adapter(self, mount_id: str, adapter: AdapterRecord, config: bytes, weights: bytes | Path,
                      claim: Claim | None = None) -> MountInfo:
        return self._staging.stage_adapter(mount_id, adapter, config, weights, claim)

    # -- revisions ------------------------------------------------------
    def commit(self, mount_id: str, message: str, author: str, request: RequestRef | None = None) -> CommitResult:
        return self._revisions.commit(mount_id, message, author, request)

    def ingest(self, mount_id: str, messages: Sequence[Message], *, tags: Sequence[str] = (), source: str = "",
               message: str = "", author: str = "", request: RequestRef | None = None,
               generation: GenerationProvenance | None = None, claim_as: RequestIdentity | None = None
               ) -> IngestResult:
        return self._revisions.ingest(mount_id, messages, tags=tags, source=source, message=message,
                                      author=author, request=request, generation=generation, claim_as=claim_as)

    def writable_mount(self, mount_id: str) -> MountInfo:
        """The open read-write mount (its cube not frozen); MOUNT_READ_ONLY / CUBE_FROZEN otherwise. For a
        call that will write through it later (a remembering Generate) to refuse before its work."""
        mount, _cube = self._staging.writable(mount_id)
        return self._tables.mount_info(mount)

    def rollback(self, ref: str, target: int, message: str, author: str) -> RevisionRecord:
        return self._revisions.rollback(ref, target, message, author)

    def commit_adapter(self, ref: str, since: int, adapter: AdapterRecord, config: bytes, weights: bytes,
                       message: str, author: str,
                       guard: Callable[[CubeState], AbstractContextManager[object]] | None = None) -> RevisionRecord:
        return self._revisions.commit_adapter(ref, since, adapter, config, weights, message, author, guard)

    def set_item_state(self, ref: str, item_ids: Sequence[str], state: str, message: str, author: str
                       ) -> RevisionRecord | None:
        return self._states.set_item_state(ref, item_ids, state, message, author)

    def expire_due(self, ref: str, author: str = "memosd") -> tuple[RevisionRecord | None, list[str]]:
        return self._states.expire_due(ref, author)

    # -- purge ----------------------------------------------------------
    def purge(self, ref: str, item_ids: Sequence[str], source: str = "", tags: Sequence[str] = ()) -> PurgeReceipt:
        """Remove items from every revision, both indexes and every KV cache of the cube, flag the adapters
        trained on them, and scrub the store (see kernel/purge.py). Items are selected by id, and/or by the
        source or any of the tags of any of their versions (or staged copies); every item derived from a selected
        one (``derived_from``) goes too, and the receipt lists those in ``derived_item_ids``."""
        return run_purge(self._purge, ref, item_ids, source, tags)

    def purges(self, ref: str) -> list[PurgeReceipt]:
        return self._reads.purges(ref)

    # -- reads ----------------------------------------------------------
    def read(self, mount_id: str, item_ids: Sequence[str]) -> tuple[list[ItemView], MountInfo]:
        return self._reads.read(mount_id, item_ids)

    def list_items(self, mount_id: str, page_size: int, token: str) -> tuple[Page[ItemView], MountInfo]:
        return self._reads.list_items(mount_id, page_size, token)

    def log(self, ref: str, page_size: int, token: str) -> tuple[Page[RevisionRecord], int]:
        return self._reads.log(ref, page_size, token)

    def diff(self, ref: str, older: int, newer: int, page_size: int, token: str) -> tuple[Page[ItemChange], int, int]:
        return self._reads.diff(ref, older, newer, page_size, token)

    def adapter_in(self, mount: MountState) -> tuple[AdapterRecord | None, bool]:
        return self._reads.adapter_in(mount)

    def adapter_files(self, cube_id: str, adapter: AdapterRecord) -> tuple[bytes, bytes]:
        return self._reads.adapter_files(cube_id, adapter)

    def adapter_change(self, ref: str, older: int, newer: int) -> tuple[AdapterRecord | None, AdapterRecord | None]:
        return self._reads.adapter_change(ref, older, newer)

    def expired_past_grace(self, ref: str, grace_ns: int) -> list[str]:
        return self._states.expired_past_grace(ref, grace_ns)


# Refusals outside code raises the same way the kernel does (syscalls, governance, parametric).
__all__ = ["Kernel", "WriteOutcome", "check_thawed", "mount_not_found"]
