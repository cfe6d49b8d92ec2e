"""Staging: a read-write mount's pending changes (Write, Forget, a staged adapter), kept until Commit.

Each change is written to the store (unsynced: staging is a draft) before the
mount's memory; the staged-bytes quota follows every change (kernel/quotas.py).
Embedding, the slow part, runs before any lock is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from memosd.config import LimitsConfig
from memosd.errors import InvalidField, ItemNotFound, MountReadOnly, StagingFull
from memosd.kernel import clock, ids, validate
from memosd.kernel.checks import check_thawed
from memosd.kernel.memory_text import memory_text
from memosd.kernel.ports import EmbedderPort
from memosd.kernel.quotas import Quotas, staged_bytes
from memosd.kernel.requests import Claim, RequestIds, RequestRef
from memosd.kernel.state import CubeState, MountState
from memosd.kernel.table import Tables
from memosd.kernel.types import ItemInput, MountInfo
from memosd.store.records import AdapterRecord, StagedAdapterRecord, StagedRecord
from memosd.store.rocks import Batch, Store


def drop_staged_files(batch: Batch, mount: MountState, cube: CubeState | None, keep: str = "") -> None:
    """Delete the files of the mount's staged adapter unless a committed version (or ``keep``) uses them."""
    staged = mount.staged_adapter.version() if mount.staged_adapter is not None else None
    if staged is None or cube is None or staged.digest == keep:
        return
    if all(a.digest != staged.digest for a in cube.adapters):
        batch.delete_adapter_files(cube.cube_id, staged.digest)


class Staging:
    def __init__(self, tables: Tables, store: Store, embedder: EmbedderPort, limits: LimitsConfig,
                 quotas: Quotas, requests: RequestIds) -> None:
        self._tables = tables
        self._store = store
        self._embedder = embedder
        self._limits = limits
        self._quotas = quotas
        self._requests = requests

    def writable(self, mount_id: str) -> tuple[MountState, CubeState]:
        """The open read-write mount and its cube, which is not frozen."""
        mount = self._tables.mount_state(mount_id)
        if not mount.writable:
            raise MountReadOnly(f"mount {mount_id!r} is read-only; mount the cube with mode "
                                "MOUNT_MODE_READ_WRITE to write or forget", mount=mount_id)
        cube = self._tables.cube_of(mount)
        check_thawed(cube, "writing to it")
        return mount, cube

    @staticmethod
    def _visible_in(mount: MountState, cube: CubeState, item_id: str) -> tuple[str, int] | None:
        """How `item_id` is visible in the mount: (staged kind or "base", base version born), or None."""
        staged = mount.staging.get(item_id)
        if staged is not None:
            return None if staged.kind == "forget" else (staged.kind, staged.base_born)
        meta = None if item_id in cube.purging else cube.catalog.visible(item_id, mount.record.base)
        return None if meta is None else ("base", meta.born)

    # -- items ----------------------------------------------------------
    def write(self, mount_id: str, inputs: Sequence[ItemInput], request: RequestRef | None = None
              ) -> tuple[list[str], MountInfo]:
        """Stage items; with a request id, a retry gets the first call's item ids and stages nothing."""
        mount, cube = self.writable(mount_id)
        validate.items(inputs, self._limits)
        validate.item_fields(inputs)
        with self._requests.claim(cube.cube_id, request, "write", mount_id, list(inputs)) as claim:
            if claim.done is not None:
                return list(claim.done.item_ids), self._tables.mount_info(mount)
            return self._stage_items(mount, cube, inputs, claim)

    def _stage_items(self, mount: MountState, cube: CubeState, inputs: Sequence[ItemInput], claim: Claim
                     ) -> tuple[list[str], MountInfo]:
        mount_id = mount.mount_id
        limit = self._limits.max_staged_changes
        # Refused before the embedding (the costly part) when it cannot fit; checked exactly below.
        vector_bytes = self._embedder.dim * 4  # float32
        self._quotas.check_staged(mount.record.principal,
                                  sum(len(item.text.encode()) + vector_bytes for item in inputs)
                                  - sum(mount.item_bytes(item.item_id) for item in inputs if item.item_id))
        said = clock.now_ns()  # an item without an event time gets its write time, a moment later
        vectors = self._embedder.embed([memory_text(item.text, item.speaker, item.event_ns or said)  # slow: outside every lock
                                        for item in inputs])
        now = clock.now_ns()
        with mount.lock:
            self._tables.check_mount_open(mount)
            if len(mount.staging) + len(inputs) > limit:
                raise StagingFull(f"mount {mount_id!r} has {len(mount.staging)} staged changes; the limit is "
                                  f"{limit} (limits.max_staged_changes). Commit first", mount=mount_id)
            # Staged after the mount's latest write, one nanosecond apart: write_ns orders the commit.
            now = max(now, max((s.write_ns for s in mount.staging.values()), default=0) + 1)
            staged_list = [self._stage_put(mount, cube, item, i, now + i) for i, item in enumerate(inputs)]
            after = {s.item_id: staged_bytes(s, v) for s, v in zip(staged_list, vectors, strict=True)}
            delta = sum(after.values()) - sum(mount.item_bytes(item_id) for item_id in after)
            with self._quotas.staging(mount.record.principal, delta):
                batch = self._store.batch()
                for staged, vector in zip(staged_list, vectors, strict=True):
                    batch.put_staged(mount_id, staged, vector)
                claim.record(batch, mount_id, item_ids=[s.item_id for s in staged_list])  # with the staging it names
                self._store.write(batch, sync=False)
                for staged, vector in zip(staged_list, vectors, strict=True):
                    mount.staging[staged.item_id] = staged
                    mount.vectors[staged.item_id] = vector
            return [s.item_id for s in staged_list], self._tables.mount_info(mount)

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
                            expire_ns=expire_ns, derived_from=self._derived_from(mount, cube, item, index),
                            derived_job=item.derived_job)

    def _derived_from(self, mount: MountState, cube: CubeState, item: ItemInput, index: int) -> list[str]:
        """The sources the staged version carries: those its current version (staged or at the mount's base)
        has, then the write's, each visible in the mount. Never fewer than before: a purge of a turn must
        still find every item that was derived from it, whatever edits came since."""
        before: tuple[str, ...] | list[str] = ()
        if item.item_id:
            staged = mount.staging.get(item.item_id)
            meta = None if staged is not None else cube.catalog.visible(item.item_id, mount.record.base)
            before = staged.derived_from if staged is not None else (meta.derived_from if meta else ())
        closure: list[str] = []
        for source_id in item.derived_from:
            if source_id not in before and self._visible_in(mount, cube, source_id) is None:
                raise ItemNotFound(f"items[{index}].derived_from names {source_id!r}, which is not visible in "
                                   f"mount {mount.mount_id!r}", item=source_id)
            # A source's own sources too (each item's list is closed, so one level is the whole chain): a purge
            # of the first source must reach this item even after compaction dropped the ones between.
            closure.extend((source_id, *self._sources_of(mount, cube, source_id)))
        return list(dict.fromkeys((*before, *closure)))

    @staticmethod
    def _sources_of(mount: MountState, cube: CubeState, item_id: str) -> tuple[str, ...]:
        """The sources the item's version visible in the mount was derived from (staged, else at the base)."""
        staged = mount.staging.get(item_id)
        if staged is not None:
            return tuple(staged.derived_from)
        meta = cube.catalog.visible(item_id, mount.record.base)
        return tuple(meta.derived_from) if meta is not None else ()

    def forget(self, mount_id: str, item_ids: Sequence[str], adapter: bool = False) -> MountInfo:
        mount, cube = self.writable(mount_id)
        if not item_ids and not adapter:
            raise InvalidField("item_ids is empty; name the items to forget (or set adapter)", field="item_ids")
        validate.id_count(item_ids, self._limits)
        with mount.lock:
            self._tables.check_mount_open(mount)
            changes: list[tuple[str, StagedRecord | None]] = []
            for item_id in dict.fromkeys(item_ids):
                seen = self._visible_in(mount, cube, item_id)
                if seen is None:
                    raise ItemNotFound(f"item {item_id!r} is not visible in mount {mount_id!r}; nothing was "
                                       "forgotten", item=item_id)
                kind, base_born = seen
                # Forgetting an item that exists only in staging just unstages it.
                changes.append((item_id, None if kind == "add" else StagedRecord(item_id, "forget", base_born)))
            batch = self._store.batch()
            for item_id, staged in changes:
                if staged is None:
                    batch.delete_staged(mount_id, item_id)
                else:
                    batch.put_staged(mount_id, staged, None)
            staged_adapter = self._stage_adapter_removal(batch, mount, cube) if adapter else mount.staged_adapter
            freed = sum(mount.item_bytes(item_id) for item_id in dict(changes))  # a forget holds no text
            with self._quotas.staging(mount.record.principal, -freed):
                self._store.write(batch, sync=False)
                mount.staged_adapter = staged_adapter
                for item_id, staged in changes:
                    mount.vectors.pop(item_id, None)
                    if staged is None:
                        del mount.staging[item_id]
                    else:
                        mount.staging[item_id] = staged
            return self._tables.mount_info(mount)

    # -- the adapter ----------------------------------------------------
    def stage_adapter(self, mount_id: str, adapter: AdapterRecord, config: bytes, weights: bytes | Path,
                      claim: Claim | None = None) -> MountInfo:
        """Stage ``adapter`` (its files are written now, under its digest) in a read-write mount; ``claim``
        records the upload's request id in the same batch."""
        mount, cube = self.writable(mount_id)
        with mount.lock:
            self._tables.check_mount_open(mount)
            current = cube.adapter_at(mount.record.base)
            staged = StagedAdapterRecord("put", current.born if current else 0, asdict(adapter))
            batch = self._store.batch()
            drop_staged_files(batch, mount, self._tables.cubes.get(mount.record.cube_id), keep=adapter.digest)
            batch.put_adapter_files(cube.cube_id, adapter.digest, config, weights)
            batch.put_staged_adapter(mount_id, staged)
            if claim is not None:
                claim.record(batch, mount_id, adapter=asdict(adapter))
            self._store.write(batch, sync=False)
            mount.staged_adapter = staged
            return self._tables.mount_info(mount)

    def _stage_adapter_removal(self, batch: Batch, mount: MountState, cube: CubeState) -> StagedAdapterRecord | None:
        current = cube.adapter_at(mount.record.base)
        if mount.staged_adapter is not None and mount.staged_adapter.kind == "put":
            # Removing an adapter that was only staged just unstages it.
            drop_staged_files(batch, mount, self._tables.cubes.get(mount.record.cube_id))
            batch.delete_staged_adapter(mount.mount_id)
            return None
        if current is None:
            raise ItemNotFound(f"mount {mount.mount_id!r} sees no adapter at revision {mount.record.base}; "
                               "there is none to forget", item="adapter")
        staged = StagedAdapterRecord("remove", current.born)
        batch.put_staged_adapter(mount.mount_id, staged)
        return staged
