"""Reads: items as a mount sees them (Read, ListItems), a cube's log and diffs, and what other layers read
of a cube at a revision (its visible items, its adapter).

A mount's reads take its lock (staging changes under it); catalog reads by
revision take the cube's. Versions are read from the store outside both.
"""

from __future__ import annotations

from collections.abc import Sequence

from memosd.config import LimitsConfig
from memosd.errors import InternalError, InvalidField, ItemNotFound, RevisionNotFound
from memosd.kernel import history, paging, validate
from memosd.kernel.catalog import VersionMeta
from memosd.kernel.checks import check_readable
from memosd.kernel.conversation import SessionOrder
from memosd.kernel.state import CubeState, MountState, staged_view, view_of
from memosd.kernel.table import Tables
from memosd.kernel.types import ItemChange, ItemView, MountInfo, Page
from memosd.store.records import AdapterRecord, PurgeReceipt, RevisionRecord, StagedRecord
from memosd.store.rocks import Store


class Reads:
    def __init__(self, tables: Tables, store: Store, limits: LimitsConfig) -> None:
        self._tables = tables
        self._store = store
        self._limits = limits

    # -- through a mount ------------------------------------------------
    def read(self, mount_id: str, item_ids: Sequence[str]) -> tuple[list[ItemView], MountInfo]:
        mount = self._tables.mount_state(mount_id)
        cube = self._tables.cube_of(mount)
        validate.id_count(item_ids, self._limits)
        with mount.lock:
            views = self._views(mount, cube, list(item_ids))
            missing = [i for i, v in zip(item_ids, views, strict=True) if v is None]
            if missing:
                raise ItemNotFound(
                    f"{len(missing)} item(s) not visible in mount {mount_id!r} at revision "
                    f"{mount.record.base}: {', '.join(missing[:5])}", items=",".join(missing[:100]))
            seen = (mount.record.base, dict(mount.staging))
            info = self._tables.mount_info(mount)
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
        records = self._store.get_versions(cube.cube_id, [(i, b) for _, i, b in committed])
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
        order = SessionOrder(self._store, cube, base, staging)
        return [order.link(v) for v in views]

    def list_items(self, mount_id: str, page_size: int, token: str) -> tuple[Page[ItemView], MountInfo]:
        mount = self._tables.mount_state(mount_id)
        cube = self._tables.cube_of(mount)
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
            info = self._tables.mount_info(mount)
        return Page(self._linked(cube, *seen, views), next_token), info

    def adapter_in(self, mount: MountState) -> tuple[AdapterRecord | None, bool]:
        """The adapter the mount sees, and whether it is its staged one."""
        staged = mount.staged_adapter
        if staged is not None:
            return staged.version(), True
        return self._tables.cube_of(mount).adapter_at(mount.record.base), False

    # -- a cube at a revision -------------------------------------------
    @staticmethod
    def visible_items(cube: CubeState, revision: int, now_ns: int) -> list[VersionMeta]:
        """The items alive at ``revision`` that are neither archived nor expired at ``now_ns`` (the memory
        an activation, a training job or the scheduler reads), read under the cube's lock."""
        with cube.lock:
            return [m for m in cube.catalog.alive_at(revision) if not m.hidden(now_ns)]

    def adapter_files(self, cube_id: str, adapter: AdapterRecord) -> tuple[bytes, bytes]:
        files = self._store.get_adapter_files(cube_id, adapter.digest)
        if files is None:
            raise InternalError(f"the files of adapter {adapter.digest[:12]} are missing from the store")
        return files

    def adapter_change(self, ref: str, older: int, newer: int) -> tuple[AdapterRecord | None, AdapterRecord | None]:
        """The cube's adapter at two revisions (for Diff)."""
        cube = self._tables.cube(ref)
        newer = newer or cube.head
        check_readable(cube, older, "diff")
        check_readable(cube, newer, "diff")
        return cube.adapter_at(older), cube.adapter_at(newer)

    def purges(self, ref: str) -> list[PurgeReceipt]:
        """The cube's purge receipts, oldest first (ids made in the same millisecond sort at random)."""
        return sorted(self._store.iter_purges(self._tables.cube(ref).cube_id), key=lambda r: r.time_ns)

    # -- history --------------------------------------------------------
    def log(self, ref: str, page_size: int, token: str) -> tuple[Page[RevisionRecord], int]:
        cube = self._tables.cube(ref)
        size = paging.page_size(page_size)
        cursor = paging.decode_int_token(token, f"log:{cube.cube_id}")
        newest = cube.head if cursor is None else cursor
        revisions = []
        for revision in self._store.iter_revisions(cube.cube_id, newest=newest):
            revisions.append(revision)
            if len(revisions) == size:
                break
        last = revisions[-1].number if revisions else 0
        more = last > 1 and len(revisions) == size
        return Page(revisions, paging.encode_token(f"log:{cube.cube_id}", last - 1) if more else ""), cube.head

    def diff(self, ref: str, older: int, newer: int, page_size: int, token: str) -> tuple[Page[ItemChange], int, int]:
        cube = self._tables.cube(ref)
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
        records = {(v.item_id, v.born): view_of(v) for v in self._store.get_versions(cube.cube_id, refs) if v}
        entries = [
            ItemChange(c.kind, c.item_id,
                       records.get((c.item_id, c.before.born)) if c.before else None,
                       records.get((c.item_id, c.after.born)) if c.after else None)
            for c in changes
        ]
        next_token = paging.encode_token(scope, changes[-1].item_id) if more else ""
        return Page(entries, next_token), older, newer
