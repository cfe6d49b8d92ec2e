"""One OpenAI chat completion as memosd syscalls, through the same gate as gRPC.

The caller is authenticated from its ``Authorization: Bearer`` header (``Gate.authenticate``), admitted as a
Generate stream (``admission``), each cube is mounted read-only under the Mount rule and the generation is
checked under the Generate rule (``policy.RULES``), then the servicer's own Mount and Generate handlers run:
the same code path as the syscalls. The mounts are unmounted when the reply ends for any reason, and one
audit record (method ``OpenAI.ChatCompletions``) names the caller, the cubes, the items and the caches used.

Threading as in the gate: the handlers run on the gate's executor, one generator step at a time; a step that
waits on the model worker yields ``Park``, awaited on the loop holding no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import MemosError
from memosd.governance.audit import AuditEntry
from memosd.park import Park
from memosd.store.records import PrincipalRecord
from memosd.syscalls.admission import Slot, stream_kinds
from memosd.syscalls.convert_openai import ChatRequest
from memosd.syscalls.gate import Gate, wait_parked
from memosd.syscalls.servicer import MemOSServicer

CHAT_METHOD = "OpenAI.ChatCompletions"
MODELS_METHOD = "OpenAI.Models"
T = TypeVar("T")


class ChatRun:
    """A chat completion in progress: start it, step its events, and end it exactly once."""

    def __init__(self, servicer: MemOSServicer, authorization: list[str], chat: ChatRequest) -> None:
        self.servicer, self.gate, self.chat = servicer, servicer.gate, chat
        self.authorization = authorization
        self.call_id = "chatcmpl-" + secrets.token_hex(12)
        self.started, self.entry = time.perf_counter(), AuditEntry(CHAT_METHOD)
        self.done = threading.Event()  # set when the reply ends: the generation stops at its next step
        self.names: dict[str, str] = {}  # cube id -> the name the caller used, for the reply's memos usage
        self._slot: Slot | None = None
        self._mounts: list[str] = []
        self._steps: Iterator[Any] | None = None
        self._step: Future[Any] | None = None
        self._closed = False
        self._lock = threading.Lock()

    async def _run(self, fn: Callable[[], T]) -> T:
        self._step = self.gate.executor.submit(fn)
        return await asyncio.wrap_future(self._step)

    async def start(self) -> None:
        """Authenticate, admit, mount and check the generation; raises the refusal (the call is then over)."""
        try:
            caller = self.gate.authenticate(CHAT_METHOD, self.authorization, self.entry)  # a dict lookup
            self._slot = self.gate.admission.admit(caller.principal_id, stream_kinds("Generate", None))
            self._steps = await self._run(lambda: self._open(caller))
        except asyncio.CancelledError:
            self.abandon()  # the mounting may still run: clean up after it
            raise
        except Exception as error:
            await self.finish(error)
            raise

    def _mount(self, caller: PrincipalRecord, ref: str, writable: bool = False) -> str:
        mode = t.MOUNT_MODE_READ_WRITE if writable else t.MOUNT_MODE_READ_ONLY
        request = pb.MountRequest(cube=ref, revision=self.chat.revisions.get(ref, 0), mode=mode)
        mount = self.servicer.Mount(request, self.gate.authorize_call(caller, "Mount", request, self.done, self.entry))
        self._mounts.append(mount.mount.mount_id)
        self.names[mount.mount.cube_id] = ref
        return str(mount.mount.mount_id)

    def _open(self, caller: PrincipalRecord) -> Iterator[Any]:
        request = self.chat.generate
        remember = self.chat.remember
        # The remember cube is mounted once, read-write, also where it is one of the memory cubes.
        by_ref = {ref: self._mount(caller, ref, writable=ref == remember) for ref in self.chat.cubes}
        request.mount_ids.extend(by_ref.values())
        if self.chat.adapter:
            request.options.adapter_mount_id = by_ref.get(self.chat.adapter) or self._mount(caller, self.chat.adapter)
        if remember:
            request.options.remember_mount_id = by_ref.get(remember) or self._mount(caller, remember, writable=True)
        call = self.gate.authorize_call(caller, "Generate", request, self.done, self.entry)
        return iter(self.servicer.Generate(request, call))

    async def next_event(self) -> str | t.GenerationSummary | None:
        """The next text delta, then the summary, then None."""
        steps = self._steps
        assert steps is not None, "start() first"
        while True:
            event = await self._run(lambda: next(steps, None))
            if event is None:
                return None
            if isinstance(event, Park):
                await wait_parked(event)
                continue
            response: pb.GenerateResponse = event
            if response.HasField("summary"):
                if self.gate.metrics is not None:  # the generation's TTFT and tokens, as for gRPC's Generate
                    self.gate.metrics.observe_response("Generate", response)
                return response.summary
            return response.delta

    async def finish(self, error: Exception | None) -> None:
        """The normal end (or a refusal): unmount, free the slot, write the audit record; awaited."""
        await asyncio.wrap_future(self.gate.executor.submit(self._close, error))

    def abandon(self) -> None:
        """The client went away: stop the generation, and clean up once the step that runs (if any) ends."""
        self.done.set()
        step = self._step
        if step is None or step.done():
            self._submit_close()
        else:  # never close a generator while a step runs in it
            step.add_done_callback(lambda _: self._submit_close())

    def _submit_close(self) -> None:
        try:
            self.gate.executor.submit(self._close, None, True)
        except RuntimeError:  # the executor is shut down (the daemon is stopping)
            self._close(None, True)

    def _close(self, error: Exception | None, cancelled: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.done.set()
        if self._steps is not None:
            with contextlib.suppress(Exception):  # its finally blocks (the generation's accounting) run here
                getattr(self._steps, "close", lambda: None)()
        for mount_id in self._mounts:
            with contextlib.suppress(MemosError):  # gone already (the cube was freed meanwhile)
                self.servicer.kernel.unmount(mount_id)
        if self._slot is not None:
            self._slot.release()
        if cancelled:
            self.entry.code = "CANCELLED"
        self.gate.finish(self.entry, self.started, error)


async def refuse_before_start(gate: Gate, authorization: list[str], error: MemosError) -> MemosError:
    """A chat refused before any syscall (a body that is not a chat request; on a cluster node, cubes on
    several nodes): the caller is still authenticated first (no token is 401 whatever the body), and the
    refusal is audited and counted like any other."""
    started, entry = time.perf_counter(), AuditEntry(CHAT_METHOD)
    try:
        gate.authenticate(CHAT_METHOD, authorization, entry)
    except MemosError as refused:
        error = refused
    await asyncio.wrap_future(gate.executor.submit(gate.finish, entry, started, error))
    return error


def visible_cube_names(servicer: MemOSServicer, authorization: list[str]) -> list[str]:
    """The names of the cubes the caller can see (for GET /v1/models), under ListCubes' rule; audited."""
    gate = servicer.gate
    started, entry, done = time.perf_counter(), AuditEntry(MODELS_METHOD), threading.Event()
    try:
        caller = gate.authenticate(MODELS_METHOD, authorization, entry)
        names: list[str] = []
        token = ""
        while True:
            # On a cluster node, the cluster's cubes (syscalls/cluster_list.py asks each owner with the
            # caller's token): a chat through this node can use any of them (openai_owner.py).
            request = pb.ListCubesRequest(page_size=1000, page_token=token)
            call = gate.authorize_call(caller, "ListCubes", request, done, entry)
            call.authorization = tuple(authorization)
            page = servicer.ListCubes(request, call)
            names.extend(cube.name for cube in page.cubes)
            token = page.next_page_token
            if not token:
                break
    except Exception as error:
        gate.finish(entry, started, error)
        raise
    gate.finish(entry, started, None)
    return names
