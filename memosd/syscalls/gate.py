"""The gate every syscall passes: authenticate, check rights (policy.RULES), run, audit, map errors.

One place for all of it, so no handler can forget a step: ``Gate.wrap``
returns the gRPC behaviour for a handler of any of the three shapes (unary,
server-streaming, client-streaming). Handlers receive a ``Call`` that names
the caller and collects what the call read or used, for its audit record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

import grpc
from memos.v1 import memos_pb2 as pb

from memosd.errors import MalformedRequest, MemosError, ShuttingDown, Unauthenticated
from memosd.governance.access import ANONYMOUS_ADMIN, AccessControl
from memosd.governance.audit import AuditEntry, AuditLog
from memosd.governance.principals import Principals
from memosd.logfmt import log_event
from memosd.parametric.jobs import JobManager
from memosd.runtime.kvcache import ComputeCancelled
from memosd.store.records import PrincipalRecord
from memosd.store.space import is_no_space
from memosd.syscalls.errors import internal, to_status
from memosd.syscalls.policy import authorize

if TYPE_CHECKING:
    from memosd.metrics import Metrics

log = logging.getLogger("memosd.syscalls")

AUTH_METADATA = "authorization"
_BEARER = "bearer "


class Malformed:
    """What the deserializer hands on for bytes that are not a valid message (see registry)."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error

    def error_for_call(self) -> MalformedRequest:
        return MalformedRequest(f"the request is not a valid {self.message_type} message ({self.error}); "
                                "send a message built from protos/memos/v1/memos.proto")

    def error_for_stream(self) -> MalformedRequest:
        return MalformedRequest(f"a streamed message is not a valid {self.message_type} ({self.error}); "
                                "send messages built from protos/memos/v1/memos.proto")


@dataclass
class Call:
    """One syscall in progress: who made it, and what it touched (for the audit record)."""

    method: str
    context: grpc.ServicerContext
    caller: PrincipalRecord
    entry: AuditEntry = field(repr=False)

    def note(self, *, items: Any = (), artifacts: Any = (), cube_id: str = "", revision: int = 0) -> None:
        self.entry.item_ids.extend(items)
        self.entry.artifacts.extend(a for a in artifacts if a)
        if cube_id and not self.entry.cube_id:
            self.entry.cube_id = cube_id
        if revision:
            self.entry.revision = revision

    def note_cube(self, cube_id: str, *, items: Any = (), artifacts: Any = ()) -> None:
        """What a call over several cubes used of one of them: each cube's audit record names its own only."""
        cube_items, cube_artifacts = self.entry.by_cube.setdefault(cube_id, ([], []))
        cube_items.extend(items)
        cube_artifacts.extend(a for a in artifacts if a)

    def cancelled(self) -> threading.Event:
        """Set when the call ends for any reason: the client cancelled, its deadline passed, or it finished."""
        event = threading.Event()
        if not self.context.add_callback(event.set):
            event.set()  # already over
        return event


Handler = Callable[[Any, Call], Any]


class Gate:
    def __init__(self, principals: Principals, access: AccessControl, audit: AuditLog, jobs: JobManager, *,
                 auth: bool = True, metrics: Metrics | None = None) -> None:
        self.principals = principals
        self.access = access
        self.audit = audit
        self.jobs = jobs
        self.auth = auth
        self.metrics = metrics  # None: metrics are off
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()
        self.draining = False

    def call_counts(self) -> dict[str, int]:
        """A copy of the per-method call counts (a call may be counting one right now)."""
        with self._calls_lock:
            return dict(self.calls)

    # -- the steps ---------------------------------------------------------------
    def _caller(self, context: grpc.ServicerContext) -> PrincipalRecord:
        if not self.auth:
            return ANONYMOUS_ADMIN
        values = [v for k, v in context.invocation_metadata() or () if k == AUTH_METADATA]
        if len(values) > 1:
            # Which one would win depends on proxies and libraries; refuse rather than pick.
            raise Unauthenticated(f"the call carries {len(values)} authorization headers; send one: "
                                  "authorization: Bearer <token>")
        token = ""
        for value in values:
            if isinstance(value, str):
                token = value[len(_BEARER):].strip() if value.lower().startswith(_BEARER) else value.strip()
        return self.principals.authenticate(token)

    def _authenticate(self, method: str, context: grpc.ServicerContext, entry: AuditEntry) -> PrincipalRecord:
        with self._calls_lock:
            self.calls[method] += 1
        if self.draining:
            raise ShuttingDown("memosd is shutting down; retry against the restarted daemon")
        try:
            caller = self._caller(context)
        except MemosError:
            entry.denied = True
            raise
        entry.principal_id = caller.principal_id
        return caller

    def _authorize(self, caller: PrincipalRecord, method: str, request: Any, context: grpc.ServicerContext,
                   entry: AuditEntry) -> Call:
        if isinstance(request, Malformed):
            raise request.error_for_call()
        try:
            target = authorize(self.access, self.jobs, caller, method, request)
        except MemosError:
            entry.denied = True
            raise
        entry.cube_id, entry.mount_id = target.cube_id, target.mount_id
        return Call(method, context, caller, entry)

    def _open(self, method: str, request: Any, context: grpc.ServicerContext, entry: AuditEntry) -> Call:
        return self._authorize(self._authenticate(method, context, entry), method, request, context, entry)

    def _disk_full(self, error: Exception) -> Exception:
        """A raw "no space" error from an index or file write is DiskFull too: no path or library text leaks."""
        if isinstance(error, MemosError) or not is_no_space(error):
            return error
        return self.audit.store.space.trip(error)

    def _close(self, entry: AuditEntry, started: float, error: Exception | None, response: Any = None) -> None:
        if error is not None:
            error = self._disk_full(error)
        if response is not None:
            _note_header(entry, response)
        seconds = time.perf_counter() - started
        took_ms = round(seconds * 1000, 2)
        if error is None:
            log_event(log, "syscall", level=logging.DEBUG, method=entry.method, code=entry.code, took_ms=took_ms)
        elif isinstance(error, MemosError):
            entry.code, entry.reason = error.code, error.reason
            log_event(log, "syscall", method=entry.method, code=error.code, reason=error.reason, took_ms=took_ms)
        elif isinstance(error, ComputeCancelled):
            entry.code = "CANCELLED"
            log_event(log, "syscall", method=entry.method, code="CANCELLED", took_ms=took_ms)
        else:
            entry.code, entry.reason = "INTERNAL", "INTERNAL_ERROR"
        if self.metrics is not None:  # entry.code is final here, for every outcome and shape
            self.metrics.observe_call(entry.method, entry.code, seconds)
        self.audit.append(entry)  # never fails the call: with the disk full it is counted instead

    def _abort(self, method: str, error: Exception, context: grpc.ServicerContext) -> None:
        error = self._disk_full(error)
        if isinstance(error, MemosError):
            context.abort_with_status(to_status(error))
        if isinstance(error, ComputeCancelled):  # the caller went away mid-prefill; nobody reads this
            context.abort(grpc.StatusCode.CANCELLED, str(error))
        context.abort_with_status(to_status(internal(method, error)))

    # -- the three shapes ------------------------------------------------------------
    def unary(self, method: str, handler: Handler) -> Callable[[Any, grpc.ServicerContext], Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            started, entry = time.perf_counter(), AuditEntry(method)
            try:
                response = handler(request, self._open(method, request, context, entry))
            except Exception as error:
                self._close(entry, started, error)
                self._abort(method, error, context)
            self._close(entry, started, None, response)
            return response

        return run

    def client_stream(self, method: str, handler: Handler) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
        """The first message (the header) is what the rights are checked against."""
        request_type = getattr(pb, _input_type(method))

        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            started, entry = time.perf_counter(), AuditEntry(method)
            try:
                caller = self._authenticate(method, context, entry)
                first = next(requests, None)
                call = self._authorize(caller, method, first if first is not None else request_type(), context,
                                       entry)
                response = handler(chain([first] if first is not None else [], requests), call)
            except Exception as error:
                self._close(entry, started, error)
                self._abort(method, error, context)
            self._close(entry, started, None, response)
            return response

        return run

    def server_stream(self, method: str, handler: Handler) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started, entry = time.perf_counter(), AuditEntry(method)
            error: Exception | None = None
            try:
                for response in handler(request, self._open(method, request, context, entry)):
                    _note_header(entry, response)
                    if self.metrics is not None:
                        self.metrics.observe_response(method, response)
                    yield response
            except GeneratorExit:  # the client went away mid-stream
                entry.code = "CANCELLED"
                raise
            except Exception as failure:
                error = failure
            finally:
                self._close(entry, started, error)
            if error is not None:
                self._abort(method, error, context)

        return run


def _input_type(method: str) -> str:
    return str(pb.DESCRIPTOR.services_by_name["MemOS"].methods_by_name[method].input_type.name)


def _note_header(entry: AuditEntry, response: Any) -> None:
    """The cube and revision a response's header names, when the rights check did not already name a cube."""
    header = getattr(response, "header", None)
    if header is None or not response.HasField("header"):
        return
    entry.cube_id = entry.cube_id or header.cube_id
    entry.revision = entry.revision or header.read_revision or header.head_revision
