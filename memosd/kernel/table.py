"""The cube and mount tables, and the one lock order of the kernel.

Lock order (a thread holding a lock on the left may take those on its right,
never the reverse):

1. a request id's claim (``RequestIds.claim``: a retry waits for the first call);
2. ``Tables.lock``: the cube and mount tables themselves (alloc, free, mount, unmount);
3. ``CubeState.lock``: commits, rollbacks, frees, compaction, purge and every catalog change of that
   cube; reads of the catalog take it too, as catalog changes happen under it;
4. ``MountState.lock``: a mount's staging (several at once only in Purge, in mount-id order);
   ``Kernel.commit_adapter``'s guard, instead, enters governance's locks here (``AccessControl`` then
   ``Principals``: the job's principal must still hold the train right), and those never call back
   into the kernel while held;
5. the quota counters' own lock (``Quotas``), held for no more than a counter update.

Other layers' locks come before all of these (the activator's per-cube lock is held around
``Kernel.write_unless_gone``), and code outside ``kernel/`` never takes these itself: the facade
(kernel.py) does, e.g. for ``Kernel.visible_items``. Nothing holds them while it waits on the model (the
runtime worker). Lookups and list_cubes read the tables without the lock, through ``list(...)`` snapshots
and single ``dict.get`` calls.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from memosd.errors import CubeNotFound, InvalidField, MountNotFound
from memosd.kernel.checks import mount_not_found
from memosd.kernel.quotas import Quotas
from memosd.kernel.state import CubeState, MountState
from memosd.kernel.types import CubeInfo, MountInfo
from memosd.store.rocks import Store


class Tables:
    """The open cubes and mounts by id, and the lookups every part refuses missing ones with."""

    def __init__(self, store: Store, quotas: Quotas) -> None:
        self._store = store
        self._quotas = quotas
        self.lock = threading.RLock()  # guards the two tables (2. in the module's lock order)
        self.cubes: dict[str, CubeState] = {}
        self.mounts: dict[str, MountState] = {}

    def cube(self, ref: str) -> CubeState:
        """A cube by id or name."""
        if not ref:
            raise InvalidField("cube is empty; give a cube id or name", field="cube")
        cube = self.cubes.get(ref)
        if cube is None:
            cube_id = self._store.cube_id_by_name(ref)
            cube = self.cubes.get(cube_id) if cube_id else None
        if cube is None or cube.freed:
            raise CubeNotFound(f"no cube with id or name {ref!r}", cube=ref)
        return cube

    def mount_state(self, mount_id: str) -> MountState:
        if not mount_id:
            raise InvalidField("mount_id is empty; Mount a cube first and pass its mount_id",
                               field="mount_id")
        mount = self.mounts.get(mount_id)
        if mount is None:
            raise mount_not_found(mount_id)
        return mount

    def cube_of(self, mount: MountState) -> CubeState:
        cube = self.cubes.get(mount.record.cube_id)
        if cube is None or cube.freed:
            raise MountNotFound(f"mount {mount.mount_id!r} was closed: its cube was freed",
                                mount=mount.mount_id)
        return cube

    def check_mount_open(self, mount: MountState) -> None:
        if self.mounts.get(mount.mount_id) is not mount:
            raise MountNotFound(f"mount {mount.mount_id!r} was closed", mount=mount.mount_id)

    def mounts_of(self, cube_id: str) -> list[MountState]:
        """The cube's open mounts (a snapshot: the table may change meanwhile unless its lock is held)."""
        return [m for m in list(self.mounts.values()) if m.record.cube_id == cube_id]

    def cube_info(self, cube: CubeState) -> CubeInfo:
        # The open mounts are counted at every open and close, not scanned.
        return CubeInfo(replace(cube.record), self._quotas.cube_mounts(cube.cube_id))

    def mount_info(self, mount: MountState) -> MountInfo:
        cube = self.cubes.get(mount.record.cube_id)
        return MountInfo(replace(mount.record), cube.head if cube else 0, *mount.counts(),
                         staged_adapter=mount.staged_adapter is not None)
