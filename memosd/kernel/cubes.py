"""Changes to the cube and mount tables: AllocCube, FreeCube, Mount, Unmount, and a cube's settings
(scheduler policy, frozen, retention). Each is written to the store before the tables change."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from memosd.errors import CubeNameTaken, DiskFull, InvalidField, RevisionNotFound
from memosd.kernel import clock, ids, paging, validate
from memosd.kernel.catalog import Catalog
from memosd.kernel.checks import check_not_moving, check_readable, check_thawed
from memosd.kernel.indexes import Indexes
from memosd.kernel.ports import NO_DIRECTORY, DirectoryPort
from memosd.kernel.quotas import Quotas
from memosd.kernel.staging import drop_staged_files
from memosd.kernel.state import CubeState, MountState
from memosd.kernel.table import Tables
from memosd.kernel.types import CubeInfo, FreeResult, MountInfo, Page
from memosd.logfmt import log_event
from memosd.store.records import CubeRecord, MountRecord
from memosd.store.rocks import Store

log = logging.getLogger("memosd.kernel")


def check_name_free(store: Store, name: str) -> None:
    """Refuse a cube name in use (AllocCube, ImportCube). Names are one namespace for every principal
    (docs/ARCHITECTURE.md): the refusal says the name is in use, never by which cube or whose, and reads the
    same whether the caller can see it."""
    if store.cube_id_by_name(name) is not None:
        raise CubeNameTaken(f"the cube name {name!r} is in use (cube names are shared by all principals, "
                            "visible cubes or not); pick another name", name=name)


class CubeAdmin:
    def __init__(self, tables: Tables, store: Store, indexes: Indexes, quotas: Quotas, *, sync: bool,
                 directory: DirectoryPort = NO_DIRECTORY) -> None:
        self._directory = directory
        self._tables = tables
        self._store = store
        self._indexes = indexes
        self._quotas = quotas
        self._sync = sync

    # -- cubes ----------------------------------------------------------
    def alloc_cube(self, name: str, description: str, labels: dict[str, str], owner: str = "",
                   cube_id: str = "") -> CubeInfo:
        validate.cube_name(name)
        validate.cube_meta(description, labels)
        if cube_id and (not ids.CUBE_ID_RE.fullmatch(cube_id) or cube_id in self._tables.cubes):
            raise InvalidField(f"the placed cube id {cube_id!r} is not a new cube id", field="cube_id")
        check_name_free(self._store, name)  # a name taken here is refused before the directory is asked
        cube_id = cube_id or ids.new_id(ids.CUBE_PREFIX)
        # Claimed in the cluster's directory first, outside the lock (a network round trip): the name is
        # then ours cluster-wide, and a local commit that fails gives the claim back.
        if not self._directory.claim(cube_id, name, owner):
            raise InvalidField(f"the placed cube id {cube_id!r} is already in the cluster's directory",
                               field="cube_id")
        try:
            with self._tables.lock:
                check_name_free(self._store, name)
                record = CubeRecord(cube_id, name, description, dict(labels), clock.now_ns(), owner=owner)
                batch = self._store.batch()
                batch.put_cube(record)
                batch.put_name(name, record.cube_id)
                self._store.write(batch, sync=self._sync)
                cube = CubeState(record, Catalog(), self._indexes.new(record.cube_id))
                self._tables.cubes[record.cube_id] = cube
        except BaseException:
            self._directory.release(cube_id)
            raise
        log_event(log, "alloc_cube", cube=record.cube_id, name=name)
        return self._tables.cube_info(cube)

    def free_cube(self, ref: str, *, local: bool = False) -> FreeResult:
        """FreeCube; ``local``: delete this node's copy only, leaving the directory alone (the old copy after a
        move, or a received one the directory does not give to this node: cluster/move.py)."""
        # Refused before anything is freed when the directory cannot be changed (etcd without quorum).
        if not local:
            check_not_moving(self._tables.cube(ref), "FreeCube", opening=True)
            self._directory.check_changeable(self._tables.cube(ref).cube_id)
        with self._tables.lock:
            cube = self._tables.cube(ref)
            with cube.lock:
                if not local:
                    check_not_moving(cube, "FreeCube", opening=True)
                mounts = [m for m in self._tables.mounts.values() if m.record.cube_id == cube.cube_id]
                batch = self._store.batch()
                batch.delete_cube(cube.record)
                for mount in mounts:
                    batch.delete_mount(mount.mount_id)
                self._store.write(batch, sync=self._sync)
                cube.freed = True
                for mount in mounts:
                    del self._tables.mounts[mount.mount_id]
                    self._quotas.closed(mount.record.principal, cube.cube_id, mount.staged_total())
                del self._tables.cubes[cube.cube_id]
                cube.index.destroy()
        # Freed locally first, then released: a release that fails now leaves an entry naming this node
        # for a cube it no longer has, which the next join reports (cluster/node.py); never the reverse.
        if not local:
            self._directory.release(cube.cube_id)
        log_event(log, "free_cube", cube=cube.cube_id, revisions=cube.head, versions=len(cube.catalog),
                  local_copy_only=local)
        return FreeResult(cube.head, len(cube.catalog), len(mounts))

    def _set_record(self, ref: str, change: Callable[[CubeRecord], CubeRecord | None]) -> CubeState:
        """Replace the cube's record by ``change``'s (None: no change), written synced, under its lock."""
        cube = self._tables.cube(ref)
        with cube.lock:
            check_not_moving(cube, "changing its settings")
            record = change(cube.record)
            if record is not None:
                batch = self._store.batch()
                batch.put_cube(record)
                self._store.write(batch, sync=True)
                cube.record = record
        return cube

    def set_policy(self, ref: str, policy: dict[str, object]) -> CubeInfo:
        """Replace the cube's scheduler policy; written synced."""
        policy = validate.policy(policy)
        cube = self._set_record(ref, lambda record: replace(record, policy=dict(policy)))
        log_event(log, "set_policy", cube=cube.cube_id, policy=",".join(f"{k}={v}" for k, v in policy.items()))
        return self._tables.cube_info(cube)

    def set_frozen(self, ref: str, frozen: bool) -> CubeInfo:
        """Freeze (read-only: commits refused with CUBE_FROZEN) or thaw the cube; written synced."""
        cube = self._set_record(ref, lambda record: replace(record, frozen=frozen) if record.frozen != frozen
                                else None)
        log_event(log, "freeze_cube" if frozen else "thaw_cube", cube=cube.cube_id)
        return self._tables.cube_info(cube)

    def set_retention(self, ref: str, keep_last: int, keep_seconds: float) -> CubeInfo:
        """Set which revisions compaction keeps (0 turns a rule off); written synced. Compacts nothing."""
        validate.retention(keep_last, keep_seconds)
        retention = {k: v for k, v in (("keep_last", keep_last), ("keep_seconds", keep_seconds)) if v}
        cube = self._set_record(ref, lambda record: replace(record, retention=retention))
        log_event(log, "set_retention", cube=cube.cube_id, keep_last=keep_last, keep_seconds=keep_seconds)
        return self._tables.cube_info(cube)

    def list_cubes(self, page_size: int, token: str, visible: Callable[[CubeRecord], bool] = lambda _: True
                   ) -> Page[CubeInfo]:
        size = paging.page_size(page_size)
        after = paging.decode_token(token, "cubes") or ""
        cubes = self._tables.cubes
        ordered = sorted(cid for cid, cube in list(cubes.items()) if cid > str(after) and visible(cube.record))
        page = [self._tables.cube_info(cubes[cid]) for cid in ordered[:size] if cid in cubes]
        more = len(ordered) > size
        return Page(page, paging.encode_token("cubes", ordered[size - 1]) if more else "")

    # -- mounts ---------------------------------------------------------
    def mount(self, ref: str, revision: int, writable: bool, principal: str = "") -> MountInfo:
        with self._tables.lock:
            cube = self._tables.cube(ref)
            with cube.lock:  # a compaction cannot remove the revision between the check and the mount
                base = cube.head if revision == 0 else revision
                if base > cube.head:
                    raise RevisionNotFound(
                        f"cube {cube.record.name!r} has no revision {revision}; HEAD is {cube.head}",
                        cube=cube.cube_id, revision=revision, head=cube.head)
                check_readable(cube, base, "mount")
                if writable:
                    check_not_moving(cube, "a read-write mount", opening=True)
                    check_thawed(cube, "a read-write mount")
                self._quotas.check_mount(principal)  # under the tables' lock: two Mounts cannot both pass
                record = MountRecord(ids.new_id(ids.MOUNT_PREFIX, self._directory.node_tag), cube.cube_id, base,
                                     "rw" if writable else "ro", clock.now_ns(), principal)
                batch = self._store.batch()
                batch.put_mount(record)
                try:
                    self._store.write(batch, sync=False)
                    persisted = True
                except DiskFull:
                    if writable:
                        raise
                    persisted = False  # a read-only mount needs no disk: reads go on while the disk is full
                mount = MountState(record, persisted=persisted)
                self._tables.mounts[record.mount_id] = mount
                self._quotas.opened(principal, cube.cube_id)
        return self._tables.mount_info(mount)

    def unmount(self, mount_id: str) -> tuple[MountInfo, int]:
        with self._tables.lock:
            mount = self._tables.mount_state(mount_id)
            with mount.lock:
                info = self._tables.mount_info(mount)
                discarded = len(mount.staging) + (mount.staged_adapter is not None)
                if mount.persisted:
                    batch = self._store.batch()
                    batch.delete_mount(mount_id)
                    drop_staged_files(batch, mount, self._tables.cubes.get(mount.record.cube_id))
                    self._store.write(batch, sync=False)
                del self._tables.mounts[mount_id]
                self._quotas.closed(mount.record.principal, mount.record.cube_id, mount.staged_total())
        return info, discarded

    # -- moves between cluster nodes (cluster/move.py) ------------------
    def begin_move(self, ref: str, node: str) -> CubeState:
        """Mark the cube as moving to ``node``: new read-write mounts are refused from now on (the open ones
        may still write and commit while they drain). Refused when a move of it is already running."""
        cube = self._tables.cube(ref)
        with cube.lock:
            check_not_moving(cube, "another move", opening=True)
            cube.moving, cube.move_direction, cube.move_frozen = node, "to", False
        log_event(log, "move_begun", cube=cube.cube_id, to=node)
        return cube

    def freeze_move(self, cube: CubeState) -> bool:
        """No change at all from now on, if no read-write mount of the cube is open (checked under its lock,
        which Mount takes too: none can open in between). False, and nothing changed, when one is."""
        with cube.lock:
            if any(m.record.cube_id == cube.cube_id and m.record.mode == "rw"
                   for m in list(self._tables.mounts.values())):
                return False
            cube.move_frozen = True
        return True

    def end_move(self, cube: CubeState) -> None:
        with cube.lock:
            cube.moving, cube.move_direction, cube.move_frozen = "", "", False
