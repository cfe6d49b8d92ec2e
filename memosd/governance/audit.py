"""The audit log: one hash-chained record per syscall, allowed or refused, in RocksDB.

Each record's body is canonical JSON (sorted keys, no spaces, ASCII) that
includes the previous record's hash; its hash is sha256(body). Changing,
removing or reordering a record therefore breaks the chain at that point,
which ``memosd_client.audit.verify`` (memosctl audit verify) reports. Rewriting the
whole chain from some record on is not detectable from the log alone: keep the
head hash that verify prints somewhere else to anchor it.

A call over several cubes (Search, Generate with mounts of several cubes)
makes one record per cube, each naming only that cube's items, so the owner
of one cube, who reads its records, never sees item ids of another.

Appends are not synced one by one (the WAL is, with the next synced write,
such as any Commit): auditing costs a JSON dump, a hash and an unsynced put
per call. Records hold ids, never item text or queries, so a Purge has nothing
to erase here.

Two kinds of *aggregate* record stand for several calls; they carry
``aggregate``, ``count`` and ``first_ns`` (the first call; ``time_ns`` is the
last), and together with the plain records every call is counted exactly once:

- ``"unauthenticated"``: calls refused for a missing or bad token are recorded
  one per (method, code, reason) and window (``security.audit_unauthenticated_
  window_seconds``): the first as itself, the rest counted into one aggregate
  when the window ends, so tokenless callers cannot fill the disk.
- ``"disk_full"``: calls made while the disk is full (reads are still served)
  cannot be appended. They are counted per (method, principal, cube, outcome,
  code, reason) in memory and written as aggregates once the disk has room
  again; the append never fails the call. A crash or SIGKILL while the disk
  is full loses those counts (Stats' ``audit_unaudited_calls`` and the log
  still show them).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from memosd.errors import DiskFull
from memosd.park import done_future, resolve
from memosd.store.records import StoredRecord
from memosd.store.rocks import Store

GENESIS = "0" * 64
OUTCOMES = ("ok", "denied", "failed")
# Codes a refusal comes with; other failures are "failed" (the call was allowed, then went wrong).
_DENIED_REASONS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


@dataclass
class AuditEntry:
    """What the syscall layer knows about one call when it ends."""

    method: str
    principal_id: str = ""
    cube_id: str = ""
    revision: int = 0
    mount_id: str = ""
    code: str = "OK"
    reason: str = ""
    denied: bool = False  # refused by authentication or the rights check (an invisible cube included)
    item_ids: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    # What a call over several cubes used of each: cube id -> (item ids, artifacts).
    by_cube: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)

    def per_cube(self) -> list[AuditEntry]:
        """This entry as the records it makes: its own cube's first, then one per other cube it used."""
        if not self.by_cube:
            return [self]
        own_items, own_artifacts = self.by_cube.get(self.cube_id, ([], []))
        entries = [replace(self, item_ids=list(dict.fromkeys([*self.item_ids, *own_items])),
                           artifacts=[*self.artifacts, *own_artifacts], by_cube={})]
        for cube_id, (items, artifacts) in self.by_cube.items():
            if cube_id != self.cube_id:
                # The mount and revision named are the first cube's; this record names the cube alone.
                entries.append(replace(self, cube_id=cube_id, revision=0, mount_id="",
                                       item_ids=list(dict.fromkeys(items)), artifacts=list(artifacts), by_cube={}))
        return entries

    @property
    def outcome(self) -> str:
        if self.code == "OK":
            return "ok"
        return "denied" if self.denied or self.reason in _DENIED_REASONS else "failed"


def canonical(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class _Tally:
    """Calls that one aggregate record will stand for."""

    fields: dict[str, object]  # the record's call fields (principal, method, outcome, ...)
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def add(self, time_ns: int, count: int = 1, first_ns: int = 0) -> None:
        self.first_ns = min(self.first_ns or time_ns, first_ns or time_ns)
        self.last_ns = max(self.last_ns, time_ns)
        self.count += count


@dataclass
class _Window:
    opened: float  # time.monotonic()
    suppressed: _Tally


def _call_fields(entry: AuditEntry) -> dict[str, object]:
    return {"principal_id": entry.principal_id, "method": entry.method, "cube_id": entry.cube_id,
            "revision": entry.revision, "mount_id": entry.mount_id, "outcome": entry.outcome, "code": entry.code,
            "reason": entry.reason, "item_ids": entry.item_ids, "artifacts": entry.artifacts}


def _tally_key(fields: dict[str, object]) -> tuple[object, ...]:
    return (fields["method"], fields["principal_id"], fields["cube_id"], fields["outcome"], fields["code"],
            fields["reason"])


class AuditLog:
    def __init__(self, store: Store, *, enabled: bool = True, unauthenticated_window: float = 60.0) -> None:
        self.store = store
        self.enabled = enabled
        self.unauthenticated_window = unauthenticated_window  # 0: every refusal is its own record
        self._cond = threading.Condition()
        last = store.last_audit()
        self.seq = last.seq if last else 0
        self.head = last.hash if last else GENESIS
        self.appended = 0
        self.unaudited_calls = 0  # since start: calls that could not be appended as themselves (disk full)
        self._unaudited: dict[tuple[object, ...], _Tally] = {}
        self._windows: dict[tuple[object, ...], _Window] = {}
        self._waiters: list[Future[Any]] = []  # beyond(): resolved at the next append

    def append(self, entry: AuditEntry) -> None:
        """Record one call. Never raises DiskFull: a call the disk has no room for is counted instead."""
        if not self.enabled:
            return
        now_ns = time.time_ns()
        with self._cond:  # a call's records (one per cube it touched) are consecutive
            self._write_unaudited()
            for part in entry.per_cube():
                fields = _call_fields(part)
                if part.reason == "UNAUTHENTICATED" and self._in_open_window(fields, now_ns):
                    continue
                if not self._write({**fields, "time_ns": now_ns}):
                    self._count_unaudited(fields, now_ns)

    def tick(self) -> None:
        """Close the windows that ended and write what the disk had no room for (the daemon calls this
        every few seconds)."""
        with self._cond:
            now = time.monotonic()
            for key, window in list(self._windows.items()):
                if now - window.opened >= self.unauthenticated_window:
                    self._close_window(key, window)
            self._write_unaudited()

    def close(self) -> None:
        """Write every pending aggregate (best effort: the disk may still be full)."""
        with self._cond:
            for key, window in list(self._windows.items()):
                self._close_window(key, window)
            self._write_unaudited()

    def pending_unaudited(self) -> int:
        with self._cond:
            return sum(tally.count for tally in self._unaudited.values())

    # -- under self._cond ------------------------------------------------------------------
    def _write(self, fields: dict[str, object]) -> bool:
        """Append one record after the head; False (nothing changed) when the disk is full."""
        seq = self.seq + 1
        body = canonical({**fields, "seq": seq, "prev_hash": self.head})
        digest = hashlib.sha256(body).hexdigest()
        try:
            self.store.put_audit(StoredRecord(seq, digest, body))
        except DiskFull:
            return False
        self.seq, self.head = seq, digest
        self.appended += 1
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # Audit(follow) streams parked on beyond()
            resolve(waiter)
        return True

    def _write_aggregate(self, tally: _Tally, kind: str) -> bool:
        return self._write({**tally.fields, "item_ids": [], "artifacts": [], "aggregate": kind,
                            "count": tally.count, "first_ns": tally.first_ns, "time_ns": tally.last_ns})

    def _count_unaudited(self, fields: dict[str, object], time_ns: int, count: int = 1, first_ns: int = 0) -> None:
        key = _tally_key(fields)
        tally = self._unaudited.get(key)
        if tally is None:
            tally = self._unaudited[key] = _Tally({**fields, "revision": 0, "mount_id": ""})
        tally.add(time_ns, count, first_ns)
        self.unaudited_calls += count

    def _write_unaudited(self) -> None:
        if not self._unaudited or self.store.space.full:
            return
        for key, tally in list(self._unaudited.items()):
            if not self._write_aggregate(tally, "disk_full"):
                return
            del self._unaudited[key]

    def _in_open_window(self, fields: dict[str, object], time_ns: int) -> bool:
        """Count an unauthenticated refusal into its open window (True), or open a new window whose
        first refusal the caller records as itself (False)."""
        if self.unauthenticated_window <= 0:
            return False
        key = (fields["method"], fields["code"], fields["reason"])
        window = self._windows.get(key)
        if window is not None and time.monotonic() - window.opened < self.unauthenticated_window:
            window.suppressed.add(time_ns)
            return True
        if window is not None:
            self._close_window(key, window)
        self._windows[key] = _Window(time.monotonic(), _Tally(fields))
        return False

    def _close_window(self, key: tuple[object, ...], window: _Window) -> None:
        del self._windows[key]
        tally = window.suppressed
        if tally.count and not self._write_aggregate(tally, "unauthenticated"):
            self._count_unaudited(tally.fields, tally.last_ns, tally.count, tally.first_ns)

    # -- reading -----------------------------------------------------------------------------
    def read(self, after_seq: int = 0) -> Iterator[StoredRecord]:
        """Records after ``after_seq``, in key order, as stored (unchecked)."""
        return self.store.iter_audit(after_seq)

    def beyond(self, seq: int) -> Future[Any]:
        """A future done once a record after ``seq`` exists: Audit(follow) parks on it (see memosd.park)."""
        with self._cond:
            if self.seq > seq:
                return done_future()
            self._waiters = [w for w in self._waiters if not w.done()]  # drop the ones followers cancelled
            waiter: Future[Any] = Future()
            self._waiters.append(waiter)
            return waiter

    def wait_beyond(self, seq: int, timeout: float) -> bool:
        """Block until a record after ``seq`` exists, or ``timeout`` passes; True if one does."""
        with self._cond:
            return self._cond.wait_for(lambda: self.seq > seq, timeout)
