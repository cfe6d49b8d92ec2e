"""The kernel: cube, mount, staging and revision semantics.

Each method is one syscall's meaning, in plain Python values. Durable changes
are built as one store Batch and written before memory (catalog, indexes) is
touched, so a crash at any point leaves either the old or the new state; the
derived indexes catch up from the store at the next start.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from memosd.config import LimitsConfig, QuotasConfig
from memosd.errors import (
    CubeFrozen,
    CubeNameTaken,
    CubeNotFound,
    DiskFull,
    InternalError,
    InvalidField,
    ItemNotFound,
    MountNotFound,
    MountReadOnly,
    RevisionCompacted,
    RevisionNotFound,
    StagingFull,
)
from memosd.fsutil import fsync_path
from memosd.kernel import adapters, history, ids, paging, validate
from memosd.kernel.catalog import Catalog, VersionMeta
from memosd.kernel.compact import CompactResult, oldest_readable, run_compact
from memosd.kernel.conversation import SessionOrder, plan_ingest
from memosd.kernel.memory_text import MEMORY_TEXT_RECIPE, memory_text
from memosd.kernel.ports import EmbedderPort, IndexFactory
from memosd.kernel.purge import run_purge, taint_on_commit
from memosd.kernel.quotas import Quotas, staged_bytes
from memosd.kernel.requests import Claim, RequestIds, RequestRef
from memosd.kernel.state import CubeState, MountState, meta_of, staged_view, view_of
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
from memosd.store import schema
from memosd.store.records import (
    AdapterRecord,
    CubeRecord,
    MountRecord,
    PurgeReceipt,
    RevisionRecord,
    StagedAdapterRecord,
    StagedRecord,
    VersionRecord,
)
from memosd.store.rocks import Batch, Store
from memosd.store.space import is_no_space

log = logging.getLogger("memosd.kernel")


def mount_not_found(mount_id: str) -> MountNotFound:
    """The one refusal for a mount id that is unknown, closed, or someone else's: they look the same."""
    return MountNotFound(f"no open mount {mount_id!r}; it was unmounted, its cube freed, or never existed. "
                         "Mount the cube again and use the new mount_id", mount=mount_id)


def _now_ns() -> int:
    return time.time_ns()


def check_readable(cube: CubeState, revision: int, action: str) -> None:
    """Refuse ``action`` at a revision compaction removed the content of (revision 0, the empty cube, stays)."""
    oldest = oldest_readable(cube)
    if 1 <= revision < oldest:
        raise RevisionCompacted(
            f"revision {revision} of cube {cube.record.name!r} was compacted by its retention policy: its log "
            f"entry stays but its content is gone. Revisions {oldest} to {cube.head} (HEAD) remain; {action} "
            "one of those", cube=cube.cube_id, revision=revision, oldest=oldest, head=cube.head)


def check_thawed(cube: CubeState, action: str) -> None:
    """Refuse ``action`` (something that would commit to the cube) while the cube is frozen."""
    if cube.record.frozen:
        raise CubeFrozen(f"cube {cube.record.name!r} is frozen (read-only): {action} is refused. Reads, "
                         "searches and activations still work; ThawCube (memosctl cube thaw) accepts "
                         "commits again", cube=cube.cube_id)


class Kernel:
    def __init__(
        self, store: Store, embedder: EmbedderPort, index_factory: IndexFactory, index_root: Path,
        limits: LimitsConfig, *, sync_commits: bool = True, quotas: QuotasConfig | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.limits = limits
        self.quotas = Quotas(quotas or QuotasConfig())  # told of every mount and staging change
        self._index_factory = index_factory
        self._index_root = index_root
        self._sync = sync_commits
        self._lock = threading.RLock()  # guards the cube and mount tables
        self.cubes: dict[str, CubeState] = {}
        self.mounts: dict[str, MountState] = {}
        self.requests = RequestIds(store, limits.request_id_ttl_seconds)

    # -- start and stop -------------------------------------------------
    def open(self) -> None:
        """Load every cube and mount, re-embedding if the embedder changed (every item) or the memory-text
        recipe did (only turns: other items read the same under every recipe), and bring the derived
        indexes up to the store."""
        self._index_root.mkdir(parents=True, exist_ok=True)
        reembed = self._embedder_changed()
        retext = not reembed and self._memory_text_changed()
        for record in self.store.iter_cubes():
            if reembed:
                self._reembed_cube(record.cube_id)
            elif retext and self._reembed_cube(record.cube_id, turns_only=True):
                shutil.rmtree(self._index_root / record.cube_id, ignore_errors=True)  # rebuilt from the store
            self.cubes[record.cube_id] = self._load_cube(record)
        for mount in self.store.iter_mounts():
            loaded = self.mounts[mount.mount_id] = self._load_mount(mount, reembed, retext)
            self.quotas.opened(mount.principal, mount.cube_id, self._staged_total(loaded))
        self.store.put_meta(schema.KEY_EMBEDDER, self.embedder.fingerprint.encode())
        self.store.put_meta(schema.KEY_MEMORY_TEXT, MEMORY_TEXT_RECIPE.encode())
        for orphan in self._index_root.iterdir():
            if orphan.name not in self.cubes:
                shutil.rmtree(orphan, ignore_errors=True)
        log_event(log, "kernel_open", cubes=len(self.cubes), mounts=len(self.mounts))

    def _embedder_changed(self) -> bool:
        stored = self.store.get_meta(schema.KEY_EMBEDDER)
        changed = stored is not None and stored.decode() != self.embedder.fingerprint
        if changed:
            log_event(log, "embedder_changed", level=logging.WARNING, was=stored, now=self.embedder.fingerprint,
                      action="re-embedding every item and rebuilding the indexes")
            shutil.rmtree(self._index_root, ignore_errors=True)
            self._index_root.mkdir(parents=True, exist_ok=True)
        return changed

    def _memory_text_changed(self) -> bool:
        """Whether a store with items was indexed under another memory-text recipe (or before there was one)."""
        if self.store.get_meta(schema.KEY_EMBEDDER) is None:
            return False  # a new store
        stored = self.store.get_meta(schema.KEY_MEMORY_TEXT)
        changed = stored is None or stored.decode() != MEMORY_TEXT_RECIPE
        if changed:
            log_event(log, "memory_text_changed", level=logging.WARNING, was=stored, now=MEMORY_TEXT_RECIPE,
                      action="re-embedding conversation turns and rebuilding the indexes of their cubes")
        return changed

    def _reembed_cube(self, cube_id: str, *, turns_only: bool = False) -> int:
        """Recompute the stored vectors of the cube's versions (with ``turns_only``, of those with a speaker);
        returns how many."""
        versions = [v for v in self.store.iter_versions(cube_id) if v.speaker or not turns_only]
        for start in range(0, len(versions), 256):
            chunk = versions[start:start + 256]
            vectors = self.embedder.embed([memory_text(v.text, v.speaker) for v in chunk])
            batch = self.store.batch()
            for version, vector in zip(chunk, vectors, strict=True):
                batch.put_vector(cube_id, version.vkey, vector)
            self.store.write(batch, sync=False)
        return len(versions)

    def _load_cube(self, record: CubeRecord) -> CubeState:
        catalog = Catalog()
        for version in self.store.iter_versions(record.cube_id):
            catalog.add(meta_of(version))
        index = self._index_factory(self._index_root / record.cube_id, self.embedder.dim)
        cube = CubeState(record, catalog, index, adapters=list(self.store.iter_adapters(record.cube_id)),
                         purged={i: p.purge_id for p in self.store.iter_purges(record.cube_id) for i in p.item_ids})
        self._catch_up_index(cube)
        return cube

    def _catch_up_index(self, cube: CubeState) -> None:
        """The indexes are derived: add whatever committed versions they lack."""
        all_keys = np.fromiter(cube.catalog.by_vkey, dtype=np.uint64, count=len(cube.catalog))
        missing = cube.index.dense_missing(all_keys)
        for start in range(0, len(missing), 4096):
            keys = missing[start:start + 4096]
            vectors = self.store.get_vectors(cube.cube_id, [int(k) for k in keys])
            present = [(k, v) for k, v in zip(keys, vectors, strict=True) if v is not None]
            if present:
                cube.index.add_dense(np.array([k for k, _ in present], dtype=np.uint64),
                                     np.stack([v for _, v in present]))
        watermark = cube.index.lexical_watermark
        behind = sorted((m for m in cube.catalog.by_vkey.values() if m.vkey > watermark), key=lambda m: m.vkey)
        for start in range(0, len(behind), 4096):
            chunk = behind[start:start + 4096]
            versions = self.store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in chunk])
            cube.index.add_lexical([(v.vkey, memory_text(v.text, v.speaker)) for v in versions if v is not None])
        if len(missing) or behind:
            cube.index_dirty = True
            log_event(log, "index_caught_up", cube=cube.cube_id, dense_added=len(missing),
                      lexical_added=len(behind))

    def reset_index(self, cube: CubeState) -> None:
        """Delete the cube's index files and put empty indexes in their place (Purge).

        From here on a crash rebuilds them from the store at start. Call refill_index after."""
        directory = self._index_root / cube.cube_id
        cube.index.destroy()
        try:
            if directory.exists():
                shutil.rmtree(directory)  # destroy() ignores errors; this raises them
            fsync_path(self._index_root)
        finally:
            cube.index = self._index_factory(directory, self.embedder.dim)

    def refill_index(self, cube: CubeState) -> None:
        """Add every committed version the indexes lack, from the store, and save them."""
        self._catch_up_index(cube)
        cube.index.save()
        cube.index_dirty = False

    def _load_mount(self, record: MountRecord, reembed: bool, retext: bool) -> MountState:
        mount = MountState(record, staged_adapter=self.store.get_staged_adapter(record.mount_id))
        for staged, vector in self.store.iter_staged(record.mount_id):
            mount.staging[staged.item_id] = staged
            if staged.kind != "forget":
                if vector is None or reembed or (retext and staged.speaker):
                    vector = self.embedder.embed([memory_text(staged.text, staged.speaker)])[0]
                mount.vectors[staged.item_id] = vector
        return mount

    def save_indexes(self) -> None:
        for cube in list(self.cubes.values()):
            with cube.lock:
                if cube.index_dirty and not cube.freed:
                    cube.index.save()
                    cube.index_dirty = False

    def close(self) -> None:
        try:
            self.save_indexes()
        except Exception as error:  # derived data: the next start catches the indexes up from the store
            log_event(log, "index_save_failed", level=logging.ERROR, error=type(error).__name__,
                      disk_full=is_no_space(error), hint="the indexes are caught up from the store at the next start")
        for cube in self.cubes.values():
            cube.index.close()
        self.store.close()

    # -- lookups --------------------------------------------------------
    def cube(self, ref: str) -> CubeState:
        """A cube by id or name."""
        if not ref:
            raise InvalidField("cube is empty; give a cube id or name", field="cube")
        cube = self.cubes.get(ref)
        if cube is None:
            cube_id = self.store.cube_id_by_name(ref)
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

    def _mount_count(self, cube_id: str) -> int:
        return self.quotas.cube_mounts(cube_id)  # counted at every open and close, not scanned

    def cube_info(self, cube: CubeState) -> CubeInfo:
        return CubeInfo(replace(cube.record), self._mount_count(cube.cube_id))

    def mount_info(self, mount: MountState) -> MountInfo:
        cube = self.cubes.get(mount.record.cube_id)
        return MountInfo(replace(mount.record), cube.head if cube else 0, *mount.counts(),
                         staged_adapter=mount.staged_adapter is not None)

    # -- cubes ----------------------------------------------------------
    def alloc_cube(self, name: str, description: str, labels: dict[str, str], owner: str = "") -> CubeInfo:
        validate.cube_name(name)
        validate.cube_meta(description, labels)
        with self._lock:
            if self.store.cube_id_by_name(name) is not None:
                # Names are one namespace for every principal (docs/ARCHITECTURE.md): the refusal says the
                # name is in use, never by which cube or whose, and reads the same whether the caller can see it.
                raise CubeNameTaken(f"the cube name {name!r} is in use (cube names are shared by all "
                                    "principals, visible cubes or not); pick another name", name=name)
            record = CubeRecord(ids.new_id(ids.CUBE_PREFIX), name, description, dict(labels), _now_ns(),
                                owner=owner)
            batch = self.store.batch()
            batch.put_cube(record)
            batch.put_name(name, record.cube_id)
            self.store.write(batch, sync=self._sync)
            cube = CubeState(record, Catalog(), self._index_factory(self._index_root / record.cube_id,
                                                                    self.embedder.dim))
            self.cubes[record.cube_id] = cube
        log_event(log, "alloc_cube", cube=record.cube_id, name=name)
        return self.cube_info(cube)

    def free_cube(self, ref: str) -> FreeResult:
        with self._lock:
            cube = self.cube(ref)
            with cube.lock:
                mounts = [m for m in self.mounts.values() if m.record.cube_id == cube.cube_id]
                batch = self.store.batch()
                batch.delete_cube(cube.record)
                for mount in mounts:
                    batch.delete_mount(mount.mount_id)
                self.store.write(batch, sync=self._sync)
                cube.freed = True
                for mount in mounts:
                    del self.mounts[mount.mount_id]
                    self.quotas.closed(mount.record.principal, cube.cube_id, self._staged_total(mount))
                del self.cubes[cube.cube_id]
                cube.index.destroy()
        log_event(log, "free_cube", cube=cube.cube_id, revisions=cube.head, versions=len(cube.catalog))
        return FreeResult(cube.head, len(cube.catalog), len(mounts))

    def set_policy(self, ref: str, policy: dict[str, object]) -> CubeInfo:
        """Replace the cube's scheduler policy; written synced."""
        policy = validate.policy(policy)
        cube = self.cube(ref)
        with cube.lock:
            record = replace(cube.record, policy=dict(policy))
            batch = self.store.batch()
            batch.put_cube(record)
            self.store.write(batch, sync=True)
            cube.record = record
        log_event(log, "set_policy", cube=cube.cube_id, policy=",".join(f"{k}={v}" for k, v in policy.items()))
        return self.cube_info(cube)

    def set_frozen(self, ref: str, frozen: bool) -> CubeInfo:
        """Freeze (read-only: commits refused with CUBE_FROZEN) or thaw the cube; written synced."""
        cube = self.cube(ref)
        with cube.lock:
            if cube.record.frozen != frozen:
                record = replace(cube.record, frozen=frozen)
                batch = self.store.batch()
                batch.put_cube(record)
                self.store.write(batch, sync=True)
                cube.record = record
        log_event(log, "freeze_cube" if frozen else "thaw_cube", cube=cube.cube_id)
        return self.cube_info(cube)

    def set_retention(self, ref: str, keep_last: int, keep_seconds: float) -> CubeInfo:
        """Set which revisions compaction keeps (0 turns a rule off); written synced. Compacts nothing."""
        validate.retention(keep_last, keep_seconds)
        retention = {k: v for k, v in (("keep_last", keep_last), ("keep_seconds", keep_seconds)) if v}
        cube = self.cube(ref)
        with cube.lock:
            record = replace(cube.record, retention=retention)
            batch = self.store.batch()
            batch.put_cube(record)
            self.store.write(batch, sync=True)
            cube.record = record
        log_event(log, "set_retention", cube=cube.cube_id, keep_last=keep_last, keep_seconds=keep_seconds)
        return self.cube_info(cube)

    def compact(self, ref: str) -> CompactResult:
        """Apply the cube's retention policy now (kernel/compact.py); refused on a frozen cube."""
        cube = self.cube(ref)
        with cube.lock:  # reentrant: run_compact takes it again
            check_thawed(cube, "compaction")
            return run_compact(self, cube)

    def list_cubes(self, page_size: int, token: str, visible: Callable[[CubeRecord], bool] = lambda _: True
                   ) -> Page[CubeInfo]:
        size = paging.page_size(page_size)
        after = paging.decode_token(token, "cubes") or ""
        ordered = sorted(cid for cid, cube in list(self.cubes.items()) if cid > str(after) and visible(cube.record))
        page = [self.cube_info(self.cubes[cid]) for cid in ordered[:size] if cid in self.cubes]
        more = len(ordered) > size
        return Page(page, paging.encode_token("cubes", ordered[size - 1]) if more else "")

    # -- mounts ---------------------------------------------------------
    def mount(self, ref: str, revision: int, writable: bool, principal: str = "") -> MountInfo:
        with self._lock:
            cube = self.cube(ref)
            with cube.lock:  # a compaction cannot remove the revision between the check and the mount
                base = cube.head if revision == 0 else revision
                if base > cube.head:
                    raise RevisionNotFound(
                        f"cube {cube.record.name!r} has no revision {revision}; HEAD is {cube.head}",
                        cube=cube.cube_id, revision=revision, head=cube.head)
                check_readable(cube, base, "mount")
                if writable:
                    check_thawed(cube, "a read-write mount")
                self.quotas.check_mount(principal)  # under the kernel's lock: two Mounts cannot both pass
                record = MountRecord(ids.new_id(ids.MOUNT_PREFIX), cube.cube_id, base, "rw" if writable else "ro",
                                     _now_ns(), principal)
                batch = self.store.batch()
                batch.put_mount(record)
                try:
                    self.store.write(batch, sync=False)
                    persisted = True
                except DiskFull:
                    if writable:
                        raise
                    persisted = False  # a read-only mount needs no disk: reads go on while the disk is full
                mount = MountState(record, persisted=persisted)
                self.mounts[record.mount_id] = mount
                self.quotas.opened(principal, cube.cube_id)
        return self.mount_info(mount)

    def unmount(self, mount_id: str) -> tuple[MountInfo, int]:
        with self._lock:
            mount = self.mount_state(mount_id)
            with mount.lock:
                info = self.mount_info(mount)
                discarded = len(mount.staging) + (mount.staged_adapter is not None)
                if mount.persisted:
                    batch = self.store.batch()
                    batch.delete_mount(mount_id)
                    self._drop_staged_files(batch, mount)
                    self.store.write(batch, sync=False)
                del self.mounts[mount_id]
                self.quotas.closed(mount.record.principal, mount.record.cube_id, self._staged_total(mount))
        return info, discarded

    # -- quotas ---------------------------------------------------------
    @staticmethod
    def _item_bytes(mount: MountState, item_id: str) -> int:
        """What the mount's staged change of ``item_id`` (if any) counts against the staged-bytes quota."""
        return staged_bytes(mount.staging.get(item_id), mount.vectors.get(item_id))

    def _staged_total(self, mount: MountState) -> int:
        return sum(self._item_bytes(mount, item_id) for item_id in mount.staging)

    # -- staging --------------------------------------------------------
    def _writable(self, mount_id: str) -> tuple[MountState, CubeState]:
        mount = self.mount_state(mount_id)
        if not mount.writable:
            raise MountReadOnly(f"mount {mount_id!r} is read-only; mount the cube with mode "
                                "MOUNT_MODE_READ_WRITE to write or forget", mount=mount_id)
        cube = self.cube_of(mount)
        check_thawed(cube, "writing to it")
        return mount, cube

    def _visible_in(self, mount: MountState, cube: CubeState, item_id: str) -> tuple[str, int] | None:
        """How `item_id` is visible in the mount: (staged kind or "base", base version born), or None."""
        staged = mount.staging.get(item_id)
        if staged is not None:
            return None if staged.kind == "forget" else (staged.kind, staged.base_born)
        meta = None if item_id in cube.purging else cube.catalog.visible(item_id, mount.record.base)
        return None if meta is None else ("base", meta.born)

    def write(self, mount_id: str, inputs: Sequence[ItemInput], request: RequestRef | None = None
              ) -> tuple[list[str], MountInfo]:
        """Stage items; with a request id, a retry gets the first call's item ids and stages nothing."""
        mount, cube = self._writable(mount_id)
        validate.items(inputs, self.limits)
        validate.item_fields(inputs)
        with self.requests.claim(cube.cube_id, request, "write", mount_id, list(inputs)) as claim:
            if claim.done is not None:
                return list(claim.done.item_ids), self.mount_info(mount)
            return self._stage_items(mount, cube, inputs, claim)

    def _stage_items(self, mount: MountState, cube: CubeState, inputs: Sequence[ItemInput], claim: Claim
                     ) -> tuple[list[str], MountInfo]:
        mount_id = mount.mount_id
        # Refused before the embedding (the costly part) when it cannot fit; checked exactly below.
        vector_bytes = self.embedder.dim * 4  # float32
        self.quotas.check_staged(mount.record.principal, sum(len(item.text.encode()) + vector_bytes for item in inputs)
                                 - sum(self._item_bytes(mount, item.item_id) for item in inputs if item.item_id))
        vectors = self.embedder.embed([memory_text(item.text, item.speaker) for item in inputs])  # slow: outside every lock
        now = _now_ns()
        with mount.lock:
            self._check_mount_open(mount)
            staged_list: list[StagedRecord] = []
            if len(mount.staging) + len(inputs) > self.limits.max_staged_changes:
                raise StagingFull(
                    f"mount {mount_id!r} has {len(mount.staging)} staged changes; the limit is "
                    f"{self.limits.max_staged_changes} (limits.max_staged_changes). Commit first",
                    mount=mount_id)
            # Staged after the mount's latest write, one nanosecond apart: write_ns orders the commit.
            now = max(now, max((s.write_ns for s in mount.staging.values()), default=0) + 1)
            for i, item in enumerate(inputs):
                staged_list.append(self._stage_put(mount, cube, item, i, now + i))
            after = {s.item_id: staged_bytes(s, v) for s, v in zip(staged_list, vectors, strict=True)}
            delta = sum(after.values()) - sum(self._item_bytes(mount, item_id) for item_id in after)
            with self.quotas.staging(mount.record.principal, delta):
                batch = self.store.batch()
                for staged, vector in zip(staged_list, vectors, strict=True):
                    batch.put_staged(mount_id, staged, vector)
                claim.record(batch, mount_id, item_ids=[s.item_id for s in staged_list])  # with the staging it names
                self.store.write(batch, sync=False)
                for staged, vector in zip(staged_list, vectors, strict=True):
                    mount.staging[staged.item_id] = staged
                    mount.vectors[staged.item_id] = vector
            return [s.item_id for s in staged_list], self.mount_info(mount)

    def _stage_put(self, mount: MountState, cube: CubeState, item: ItemInput, index: int, now: int) -> StagedRecord:
        kind, base_born = "add", 0
        item_id = item.item_id or ids.new_id(ids.ITEM_PREFIX)
        if item.item_id:
            seen = self._visible_in(mount, cube, item.item_id)
            if seen is None:
                raise ItemNotFound(f"items[{index}].item_id {item.item_id!r} is not visible in mount "
                                   f"{mount.mount_id!r}", item=item.item_id)
            kind = "add" if seen[0] == "add" else "edit"
            base_born = seen[1]
        expire_ns = now + item.ttl_seconds * 1_000_000_000 if item.ttl_seconds else 0
        return StagedRecord(item_id, kind, base_born, item.text, list(item.tags), item.source,  # type: ignore[arg-type]
                            item.event_ns or now, now, speaker=item.speaker, session_id=item.session_id,
                            expire_ns=expire_ns)

    def forget(self, mount_id: str, item_ids: Sequence[str], adapter: bool = False) -> MountInfo:
        mount, cube = self._writable(mount_id)
        if not item_ids and not adapter:
            raise InvalidField("item_ids is empty; name the items to forget (or set adapter)", field="item_ids")
        validate.id_count(item_ids, self.limits)
        with mount.lock:
            self._check_mount_open(mount)
            changes: list[tuple[str, StagedRecord | None]] = []
            for item_id in dict.fromkeys(item_ids):
                seen = self._visible_in(mount, cube, item_id)
                if seen is None:
                    raise ItemNotFound(f"item {item_id!r} is not visible in mount {mount_id!r}; nothing was "
                                       "forgotten", item=item_id)
                kind, base_born = seen
                # Forgetting an item that exists only in staging just unstages it.
                changes.append((item_id, None if kind == "add" else StagedRecord(item_id, "forget", base_born)))
            batch = self.store.batch()
            for item_id, staged in changes:
                if staged is None:
                    batch.delete_staged(mount_id, item_id)
                else:
                    batch.put_staged(mount_id, staged, None)
            staged_adapter = self._stage_adapter_removal(batch, mount, cube) if adapter else mount.staged_adapter
            freed = sum(self._item_bytes(mount, item_id) for item_id in dict(changes))  # a forget holds no text
            with self.quotas.staging(mount.record.principal, -freed):
                self.store.write(batch, sync=False)
                mount.staged_adapter = staged_adapter
                for item_id, staged in changes:
                    mount.vectors.pop(item_id, None)
                    if staged is None:
                        del mount.staging[item_id]
                    else:
                        mount.staging[item_id] = staged
            return self.mount_info(mount)

    # -- adapters -------------------------------------------------------
    def adapter_in(self, mount: MountState) -> tuple[AdapterRecord | None, bool]:
        """The adapter the mount sees, and whether it is its staged one."""
        staged = mount.staged_adapter
        if staged is not None:
            return staged.version(), True
        return self.cube_of(mount).adapter_at(mount.record.base), False

    def adapter_files(self, cube_id: str, adapter: AdapterRecord) -> tuple[bytes, bytes]:
        files = self.store.get_adapter_files(cube_id, adapter.digest)
        if files is None:
            raise InternalError(f"the files of adapter {adapter.digest[:12]} are missing from the store")
        return files

    def stage_adapter(self, mount_id: str, adapter: AdapterRecord, config: bytes, weights: bytes | Path,
                      claim: Claim | None = None) -> MountInfo:
        """Stage ``adapter`` (its files are written now, under its digest) in a read-write mount; ``claim``
        records the upload's request id in the same batch."""
        mount, cube = self._writable(mount_id)
        with mount.lock:
            self._check_mount_open(mount)
            current = cube.adapter_at(mount.record.base)
            staged = StagedAdapterRecord("put", current.born if current else 0, asdict(adapter))
            batch = self.store.batch()
            self._drop_staged_files(batch, mount, keep=adapter.digest)
            batch.put_adapter_files(cube.cube_id, adapter.digest, config, weights)
            batch.put_staged_adapter(mount_id, staged)
            if claim is not None:
                claim.record(batch, mount_id, adapter=asdict(adapter))
            self.store.write(batch, sync=False)
            mount.staged_adapter = staged
            return self.mount_info(mount)

    def _stage_adapter_removal(self, batch: Batch, mount: MountState, cube: CubeState) -> StagedAdapterRecord | None:
        current = cube.adapter_at(mount.record.base)
        if mount.staged_adapter is not None and mount.staged_adapter.kind == "put":
            # Removing an adapter that was only staged just unstages it.
            self._drop_staged_files(batch, mount)
            batch.delete_staged_adapter(mount.mount_id)
            return None
        if current is None:
            raise ItemNotFound(f"mount {mount.mount_id!r} sees no adapter at revision {mount.record.base}; "
                               "there is none to forget", item="adapter")
        staged = StagedAdapterRecord("remove", current.born)
        batch.put_staged_adapter(mount.mount_id, staged)
        return staged

    def _drop_staged_files(self, batch: Batch, mount: MountState, keep: str = "") -> None:
        """Delete the files of the mount's staged adapter unless a committed version (or ``keep``) uses them."""
        staged = mount.staged_adapter.version() if mount.staged_adapter is not None else None
        cube = self.cubes.get(mount.record.cube_id)
        if staged is None or cube is None or staged.digest == keep:
            return
        if all(a.digest != staged.digest for a in cube.adapters):
            batch.delete_adapter_files(cube.cube_id, staged.digest)

    def commit_adapter(self, ref: str, since: int, adapter: AdapterRecord, config: bytes, weights: bytes,
                       message: str, author: str,
                       guard: Callable[[CubeState], AbstractContextManager[object]] | None = None) -> RevisionRecord:
        """Commit ``adapter`` as the cube's at a new revision (a training job's result), with its files.

        Refused (COMMIT_CONFLICT) if the cube's adapter changed since revision ``since``; ``guard`` is entered
        under the cube's lock around the checks and the write (the job's principal still holds its right)."""
        cube = self.cube(ref)
        with cube.lock, guard(cube) if guard is not None else nullcontext():
            check_thawed(cube, "committing the trained adapter")
            head = cube.head
            adapters.check_unchanged_since(cube, since, head)
            adapter = taint_on_commit(cube, adapter)
            adapter_plan = adapters.plan_to(cube.adapter_at(head), adapter, head + 1)
            if adapter_plan is None:  # the same bytes as the current adapter: still record the training
                adapter_plan = adapters.AdapterPlan(cube.adapter_at(head), replace(adapter, born=head + 1))
            plan = history.Plan()
            revision = self._make_revision(cube, plan, "commit", author, message, adapter_plan=adapter_plan)
            self._write_revision(cube, plan, revision, adapter_plan=adapter_plan, adapter_files=(config, weights))
        log_event(log, "commit_adapter", cube=cube.cube_id, revision=revision.number, digest=adapter.digest[:16])
        return revision

    # -- purge ----------------------------------------------------------
    def purge(self, ref: str, item_ids: Sequence[str], source: str = "", tags: Sequence[str] = ()) -> PurgeReceipt:
        """Remove items from every revision, both indexes and every KV cache of the cube, flag the adapters
        trained on them, and scrub the store (see kernel/purge.py). Items are selected by id, and/or by the
        source or any of the tags of any of their versions (or staged copies)."""
        return run_purge(self, ref, item_ids, source, tags)

    def purges(self, ref: str) -> list[PurgeReceipt]:
        """The cube's purge receipts, oldest first (ids made in the same millisecond sort at random)."""
        return sorted(self.store.iter_purges(self.cube(ref).cube_id), key=lambda r: r.time_ns)

    def adapter_change(self, ref: str, older: int, newer: int) -> tuple[AdapterRecord | None, AdapterRecord | None]:
        """The cube's adapter at two revisions (for Diff)."""
        cube = self.cube(ref)
        newer = newer or cube.head
        check_readable(cube, older, "diff")
        check_readable(cube, newer, "diff")
        return cube.adapter_at(older), cube.adapter_at(newer)

    def _check_mount_open(self, mount: MountState) -> None:
        if self.mounts.get(mount.mount_id) is not mount:
            raise MountNotFound(f"mount {mount.mount_id!r} was closed", mount=mount.mount_id)

    # -- reads ----------------------------------------------------------
    def read(self, mount_id: str, item_ids: Sequence[str]) -> tuple[list[ItemView], MountInfo]:
        mount = self.mount_state(mount_id)
        cube = self.cube_of(mount)
        validate.id_count(item_ids, self.limits)
        with mount.lock:
            views = self._views(mount, cube, list(item_ids))
            missing = [i for i, v in zip(item_ids, views, strict=True) if v is None]
            if missing:
                raise ItemNotFound(
                    f"{len(missing)} item(s) not visible in mount {mount_id!r} at revision "
                    f"{mount.record.base}: {', '.join(missing[:5])}", items=",".join(missing[:100]))
            seen = (mount.record.base, dict(mount.staging))
            info = self.mount_info(mount)
        return self._linked(cube, *seen, [v for v in views if v is not None]), info

    def _views(self, mount: MountState, cube: CubeState, item_ids: list[str]) -> list[ItemView | None]:
        views: list[ItemView | None] = [None] * len(item_ids)
        committed: list[tuple[int, str, int]] = []
        for pos, item_id in enumerate(item_ids):
            staged = mount.staging.get(item_id)
            if staged is not None:
                views[pos] = None if staged.kind == "forget" else staged_view(staged)
                continue
            meta = cube.catalog.visible(item_id, mount.record.base)
            if meta is not None:
                committed.append((pos, item_id, meta.born))
        records = self.store.get_versions(cube.cube_id, [(i, b) for _, i, b in committed])
        for (pos, _, _), record in zip(committed, records, strict=True):
            views[pos] = view_of(record) if record else None
        return views

    def _linked(self, cube: CubeState, base: int, staging: dict[str, StagedRecord], views: list[ItemView]
                ) -> list[ItemView]:
        """Conversation turns with their previous and next turns, as a mount at ``base`` with ``staging``
        (a snapshot) sees them. Called without the mount's lock: ordering a session takes the cube's, and
        a commit takes the cube's lock before the mount's."""
        if not any(v.session_id for v in views):
            return views
        order = SessionOrder(self.store, cube, base, staging)
        return [order.link(v) for v in views]

    def list_items(self, mount_id: str, page_size: int, token: str) -> tuple[Page[ItemView], MountInfo]:
        mount = self.mount_state(mount_id)
        cube = self.cube_of(mount)
        size = paging.page_size(page_size)
        after = str(paging.decode_token(token, f"items:{mount_id}") or "")
        with mount.lock:
            visible = {m.item_id for m in cube.catalog.alive_at(mount.record.base)}
            for item_id, staged in mount.staging.items():
                if staged.kind == "forget":
                    visible.discard(item_id)
                else:
                    visible.add(item_id)
            ordered = sorted(i for i in visible if i > after)
            views = [v for v in self._views(mount, cube, ordered[:size]) if v is not None]
            more = len(ordered) > size
            next_token = paging.encode_token(f"items:{mount_id}", ordered[size - 1]) if more else ""
            seen = (mount.record.base, dict(mount.staging))
            info = self.mount_info(mount)
        return Page(self._linked(cube, *seen, views), next_token), info

    # -- revisions ------------------------------------------------------
    def commit(self, mount_id: str, message: str, author: str, request: RequestRef | None = None) -> CommitResult:
        """Commit the mount's staging as a new revision; with a request id, a retry gets the first result."""
        mount, cube = self._writable(mount_id)
        with self.requests.claim(cube.cube_id, request, "commit", mount_id, message, author) as claim:
            if claim.done is not None:
                return self._commit_replay(cube, mount, claim.done.revision)
            return self._commit(cube, mount, message, author, claim)

    def _commit_replay(self, cube: CubeState, mount: MountState, number: int) -> CommitResult:
        revision = self.store.get_revision(cube.cube_id, number) if number else None
        if number and revision is None:
            raise InternalError(f"revision {number} of a recorded request is missing from the store")
        return CommitResult(revision, self.mount_info(mount), number or cube.head)

    def _commit(self, cube: CubeState, mount: MountState, message: str, author: str, claim: Claim) -> CommitResult:
        mount_id = mount.mount_id
        with cube.lock, mount.lock:
            self._check_mount_open(mount)
            check_thawed(cube, "Commit")
            head = cube.head
            adapter_plan = adapters.plan_staged(cube, head, mount.staged_adapter)
            if not mount.staging and adapter_plan is None:
                mount.record.base = head
                batch = self.store.batch()
                batch.put_mount(mount.record)
                claim.record(batch, mount_id)  # made no revision: a retry makes none either
                if mount.staged_adapter is not None:  # a staged change that changes nothing
                    self._drop_staged_files(batch, mount)
                    batch.delete_staged_adapter(mount_id)
                self.store.write(batch, sync=False)
                mount.staged_adapter = None
                return CommitResult(None, self.mount_info(mount), head)
            history.check_conflicts(cube.catalog, head, mount.staging)
            plan = history.plan_commit(cube.catalog, head, mount.staging, mount.vectors, cube.record.next_vkey)
            revision = self._make_revision(cube, plan, "commit", author, message, adapter_plan=adapter_plan,
                                           request_id=claim.request_id)
            # Staging, the mount's new base and the request id go in the same batch as the revision.
            self._write_revision(cube, plan, revision, mount, adapter_plan,
                                 also=lambda batch: claim.record(batch, mount_id, revision=revision.number))
            self.quotas.unstaged(mount.record.principal, self._staged_total(mount))
            mount.staging.clear()
            mount.vectors.clear()
            mount.staged_adapter = None
            log_event(log, "commit", cube=cube.cube_id, revision=revision.number, added=plan.added,
                      changed=plan.changed, forgotten=plan.forgotten, mount=mount_id)
            return CommitResult(revision, self.mount_info(mount), revision.number)

    def ingest(self, mount_id: str, messages: Sequence[Message], *, tags: Sequence[str] = (), source: str = "",
               message: str = "", author: str = "", request: RequestRef | None = None) -> IngestResult:
        """Commit a conversation, one item per message, as one new revision (see kernel/conversation.py).

        Appends never conflict, so this commits directly rather than through the mount's staging, which
        it leaves as it was; the mount moves to the new revision, as after a Commit. With a request id, a
        retry (even one sent while this call still runs) gets this call's result and commits nothing."""
        mount, cube = self._writable(mount_id)
        validate.messages(messages, self.limits)
        validate.tags(tags, "tags")
        validate.source(source, "source")
        with self.requests.claim(cube.cube_id, request, "ingest", mount_id, list(messages), list(tags), source,
                                 message, author) as claim:
            if claim.done is not None:
                revision = self.store.get_revision(cube.cube_id, claim.done.revision)
                if revision is None:
                    raise InternalError(f"revision {claim.done.revision} of a recorded request is missing")
                return IngestResult(list(claim.done.item_ids), revision, self.mount_info(mount))
            vectors = self.embedder.embed([memory_text(m.text, m.speaker) for m in messages])  # slow: outside every lock
            with cube.lock, mount.lock:
                self._check_mount_open(mount)
                check_thawed(cube, "Ingest")
                item_ids, plan = plan_ingest(messages, vectors, revision=cube.head + 1,
                                             next_vkey=cube.record.next_vkey, now=_now_ns(), tags=tags, source=source)
                revision = self._make_revision(cube, plan, "commit", author,
                                               message or f"ingest {len(messages)} messages",
                                               request_id=claim.request_id)
                self._write_revision(cube, plan, revision, mount, keep_staging=True,
                                     also=lambda batch: claim.record(batch, mount_id, revision=revision.number,
                                                                     item_ids=item_ids))
                log_event(log, "ingest", cube=cube.cube_id, revision=revision.number, added=plan.added,
                          sessions=len({m.session_id for m in messages}), mount=mount_id)
                return IngestResult(item_ids, revision, self.mount_info(mount))

    def _make_revision(self, cube: CubeState, plan: history.Plan, kind: str, author: str, message: str,
                       restored: int = 0, adapter_plan: adapters.AdapterPlan | None = None,
                       request_id: str = "") -> RevisionRecord:
        head = cube.head
        items = cube.record.item_count + plan.added - plan.forgotten
        current = cube.adapter_at(head)
        digest = adapter_plan.digest_after if adapter_plan is not None else (current.digest if current else "")
        return RevisionRecord(head + 1, head, kind, author or "anonymous", message, _now_ns(),  # type: ignore[arg-type]
                              plan.added, plan.changed, plan.forgotten, items, restored,
                              adapter_changed=adapter_plan is not None, adapter_digest=digest,
                              request_id=request_id)

    def _write_revision(self, cube: CubeState, plan: history.Plan, revision: RevisionRecord,
                        mount: MountState | None = None, adapter_plan: adapters.AdapterPlan | None = None,
                        adapter_files: tuple[bytes, bytes] | None = None, keep_staging: bool = False,
                        also: Callable[[Batch], None] | None = None) -> None:
        """One synced batch: new versions and vectors, ended versions, the revision, the cube record,
        for a commit the mount's cleared staging (kept by an ingest) and new base, and what ``also`` adds
        (the call's request id)."""
        record = replace(cube.record, head=revision.number, item_count=revision.item_count,
                         version_count=cube.record.version_count + len(plan.born),
                         next_vkey=cube.record.next_vkey + len(plan.born))
        batch = self.store.batch()
        ended: list[VersionRecord] = []
        stored = self.store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in plan.ended])
        for old in stored:
            assert old is not None
            old.died = revision.number
            ended.append(old)
            batch.put_version(cube.cube_id, old)
        for version, vector in plan.born:
            batch.put_version(cube.cube_id, version)
            batch.put_vector(cube.cube_id, version.vkey, vector)
        if adapter_plan is not None:
            if adapter_plan.ended is not None:
                batch.put_adapter(cube.cube_id, replace(adapter_plan.ended, died=revision.number))
            if adapter_plan.born is not None:
                batch.put_adapter(cube.cube_id, adapter_plan.born)
                if adapter_files is not None:
                    batch.put_adapter_files(cube.cube_id, adapter_plan.born.digest, *adapter_files)
        batch.put_revision(cube.cube_id, revision)
        batch.put_cube(record)
        mount_record = None
        if mount is not None:
            mount_record = replace(mount.record, base=revision.number)
            if not keep_staging:
                batch.clear_staging(mount.mount_id)
            batch.put_mount(mount_record)
        if also is not None:
            also(batch)
        self.store.write(batch, sync=self._sync)
        # Durable from here on: now update memory.
        cube.record = record
        if mount is not None and mount_record is not None:
            mount.record = mount_record
        for meta in plan.ended:
            meta.died = revision.number
        for version, _ in plan.born:
            cube.catalog.add(meta_of(version))
        if adapter_plan is not None:
            if adapter_plan.ended is not None:
                adapter_plan.ended.died = revision.number
            if adapter_plan.born is not None:
                cube.adapters.append(adapter_plan.born)
        if plan.born:
            keys = np.array([v.vkey for v, _ in plan.born], dtype=np.uint64)
            cube.index.add(keys, np.stack([vec for _, vec in plan.born]),
                            [memory_text(v.text, v.speaker) for v, _ in plan.born])
            cube.index_dirty = True

    def rollback(self, ref: str, target: int, message: str, author: str) -> RevisionRecord:
        cube = self.cube(ref)
        with cube.lock:
            check_thawed(cube, "Rollback")
            head = cube.head
            if target > head:
                raise RevisionNotFound(f"cube {cube.record.name!r} has no revision {target}; HEAD is {head}",
                                       cube=cube.cube_id, revision=target, head=head)
            if target == head:
                raise InvalidField(f"to_revision {target} is HEAD already; roll back to an older revision "
                                   f"(0 to {head - 1})", field="to_revision")
            check_readable(cube, target, "roll back to")
            plan, revive = history.plan_rollback(cube.catalog, head, target)
            sources = self.store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in revive])
            vectors = self.store.get_vectors(cube.cube_id, [m.vkey for m in revive])
            next_vkey = cube.record.next_vkey
            now = _now_ns()
            for source, vector in zip(sources, vectors, strict=True):
                assert source is not None and vector is not None
                copy = replace(source, vkey=next_vkey, born=head + 1, died=0, write_ns=now,
                               origin=source.content_id)
                next_vkey += 1
                plan.born.append((copy, vector))
            adapter_plan = adapters.plan_to(cube.adapter_at(head), cube.adapter_at(target), head + 1)
            revision = self._make_revision(cube, plan, "rollback", author,
                                           message or f"rollback to revision {target}", restored=target,
                                           adapter_plan=adapter_plan)
            self._write_revision(cube, plan, revision, adapter_plan=adapter_plan)
        log_event(log, "rollback", cube=cube.cube_id, revision=revision.number, restored=target)
        return revision

    # -- lifecycle ------------------------------------------------------
    def set_item_state(self, ref: str, item_ids: Sequence[str], state: str, message: str, author: str
                       ) -> RevisionRecord | None:
        """Archive items (left out of Search and memory blocks, kept) or restore them (active; restoring an
        expired item also drops its TTL), as one new revision at HEAD. Each change is a new version with the
        same content, so Diff shows it as changed and Rollback undoes it. Items already in that state change
        nothing; None when none changed (no revision)."""
        validate.item_state(state)
        if not item_ids:
            raise InvalidField("item_ids is empty; name the items to change", field="item_ids")
        validate.id_count(item_ids, self.limits)
        cube = self.cube(ref)
        now = _now_ns()
        with cube.lock:
            check_thawed(cube, "changing item states")
            changes: list[tuple[VersionMeta, str, int]] = []
            missing: list[str] = []
            for item_id in dict.fromkeys(item_ids):
                meta = None if item_id in cube.purging else cube.catalog.visible(item_id, cube.head)
                if meta is None:
                    missing.append(item_id)
                    continue
                expired = meta.expired(now)
                if state == "archived" and meta.state != "archived" and not expired:
                    changes.append((meta, "archived", meta.expire_ns))
                elif state == "active" and (meta.state != "active" or expired):
                    changes.append((meta, "active", 0 if expired else meta.expire_ns))
            if missing:
                raise ItemNotFound(f"{len(missing)} item(s) not alive at HEAD (revision {cube.head}) of cube "
                                   f"{cube.record.name!r}: {', '.join(missing[:5])}; nothing was changed",
                                   items=",".join(missing[:100]))
            if not changes:
                return None
            verb = "archive" if state == "archived" else "restore"
            revision = self._restate(cube, changes, author,
                                     message or f"{verb} {len(changes)} item{'s' if len(changes) > 1 else ''}")
        log_event(log, "set_item_state", cube=cube.cube_id, revision=revision.number, state=state,
                  items=len(changes))
        return revision

    def expire_due(self, ref: str, author: str = "memosd") -> tuple[RevisionRecord | None, list[str]]:
        """Commit the items alive at HEAD whose TTL has passed as "expired" (the lifecycle loop); the
        revision (None when none was due, or the cube is frozen) and the expired item ids."""
        cube = self.cube(ref)
        now = _now_ns()
        with cube.lock:
            if cube.record.frozen:  # read-only: Search leaves them out anyway, by their TTL
                return None, []
            due = [(m, "expired", m.expire_ns) for m in cube.catalog.alive_with_ttl(cube.head)
                   if m.state != "expired" and 0 < m.expire_ns <= now and m.item_id not in cube.purging]
            if not due:
                return None, []
            due.sort(key=lambda change: change[0].vkey)
            revision = self._restate(cube, due, author, f"expire {len(due)} item{'s' if len(due) > 1 else ''} "
                                                         "(TTL passed)")
        log_event(log, "expire_items", cube=cube.cube_id, revision=revision.number, items=len(due))
        return revision, [m.item_id for m, _, _ in due]

    def expired_past_grace(self, ref: str, grace_ns: int) -> list[str]:
        """Items whose HEAD version is expired and whose TTL ended more than ``grace_ns`` ago (to purge)."""
        cube = self.cube(ref)
        now = _now_ns()
        with cube.lock:
            return sorted(m.item_id for m in cube.catalog.alive_with_ttl(cube.head)
                          if m.state == "expired" and m.expire_ns + grace_ns <= now)

    def _restate(self, cube: CubeState, changes: Sequence[tuple[VersionMeta, str, int]], author: str,
                 message: str) -> RevisionRecord:
        """One revision giving each item a new version with the same content and a new (state, expire_ns).
        Called with the cube's lock held."""
        head = cube.head
        metas = [m for m, _, _ in changes]
        sources = self.store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in metas])
        vectors = self.store.get_vectors(cube.cube_id, [m.vkey for m in metas])
        plan = history.Plan(ended=list(metas), changed=len(changes))
        next_vkey = cube.record.next_vkey
        now = _now_ns()
        for (meta, state, expire_ns), source, vector in zip(changes, sources, vectors, strict=True):
            if source is None or vector is None:
                raise InternalError(f"a version of item {meta.item_id} is missing from the store")
            plan.born.append((replace(source, vkey=next_vkey, born=head + 1, died=0, write_ns=now,
                                      origin=source.content_id, state=state, expire_ns=expire_ns), vector))
            next_vkey += 1
        revision = self._make_revision(cube, plan, "commit", author, message)
        self._write_revision(cube, plan, revision)
        return revision

    def log(self, ref: str, page_size: int, token: str) -> tuple[Page[RevisionRecord], int]:
        cube = self.cube(ref)
        size = paging.page_size(page_size)
        cursor = paging.decode_int_token(token, f"log:{cube.cube_id}")
        newest = cube.head if cursor is None else cursor
        revisions = []
        for revision in self.store.iter_revisions(cube.cube_id, newest=newest):
            revisions.append(revision)
            if len(revisions) == size:
                break
        last = revisions[-1].number if revisions else 0
        more = last > 1 and len(revisions) == size
        return Page(revisions, paging.encode_token(f"log:{cube.cube_id}", last - 1) if more else ""), cube.head

    def diff(self, ref: str, older: int, newer: int, page_size: int, token: str) -> tuple[Page[ItemChange], int, int]:
        cube = self.cube(ref)
        newer = newer or cube.head
        for name, rev in (("from_revision", older), ("to_revision", newer)):
            if rev > cube.head:
                raise RevisionNotFound(f"{name} {rev}: cube {cube.record.name!r} has revisions 0 to {cube.head}",
                                       cube=cube.cube_id, revision=rev, head=cube.head)
        if older > newer:  # reversed, the change kinds would read inverted (an add as a forget)
            raise InvalidField(f"from_revision {older} is after to_revision {newer}; swap them to see what "
                               f"changed from {newer} to {older}", field="from_revision")
        size = paging.page_size(page_size)
        scope = f"diff:{cube.cube_id}:{older}:{newer}"
        after = str(paging.decode_token(token, scope) or "")
        with cube.lock:  # a compaction waits for it, or came first and is seen here
            check_readable(cube, older, "diff")
            check_readable(cube, newer, "diff")
            changes, more = history.diff(cube.catalog, older, newer, after, size)
        refs = [(m.item_id, m.born) for c in changes for m in (c.before, c.after) if m is not None]
        records = {(v.item_id, v.born): view_of(v) for v in self.store.get_versions(cube.cube_id, refs) if v}
        entries = [
            ItemChange(c.kind, c.item_id,
                       records.get((c.item_id, c.before.born)) if c.before else None,
                       records.get((c.item_id, c.after.born)) if c.after else None)
            for c in changes
        ]
        next_token = paging.encode_token(scope, changes[-1].item_id) if more else ""
        return Page(entries, next_token), older, newer
