"""The lifecycle loop: what the daemon does to cubes on its own, as time passes.

Every ``lifecycle.interval_seconds`` it passes over every cube:

1. items alive at HEAD whose TTL has passed are committed as "expired" in one
   revision (author "memosd"; a frozen cube is skipped: it is read-only, and
   Search leaves those items out by their TTL anyway);
2. items whose HEAD version is expired and whose TTL ended more than
   ``lifecycle.expire_grace_seconds`` ago are purged exactly as by the Purge
   syscall: ``erase`` is the daemon's ``Erasure.erase`` (services/erasure.py),
   the one code path for every version, vector, staged copy and KV cache,
   pooled or stored, and their usage counts;
3. a cube with a retention policy (and not frozen) is compacted
   (``Kernel.compact``, like the Compact syscall).

Then request ids older than ``limits.request_id_ttl_seconds`` are deleted (at most once a minute; see
kernel/requests.py).

The gate audits syscalls only, so each change made here is appended to the
audit log by the loop itself, with principal_id "" and the methods
``Lifecycle.Expire``, ``Lifecycle.Purge`` and ``Lifecycle.Compact``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from memosd.errors import MemosError
from memosd.governance.audit import AuditEntry
from memosd.kernel.kernel import Kernel
from memosd.logfmt import log_event
from memosd.periodic import Periodic
from memosd.store.records import PurgeReceipt

log = logging.getLogger("memosd.lifecycle")  # the logger name the daemon has always logged under

AUTHOR = "memosd"


class AuditSink(Protocol):
    def append(self, entry: AuditEntry) -> None: ...


# (cube, item ids) -> receipt: the daemon passes Erasure.erase, the one the Purge syscall calls.
Erase = Callable[[str, list[str]], PurgeReceipt]


class LifecycleLoop:
    """Owns the invariant "what the daemon changes on its own is audited like a syscall": every expiry
    revision, purge and compaction it makes appends its ``Lifecycle.*`` record (principal "") to the
    audit sink. Purging is not its own: ``erase`` does it, as for Purge.

    ``tick`` raises nothing for one cube: a MemosError there (the cube freed meanwhile, a commit refused)
    is logged and the pass goes on to the next cube; anything else ends the pass, and ``Periodic`` logs it.
    """

    def __init__(self, kernel: Kernel, audit: AuditSink | None, erase: Erase, *, interval: float,
                 grace_seconds: float) -> None:
        self.kernel = kernel
        self.audit = audit
        self.erase = erase
        self.interval = interval
        self.grace_ns = int(grace_seconds * 1_000_000_000)
        self._stop = threading.Event()
        self._loop = Periodic(self.tick, interval, "lifecycle", log, self._stop)

    def tick(self) -> None:
        """One pass over every cube."""
        for cube_id in self.kernel.cube_ids():
            if self._stop.is_set():
                return
            try:
                self._expire(cube_id)
                self._purge(cube_id)
                self._compact(cube_id)
            except MemosError as error:  # freed meanwhile, or a commit refused: the next pass tries again
                log_event(log, "lifecycle_skipped", cube=cube_id, reason=error.reason, error=error.message)
        swept = self.kernel.requests.sweep()
        if swept:
            log_event(log, "request_ids_swept", removed=swept)

    def _expire(self, cube_id: str) -> None:
        revision, item_ids = self.kernel.expire_due(cube_id, AUTHOR)
        if revision is not None:
            self._audit("Lifecycle.Expire", cube_id, revision.number, item_ids)

    def _purge(self, cube_id: str) -> None:
        item_ids = self.kernel.expired_past_grace(cube_id, self.grace_ns)
        if not item_ids:
            return
        receipt = self.erase(cube_id, item_ids)
        if receipt.item_ids:
            self._audit("Lifecycle.Purge", cube_id, 0, list(receipt.item_ids), [f"purge:{receipt.purge_id}"])
            log_event(log, "purge_expired", cube=cube_id, items=len(receipt.item_ids), purge=receipt.purge_id)

    def _compact(self, cube_id: str) -> None:
        record = self.kernel.cube_record(cube_id)
        if record is None or record.frozen or not record.retention:
            return
        result = self.kernel.compact(cube_id)
        if result.revisions_compacted or result.versions_removed:
            self._audit("Lifecycle.Compact", cube_id, result.oldest_revision, [],
                        [f"compacted:{result.revisions_compacted}:{result.versions_removed}"])

    def _audit(self, method: str, cube_id: str, revision: int, item_ids: list[str],
               artifacts: list[str] | None = None) -> None:
        if self.audit is not None:
            self.audit.append(AuditEntry(principal_id="", method=method, cube_id=cube_id, revision=revision,
                                         item_ids=item_ids, artifacts=artifacts or []))

    def start(self) -> None:
        self._loop.start()

    def close(self) -> None:
        self._loop.close()
