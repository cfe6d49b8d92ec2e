"""Conversations: planning an Ingest, and the order of a session's turns.

Ingest turns each message into an item carrying its speaker and session, all
committed in one revision (Kernel.ingest writes the plan made here).

A turn's previous and next turns are *derived when read*, not stored: they are
its neighbours among the turns of its session that the reading mount sees (its
base revision plus its staging), ordered by event time, then write order (a
committed version's vkey; staged turns after committed ones at the same time).
Storing links would mean that appending a turn to a session ingested earlier
writes a new version of the session's old last turn, just to set its "next":
Diff would report it as changed, the activation memory block (in vkey order)
would move it to the end, and a mount editing it would meet a commit conflict.
Stored links would also go stale on Forget, Rollback and Purge, and at an older
revision would name turns that revision cannot see. Derived links have none of
these problems; their cost is one ordering of each session a call touches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from memosd.kernel import history, ids
from memosd.kernel.state import CubeState, staged_view, view_of
from memosd.kernel.types import ItemView, Message
from memosd.store.records import StagedRecord, VersionRecord
from memosd.store.rocks import Store


def ingest_order(messages: Sequence[Message], now: int) -> list[int]:
    """Indexes of ``messages`` in commit order: grouped by session (in order of first appearance), then by
    time (unset: ``now``), then as given. Version keys, and with them the memory block, follow this order."""
    first_seen: dict[str, int] = {}
    for message in messages:
        first_seen.setdefault(message.session_id, len(first_seen))
    return sorted(range(len(messages)),
                  key=lambda i: (first_seen[messages[i].session_id], messages[i].time_ns or now, i))


def plan_ingest(messages: Sequence[Message], vectors: np.ndarray, *, revision: int, next_vkey: int, now: int,
                tags: Sequence[str], source: str) -> tuple[list[str], history.Plan]:
    """The new versions of an Ingest at ``revision``; returns the item ids in request order, and the plan.

    Write times are ``now`` + the commit position, one nanosecond apart, so a message without a time gets an
    event time that keeps it after the turns before it in the call."""
    item_ids = [ids.new_id(ids.ITEM_PREFIX) for _ in messages]
    plan = history.Plan(added=len(messages))
    for position, i in enumerate(ingest_order(messages, now)):
        message = messages[i]
        write_ns = now + position
        version = VersionRecord(item_ids[i], next_vkey + position, message.text, list(tags), source,
                                message.time_ns or write_ns, write_ns, revision,
                                speaker=message.speaker, session_id=message.session_id)
        plan.born.append((version, vectors[i]))
    return item_ids, plan


@dataclass(frozen=True)
class _Turn:
    item_id: str
    born: int  # of the committed version; 0 when staged
    staged: StagedRecord | None = None
    vkey: int = 0  # of the committed version; 0 when staged


class SessionOrder:
    """The sessions of one cube as one mount sees them; each session is ordered once, when first asked for.

    ``staging`` is the mount's staging as the caller read it (a snapshot, so that the links agree with the
    items the call returns). With ``hidden_at`` (Search), turns hidden then (expired; archived unless
    ``include_archived``) are left out; without it (Read), every turn the mount sees counts."""

    def __init__(self, store: Store, cube: CubeState, base: int, staging: Mapping[str, StagedRecord], *,
                 hidden_at: int = 0, include_archived: bool = True) -> None:
        self._store = store
        self._cube = cube
        self._base = base
        self._staging = staging
        self._hidden_at = hidden_at
        self._include_archived = include_archived
        self._sessions: dict[str, tuple[list[_Turn], dict[str, int]]] = {}

    def _session(self, session_id: str) -> tuple[list[_Turn], dict[str, int]]:
        known = self._sessions.get(session_id)
        if known is not None:
            return known
        catalog = self._cube.catalog
        with self._cube.lock:  # a commit adds to the postings
            vkeys = list(catalog.by_session.get(session_id, ()))
        keyed: list[tuple[tuple[int, int, int], _Turn]] = []
        for vkey in vkeys:
            meta = catalog.by_vkey.get(vkey)
            if (meta is not None and meta.alive_at(self._base) and meta.item_id not in self._staging
                    and not (self._hidden_at and meta.hidden(self._hidden_at, self._include_archived))):
                keyed.append(((meta.event_ns, 0, meta.vkey), _Turn(meta.item_id, meta.born, vkey=meta.vkey)))
        for staged in self._staging.values():
            if (staged.kind != "forget" and staged.session_id == session_id
                    and not (self._hidden_at and 0 < staged.expire_ns <= self._hidden_at)):
                keyed.append(((staged.event_ns, 1, staged.write_ns), _Turn(staged.item_id, 0, staged)))
        keyed.sort(key=lambda entry: entry[0])
        turns = [turn for _, turn in keyed]
        known = self._sessions[session_id] = (turns, {t.item_id: i for i, t in enumerate(turns)})
        return known

    @property
    def cube(self) -> CubeState:
        return self._cube

    def turns(self, session_id: str) -> list[tuple[str, int, int, StagedRecord | None]]:
        """The turns of ``session_id`` this mount sees, in order, as (item id, born, vkey, staged record or
        None); born and vkey are 0 for a staged turn."""
        return [(t.item_id, t.born, t.vkey, t.staged) for t in self._session(session_id)[0]]

    def _window(self, view: ItemView, before: int, after: int) -> tuple[list[_Turn], list[_Turn]]:
        if not view.session_id:
            return [], []
        turns, position = self._session(view.session_id)
        i = position.get(view.item_id)
        if i is None:  # not a turn this mount sees (the caller's view is from elsewhere)
            return [], []
        return turns[max(0, i - before):i], turns[i + 1:i + 1 + after]

    def next_turn(self, session_id: str, item_id: str) -> tuple[str, int, StagedRecord | None] | None:
        """The turn after ``item_id`` in ``session_id`` as (item id, born, staged record or None), or None
        when it is the last (or not a turn this mount sees)."""
        turns, position = self._session(session_id)
        i = position.get(item_id)
        if i is None or i + 1 >= len(turns):
            return None
        turn = turns[i + 1]
        return turn.item_id, turn.born, turn.staged

    def link(self, view: ItemView) -> ItemView:
        """``view`` with its previous and next turns filled in."""
        prev, nxt = self._window(view, 1, 1)
        if not prev and not nxt:
            return view
        return replace(view, prev_item_id=prev[0].item_id if prev else "",
                       next_item_id=nxt[0].item_id if nxt else "")

    def context(self, views: Sequence[ItemView], turns: int
                ) -> list[tuple[tuple[ItemView, ...], tuple[ItemView, ...]]]:
        """For each view, up to ``turns`` turns before it and after it (linked views, oldest first), read
        from the store in one batch. A turn purged meanwhile is left out."""
        windows = [self._window(view, turns, turns) for view in views]
        refs = sorted({(t.item_id, t.born) for window in windows for side in window for t in side
                       if t.staged is None})
        records = self._store.get_versions(self._cube.cube_id, refs)
        loaded = {ref: view_of(record) for ref, record in zip(refs, records, strict=True) if record is not None}

        def load(side: list[_Turn]) -> tuple[ItemView, ...]:
            out = []
            for turn in side:
                view = staged_view(turn.staged) if turn.staged is not None else loaded.get((turn.item_id, turn.born))
                if view is not None:
                    out.append(self.link(view))
            return tuple(out)

        return [(load(before), load(after)) for before, after in windows]
