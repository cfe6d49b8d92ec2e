"""Routing on a cluster node: a call for a cube owned elsewhere is forwarded to its owner, as raw bytes.

Any node accepts any call. Before the gate, the router finds where the call's cube lives, from the
request field policy.RULES names for it: a cube (id or name) is looked up in the node's watch-fed copy
of the directory (cluster/view.py); a mount or a job id carries its node's tag (kernel/ids.py), so it
needs no lookup at all. If the owner is this node, or no owner is known (a cube that is in no
directory: the local answer, CUBE_NOT_FOUND, is the right one), the gate runs here as on a single
node. Otherwise the request's bytes go, unparsed again, to the owner's advertised address with the
caller's metadata (its token among them), and the owner's answer (its response bytes, or its status
with its ErrorInfo) comes back as is. Unary, server-streaming and client-streaming calls alike.

Why forwarding, not a redirect: every client (Python, Node, a generated stub, grpcurl) keeps working
unchanged, and a mount's calls reach its owner with no client-side routing table. The cost is one more
hop for a call that lands on the wrong node.

Rules:
- A forwarded call carries ``memosd-forwarded-by: <node>`` and is never forwarded again: if the
  receiving node's directory names yet another owner (its view and the sender's disagree for a moment)
  it answers CUBE_UNAVAILABLE rather than serve a copy it does not own. A loop is impossible.
- The owner is not a live member, or cannot be reached: CUBE_UNAVAILABLE naming the owner and its
  address. Every other cube keeps serving.
- Tokens are checked by the owner (principals are still per node: the caller needs a token valid on
  the owner; principals and grants in etcd are the next step). The call's audit record is the owner's.
- AllocCube is placed here: a new cube id, placed by rendezvous over the live members
  (cluster/placement.py); the call goes to the winner with ``memosd-cube-id`` (the gate hands it to
  the handler), or runs here with it when this node wins. A winner that cannot be reached is skipped
  for the next in its ranking. ImportCube runs where it lands (it claims there).
- A call naming several mounts (Search, Generate) goes to the owner of the first; the others must be
  on the same node (each node answers MOUNT_NOT_FOUND for a mount it does not hold).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memosd.cluster.placement import ranking
from memosd.cluster.view import DirectoryView
from memosd.errors import CubeUnavailable
from memosd.kernel import ids
from memosd.syscalls.errors import to_status
from memosd.syscalls.gate import PLACED_METADATA
from memosd.syscalls.policy import RULES

HOP = "memosd-forwarded-by"
PLACED = PLACED_METADATA
_DROPPED = ("user-agent", "content-type", "te")  # transport headers: the outgoing call sets its own

Parse = Callable[[bytes], Any]


def _field(request: Any, path: str) -> Any:
    value = request
    for part in path.split("."):
        value = getattr(value, part, "")
    return value


def _first(value: Any) -> str:
    if isinstance(value, str):
        return value
    return next((v for v in value if v), "") if value else ""


class _Placed:
    """The server context of a call run here, with the placed cube id added to its metadata."""

    def __init__(self, context: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._context = context
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        sent = tuple((k, v) for k, v in self._context.invocation_metadata() or () if k != PLACED)
        return sent + self._metadata  # the caller's own memosd-cube-id never counts: ours replaces it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class Router:
    def __init__(self, view: DirectoryView, node: str, *, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.view = view
        self.node = node
        self._credentials = credentials  # TLS to the other nodes (the daemon's TLS is on); None: plaintext
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.forwarded = 0  # calls sent on to another node (Stats may show it)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _channel(self, address: str) -> Any:
        """The owner's channel; Any: its calls take and give bytes (no serializers), which the stubs' types
        cannot say."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = (
                grpc.aio.secure_channel(address, self._credentials, options=self._options)
                if self._credentials is not None else grpc.aio.insecure_channel(address, options=self._options))
        return channel

    # -- where a call goes -------------------------------------------------------------------------------
    async def _owner_of(self, method: str, request: Any) -> tuple[str, str]:
        """(the owner node, what the call names) for a call that names something; ("", "") for local."""
        rule = RULES.get(method)
        if rule is None:
            return "", ""
        ref = _field(request, rule.cube) if rule.cube else ""
        if isinstance(ref, str) and ref:
            owner = await self.cube_owner(ref)
            return (owner, f"cube {ref!r}") if owner else ("", "")
        for path in (*rule.mounts, *(p for p, _ in rule.mounts_with)):
            mount_id = _first(_field(request, path))
            if mount_id:
                return self.view.node_of_tag(ids.tag_of(mount_id, ids.MOUNT_PREFIX)), f"mount {mount_id}"
        job_id = _field(request, rule.job) if rule.job else ""
        if isinstance(job_id, str) and job_id:
            return self.view.node_of_tag(ids.tag_of(job_id, ids.JOB_PREFIX)), f"job {job_id}"
        return "", ""

    async def cube_owner(self, ref: str) -> str:
        """The node the directory names for cube ``ref`` (an id or a name), this one included; "" if none."""
        entry = self.view.entry(ref)
        if entry is None:  # created a moment ago elsewhere? ask the directory itself, off the loop
            entry = await asyncio.get_running_loop().run_in_executor(None, self.view.lookup, ref)
        return entry.owner if entry is not None else ""

    def owner_channel(self, node: str, what: str) -> Any:
        """The channel to ``node``, for the HTTP surface's calls on its cubes (syscalls/openai_owner.py):
        the same channels (and TLS) as forwarded calls. CubeUnavailable when it is not a live member."""
        owner = self.view.owner(node)
        if not owner.live:
            raise self._unavailable(node, what, "is not a live cluster member")
        self.forwarded += 1
        return self._channel(owner.address)

    def unavailable(self, node: str, what: str, why: str) -> CubeUnavailable:
        """CUBE_UNAVAILABLE for ``what`` (a cube, a mount), naming its owner ``node`` and the owner's address."""
        return self._unavailable(node, what, why)

    def _unavailable(self, node: str, what: str, why: str) -> CubeUnavailable:
        owner = self.view.owner(node)
        at = owner.address or "an unknown address"
        return CubeUnavailable(f"{what} is served by cluster node {node!r} at {at}, which {why}; its cubes are "
                               "unavailable until it is back, every other cube keeps serving",
                               owner=node, address=owner.address)

    async def _route(self, method: str, request: Any, context: Any) -> str:
        """The node to forward to, or "" to run here. Raises CubeUnavailable."""
        node, what = await self._owner_of(method, request)
        if not node or node == self.node:
            return ""
        if any(key == HOP for key, _ in context.invocation_metadata() or ()):
            raise self._unavailable(node, what, f"is its owner by this node's directory ({self.node!r}); the call "
                                    "was forwarded here already and is not forwarded twice")
        if not self.view.owner(node).live:
            raise self._unavailable(node, what, "is not a live cluster member")
        return node

    def _metadata(self, context: Any, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        kept = [(k, v) for k, v in context.invocation_metadata() or ()
                if not k.startswith((":", "grpc-")) and k not in _DROPPED and k not in (HOP, PLACED)]
        return [*kept, (HOP, self.node), *extra]

    async def _relay(self, error: grpc.aio.AioRpcError, context: Any, node: str, what: str) -> None:
        """The owner's status as the caller's; a transport failure (no answer from it) is CUBE_UNAVAILABLE."""
        trailing = tuple(error.trailing_metadata() or ())
        answered = any(key == "grpc-status-details-bin" for key, _ in trailing)
        if error.code() == grpc.StatusCode.UNAVAILABLE and not answered:
            await context.abort_with_status(to_status(self._unavailable(node, what, f"cannot be reached "
                                                                         f"({error.details()})")))
        await context.abort(error.code(), error.details() or "", trailing)

    # -- the three shapes ------------------------------------------------------------------------------
    def unary(self, method: str, parse: Parse, local: Callable[[Any, Any], Awaitable[Any]]
              ) -> Callable[[bytes, Any], Awaitable[Any]]:
        path = f"/memos.v1.MemOS/{method}"
        if method == "AllocCube":
            return self._alloc(path, parse, local)

        async def run(raw: bytes, context: Any) -> Any:
            request = parse(raw)
            try:
                node = await self._route(method, request, context)
            except CubeUnavailable as error:
                await context.abort_with_status(to_status(error))
            if not node:
                return await local(request, context)
            self.forwarded += 1
            owner = self.view.owner(node)
            try:
                return await self._channel(owner.address).unary_unary(path)(
                    raw, metadata=self._metadata(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await self._relay(error, context, node, (await self._owner_of(method, request))[1])

        return run

    def _alloc(self, path: str, parse: Parse, local: Callable[[Any, Any], Awaitable[Any]]
               ) -> Callable[[bytes, Any], Awaitable[Any]]:
        async def run(raw: bytes, context: Any) -> Any:
            if any(key == HOP for key, _ in context.invocation_metadata() or ()):
                return await local(parse(raw), context)  # placed by the node that forwarded it
            cube_id = ids.new_id(ids.CUBE_PREFIX)
            members = set(self.view.live_members()) | {self.node}
            last: grpc.aio.AioRpcError | None = None
            for node in ranking(cube_id, members):
                if node == self.node:
                    return await local(parse(raw), _Placed(context, ((PLACED, cube_id),)))
                owner = self.view.owner(node)
                try:
                    self.forwarded += 1
                    return await self._channel(owner.address).unary_unary(path)(
                        raw, metadata=self._metadata(context, (PLACED, cube_id)), timeout=context.time_remaining())
                except grpc.aio.AioRpcError as error:
                    answered = any(k == "grpc-status-details-bin" for k, _ in error.trailing_metadata() or ())
                    if error.code() != grpc.StatusCode.UNAVAILABLE or answered:
                        await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata()))
                    last = error  # not reached: the next in the cube's ranking takes it
            assert last is not None  # this node is in the ranking: the loop returned
            return None

        return run

    def server_stream(self, method: str, parse: Parse, local: Callable[[Any, Any], AsyncIterator[Any]]
                      ) -> Callable[[bytes, Any], AsyncIterator[Any]]:
        path = f"/memos.v1.MemOS/{method}"

        async def run(raw: bytes, context: Any) -> AsyncIterator[Any]:
            request = parse(raw)
            try:
                node = await self._route(method, request, context)
            except CubeUnavailable as error:
                await context.abort_with_status(to_status(error))
            if not node:
                async for response in local(request, context):
                    yield response
                return
            self.forwarded += 1
            call = self._channel(self.view.owner(node).address).unary_stream(path)(
                raw, metadata=self._metadata(context), timeout=context.time_remaining())
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as error:
                await self._relay(error, context, node, (await self._owner_of(method, request))[1])

        return run

    def client_stream(self, method: str, parse: Parse,
                      local: Callable[[AsyncIterator[Any], Any], Awaitable[Any]]
                      ) -> Callable[[AsyncIterator[bytes], Any], Awaitable[Any]]:
        """Routed by the first message (the header); ImportCube runs where it lands."""
        path = f"/memos.v1.MemOS/{method}"

        async def run(requests: AsyncIterator[bytes], context: Any) -> Any:
            first: bytes | None = None
            node = ""
            if method != "ImportCube":
                try:
                    first = await anext(requests)
                except StopAsyncIteration:
                    first = None
                if first is not None:
                    try:
                        node = await self._route(method, parse(first), context)
                    except CubeUnavailable as error:
                        await context.abort_with_status(to_status(error))

            async def raw() -> AsyncIterator[bytes]:
                if first is not None:
                    yield first
                async for message in requests:
                    yield message

            if not node:
                async def parsed() -> AsyncIterator[Any]:
                    async for message in raw():
                        yield parse(message)
                return await local(parsed(), context)
            self.forwarded += 1
            try:
                return await self._channel(self.view.owner(node).address).stream_unary(path)(
                    raw(), metadata=self._metadata(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await self._relay(error, context, node, f"the {method} call's mount")

        return run


__all__ = ["HOP", "PLACED", "Router"]
