"""Item states: SetItemState (archive, restore) and the lifecycle loop's TTL expiry and purge selection.

A state change is a revision like a commit: each changed item gets a new
version with the same content and a new (state, expire_ns), so Diff shows it
and Rollback undoes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from memosd.config import LimitsConfig
from memosd.errors import InternalError, InvalidField, ItemNotFound
from memosd.kernel import clock, history, validate
from memosd.kernel.catalog import VersionMeta
from memosd.kernel.checks import check_thawed
from memosd.kernel.revisions import Revisions
from memosd.kernel.state import CubeState
from memosd.kernel.table import Tables
from memosd.logfmt import log_event
from memosd.store.records import RevisionRecord
from memosd.store.rocks import Store

log = logging.getLogger("memosd.kernel")



class ItemStates:
    def __init__(self, tables: Tables, revisions: Revisions, store: Store, limits: LimitsConfig) -> None:
        self._tables = tables
        self._revisions = revisions  # makes and writes the revision
        self._store = store
        self._limits = limits

    def set_item_state(self, ref: str, item_ids: Sequence[str], state: str, message: str, author: str
                       ) -> RevisionRecord | None:
        """Archive items (left out of Search and memory blocks, kept) or restore them (active; restoring an
        expired item also drops its TTL), as one new revision at HEAD. Each change is a new version with the
        same content, so Diff shows it as changed and Rollback undoes it. Items already in that state change
        nothing; None when none changed (no revision)."""
        validate.item_state(state)
        if not item_ids:
            raise InvalidField("item_ids is empty; name the items to change", field="item_ids")
        validate.id_count(item_ids, self._limits)
        cube = self._tables.cube(ref)
        now = clock.now_ns()
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
        cube = self._tables.cube(ref)
        now = clock.now_ns()
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
        cube = self._tables.cube(ref)
        now = clock.now_ns()
        with cube.lock:
            return sorted(m.item_id for m in cube.catalog.alive_with_ttl(cube.head)
                          if m.state == "expired" and m.expire_ns + grace_ns <= now)

    def _restate(self, cube: CubeState, changes: Sequence[tuple[VersionMeta, str, int]], author: str,
                 message: str) -> RevisionRecord:
        """One revision giving each item a new version with the same content and a new (state, expire_ns).
        Called with the cube's lock held."""
        head = cube.head
        metas = [m for m, _, _ in changes]
        sources = self._store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in metas])
        vectors = self._store.get_vectors(cube.cube_id, [m.vkey for m in metas])
        plan = history.Plan(ended=list(metas), changed=len(changes))
        next_vkey = cube.record.next_vkey
        now = clock.now_ns()
        for (meta, state, expire_ns), source, vector in zip(changes, sources, vectors, strict=True):
            if source is None or vector is None:
                raise InternalError(f"a version of item {meta.item_id} is missing from the store")
            plan.born.append((replace(source, vkey=next_vkey, born=head + 1, died=0, write_ns=now,
                                      origin=source.content_id, state=state, expire_ns=expire_ns), vector))
            next_vkey += 1
        revision = self._revisions.make_revision(cube, plan, "commit", author, message)
        self._revisions.write_revision(cube, plan, revision)
        return revision
