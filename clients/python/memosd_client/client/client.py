"""The typed, synchronous client of memosd.

It is a thin layer over the generated ``memos.v1`` stub: each method builds one
request, returns the interesting part of the response as the protobuf message
itself, and turns gRPC failures into :mod:`memosd_client.errors` exceptions. List calls
are generators that follow page tokens; streaming calls convert their errors
while they are iterated. A call that takes a mount takes its id or the
:class:`~memosd_client.client.mount.MountHandle` itself; a handle's ``info`` is then
refreshed from each response that carries the mount.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

from memosd_client import auth
from memosd_client.client.adapters import adapter_bytes, adapter_upload, receive_adapter, save_adapter_dir
from memosd_client.client.archives import Progress, archive_upload, save_archive
from memosd_client.client.inputs import (
    AUDIT_OUTCOMES,
    ITEM_STATES,
    PRINCIPAL_KINDS,
    SCHEDULES,
    SEARCH_MODES,
    AdapterSource,
    ConversationLike,
    ItemLike,
    MessageLike,
    TimeLike,
    as_list,
    chat_messages,
    chunks,
    conversation_message,
    item_input,
    right_values,
    to_timestamp,
)
from memosd_client.client.results import DiffChanges, Generation, ResponseStream, SearchResults
from memosd_client.client.retry import (
    RETRY_NEVER,
    RETRY_READ,
    RETRY_WITH_ID,
    Deadlines,
    RetryPolicy,
    new_request_id,
    retrying,
)
from memosd_client.errors import CubeNameTaken, CubeNotFound, DataLoss, TooManyItems, Unknown, from_rpc_error
from memosd_client.v1 import memos_pb2, memos_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from memosd_client.client.mount import MountHandle

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The daemon's default limits.max_items_per_write: messages per Ingest call unless told otherwise.
DEFAULT_INGEST_BATCH = 1024
# The daemon's default max_tokens of a Generate: what a stream's deadline allows for when none is given.
DEFAULT_MAX_TOKENS = 256
_MIB = 1 << 20

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)
_T = TypeVar("_T")


class _UnaryCall(Protocol[_Req, _Resp]):
    def __call__(self, request: _Req, timeout: float | None = ...) -> _Resp: ...


class Client:
    """A connection to memosd.

    ``target`` defaults to ``$MEMOS_TARGET`` or ``127.0.0.1:50051``. ``timeout``
    (seconds, ``None`` for none) is every call's deadline; long calls get more,
    as ``deadlines`` says (per item of a Write or Ingest, per MiB of an adapter
    upload, per token of a Generate stream). Write, Ingest, Commit and
    ImportAdapter send a request id (a fresh uuid4 unless one is passed as
    ``request_id``) and are retried with it on UNAVAILABLE and
    DEADLINE_EXCEEDED: the daemon returns the first call's result to a retry,
    so nothing is applied twice. Read-only calls are retried on UNAVAILABLE;
    other calls are never retried. ``retry`` sets the attempts and backoff
    (``NO_RETRY`` turns retrying off). ``token`` (or
    ``token_file``) is the caller's bearer token; without one the client looks
    at ``$MEMOS_TOKEN``, ``$MEMOS_TOKEN_FILE`` and the local admin's token file
    (see :mod:`memosd_client.auth`). ``tls_ca`` (a PEM file, or True for the system
    roots) connects with TLS; ``tls_cert`` and ``tls_key`` add a client
    certificate (mTLS). A ``channel`` passed in is used as is and stays open on
    :meth:`close`: its owner closes it. A call on a mount takes the mount's id
    or its :class:`MountHandle`, whose ``info`` it then keeps up to date.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls_ca: str | bool | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        channel: grpc.Channel | None = None,
        retry: RetryPolicy | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.target = target or os.environ.get("MEMOS_TARGET") or DEFAULT_TARGET
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.deadlines = deadlines or Deadlines()
        self._owns_channel = channel is None
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if channel is None:
            if tls_ca or tls_cert:
                credentials = auth.tls_credentials(tls_ca if isinstance(tls_ca, str) else None, tls_cert, tls_key)
                channel = grpc.secure_channel(self.target, credentials, options=options)
            else:
                channel = grpc.insecure_channel(self.target, options=options)
        self._base_channel = channel
        self.token = auth.resolve_token(token, token_file)
        self.channel: grpc.Channel = (grpc.intercept_channel(channel, auth.TokenInterceptor(self.token))
                                      if self.token else channel)
        self._stub = memos_pb2_grpc.MemOSStub(self.channel)

    def close(self) -> None:
        if self._owns_channel:
            self._base_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, rpc: _UnaryCall[_Req, _T], request: _Req, *,
              retry_on: frozenset[grpc.StatusCode] = RETRY_NEVER, timeout: float | None = None) -> _T:
        """One unary call (``timeout``: the deadline, when longer than the client's), retried as ``retry_on``
        allows, with the same request each time."""
        deadline = self.timeout if timeout is None else timeout
        return retrying(lambda: rpc(request, timeout=deadline), retry_on, self.retry)

    def _longer(self, extra: float) -> float | None:
        """The client's timeout plus ``extra`` seconds (None stays None: no deadline)."""
        return None if self.timeout is None else self.timeout + extra

    def _pages(self, fetch: Callable[[str], tuple[Sequence[_T], str]]) -> Iterator[_T]:
        token = ""
        while True:
            page, token = fetch(token)
            yield from page
            if not token:
                return

    def is_ready(self, timeout: float = 1.0) -> bool:
        """Whether the channel is (or within ``timeout`` seconds gets) connected to the daemon."""
        ready = grpc.channel_ready_future(self._base_channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        finally:
            # Stops the future's connectivity polling thread, which would otherwise outlive the channel.
            ready.cancel()
        return True

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name of ``service`` ("" is the daemon), e.g. ``"SERVING"``.

        Needs the optional ``grpcio-health-checking`` package (not a dependency
        of this client); raises ImportError without it.
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)  # untyped module
        return name

    # -- cubes ---------------------------------------------------------------

    def alloc_cube(
        self, name: str, description: str = "", labels: Mapping[str, str] | None = None, *, exist_ok: bool = False
    ) -> types_pb2.Cube:
        """Create a cube. With ``exist_ok``, a name already taken by a cube the caller can see returns that
        cube as it is (its description and labels neither compared nor changed), so a script can run twice;
        a name taken by a cube the caller cannot see still raises CubeNameTaken."""
        req = memos_pb2.AllocCubeRequest(name=name, description=description, labels=labels)
        try:
            return self._call(self._stub.AllocCube, req).cube
        except CubeNameTaken as taken:
            if not exist_ok:
                raise
            try:
                return self.stat_cube(name)
            except CubeNotFound:
                raise taken from None  # someone else's cube: the name is taken, and not by one we may see

    def free_cube(self, cube: str) -> memos_pb2.FreeCubeResponse:
        """Delete a cube (id or name) with everything in it. Irreversible."""
        return self._call(self._stub.FreeCube, memos_pb2.FreeCubeRequest(cube=cube))

    def export_cube(
        self,
        cube: str,
        path: str | os.PathLike[str],
        *,
        with_kv: bool = False,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> memos_pb2.CubeArchive:
        """Save the cube (id or name) as a portable archive at ``path``: every revision, item version, vector
        and adapter, and with ``with_kv`` its persisted KV caches (docs/ARCHIVE.md). Returns what the archive
        holds. The file appears only once whole, its size and sha256 checked (DataLoss otherwise).
        ``progress(done, total)`` is called with bytes after each chunk. ``timeout`` (default: none, as an
        archive may be large) bounds the whole download."""
        stream = self._stub.ExportCube(memos_pb2.ExportCubeRequest(cube=cube, with_kv=with_kv), timeout=timeout)
        try:
            return save_archive(stream, path, progress)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()  # a no-op once the stream has ended

    def move_cube(
        self,
        cube: str,
        to_node: str,
        *,
        drain_seconds: float = 0.0,
        progress: Callable[[memos_pb2.MoveCubeProgress], None] | None = None,
        timeout: float | None = None,
    ) -> memos_pb2.MoveCubeProgress:
        """Move the cube (id or name) to the cluster node ``to_node``, keeping its id and revisions
        (docs/ARCHITECTURE.md, Cluster). Any node takes the call (its owner runs it). ``progress`` sees each
        step ("draining", "frozen", "exported", "received", "switched", "settled", "done"); returns the last.
        Raises MoveRefused (nothing moved), CubeMoving (a move of it runs already). ``drain_seconds`` (0: 10 s)
        bounds the wait for its open read-write mounts. ``timeout`` (default: none) bounds the whole move.
        Not retried: a move that failed left the cube where it was."""
        stream = self._stub.MoveCube(memos_pb2.MoveCubeRequest(cube=cube, to_node=to_node,
                                                               drain_seconds=drain_seconds), timeout=timeout)
        last = None
        try:
            for step in stream:
                last = step
                if progress is not None:
                    progress(step)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()
        if last is None:
            raise DataLoss("MoveCube ended without a step")
        return last

    def import_cube(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        progress: Progress | None = None,
        chunk_bytes: int = 1 << 20,
        timeout: float | None = None,
    ) -> memos_pb2.ImportCubeResponse:
        """Recreate the cube archived at ``path`` as a new cube ``name`` (owned by the caller), with the same
        revisions. Returns the response: the ``cube``, what the ``archive`` held, whether it was
        ``reembedded`` and how many KV caches loaded. Raises ArchiveInvalid (nothing is imported) or
        CubeNameTaken. ``timeout`` (default: the client's plus ``deadlines.per_mib`` per MiB) bounds the
        upload. It is not retried: a retry after a lost answer would find the name taken."""
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        if timeout is None:
            timeout = self._longer(self.deadlines.per_mib * os.path.getsize(path) / _MIB)
        requests = archive_upload(path, name, chunk_bytes, progress)
        try:
            resp: memos_pb2.ImportCubeResponse = self._stub.ImportCube(requests, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return resp

    def stat_cube(self, cube: str) -> types_pb2.Cube:
        return self._call(self._stub.StatCube, memos_pb2.StatCubeRequest(cube=cube), retry_on=RETRY_READ).cube

    def list_cubes(self, page_size: int = 0, *, local: bool = False) -> Iterator[types_pb2.Cube]:
        """Every cube the caller may see. On a cluster node: the cluster's (each with ``owner_node``; one whose
        owner is down has ``unavailable`` set), or with ``local`` only the node's own."""
        def fetch(token: str) -> tuple[Sequence[types_pb2.Cube], str]:
            resp = self._call(
                self._stub.ListCubes,
                memos_pb2.ListCubesRequest(page_size=page_size, page_token=token, local=local),
                retry_on=RETRY_READ,
            )
            return resp.cubes, resp.next_page_token

        return self._pages(fetch)

    # -- mounts --------------------------------------------------------------

    def mount(self, cube: str, revision: int = 0, writable: bool = False) -> MountHandle:
        """Open a mount on a cube (id or name) at ``revision`` (0: HEAD). Use it as a context manager."""
        mode = types_pb2.MOUNT_MODE_READ_WRITE if writable else types_pb2.MOUNT_MODE_READ_ONLY
        resp = self._call(self._stub.Mount, memos_pb2.MountRequest(cube=cube, revision=revision, mode=mode))
        # Imported here: mount.py binds this class's methods as it is imported, so it imports this module.
        from memosd_client.client.mount import MountHandle

        return MountHandle(self, resp.mount)

    def unmount(self, mount_id: str) -> memos_pb2.UnmountResponse:
        """Close a mount, discarding its staged changes (the response says how many)."""
        return self._call(self._stub.Unmount, memos_pb2.UnmountRequest(mount_id=mount_id))

    # -- items ---------------------------------------------------------------

    def write_raw(
        self,
        mount_id: str | MountHandle,
        items: Sequence[ItemLike],
        *,
        tags: Sequence[str] = (),
        source: str = "",
        event_time: TimeLike | None = None,
        ttl_seconds: int = 0,
        request_id: str = "",
    ) -> memos_pb2.WriteResponse:
        """Like :meth:`write`, returning the whole response (with the mount's staging counts)."""
        when = to_timestamp(event_time) if event_time is not None else None
        inputs = [item_input(item, list(tags), source, when, ttl_seconds) for item in items]
        req = memos_pb2.WriteRequest(mount_id=_mount_id(mount_id), items=inputs,
                                     request_id=request_id or new_request_id())
        resp = self._call(self._stub.Write, req, retry_on=RETRY_WITH_ID,
                          timeout=self._longer(self.deadlines.per_item * len(inputs)))
        _refresh(mount_id, resp)
        return resp

    def write(
        self,
        mount_id: str | MountHandle,
        items: Sequence[ItemLike],
        *,
        tags: Sequence[str] = (),
        source: str = "",
        event_time: TimeLike | None = None,
        ttl_seconds: int = 0,
        request_id: str = "",
    ) -> list[str]:
        """Stage items in a read-write mount (its id, or its MountHandle) in one call; returns their ids in order.

        ``tags``, ``source``, ``event_time`` and ``ttl_seconds`` (the item expires that long after the
        write; 0: never) apply to str items and fill the keys a dict item lacks; ItemInput messages are
        sent unchanged. ``request_id`` (default: a fresh uuid4) makes a resent call return the first
        one's ids without staging them again.
        """
        resp = self.write_raw(mount_id, items, tags=tags, source=source, event_time=event_time,
                              ttl_seconds=ttl_seconds, request_id=request_id)
        return list(resp.item_ids)

    def write_many(
        self,
        mount_id: str | MountHandle,
        items: Iterable[ItemLike],
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
        *,
        tags: Sequence[str] = (),
        source: str = "",
        event_time: TimeLike | None = None,
        ttl_seconds: int = 0,
    ) -> list[str]:
        """Stage any number of items, ``batch_size`` per Write call.

        ``progress`` is called after each call with the number of items it
        staged (a delta, like ``tqdm.update``). Batches already sent stay staged
        if a later one fails.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        ids: list[str] = []
        for batch in chunks(items, batch_size):
            ids += self.write(mount_id, batch, tags=tags, source=source, event_time=event_time,
                              ttl_seconds=ttl_seconds)
            if progress is not None:
                progress(len(batch))
        return ids

    def read(self, mount_id: str | MountHandle, item_ids: Sequence[str]) -> list[types_pb2.Item]:
        """Read items by id, as the mount sees them (raises ItemNotFound for an invisible id)."""
        req = memos_pb2.ReadRequest(mount_id=_mount_id(mount_id), item_ids=item_ids)
        resp = self._call(self._stub.Read, req, retry_on=RETRY_READ)
        return list(resp.items)

    def iter_items(self, mount_id: str | MountHandle, page_size: int = 0) -> Iterator[types_pb2.Item]:
        """Every item the mount sees, ordered by item id."""
        mount = _mount_id(mount_id)

        def fetch(token: str) -> tuple[Sequence[types_pb2.Item], str]:
            req = memos_pb2.ReadRequest(mount_id=mount, page_size=page_size, page_token=token)
            resp = self._call(self._stub.Read, req, retry_on=RETRY_READ)
            return resp.items, resp.next_page_token

        return self._pages(fetch)

    def forget(self, mount_id: str | MountHandle, item_ids: Sequence[str] = (), *, adapter: bool = False
               ) -> types_pb2.Mount:
        """Stage the removal of items, and with ``adapter`` of the cube's adapter; returns the mount.

        ``item_ids`` may be empty when ``adapter`` is set. The mount returned
        carries the new staging counts (``staged_adapter`` included).
        """
        req = memos_pb2.ForgetRequest(mount_id=_mount_id(mount_id), item_ids=item_ids, adapter=adapter)
        mount = self._call(self._stub.Forget, req).mount
        if not isinstance(mount_id, str) and mount.mount_id:
            mount_id.info = mount
        return mount

    def ingest(
        self,
        mount: str | MountHandle,
        messages: Sequence[ConversationLike],
        *,
        session_id: str = "",
        tags: Sequence[str] = (),
        source: str = "",
        commit_message: str = "",
        author: str = "",
        request_id: str = "",
    ) -> memos_pb2.IngestResponse:
        """Commit a conversation into a read-write mount's cube, one item per message, as one revision.

        Each message has a speaker, a text, a session id (``session_id`` fills it for messages without
        one) and optionally a time. Returns the response: ``item_ids`` (request order), ``revision`` and
        the ``mount``, now at that revision; the mount's other staged changes stay staged.
        ``request_id`` (default: a fresh uuid4) makes a resent call return the first one's revision and
        items without committing again.
        """
        req = memos_pb2.IngestRequest(
            mount_id=_mount_id(mount), messages=[conversation_message(m, session_id) for m in messages],
            commit_message=commit_message, author=author, tags=tags, source=source,
            request_id=request_id or new_request_id(),
        )
        resp = self._call(self._stub.Ingest, req, retry_on=RETRY_WITH_ID,
                          timeout=self._longer(self.deadlines.per_item * len(req.messages)))
        _refresh(mount, resp)
        return resp

    def ingest_many(
        self,
        mount: str | MountHandle,
        messages: Iterable[ConversationLike],
        batch_size: int = DEFAULT_INGEST_BATCH,
        progress: Callable[[int], None] | None = None,
        *,
        session_id: str = "",
        tags: Sequence[str] = (),
        source: str = "",
        commit_message: str = "",
        author: str = "",
    ) -> list[memos_pb2.IngestResponse]:
        """Ingest any number of messages, ``batch_size`` per Ingest call: one revision per call.

        Turns of a session are linked across calls. A batch over the daemon's limit
        (``limits.max_items_per_write``) is refused whole and resent in batches of that limit.
        ``progress`` is called with each committed batch's size. Batches already committed stay
        committed if a later one fails.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        responses: list[memos_pb2.IngestResponse] = []
        pending = [conversation_message(m, session_id) for m in messages]
        start = 0
        while start < len(pending):
            batch = pending[start:start + batch_size]
            try:
                resp = self.ingest(mount, batch, tags=tags, source=source, commit_message=commit_message,
                                   author=author)
            except TooManyItems as e:
                limit = int(e.metadata.get("limit", "0") or 0)
                if not 0 < limit < len(batch):
                    raise
                batch_size = limit  # the refused batch committed nothing: send it again, smaller
                continue
            responses.append(resp)
            start += len(batch)
            if progress is not None:
                progress(len(batch))
        return responses

    def search(
        self,
        mount_ids: str | MountHandle | Sequence[str | MountHandle],
        query: str,
        k: int = 10,
        *,
        tags_all: Sequence[str] = (),
        tags_any: Sequence[str] = (),
        tags_none: Sequence[str] = (),
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        mode: str = "hybrid",
        speakers: Sequence[str] = (),
        session_ids: Sequence[str] = (),
        context_turns: int = 0,
        include_archived: bool = False,
    ) -> SearchResults:
        """Top-``k`` items for ``query`` over one or more mounts (ids or MountHandles).

        Returns a list of SearchHit, best first; ``.response`` holds the whole
        SearchResponse (headers, ``took_us``, ``embed_us``). ``since``/``until``
        bound the items' event_time as [since, until). ``mode`` is "hybrid",
        "dense" or "lexical". ``speakers`` / ``session_ids`` keep conversation
        turns said by one of them / in one of them; ``context_turns`` (0 to 10)
        returns that many turns before and after each hit in its session
        (``hit.context_before``, ``hit.context_after``, oldest first). Archived
        items are left out unless ``include_archived``; expired ones always are.
        """
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {sorted(SEARCH_MODES)}, not {mode!r}")
        window = types_pb2.TimeRange(
            start=to_timestamp(since) if since is not None else None,
            end=to_timestamp(until) if until is not None else None,
        )
        req = memos_pb2.SearchRequest(
            mount_ids=_mount_ids(mount_ids),
            query=query,
            k=k,
            tags=types_pb2.TagFilter(all_of=tags_all, any_of=tags_any, none_of=tags_none),
            event_time=window,
            mode=SEARCH_MODES[mode],
            speakers=as_list(speakers),
            session_ids=as_list(session_ids),
            context_turns=context_turns,
            include_archived=include_archived,
        )
        return SearchResults(self._call(self._stub.Search, req, retry_on=RETRY_READ))

    # -- history -------------------------------------------------------------

    def commit(self, mount_id: str | MountHandle, message: str = "", author: str = "", *, request_id: str = ""
               ) -> memos_pb2.CommitResponse:
        """Apply the mount's staged changes as a new revision (``.revision``); raises CommitConflict.

        ``request_id`` (default: a fresh uuid4) makes a resent call return the first one's revision."""
        req = memos_pb2.CommitRequest(mount_id=_mount_id(mount_id), message=message, author=author,
                                      request_id=request_id or new_request_id())
        resp = self._call(self._stub.Commit, req, retry_on=RETRY_WITH_ID)
        _refresh(mount_id, resp)
        return resp

    def log(self, cube: str, page_size: int = 0) -> Iterator[types_pb2.Revision]:
        """The cube's revisions, newest first."""

        def fetch(token: str) -> tuple[Sequence[types_pb2.Revision], str]:
            req = memos_pb2.LogRequest(cube=cube, page_size=page_size, page_token=token)
            resp = self._call(self._stub.Log, req, retry_on=RETRY_READ)
            return resp.revisions, resp.next_page_token

        return self._pages(fetch)

    def diff(self, cube: str, from_revision: int, to_revision: int = 0, page_size: int = 0) -> DiffChanges:
        """Items added, changed and forgotten between two revisions (0 as ``to_revision``: HEAD).

        An iterator of ItemChange; its ``adapter_change`` says how the cube's
        adapter differs (see :class:`DiffChanges`).
        """

        def fetch(token: str) -> memos_pb2.DiffResponse:
            req = memos_pb2.DiffRequest(
                cube=cube,
                from_revision=from_revision,
                to_revision=to_revision,
                page_size=page_size,
                page_token=token,
            )
            return self._call(self._stub.Diff, req, retry_on=RETRY_READ)

        return DiffChanges(fetch)

    def rollback(self, cube: str, to_revision: int, message: str = "", author: str = "") -> types_pb2.Revision:
        """Make a new revision whose content equals ``to_revision``'s."""
        req = memos_pb2.RollbackRequest(cube=cube, to_revision=to_revision, message=message, author=author)
        return self._call(self._stub.Rollback, req).revision

    def stats(self) -> memos_pb2.StatsResponse:
        return self._call(self._stub.Stats, memos_pb2.StatsRequest(), retry_on=RETRY_READ)

    def cluster_config(self) -> memos_pb2.ClusterConfigResponse:
        """The cluster config as the node applies it (a cluster node; daemon admins)."""
        return self._call(self._stub.GetClusterConfig, memos_pb2.GetClusterConfigRequest(), retry_on=RETRY_READ)

    def set_cluster_config(self, key: str, value: str) -> memos_pb2.ClusterConfigResponse:
        """Change one cluster-wide setting (``quotas.*``) in etcd; every node applies it. Raises InvalidArgument
        (an unknown or must-agree key, a bad value), ClusterUnavailable (etcd has no quorum)."""
        return self._call(self._stub.SetClusterConfig, memos_pb2.SetClusterConfigRequest(key=key, value=value))

    # -- activation memory and generation ---------------------------------------

    def activate(self, mount: str | MountHandle, *, items: Sequence[str] | None = None, tag: str | None = None,
                 working_set: int | None = None) -> types_pb2.Activation:
        """Encode the cube's items at the mount's base revision into a KV cache (or reuse/load one).

        By default the block holds every item; ``items`` (ids), ``tag``, or
        ``working_set`` (the top N by usage; 0 for the cube policy's N) select
        fewer (at most one of them). On a cold cube this runs a prefill of the
        whole block: give the client a ``timeout`` that allows for it. Raises
        CubeEmpty, ContextExceeded, PoolTooSmall or ModelUnavailable.
        """
        req = memos_pb2.ActivateRequest(mount_id=_mount_id(mount))
        chosen = [name for name, value in (("items", items), ("tag", tag), ("working_set", working_set))
                  if value is not None]
        if len(chosen) > 1:
            raise ValueError(f"give at most one selector; got {chosen}")
        if items is not None:
            req.selector.items.item_ids.extend(items)
        elif tag is not None:
            req.selector.tag = tag
        elif working_set is not None:
            req.selector.working_set = working_set
        return self._call(self._stub.Activate, req).activation

    def set_cube_policy(self, cube: str, *, schedule: str = "manual", working_set_size: int = 0,
                        drift_threshold: float = 0.0, train_after_seconds: int = 0,
                        train_min_items: int = 0) -> types_pb2.Cube:
        """How the scheduler treats ``cube``: "manual", or "auto" (keep its working set activated); with
        ``train_after_seconds``, it also trains an adapter once the items have been stable that long."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule is {schedule!r}; use 'manual' or 'auto'")
        policy = types_pb2.CubePolicy(schedule=SCHEDULES[schedule], working_set_size=working_set_size,
                                      drift_threshold=drift_threshold, train_after_seconds=train_after_seconds,
                                      train_min_items=train_min_items)
        return self._call(self._stub.SetCubePolicy, memos_pb2.SetCubePolicyRequest(cube=cube, policy=policy)).cube

    def freeze_cube(self, cube: str) -> types_pb2.Cube:
        """Make ``cube`` read-only: commits (and rw mounts, writes, rollbacks, training) fail CubeFrozen."""
        return self._call(self._stub.FreezeCube, memos_pb2.FreezeCubeRequest(cube=cube)).cube

    def thaw_cube(self, cube: str) -> types_pb2.Cube:
        """Accept commits to a frozen ``cube`` again."""
        return self._call(self._stub.ThawCube, memos_pb2.ThawCubeRequest(cube=cube)).cube

    def set_retention(self, cube: str, *, keep_last: int = 0, keep_seconds: float = 0.0) -> types_pb2.Cube:
        """Which revisions compaction keeps: the last ``keep_last`` and/or those younger than ``keep_seconds``
        (0 turns a rule off; both 0: keep everything). HEAD and revisions open mounts read at are always kept."""
        req = memos_pb2.SetRetentionRequest(
            cube=cube, retention=types_pb2.Retention(keep_last=keep_last, keep_seconds=keep_seconds))
        return self._call(self._stub.SetRetention, req).cube

    def compact(self, cube: str) -> memos_pb2.CompactResponse:
        """Apply the retention policy now: delete what no kept revision sees; older revisions read as
        RevisionCompacted (their log entries stay, marked ``compacted``)."""
        return self._call(self._stub.Compact, memos_pb2.CompactRequest(cube=cube))

    def set_item_state(self, cube: str, item_ids: Sequence[str], state: str, *, message: str = "",
                       author: str = "") -> types_pb2.Revision | None:
        """Archive ("archived") or restore ("active") items at HEAD as one new revision; None when no item
        changed (all were in that state already)."""
        if state not in ITEM_STATES:
            raise ValueError(f"state is {state!r}; use one of {sorted(ITEM_STATES)}")
        req = memos_pb2.SetItemStateRequest(cube=cube, item_ids=item_ids, state=ITEM_STATES[state],
                                            message=message, author=author)
        resp = self._call(self._stub.SetItemState, req)
        return resp.revision if resp.HasField("revision") else None

    def archive(self, cube: str, item_ids: Sequence[str], *, message: str = "") -> types_pb2.Revision | None:
        """Archive items: kept and readable, left out of Search (unless include_archived) and memory blocks."""
        return self.set_item_state(cube, item_ids, "archived", message=message)

    def restore(self, cube: str, item_ids: Sequence[str], *, message: str = "") -> types_pb2.Revision | None:
        """Make archived (or expired, not yet purged) items active again."""
        return self.set_item_state(cube, item_ids, "active", message=message)

    def scheduler_status(self) -> memos_pb2.SchedulerStatusResponse:
        """The scheduler's running task, pending cubes, pool usage and recent decisions (admins)."""
        return self._call(self._stub.SchedulerStatus, memos_pb2.SchedulerStatusRequest())

    def evict(self, cube: str, *, delete_persisted: bool = False) -> memos_pb2.EvictResponse:
        """Drop a cube's (id or name) KV cache from the pool; ``delete_persisted`` also deactivates it."""
        req = memos_pb2.EvictRequest(cube=cube, delete_persisted=delete_persisted)
        return self._call(self._stub.Evict, req)

    def generate(
        self,
        messages: str | Sequence[MessageLike],
        mounts: str | MountHandle | Sequence[str | MountHandle] = (),
        *,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        seed: int = 0,
        retrieve_k: int | None = None,
        bypass_kv_cache: bool = False,
        adapter_mount: str | MountHandle | None = None,
        remember_mount: str | MountHandle | None = None,
        session_id: str = "",
        request_id: str = "",
        compose: str = "",
        compose_recompute: float | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> Generation:
        """Start generating a reply to ``messages`` with the memory of ``mounts``; returns the stream.

        ``messages`` is one str (a single user message) or a sequence of
        ChatMessage, (role, content) tuples or role/content mappings; the last
        must be the user's. ``mounts`` are mount ids or MountHandles. Zero
        options mean the daemon's defaults (greedy, 256 tokens); ``retrieve_k``
        None means the daemon's default, 0 no retrieval. ``bypass_kv_cache``
        prefills activated memory blocks instead of reusing their KV caches
        (same prompt, full prefill: for measurements). ``adapter_mount`` (a
        mount id or MountHandle, usually one of ``mounts``) generates with that
        mount's cube's adapter; None is the base model. ``remember_mount`` (a
        read-write mount) remembers the exchange once the reply has ended: the
        last user message and the reply become two turns of ``session_id`` (empty:
        a new session) in one new revision of its cube, whose Log entry carries
        the generation's provenance; ``summary.remembered`` is that revision. A
        cancelled or failed reply records nothing. ``compose`` ("exact", "composed" or "auto"; empty:
        the daemon's ``runtime.compose``) chooses how activated blocks after the first reuse their KV, and
        ``compose_recompute`` (0 to 1; None: the daemon's) the share of a composed block's tokens recomputed
        (``summary.memory[i].block_reuse`` says what each block got). ``request_id`` (default when
        remembering: a fresh uuid4) makes a resent Generate record once. ``timeout`` bounds the
        whole stream (default: the client's plus ``deadlines.per_token`` for each
        token it may generate). ``idle_timeout`` instead bounds the silence: the
        stream is cancelled, raising DeadlineExceeded, when no response arrives
        for that many seconds, and a stream making progress is never cut off
        (its whole-stream deadline is then ``timeout`` alone: None, none). Errors
        are raised while iterating.
        """
        req = memos_pb2.GenerateRequest(
            messages=chat_messages(messages),
            mount_ids=_mount_ids(mounts),
            options=types_pb2.GenerationOptions(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(stop), seed=seed,
                bypass_kv_cache=bypass_kv_cache,
                adapter_mount_id=_mount_id(adapter_mount) if adapter_mount is not None else "",
                remember_mount_id=_mount_id(remember_mount) if remember_mount is not None else "",
                session_id=session_id, compose=_compose_mode(compose),
            ),
            request_id=request_id or (new_request_id() if remember_mount is not None else ""),
        )
        if retrieve_k is not None:
            req.retrieve_k = retrieve_k
        if compose_recompute is not None:
            req.options.compose_recompute = compose_recompute
        started = time.perf_counter()
        if timeout is None and idle_timeout is None:
            timeout = self._longer(self.deadlines.per_token * (max_tokens or DEFAULT_MAX_TOKENS))
        stream: ResponseStream = self._stub.Generate(req, timeout=timeout)
        return Generation(stream, started, idle_timeout)

    # -- parametric memory -----------------------------------------------------

    def import_adapter(
        self,
        mount: str | MountHandle,
        source: AdapterSource,
        *,
        chunk_bytes: int = 1 << 20,
        timeout: float | None = None,
        request_id: str = "",
    ) -> memos_pb2.ImportAdapterResponse:
        """Upload a peft LoRA adapter into a read-write mount's staging area; Commit makes it the cube's.

        ``source`` is a directory holding adapter_config.json and
        adapter_model.safetensors (ValueError when one is missing), or the two
        files' bytes as ``(config, weights)``. The upload states the exact sizes
        and the sha256 digest, then streams the files in ``chunk_bytes`` pieces.
        Returns the response: the staged ``adapter`` and the ``mount``. Raises
        AdapterInvalid, AdapterTooLarge or AdapterMismatch. ``timeout`` bounds
        the whole upload (default: the client's plus ``deadlines.per_mib`` per
        MiB). The upload carries ``request_id`` (default: a fresh uuid4) and is
        resent with it when its answer is lost: the daemon stages it once.
        """
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        config, weights = adapter_bytes(source)
        mount_id, request_id = _mount_id(mount), request_id or new_request_id()
        if timeout is None:
            timeout = self._longer(self.deadlines.per_mib * (len(config) + len(weights)) / _MIB)

        def upload() -> memos_pb2.ImportAdapterResponse:
            requests = adapter_upload(mount_id, config, weights, chunk_bytes, request_id)
            resp: memos_pb2.ImportAdapterResponse = self._stub.ImportAdapter(requests, timeout=timeout)
            return resp

        resp = retrying(upload, RETRY_WITH_ID, self.retry)
        _refresh(mount, resp)
        return resp

    def export_adapter(
        self,
        mount: str | MountHandle,
        directory: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[types_pb2.Adapter, bytes, bytes]:
        """Download the adapter a mount sees (staged, or at its base revision): ``(adapter, config, weights)``.

        With ``directory``, also writes adapter_config.json and
        adapter_model.safetensors there (creating it; files of those names are
        replaced). Raises AdapterNotFound when the cube has none, and DataLoss
        when what arrived does not match the adapter's sizes or digest (nothing
        is written then). ``timeout`` (default: the client's) bounds the download.
        """
        req = memos_pb2.ExportAdapterRequest(mount_id=_mount_id(mount))
        stream = self._stub.ExportAdapter(req, timeout=self.timeout if timeout is None else timeout)
        try:
            adapter, config, weights = receive_adapter(stream)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()  # a no-op once the stream has ended
        if directory is not None:
            save_adapter_dir(directory, config, weights)
        return adapter, config, weights

    # -- jobs ------------------------------------------------------------------

    def train(
        self,
        mount: str | MountHandle,
        *,
        steps: int = 0,
        rank: int = 0,
        learning_rate: float = 0.0,
        seed: int = 0,
        message: str = "",
        author: str = "",
    ) -> types_pb2.Job:
        """Start training the cube's items at the mount's base revision into a LoRA adapter.

        Returns the Job at once (queued); on success the daemon commits the
        adapter as a new revision with ``message`` and ``author``. Zero
        settings mean the daemon's defaults. Raises TrainingInProgress when the
        cube already has a job queued or running.
        """
        req = memos_pb2.TrainRequest(
            mount_id=_mount_id(mount),
            settings=types_pb2.TrainSettings(steps=steps, rank=rank, learning_rate=learning_rate, seed=seed),
            message=message,
            author=author,
        )
        return self._call(self._stub.Train, req).job

    def extract(
        self,
        mount: str | MountHandle,
        *,
        url: str = "",
        token: str = "",
        model: str = "",
        max_tokens: int = 0,
        message: str = "",
        author: str = "",
        reread: bool = False,
    ) -> types_pb2.Job:
        """Start the MemReader on a read-write mount: derive facts, preferences and events from the cube's
        conversation turns at the mount's base revision, each naming its source turns.

        Returns the Job at once; its ``extract`` field counts what the extractor proposed, kept, dropped
        (unparseable) and refused (unsupported). On success the kept items are reconciled with the cube's
        derived items and committed at HEAD as one revision with ``message`` and ``author``. The extractor is
        the in-process model unless ``url`` names an OpenAI-compatible endpoint (``token``: its bearer token,
        never stored; ``model``: its model name). Raises ExtractionInProgress when the cube already has an
        extraction job queued or running, CubeEmpty when it holds no turns (or, unless ``reread``, none new).

        Incremental: only the turns born after the revision the cube's last successful extraction read are
        read; ``reread=True`` reads them all again (a new extractor, a turn restored by a Rollback).
        """
        req = memos_pb2.ExtractRequest(
            mount_id=_mount_id(mount),
            extractor=types_pb2.ExtractorSettings(url=url, token=token, model=model, max_tokens=max_tokens),
            message=message,
            author=author,
            reread=reread,
        )
        return self._call(self._stub.Extract, req).job

    def watch_job(self, job_id: str, timeout: float | None = None) -> Generator[types_pb2.Job, None, None]:
        """The job's state on every change, ending after its final state.

        ``timeout`` bounds the whole watch; None (the default) waits as long
        as the job runs. Closing the iterator early cancels the watch (not the
        job). Raises JobNotFound while iterating.
        """
        stream = self._stub.WatchJob(memos_pb2.WatchJobRequest(job_id=job_id), timeout=timeout)
        try:
            for resp in stream:
                yield resp.job
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()

    def wait_job(
        self,
        job_id: str,
        on_update: Callable[[types_pb2.Job], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> types_pb2.Job:
        """Watch a job until it ends and return its final state; ``on_update`` sees every state on the way."""
        last: types_pb2.Job | None = None
        for job in self.watch_job(job_id, timeout):
            last = job
            if on_update is not None:
                on_update(job)
        if last is None:
            raise Unknown(f"the watch of job {job_id} ended without a state")
        return last

    def cancel_job(self, job_id: str) -> types_pb2.Job:
        """Stop a queued or running job (the cube is left unchanged); raises JobFinished if it has ended."""
        return self._call(self._stub.CancelJob, memos_pb2.CancelJobRequest(job_id=job_id)).job

    def list_jobs(self, cube: str = "") -> list[types_pb2.Job]:
        """The daemon's recent jobs, newest first; only a cube's (id or name) when ``cube`` is given."""
        return list(self._call(self._stub.ListJobs, memos_pb2.ListJobsRequest(cube=cube), retry_on=RETRY_READ).jobs)

    # -- governance ------------------------------------------------------------
    def whoami(self) -> types_pb2.Principal:
        """The principal this client's token belongs to."""
        return self._call(self._stub.WhoAmI, memos_pb2.WhoAmIRequest(), retry_on=RETRY_READ).principal

    def create_principal(self, name: str, *, kind: str = "user", admin: bool = False
                         ) -> tuple[types_pb2.Principal, str]:
        """Create a user or agent (admins only); returns it and its token, which is shown only this once."""
        if kind not in PRINCIPAL_KINDS:
            raise ValueError(f"kind is {kind!r}; use one of {sorted(PRINCIPAL_KINDS)}")
        resp = self._call(self._stub.CreatePrincipal,
                          memos_pb2.CreatePrincipalRequest(name=name, kind=PRINCIPAL_KINDS[kind], admin=admin))
        return resp.principal, resp.token

    def list_principals(self, page_size: int = 0) -> Iterator[types_pb2.Principal]:
        def fetch(token: str) -> tuple[Sequence[types_pb2.Principal], str]:
            resp = self._call(self._stub.ListPrincipals,
                              memos_pb2.ListPrincipalsRequest(page_size=page_size, page_token=token))
            return resp.principals, resp.next_page_token

        return self._pages(fetch)

    def disable_principal(self, principal: str) -> memos_pb2.DisablePrincipalResponse:
        """Disable a principal by id or name: its token stops working and its mounts close."""
        return self._call(self._stub.DisablePrincipal, memos_pb2.DisablePrincipalRequest(principal=principal))

    def grant(self, cube: str, principal: str, rights: Sequence[str], *, expires: TimeLike | None = None
              ) -> types_pb2.CubeGrant:
        """Give ``principal`` rights ("read", "write", "activate", "train", "grant", "admin") on ``cube``."""
        req = memos_pb2.GrantRequest(cube=cube, principal=principal, rights=right_values(rights))
        if expires is not None:
            req.expire_time.CopyFrom(to_timestamp(expires))
        return self._call(self._stub.Grant, req).grant

    def revoke(self, cube: str, principal: str, rights: Sequence[str] = ()) -> memos_pb2.RevokeResponse:
        """Take rights back (all when none are named); the principal's mounts of the cube close."""
        return self._call(self._stub.Revoke,
                          memos_pb2.RevokeRequest(cube=cube, principal=principal, rights=right_values(rights)))

    def list_grants(self, cube: str = "", page_size: int = 0) -> Iterator[types_pb2.CubeGrant]:
        """Who holds what on ``cube``; the caller's own grants when no cube is named."""
        def fetch(token: str) -> tuple[Sequence[types_pb2.CubeGrant], str]:
            resp = self._call(self._stub.ListGrants,
                              memos_pb2.ListGrantsRequest(cube=cube, page_size=page_size, page_token=token))
            return resp.grants, resp.next_page_token

        return self._pages(fetch)

    def audit(self, *, after_seq: int = 0, limit: int = 0, cube: str = "", principal_id: str = "",
              method: str = "", outcome: str = "", since: TimeLike | None = None, until: TimeLike | None = None,
              follow: bool = False, timeout: float | None = None) -> Generator[types_pb2.AuditRecord, None, None]:
        """Audit records in order, filtered; with ``follow``, new ones as they come until the iterator closes."""
        if outcome and outcome not in AUDIT_OUTCOMES:
            raise ValueError(f"outcome is {outcome!r}; use one of {sorted(AUDIT_OUTCOMES)}")
        req = memos_pb2.AuditRequest(after_seq=after_seq, limit=limit, cube=cube, principal_id=principal_id,
                                     method=method, outcome=AUDIT_OUTCOMES.get(outcome, types_pb2.AUDIT_OUTCOME_UNSPECIFIED),
                                     follow=follow)
        if since is not None:
            req.time_range.start.CopyFrom(to_timestamp(since))
        if until is not None:
            req.time_range.end.CopyFrom(to_timestamp(until))
        stream = self._stub.Audit(req, timeout=timeout if follow else (timeout or self.timeout))
        try:
            for resp in stream:
                yield resp.record
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()

    def purge(self, cube: str, item_ids: Sequence[str] = (), *, source: str = "", tags: Sequence[str] = ()
              ) -> types_pb2.PurgeReceipt:
        """Erase items (by id, source or tag) from every revision and derived memory; returns the receipt."""
        req = memos_pb2.PurgeRequest(cube=cube, item_ids=item_ids, source=source, tags=tags)
        return self._call(self._stub.Purge, req).receipt


def _mount_id(mount: str | MountHandle) -> str:
    return mount if isinstance(mount, str) else mount.mount_id


COMPOSE_MODES = {"": types_pb2.COMPOSE_MODE_DEFAULT, "exact": types_pb2.COMPOSE_MODE_EXACT,
                 "composed": types_pb2.COMPOSE_MODE_COMPOSED, "auto": types_pb2.COMPOSE_MODE_AUTO}


def _compose_mode(mode: str) -> types_pb2.ComposeMode.ValueType:
    try:
        return COMPOSE_MODES[mode.lower()]
    except KeyError:
        raise ValueError(f"compose is {mode!r}; use 'exact', 'composed', 'auto' or '' (the daemon's)") from None


def _mount_ids(mounts: str | MountHandle | Sequence[str | MountHandle]) -> list[str]:
    # A str is iterable too, and a MountHandle is not: either is a single mount (any other iterable is many).
    if isinstance(mounts, str) or not isinstance(mounts, Iterable):
        return [_mount_id(mounts)]
    return [_mount_id(m) for m in mounts]


def _refresh(mount: str | MountHandle, response: Any) -> None:
    """Keep a handle's ``info`` as the daemon last described it, when ``response`` carries the mount."""
    if not isinstance(mount, str) and response.HasField("mount"):
        mount.info = response.mount
