"""The kernel's live state: open cubes with their catalogs and indexes, and mounts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from memosd.kernel.catalog import Catalog, VersionMeta
from memosd.kernel.ports import CubeIndexPort
from memosd.kernel.quotas import staged_bytes
from memosd.kernel.types import ItemView
from memosd.store.records import (
    AdapterRecord,
    CubeRecord,
    MountRecord,
    StagedAdapterRecord,
    StagedRecord,
    VersionRecord,
)


@dataclass
class CubeState:
    record: CubeRecord
    catalog: Catalog
    index: CubeIndexPort
    # Serializes commits, rollbacks and frees of this cube, and catalog changes.
    lock: threading.RLock = field(default_factory=threading.RLock)
    index_dirty: bool = False
    freed: bool = False
    # Every version of the cube's adapter, oldest first (a few at most; see kernel/adapters.py).
    adapters: list[AdapterRecord] = field(default_factory=list)
    # Purged item id -> the purge that removed it (from the purges family): the tombstones.
    purged: dict[str, str] = field(default_factory=dict)
    # Items a running Purge removes: no mount may stage a change to them meanwhile.
    purging: frozenset[str] = frozenset()
    # A move between cluster nodes (cluster/move.py), in memory only (a restart ends it): the node it goes
    # to or comes from ("" for none). ``move_frozen``: no change at all is taken (from the freeze until the
    # move ends); before it, only new read-write mounts are refused, while the open ones drain.
    moving: str = ""
    move_direction: str = ""  # "to" (this node is the owner sending it) or "from" (received, not served yet)
    move_frozen: bool = False

    @property
    def cube_id(self) -> str:
        return self.record.cube_id

    def adapter_at(self, revision: int) -> AdapterRecord | None:
        """The adapter current at ``revision``, or None."""
        for adapter in reversed(self.adapters):
            if adapter.born <= revision and (adapter.died == 0 or adapter.died > revision):
                return adapter
        return None

    @property
    def head(self) -> int:
        return self.record.head


@dataclass
class MountState:
    record: MountRecord
    staging: dict[str, StagedRecord] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    staged_adapter: StagedAdapterRecord | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    # False: a read-only mount made while the disk was full, held in memory only (gone at a restart)
    persisted: bool = True

    @property
    def mount_id(self) -> str:
        return self.record.mount_id

    @property
    def writable(self) -> bool:
        return self.record.mode == "rw"

    def item_bytes(self, item_id: str) -> int:
        """What the staged change of ``item_id`` (if any) counts against the staged-bytes quota."""
        return staged_bytes(self.staging.get(item_id), self.vectors.get(item_id))

    def staged_total(self) -> int:
        """What the whole staging counts against the staged-bytes quota."""
        return sum(self.item_bytes(item_id) for item_id in self.staging)

    def counts(self) -> tuple[int, int, int]:
        adds = edits = forgets = 0
        for staged in self.staging.values():
            if staged.kind == "add":
                adds += 1
            elif staged.kind == "edit":
                edits += 1
            else:
                forgets += 1
        return adds, edits, forgets


def meta_of(version: VersionRecord) -> VersionMeta:
    return VersionMeta(version.vkey, version.item_id, version.born, version.died,
                       frozenset(version.tags), version.event_ns, version.content_id,
                       version.speaker, version.session_id, version.state, version.expire_ns,
                       tuple(version.derived_from))


def view_of(version: VersionRecord) -> ItemView:
    return ItemView(version.item_id, version.text, tuple(version.tags), version.source,
                    version.event_ns, version.write_ns, version.born,
                    speaker=version.speaker, session_id=version.session_id, state=version.state,
                    expire_ns=version.expire_ns, derived_from=tuple(version.derived_from),
                    derived_job=version.derived_job)


def staged_view(staged: StagedRecord) -> ItemView:
    return ItemView(staged.item_id, staged.text, tuple(staged.tags), staged.source,
                    staged.event_ns, staged.write_ns, 0, staged=True,
                    speaker=staged.speaker, session_id=staged.session_id, expire_ns=staged.expire_ns,
                    derived_from=tuple(staged.derived_from), derived_job=staged.derived_job)
