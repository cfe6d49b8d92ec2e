"""The gate every syscall passes: authenticate, check rights (policy.RULES), run, audit, map errors.

One place for all of it, so no handler can forget a step: ``Gate.wrap``
returns the gRPC behaviour for a handler of any of the three shapes (unary,
server-streaming, client-streaming). Handlers receive a ``Call`` that names
the caller and collects what the call read or used, for its audit record.

Threading. The server is gRPC's asyncio server; the behaviours here are
coroutines on its event loop, and the handlers (synchronous, like all kernel
code) run on a bounded executor. Nothing waits on the loop's thread or holds
an executor thread while it waits for someone else: a server stream's
generator is stepped one item at a time on the executor, and a step that would
block yields ``Park(future)`` (memosd.park), which is awaited on the loop. A
client stream is read on the loop, each message within
``server.stream_idle_seconds`` (else STREAM_IDLE), and handed to the handler's
thread (on its own small executor) as a plain iterator. Streams are admitted
against per-principal limits (``admission``) before any work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any, Protocol, TypeVar

import grpc
from memosd_client.v1 import memos_pb2 as pb

from memosd.config import QuotasConfig, ServerConfig
from memosd.errors import MalformedRequest, MemosError, ShuttingDown, StreamIdle, Unauthenticated
from memosd.governance.access import ANONYMOUS_ADMIN, AccessControl
from memosd.governance.audit import AuditEntry, AuditLog
from memosd.governance.principals import Principals
from memosd.logfmt import log_event
from memosd.parametric.jobs import JobManager
from memosd.park import Park
from memosd.runtime.kvcache import ComputeCancelled
from memosd.store.records import PrincipalRecord
from memosd.store.space import is_no_space
from memosd.syscalls.admission import Admission, Slot, stream_kinds
from memosd.syscalls.errors import internal, to_status
from memosd.syscalls.policy import authorize

log = logging.getLogger("memosd.syscalls")
T = TypeVar("T")

AUTH_METADATA = "authorization"
PLACED_METADATA = "memosd-cube-id"  # syscalls/router.py's PLACED (the router imports the gate's module)
_BEARER = "bearer "


class CallMetrics(Protocol):
    """What the gate reports each call to (``memosd.metrics.Metrics``, which the wiring passes in: the
    metrics endpoint sits above the syscall line, so the gate names only this)."""

    def observe_call(self, method: str, code: str, seconds: float) -> None: ...

    def observe_response(self, method: str, response: Any) -> None: ...


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
    done: threading.Event  # set when the call ends for any reason (see cancelled())
    caller: PrincipalRecord
    entry: AuditEntry = field(repr=False)
    placed_cube_id: str = ""  # AllocCube on a cluster node: the id placement chose (syscalls/router.py)
    # The authorization header values as sent (unary calls and server streams): MoveCube passes them on to the
    # target node, ListCubes to the other owners on a cluster node; each checks them itself.
    authorization: tuple[str, ...] = field(default=(), repr=False)

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
        return self.done


Handler = Callable[[Any, Call], Any]


_END = object()  # a stream is over: next(steps, _END), or a client stream's last message was read


class Gate:
    def __init__(self, principals: Principals, access: AccessControl, audit: AuditLog, jobs: JobManager, *,
                 auth: bool = True, metrics: CallMetrics | None = None, server: ServerConfig | None = None,
                 quotas: QuotasConfig | None = None) -> None:
        self.principals = principals
        self.access = access
        self.audit = audit
        self.jobs = jobs
        self.auth = auth
        self.metrics = metrics  # None: metrics are off
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()
        self.placement = False  # a cluster node: AllocCube takes the placed cube id from its metadata
        self.draining = False  # set by the daemon when SIGTERM starts the drain: new calls get SHUTTING_DOWN
        server = server or ServerConfig()
        self.idle_seconds = server.stream_idle_seconds
        self.admission = Admission(quotas or QuotasConfig())
        # Handlers run here; waits do not (see the module docstring), so this bounds CPU work, not streams.
        self.executor = ThreadPoolExecutor(max_workers=server.workers, thread_name_prefix="syscall")
        # A client stream's handler blocks between messages (for at most stream_idle_seconds each):
        # on threads of its own, uploads can only ever delay other uploads.
        self.upload_executor = ThreadPoolExecutor(max_workers=server.upload_workers, thread_name_prefix="upload")

    def call_counts(self) -> dict[str, int]:
        """A copy of the per-method call counts (a call may be counting one right now)."""
        with self._calls_lock:
            return dict(self.calls)

    def close(self) -> None:
        """After the server stopped: no new work; what runs finishes on its own (it sees its call ended)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.upload_executor.shutdown(wait=False, cancel_futures=True)

    # -- the steps ---------------------------------------------------------------
    @staticmethod
    def _token(context: Any) -> list[str]:
        """The call's authorization header values (normally one), as sent."""
        return [value for key, value in context.invocation_metadata() or () if key == AUTH_METADATA]

    @staticmethod
    def _placed(context: Any) -> str:
        """The cube id a cluster router placed an AllocCube at (its memosd-cube-id header), if any."""
        return next((str(v) for k, v in context.invocation_metadata() or () if k == PLACED_METADATA), "")

    def _caller(self, values: list[str]) -> PrincipalRecord:
        if not self.auth:
            return ANONYMOUS_ADMIN
        if len(values) > 1:
            # Which one would win depends on proxies and libraries; refuse rather than pick.
            raise Unauthenticated(f"the call carries {len(values)} authorization headers; send one: "
                                  "authorization: Bearer <token>")
        value = values[0] if values and isinstance(values[0], str) else ""
        token = value[len(_BEARER):].strip() if value.lower().startswith(_BEARER) else value.strip()
        return self.principals.authenticate(token)

    def _authenticate(self, method: str, token: list[str], entry: AuditEntry) -> PrincipalRecord:
        """Who calls (in memory: a dict lookup and a hash, so the event loop may do it)."""
        with self._calls_lock:
            self.calls[method] += 1
        if self.draining:
            raise ShuttingDown("memosd is shutting down; retry against the restarted daemon")
        try:
            caller = self._caller(token)
        except MemosError:
            entry.denied = True
            raise
        entry.principal_id = caller.principal_id
        return caller

    def _authorize(self, caller: PrincipalRecord, method: str, request: Any, done: threading.Event,
                   entry: AuditEntry) -> Call:
        if isinstance(request, Malformed):
            raise request.error_for_call()
        try:
            target = authorize(self.access, self.jobs, caller, method, request)
        except MemosError:
            entry.denied = True
            raise
        entry.cube_id, entry.mount_id = target.cube_id, target.mount_id
        return Call(method, done, caller, entry)

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

    async def _abort(self, method: str, error: Exception, context: Any) -> None:
        error = self._disk_full(error)
        if isinstance(error, MemosError):
            await context.abort_with_status(to_status(error))
        if isinstance(error, ComputeCancelled):  # the caller went away mid-prefill; nobody reads this
            await context.abort(grpc.StatusCode.CANCELLED, str(error))
        await context.abort_with_status(to_status(internal(method, error)))

    async def _receive(self, requests: AsyncIterator[Any], method: str) -> Any:
        """A client stream's next message (``_END`` after the last), waiting at most ``idle_seconds``."""
        try:
            message = await asyncio.wait_for(anext(requests), self.idle_seconds)
        except StopAsyncIteration:
            return _END
        except TimeoutError:
            raise StreamIdle(f"the {method} stream sent no message for {self.idle_seconds:g} s "
                             "(server.stream_idle_seconds); send its messages without pausing that long",
                             idle_seconds=f"{self.idle_seconds:g}") from None
        if isinstance(message, Malformed):
            raise message.error_for_stream()
        return message

    # -- the same steps for the HTTP surface (syscalls/openai_chat.py): no second auth path ----------
    def authenticate(self, method: str, authorization: list[str], entry: AuditEntry) -> PrincipalRecord:
        """The caller of an HTTP call, from its Authorization header values (as gRPC's metadata)."""
        return self._authenticate(method, authorization, entry)

    def authorize_call(self, caller: PrincipalRecord, method: str, request: Any, done: threading.Event,
                       entry: AuditEntry) -> Call:
        """``caller`` may make ``method`` (a MemOS syscall) with ``request``; the Call to hand its handler."""
        return self._authorize(caller, method, request, done, entry)

    def finish(self, entry: AuditEntry, started: float, error: Exception | None) -> None:
        """The call's audit record and metrics (on an executor thread: it writes to RocksDB)."""
        self._close(entry, started, error)

    def public_error(self, method: str, error: Exception) -> MemosError:
        """What the caller may be told of ``error``: a MemosError as is, anything else INTERNAL with a ref."""
        error = self._disk_full(error)
        return error if isinstance(error, MemosError) else internal(method, error)

    # -- the three shapes ------------------------------------------------------------
    def unary(self, method: str, handler: Handler) -> Callable[[Any, Any], Awaitable[Any]]:
        async def run(request: Any, context: Any) -> Any:
            started, entry = time.perf_counter(), AuditEntry(method)
            token, done = self._token(context), _done_event(context)
            placed = self._placed(context) if self.placement else ""

            def work() -> tuple[Any, Exception | None]:
                try:
                    caller = self._authenticate(method, token, entry)
                    call = self._authorize(caller, method, request, done, entry)
                    call.placed_cube_id = placed
                    call.authorization = tuple(token)  # ListCubes on a cluster node asks the other owners with it
                    response = handler(request, call)
                except Exception as error:
                    self._close(entry, started, error)
                    return None, error
                self._close(entry, started, None, response)
                return response, None

            # Shielded: a call the client abandons still finishes its audit record (its handler sees
            # `done` set and stops early where it can).
            response, error = await asyncio.shield(asyncio.get_running_loop().run_in_executor(self.executor, work))
            if error is not None:
                await self._abort(method, error, context)
            return response

        return run

    def client_stream(self, method: str, handler: Handler) -> Callable[[AsyncIterator[Any], Any], Awaitable[Any]]:
        """The first message (the header) is what the rights are checked against."""
        request_type = getattr(pb, _input_type(method))

        async def run(requests: AsyncIterator[Any], context: Any) -> Any:
            stream = _Stream(self, method, context)
            feed = _Feed(asyncio.get_running_loop())
            stream.on_done(feed.close)
            pump: asyncio.Task[None] | None = None
            try:
                caller = self._authenticate(method, stream.token, stream.entry)
                stream.slot = self.admission.admit(caller.principal_id, stream_kinds(method, None))
                first = await self._receive(requests, method)
                header = request_type() if first is _END else first
                call = await stream.run(lambda: self._authorize(caller, method, header, stream.done, stream.entry))
                if first is _END:
                    messages: Iterator[Any] = iter(())
                else:
                    pump = asyncio.ensure_future(feed.pump(lambda: self._receive(requests, method)))
                    messages = chain([first], feed.messages())
                response = await stream.run(lambda: handler(messages, call), self.upload_executor)
            except Exception as error:
                await stream.run(partial(stream.finish, error))
                await self._abort(method, error, context)
            finally:
                if pump is not None:
                    pump.cancel()
            await stream.run(lambda: stream.finish(None, response))
            return response

        return run

    def server_stream(self, method: str, handler: Handler) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def run(request: Any, context: Any) -> AsyncIterator[Any]:
            stream = _Stream(self, method, context)
            try:
                caller = self._authenticate(method, stream.token, stream.entry)
                stream.slot = self.admission.admit(caller.principal_id, stream_kinds(method, request))

                def start() -> Iterator[Any]:
                    call = self._authorize(caller, method, request, stream.done, stream.entry)
                    call.authorization = tuple(stream.token)
                    return iter(handler(request, call))

                stream.steps = await stream.run(start)
                while True:
                    response = await stream.run(lambda: next(stream.steps, _END))  # type: ignore[arg-type]
                    if response is _END:
                        break
                    if isinstance(response, Park):
                        await wait_parked(response)
                        continue
                    _note_header(stream.entry, response)
                    if self.metrics is not None:
                        self.metrics.observe_response(method, response)
                    yield response
            except Exception as error:
                await stream.run(partial(stream.finish, error))
                await self._abort(method, error, context)
            await stream.run(lambda: stream.finish(None))

        return run


class _Stream:
    """A streaming call's state, shared by the event loop and the executor threads that run its steps."""

    def __init__(self, gate: Gate, method: str, context: Any) -> None:
        self.gate = gate
        self.started, self.entry = time.perf_counter(), AuditEntry(method)
        self.token = gate._token(context)
        self.done = threading.Event()
        self.slot: Slot | None = None
        self.steps: Iterator[Any] | None = None  # a server stream's handler generator
        self._step: Future[Any] | None = None  # the executor work of this call running (or queued) now
        self._closed = False
        self._lock = threading.Lock()
        self._on_done: list[Callable[[], None]] = []
        context.add_done_callback(self._call_done)

    def on_done(self, callback: Callable[[], None]) -> None:
        self._on_done.append(callback)

    async def run(self, fn: Callable[[], T], executor: Executor | None = None) -> T:
        """``fn`` on the executor, awaited; cancelling the call cancels it if it has not started."""
        self._step = (executor or self.gate.executor).submit(fn)
        return await asyncio.wrap_future(self._step)

    def finish(self, error: Exception | None, response: Any = None) -> None:
        """The call's audit record and metrics, once (on an executor thread: it writes to RocksDB)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.gate._close(self.entry, self.started, error, response)

    def _call_done(self, _context: Any) -> None:
        """On the loop, when the RPC ends for any reason: free the slot; clean up after a caller that left."""
        self.done.set()
        if self.slot is not None:
            self.slot.release()
        for callback in self._on_done:
            callback()
        with self._lock:
            if self._closed:
                return
        step = self._step
        if step is None or step.done():
            self._cleanup()
        else:  # never close a generator while a step runs in it
            step.add_done_callback(lambda _: self._cleanup())

    def _cleanup(self) -> None:
        def work() -> None:
            close = getattr(self.steps, "close", None)
            if close is not None:
                try:
                    close()  # runs the handler's finally blocks (a generation's accounting, say)
                except Exception as error:  # logged; the call is over either way
                    log_event(log, "stream_close_failed", level=logging.WARNING, method=self.entry.method,
                              error=repr(error))
            self.entry.code = "CANCELLED"
            self.finish(None)

        try:
            self.gate.executor.submit(work)
        except RuntimeError:  # the executor is shut down (the daemon is stopping)
            work()


class _Feed:
    """A client stream's messages, read on the event loop, handed to the handler's thread as an iterator.

    At most ``BUFFER`` messages wait in between: no more is read until the handler takes one."""

    BUFFER = 2

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(self.BUFFER)

    async def pump(self, receive: Callable[[], Awaitable[Any]]) -> None:
        try:
            while True:
                await self._room.acquire()
                message = await receive()
                self._queue.put(message)
                if message is _END:
                    return
        except Exception as error:  # STREAM_IDLE, MALFORMED_REQUEST: the handler raises it
            self._queue.put(error)

    def close(self) -> None:
        """The call ended: wake a handler that waits for a message."""
        self._queue.put(ComputeCancelled("the client stream ended before its last message"))

    def messages(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is stopping
                self._loop.call_soon_threadsafe(self._room.release)
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item


async def wait_parked(park: Park) -> None:
    """Wait on the loop until ``park.future`` is done; the generator reads its result (or error) itself."""
    waiting = asyncio.wrap_future(park.future)
    try:
        await asyncio.wait([waiting])
    except asyncio.CancelledError:
        waiting.cancel()  # cancels the work behind it if it has not started (a queued token, say)
        raise


def _done_event(context: Any) -> threading.Event:
    event = threading.Event()
    context.add_done_callback(lambda _context: event.set())
    return event


def _input_type(method: str) -> str:
    return str(pb.DESCRIPTOR.services_by_name["MemOS"].methods_by_name[method].input_type.name)


def _note_header(entry: AuditEntry, response: Any) -> None:
    """The cube and revision a response's header names, when the rights check did not already name a cube."""
    header = getattr(response, "header", None)
    if header is None or not response.HasField("header"):
        return
    entry.cube_id = entry.cube_id or header.cube_id
    entry.revision = entry.revision or header.read_revision or header.head_revision
