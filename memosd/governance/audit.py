"""The audit log: one hash-chained record per syscall, allowed or refused, in RocksDB.

Each record's body is canonical JSON (sorted keys, no spaces, ASCII) that
includes the previous record's hash; its hash is sha256(body). Changing,
removing or reordering a record therefore breaks the chain at that point,
which ``memos.audit.verify`` (memosctl audit verify) reports. Rewriting the
whole chain from some record on is not detectable from the log alone: keep the
head hash that verify prints somewhere else to anchor it.

Appends are not synced one by one (the WAL is, with the next synced write,
such as any Commit): auditing costs a JSON dump, a hash and an unsynced put
per call. Records hold ids, never item text or queries, so a Purge has nothing
to erase here.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from memosd.park import done_future, resolve
from memosd.store import schema
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

    @property
    def outcome(self) -> str:
        if self.code == "OK":
            return "ok"
        return "denied" if self.denied or self.reason in _DENIED_REASONS else "failed"


@dataclass(frozen=True)
class StoredRecord:
    seq: int  # from the key
    hash: str
    body: bytes

    def fields(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.body)
        return parsed


def canonical(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class AuditLog:
    def __init__(self, store: Store, *, enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled
        self._cond = threading.Condition()
        last = store.last_row(schema.CF_AUDIT)
        self.seq = int(last[0], 16) if last else 0
        self.head = bytes(last[1][:64]).decode() if last else GENESIS
        self.appended = 0
        self._waiters: list[Future[Any]] = []  # beyond(): resolved at the next append

    def append(self, entry: AuditEntry) -> None:
        if not self.enabled:
            return
        with self._cond:
            seq = self.seq + 1
            body = canonical({
                "seq": seq, "time_ns": time.time_ns(), "principal_id": entry.principal_id, "method": entry.method,
                "cube_id": entry.cube_id, "revision": entry.revision, "mount_id": entry.mount_id,
                "outcome": entry.outcome, "code": entry.code, "reason": entry.reason,
                "item_ids": entry.item_ids, "artifacts": entry.artifacts, "prev_hash": self.head,
            })
            digest = hashlib.sha256(body).hexdigest()
            self.store.put_row(schema.CF_AUDIT, schema.audit_key(seq), digest.encode() + b"\n" + body, sync=False)
            self.seq, self.head = seq, digest
            self.appended += 1
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            resolve(waiter)

    def read(self, after_seq: int = 0) -> Iterator[StoredRecord]:
        """Records after ``after_seq``, in key order, as stored (unchecked)."""
        for key, raw in self.store.scan_rows(schema.CF_AUDIT, schema.audit_key(after_seq + 1)):
            value = bytes(raw)
            yield StoredRecord(int(key, 16), value[:64].decode(errors="replace"), value[65:])

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
