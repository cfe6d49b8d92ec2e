"""Request ids: a retried Write, Ingest, Commit or ImportAdapter returns the first call's result.

A client that loses its answer (a deadline, a dropped connection) cannot tell whether the call took effect.
It may send a request id, and then retry with the same id: the daemon remembers each id with the first
call's result (``request_ids``: ``{cube_id}/{principal_id}/{request_id}`` -> RequestRecord), written in
the same batch as what the call changed (the synced revision batch of an Ingest or Commit, the staging
batch of a Write or ImportAdapter), so a crash never keeps one without the other. A retry with the same id
and the same request (the same digest of its kind and inputs) returns that result and changes nothing;
the same id with another request is REQUEST_ID_REUSED. Calls with the same id are serialized, so a retry
that arrives while the first call still runs waits for it and then returns its result.

Ids are scoped by cube and principal (one tenant's ids never meet another's), are kept
``limits.request_id_ttl_seconds`` (older ones count as unknown, and the lifecycle loop deletes them), and
go with their cube on FreeCube. An id is used once in that window, whatever the call: after its Write was
committed or discarded it still names that Write.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from memosd.errors import RequestIdReused
from memosd.kernel import validate
from memosd.store.records import RequestKind, RequestRecord
from memosd.store.rocks import Batch, Store

# The lifecycle loop runs often; a sweep reads every kept id, so it runs at most this often.
SWEEP_INTERVAL_SECONDS = 60.0
# A record whose items a Purge erased keeps no digest of their text, only this prefix and the purge id.
PURGED_DIGEST = "purged:"


@dataclass(frozen=True)
class RequestRef:
    """A request id as one principal sent it."""

    principal_id: str
    request_id: str


@dataclass(frozen=True)
class RequestIdentity:
    """What a request id stands for: the kind of call and the inputs its digest covers. A kernel call made
    on behalf of a larger one (the Ingest of a remembering Generate) is claimed under the larger call's."""

    kind: RequestKind
    inputs: tuple[object, ...]


def request_ref(principal_id: str, request_id: str, field: str = "request_id") -> RequestRef | None:
    """The validated reference of a call's request id; None when the call has none."""
    if not request_id:
        return None
    validate.request_id(request_id, field)
    return RequestRef(principal_id, request_id)


def _plain(value: object) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot digest a {type(value).__name__}")


def request_digest(kind: str, *inputs: object) -> str:
    """sha256 over a call's kind and inputs (plain values and dataclasses), in a stable JSON form."""
    text = json.dumps([kind, *inputs], default=_plain, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """A call holding its request id: ``done`` is the first call's result (replay it), else ``record``
    what this call did in the batch that does it. Without a request id both are no-ops."""

    cube_id: str
    ref: RequestRef | None
    kind: RequestKind
    digest: str
    done: RequestRecord | None = None

    @property
    def request_id(self) -> str:
        return self.ref.request_id if self.ref is not None else ""

    def record(self, batch: Batch, mount_id: str, *, revision: int = 0, item_ids: list[str] | None = None,
               adapter: dict[str, Any] | None = None) -> None:
        if self.ref is None:
            return
        batch.put_request(self.cube_id, self.ref.principal_id, self.ref.request_id,
                          RequestRecord(self.kind, self.digest, time.time_ns(), mount_id, revision,
                                        list(item_ids or []), adapter))


class RequestIds:
    """The kernel's request ids: per-id serialization, lookup, and the sweep of expired ids."""

    def __init__(self, store: Store, ttl_seconds: float) -> None:
        self._store = store
        self._ttl_ns = int(ttl_seconds * 1_000_000_000)
        self._guard = threading.Lock()
        self._held: dict[tuple[str, str, str], tuple[threading.Lock, int]] = {}  # lock, waiters + holder
        self._last_sweep = 0.0

    @contextmanager
    def _serialized(self, key: tuple[str, str, str]) -> Iterator[None]:
        with self._guard:
            lock, users = self._held.get(key, (threading.Lock(), 0))
            self._held[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._held[key]
                if users == 1:
                    del self._held[key]
                else:
                    self._held[key] = (lock, users - 1)

    @contextmanager
    def claim(self, cube_id: str, ref: RequestRef | None, kind: RequestKind, *inputs: object) -> Iterator[Claim]:
        """Hold the request id for the call (a retry with it waits), and say whether it was done already.

        Raises RequestIdReused when the id is known with another request."""
        digest = request_digest(kind, *inputs) if ref is not None else ""
        if ref is None:
            yield Claim(cube_id, None, kind, digest)
            return
        with self._serialized((cube_id, ref.principal_id, ref.request_id)):
            yield Claim(cube_id, ref, kind, digest, self._find(cube_id, ref, kind, digest))

    def _find(self, cube_id: str, ref: RequestRef, kind: RequestKind, digest: str) -> RequestRecord | None:
        record = self._store.get_request(cube_id, ref.principal_id, ref.request_id)
        if record is None or record.time_ns < time.time_ns() - self._ttl_ns:
            return None
        if record.digest.startswith(PURGED_DIGEST):
            raise RequestIdReused(
                f"request_id {ref.request_id!r} named a {record.kind} whose items were purged since "
                f"({record.digest.removeprefix(PURGED_DIGEST)}); it is not applied again. A new request "
                "needs a new id", request_id=ref.request_id, kind=record.kind)
        if record.kind != kind or record.digest != digest:
            raise RequestIdReused(
                f"request_id {ref.request_id!r} was already used on this cube by another request "
                f"({record.kind}); a retry must resend exactly the same request, and a new request needs a new id",
                request_id=ref.request_id, kind=record.kind)
        return record

    def sweep(self, *, force: bool = False) -> int:
        """Delete the ids older than the TTL (at most once a minute unless ``force``); returns how many."""
        now = time.monotonic()
        if not force and now - self._last_sweep < SWEEP_INTERVAL_SECONDS:
            return 0
        self._last_sweep = now
        return self._store.delete_requests_before(time.time_ns() - self._ttl_ns)
