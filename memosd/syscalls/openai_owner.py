"""An OpenAI chat completion on a cluster node whose cubes another node owns: run on the owner, over gRPC.

The HTTP surface is routed like the gRPC calls (syscalls/router.py), one level up: a chat is a Mount of each
named cube, a Generate over the mounts and an Unmount of each, and a mount is served by its cube's owner.
So where the named cubes (memos.cubes, memos.adapter, memos.remember) are all owned by another node, this
node sends that same sequence to the owner as gRPC calls, through the router's channel to its advertised
address (TLS as forwarded calls), with the caller's own Authorization header and ``memosd-forwarded-by``:
the owner checks the token and the rights, admits the stream, generates, and writes the calls' audit
records, exactly as for a client that called it directly; this node keeps only the HTTP side (JSON, SSE)
and one ``OpenAI.ChatCompletions`` audit record of its own naming the caller and the first cube.

Why not forward the HTTP request to the owner's HTTP listener: nodes advertise only their gRPC address, a
node's ``[http] listen`` may be off or bound to loopback, and the gRPC path already has the channels, the
TLS between nodes and the hop rule. The cost is three round trips (Mount, Generate's stream, Unmount)
where one would do: ~13-22 ms at p50 on two loaded cores (BENCHMARKS.md, Cluster), against a real model's
generation of hundreds of ms or more.

Rules:
- Every named cube must be on one node (the Generate runs where its mounts are, as gRPC's Generate must):
  otherwise INVALID_FIELD (param memos.cubes) saying which cube is on which node. The routing reads the
  directory before any rights check, as the gRPC router does; cube names are cluster-wide, and which node
  holds a named cube is no more than AllocCube's CUBE_NAME_TAKEN already tells any caller.
- A cube no directory names is left to this node (its CUBE_NOT_FOUND is the answer).
- The owner not a live member, or not reachable: CUBE_UNAVAILABLE (HTTP 503) naming it and its address.
  Its own refusals (PERMISSION_DENIED, CUBE_NOT_FOUND, RESOURCE_EXHAUSTED, ...) come back with their code
  and reason, mapped to HTTP as a local refusal is (openai_errors.HTTP_BY_CODE).
- The client leaving (a closed connection) cancels the Generate on the owner and unmounts there; a mount
  still being made when it leaves is unmounted once it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

import grpc
from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import InvalidField
from memosd.governance.audit import AuditEntry
from memosd.syscalls.convert_openai import ChatRequest
from memosd.syscalls.errors import from_rpc_error
from memosd.syscalls.gate import AUTH_METADATA
from memosd.syscalls.openai_chat import CHAT_METHOD, ChatRun
from memosd.syscalls.router import HOP, Router
from memosd.syscalls.servicer import MemOSServicer

CALL_TIMEOUT = 60.0  # seconds for one Mount or Unmount on the owner (a Generate has no deadline, as here)
_CLOSING: set[asyncio.Task[None]] = set()  # abandoned runs' clean-ups, held until they end


def chat_refs(chat: ChatRequest) -> list[str]:
    """Every cube the chat mounts, each once, in order."""
    return list(dict.fromkeys(ref for ref in (*chat.cubes, chat.adapter, chat.remember) if ref))


async def chat_owner(router: Router, chat: ChatRequest) -> str:
    """The node that owns every cube the chat names; "" when that is this node (or none is named, or no
    directory names them). Raises InvalidField when they are on several nodes."""
    where = {ref: await router.cube_owner(ref) for ref in chat_refs(chat)}
    nodes = sorted({node for node in where.values() if node})
    if len(nodes) > 1:
        placed = ", ".join(f"{ref!r} on {node!r}" for ref, node in where.items() if node)
        raise InvalidField(f"memos.cubes: the chat's cubes are on different cluster nodes ({placed}); a chat is "
                           "generated where its cubes are mounted, so memos.cubes, memos.adapter and "
                           "memos.remember must all be on one node (memosctl cluster move one of them)",
                           field="memos.cubes", nodes=",".join(nodes))
    return nodes[0] if nodes and nodes[0] != router.node else ""


async def open_chat(servicer: MemOSServicer, router: Router | None, authorization: list[str],
                    chat: ChatRequest) -> ChatRun | OwnerChatRun:
    """The run for this chat: here (a single node, or a cluster node's own cubes) or on its cubes' owner.
    Authenticates first, so a caller without a valid token learns nothing of where cubes are; raises the
    refusal (audited by the caller of this, as a malformed request is)."""
    if router is None:
        return ChatRun(servicer, authorization, chat)
    servicer.gate.authenticate(CHAT_METHOD, authorization, AuditEntry(CHAT_METHOD))  # a dict lookup
    node = await chat_owner(router, chat)
    return OwnerChatRun(servicer, router, node, authorization, chat) if node else ChatRun(servicer, authorization,
                                                                                         chat)


class OwnerChatRun:
    """A chat completion served by the cubes' owner ``node``: ChatRun's interface, over gRPC calls."""

    def __init__(self, servicer: MemOSServicer, router: Router, node: str, authorization: list[str],
                 chat: ChatRequest) -> None:
        self.gate, self.chat, self.router, self.node = servicer.gate, chat, router, node
        self.authorization = authorization
        self.call_id = "chatcmpl-" + secrets.token_hex(12)
        self.started, self.entry = time.perf_counter(), AuditEntry(CHAT_METHOD)
        self.names: dict[str, str] = {}  # cube id -> the name the caller used, for the reply's memos usage
        self._what = f"cube {chat_refs(chat)[0]!r}"
        # The caller's token (the owner checks it) and the hop header (the owner serves it, never forwards it).
        self._metadata = (*((AUTH_METADATA, value) for value in authorization), (HOP, router.node))
        self._channel: Any = None
        self._mounts: list[str] = []
        self._generate: Any = None  # the Generate call on the owner (a grpc.aio unary-stream call of bytes)
        self._opening: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _relayed(self, error: Exception) -> Exception:
        """An owner's answer as the MemosError it carries; no answer at all as CUBE_UNAVAILABLE naming it."""
        if not isinstance(error, grpc.aio.AioRpcError):
            return error
        answered = from_rpc_error(error)
        if answered is not None:
            return answered
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return self.router.unavailable(self.node, self._what, f"cannot be reached ({error.details()})")
        return error  # anything else without an ErrorInfo is INTERNAL here (public_error), logged with a ref

    async def _call(self, method: str, request: Any, response: Any) -> Any:
        raw = await self._channel.unary_unary(f"/memos.v1.MemOS/{method}")(
            request.SerializeToString(), metadata=self._metadata, timeout=CALL_TIMEOUT)
        return response.FromString(raw)

    async def _mount(self, ref: str, writable: bool = False) -> str:
        mode = t.MOUNT_MODE_READ_WRITE if writable else t.MOUNT_MODE_READ_ONLY
        request = pb.MountRequest(cube=ref, revision=self.chat.revisions.get(ref, 0), mode=mode)
        mount = (await self._call("Mount", request, pb.MountResponse)).mount
        self._mounts.append(mount.mount_id)
        self.names[mount.cube_id] = ref
        self.entry.cube_id = self.entry.cube_id or mount.cube_id
        return str(mount.mount_id)

    async def _open(self) -> None:
        """ChatRun._open's sequence, on the owner: the Mounts, then the Generate over them."""
        request, remember = self.chat.generate, self.chat.remember
        by_ref = {ref: await self._mount(ref, writable=ref == remember) for ref in self.chat.cubes}
        request.mount_ids.extend(by_ref.values())
        if self.chat.adapter:
            request.options.adapter_mount_id = by_ref.get(self.chat.adapter) or await self._mount(self.chat.adapter)
        if remember:
            request.options.remember_mount_id = by_ref.get(remember) or await self._mount(remember, writable=True)
        self._generate = self._channel.unary_stream("/memos.v1.MemOS/Generate")(
            request.SerializeToString(), metadata=self._metadata)

    async def start(self) -> None:
        """Authenticate here, then mount on the owner and start its Generate; raises the refusal."""
        self._loop = asyncio.get_running_loop()
        try:
            self.gate.authenticate(CHAT_METHOD, self.authorization, self.entry)
            self._channel = self.router.owner_channel(self.node, self._what)
            # Shielded: a client that leaves mid-Mount must not lose a mount the owner then makes (abandon()
            # unmounts it once this ends).
            self._opening = asyncio.ensure_future(self._open())
            await asyncio.shield(self._opening)
        except asyncio.CancelledError:
            self.abandon()
            raise
        except Exception as error:
            relayed = self._relayed(error)
            await self.finish(relayed)
            raise relayed from None

    async def next_event(self) -> str | t.GenerationSummary | None:
        """The next text delta, then the summary, then None."""
        assert self._generate is not None, "start() first"
        try:
            raw = await self._generate.read()
        except grpc.aio.AioRpcError as error:
            raise self._relayed(error) from None
        if raw is grpc.aio.EOF:
            return None
        response = pb.GenerateResponse.FromString(raw)
        return response.summary if response.HasField("summary") else response.delta

    async def _drain(self) -> None:
        while await self._generate.read() is not grpc.aio.EOF:
            pass

    async def finish(self, error: Exception | None, cancelled: bool = False) -> None:
        """The end, once: stop the Generate, unmount on the owner, write this node's audit record."""
        if self._closed:
            return
        self._closed = True
        if self._generate is not None:
            if error is None and not cancelled:  # the summary came: let the stream end, so the owner's is OK
                with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                    await asyncio.wait_for(self._drain(), CALL_TIMEOUT)
            self._generate.cancel()  # a no-op once the stream ended; else the owner sees the call cancelled
        for mount_id in self._mounts:
            with contextlib.suppress(grpc.aio.AioRpcError):  # gone already, or the owner is: it frees it then
                await self._call("Unmount", pb.UnmountRequest(mount_id=mount_id), pb.UnmountResponse)
        if cancelled:
            self.entry.code = "CANCELLED"
        await asyncio.wrap_future(self.gate.executor.submit(self.gate.finish, self.entry, self.started, error))

    def abandon(self) -> None:
        """The client went away: end the run on the owner, after any Mount in flight (from any thread)."""
        loop = self._loop
        if loop is None or self._closed:
            return

        def close() -> None:
            task = asyncio.ensure_future(self.finish(None, cancelled=True))
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

        def opened(done: asyncio.Future[None]) -> None:
            if not done.cancelled():
                done.exception()  # start() reports its failure, if anyone: read here, so never "unretrieved"
            close()

        def after_opening() -> None:
            opening = self._opening
            if opening is not None and not opening.done():
                opening.add_done_callback(opened)
            else:
                close()

        loop.call_soon_threadsafe(after_opening)


__all__ = ["OwnerChatRun", "chat_owner", "chat_refs", "open_chat"]
