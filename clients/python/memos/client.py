"""The typed, synchronous client of memosd.

It is a thin layer over the generated ``memos.v1`` stub: each method builds one
request, returns the interesting part of the response as the protobuf message
itself, and turns gRPC failures into :mod:`memos.errors` exceptions. List calls
are generators that follow page tokens; streaming calls convert their errors
while they are iterated.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from memos import auth
from memos.errors import DataLoss, MountNotFound, TooManyItems, Unknown, from_rpc_error
from memos.v1 import memos_pb2, memos_pb2_grpc, types_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Anything write() accepts as one item: bare text, a ready ItemInput, or a dict
# with the keys text/tags/source/event_time/item_id/speaker/session_id.
ItemLike = str | types_pb2.ItemInput | Mapping[str, Any]
# A point in time: a datetime (naive means UTC), an ISO 8601 string, or a Timestamp.
TimeLike = datetime | str | Timestamp
# One message of a conversation: a ready ChatMessage, a (role, content) pair, or a
# mapping with the keys role/content.
MessageLike = types_pb2.ChatMessage | tuple[str, str] | Mapping[str, str]
# One message of a conversation to ingest: a ready ConversationMessage, or a mapping with the keys
# speaker/text/time/session_id (time: a TimeLike).
ConversationLike = types_pb2.ConversationMessage | Mapping[str, Any]
# A peft LoRA adapter: a directory holding its two files, or their bytes (config, weights).
AdapterSource = str | os.PathLike[str] | tuple[bytes, bytes]

# The two files of a peft adapter directory.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# States a job never leaves.
JOB_TERMINAL_STATES = frozenset(
    {types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED}
)

_SEARCH_MODES = {
    "hybrid": types_pb2.SEARCH_MODE_HYBRID,
    "dense": types_pb2.SEARCH_MODE_DENSE,
    "lexical": types_pb2.SEARCH_MODE_LEXICAL,
}
_KINDS = {"user": types_pb2.PRINCIPAL_KIND_USER, "agent": types_pb2.PRINCIPAL_KIND_AGENT}
RIGHTS = ("read", "write", "activate", "train", "grant", "admin")
_OUTCOMES = {"ok": types_pb2.AUDIT_OUTCOME_OK, "denied": types_pb2.AUDIT_OUTCOME_DENIED,
             "failed": types_pb2.AUDIT_OUTCOME_FAILED}
_ITEM_KEYS = frozenset({"text", "tags", "source", "event_time", "item_id", "speaker", "session_id", "ttl_seconds"})
_ITEM_STATES = {"active": types_pb2.ITEM_STATE_ACTIVE, "archived": types_pb2.ITEM_STATE_ARCHIVED}
_MESSAGE_KEYS = frozenset({"role", "content"})
_CONVERSATION_KEYS = frozenset({"speaker", "text", "time", "session_id"})
# The daemon's default limits.max_items_per_write: messages per Ingest call unless told otherwise.
DEFAULT_INGEST_BATCH = 1024
# The daemon's default max_tokens of a Generate: what a stream's deadline allows for when none is given.
DEFAULT_MAX_TOKENS = 256
_MIB = 1 << 20

# What is retried. Write, Ingest, Commit and ImportAdapter carry a request id, so resending the same request
# after a lost answer (a deadline, a dropped connection) returns the first call's result: safe on both codes.
# Read-only calls are retried when the daemon could not be reached; calls that change state without a request
# id are never retried (a retry could apply them twice).
_RETRY_WITH_ID = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_RETRY_READ = frozenset({grpc.StatusCode.UNAVAILABLE})
_NO_RETRY: frozenset[grpc.StatusCode] = frozenset()

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How calls whose answer was lost are retried (see ``Client``).

    ``attempts`` in all (1: never retry). Before retry n (1, 2, ...) the client waits a random time between
    half and all of ``backoff * multiplier ** (n - 1)`` seconds, at most ``max_backoff``: exponential backoff
    with jitter, so many clients that lost the daemon together do not return together."""

    attempts: int = 4
    backoff: float = 0.25
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts is {self.attempts}; use 1 (no retries) or more")
        if self.backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy needs backoff >= 0, max_backoff >= 0 and multiplier >= 1")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        ceiling = min(self.max_backoff, self.backoff * self.multiplier ** (retry - 1))
        return random.uniform(ceiling / 2, ceiling)


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class Deadlines:
    """How a long call's deadline grows beyond the client's ``timeout`` (the base, for every call).

    Write and Ingest get ``per_item`` seconds more per item or message (the daemon embeds them before it
    answers: about 50 ms a message on two busy cores), ImportAdapter ``per_mib`` per MiB uploaded, and a
    Generate stream ``per_token`` per token it may generate (``max_tokens``, or the daemon's default 256),
    so a long reply on a slow CPU is not cut off. Zeros make every call's deadline the base."""

    per_item: float = 0.1
    per_mib: float = 1.0
    per_token: float = 0.5


def new_request_id() -> str:
    """A fresh request id (a uuid4): what the client sends with Write, Ingest, Commit and ImportAdapter."""
    return str(uuid.uuid4())


class _UnaryCall(Protocol[_Req, _Resp]):
    def __call__(self, request: _Req, timeout: float | None = ...) -> _Resp: ...


class _ResponseStream(Protocol):
    """What a server-streaming stub call returns: an iterator of responses that is also a grpc.Call."""

    def __next__(self) -> memos_pb2.GenerateResponse: ...

    def cancel(self) -> bool: ...


def parse_time(text: str) -> datetime:
    """Parse ISO 8601 (a trailing ``Z`` and date-only forms included) into an aware datetime."""
    # fromisoformat() on Python 3.10 rejects the "Z" suffix.
    value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def to_timestamp(value: TimeLike) -> Timestamp:
    """Convert a datetime (naive means UTC), an ISO 8601 string or a Timestamp to a Timestamp."""
    if isinstance(value, Timestamp):
        return value
    if isinstance(value, str):
        value = parse_time(value)
    ts = Timestamp()
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    ts.FromDatetime(value)
    return ts


def _item_input(
    item: ItemLike, tags: Sequence[str], source: str, event_time: Timestamp | None, ttl_seconds: int = 0
) -> types_pb2.ItemInput:
    if isinstance(item, types_pb2.ItemInput):
        return item
    if isinstance(item, str):
        return types_pb2.ItemInput(text=item, tags=tags, source=source, event_time=event_time,
                                   ttl_seconds=ttl_seconds)
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise ValueError(f"unknown item keys {sorted(unknown)}; expected some of {sorted(_ITEM_KEYS)}")
    item_tags = item.get("tags", tags)
    # A bare string would otherwise be split into one tag per character.
    item_tags = [item_tags] if isinstance(item_tags, str) else list(item_tags)
    when = item.get("event_time")
    return types_pb2.ItemInput(
        item_id=item.get("item_id", ""),
        text=item.get("text", ""),
        tags=item_tags,
        source=item.get("source", source),
        event_time=to_timestamp(when) if when is not None else event_time,
        speaker=item.get("speaker", ""),
        session_id=item.get("session_id", ""),
        ttl_seconds=int(item.get("ttl_seconds", ttl_seconds)),
    )


def _conversation_message(message: ConversationLike, session_id: str) -> types_pb2.ConversationMessage:
    if isinstance(message, types_pb2.ConversationMessage):
        return message
    if not isinstance(message, Mapping):
        raise TypeError(f"a conversation message is a ConversationMessage or a mapping with the keys "
                        f"{sorted(_CONVERSATION_KEYS)}, not {type(message).__name__}")
    unknown = set(message) - _CONVERSATION_KEYS
    if unknown:
        raise ValueError(f"unknown message keys {sorted(unknown)}; expected some of {sorted(_CONVERSATION_KEYS)}")
    when = message.get("time")
    return types_pb2.ConversationMessage(
        speaker=message.get("speaker", ""), text=message.get("text", ""),
        time=to_timestamp(when) if when is not None else None,
        session_id=message.get("session_id") or session_id,
    )


def _chat_message(message: MessageLike) -> types_pb2.ChatMessage:
    if isinstance(message, types_pb2.ChatMessage):
        return message
    if isinstance(message, tuple):
        role, content = message
        return types_pb2.ChatMessage(role=role, content=content)
    if isinstance(message, Mapping):
        unknown = set(message) - _MESSAGE_KEYS
        if unknown:
            raise ValueError(f"unknown message keys {sorted(unknown)}; expected {sorted(_MESSAGE_KEYS)}")
        return types_pb2.ChatMessage(role=message.get("role", ""), content=message.get("content", ""))
    # A bare str here is most likely a (role, content) pair that lost its tuple.
    raise TypeError(
        f"a message is a ChatMessage, a (role, content) tuple or a role/content mapping, not "
        f"{type(message).__name__}; pass one str as `messages` for a single user message"
    )


def _chat_messages(messages: str | Sequence[MessageLike]) -> list[types_pb2.ChatMessage]:
    if isinstance(messages, str):
        return [types_pb2.ChatMessage(role="user", content=messages)]
    return [_chat_message(m) for m in messages]


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def adapter_digest(config: bytes, weights: bytes) -> str:
    """The digest naming an adapter: sha256 over its config bytes then its weights bytes (64 hex)."""
    h = hashlib.sha256(config)
    h.update(weights)
    return h.hexdigest()


def load_adapter_dir(directory: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The (config, weights) bytes of a peft adapter directory; ValueError when one of the files is missing."""
    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; an adapter is a directory holding "
                         f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}")
    files = []
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{path!r} holds no {name}: not a peft LoRA adapter directory")
        with open(file, "rb") as f:
            files.append(f.read())
    return files[0], files[1]


def _adapter_bytes(source: AdapterSource) -> tuple[bytes, bytes]:
    if isinstance(source, tuple):
        if len(source) != 2 or not all(isinstance(b, bytes | bytearray | memoryview) for b in source):
            raise TypeError("an adapter given as a tuple is (config_bytes, weights_bytes)")
        return bytes(source[0]), bytes(source[1])
    return load_adapter_dir(source)


def _adapter_upload(
    mount_id: str, config: bytes, weights: bytes, chunk_bytes: int, request_id: str = ""
) -> Iterator[memos_pb2.ImportAdapterRequest]:
    yield memos_pb2.ImportAdapterRequest(header=memos_pb2.AdapterUpload(
        mount_id=mount_id, config_bytes=len(config), weights_bytes=len(weights),
        digest=adapter_digest(config, weights), request_id=request_id,
    ))
    for file, data in ((types_pb2.ADAPTER_FILE_CONFIG, config), (types_pb2.ADAPTER_FILE_WEIGHTS, weights)):
        view = memoryview(data)
        for start in range(0, len(data), chunk_bytes):
            chunk = types_pb2.AdapterChunk(file=file, data=bytes(view[start:start + chunk_bytes]))
            yield memos_pb2.ImportAdapterRequest(chunk=chunk)


def _write_file(path: str, data: bytes) -> None:
    # Through a temporary name, so a reader never sees half a file.
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


class Generation:
    """A streaming Generate call. Iterate it for the text deltas (str, never empty).

    After the stream ends, ``summary`` is the GenerationSummary (None before, and
    when the call was cancelled). :meth:`text` consumes the rest of the stream
    and returns the whole reply. :meth:`cancel` stops the call; iteration then
    ends quietly. As a context manager it cancels an unfinished call on exit.
    ``first_delta_seconds`` is the client-side time from the call to the first
    delta (None until one arrives).
    """

    def __init__(self, stream: _ResponseStream, started: float) -> None:
        self._stream = stream
        self._started = started
        self._parts: list[str] = []
        self._done = False
        self._cancelled = False
        self.summary: types_pb2.GenerationSummary | None = None
        self.first_delta_seconds: float | None = None

    @property
    def done(self) -> bool:
        """Whether the stream has ended (completed, failed or cancelled)."""
        return self._done

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` stopped the call before it completed."""
        return self._cancelled

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        while not self._done:
            try:
                resp = next(self._stream)
            except StopIteration:
                self._done = True
                break
            except grpc.RpcError as e:
                self._done = True
                if self._cancelled:
                    break
                raise from_rpc_error(e) from e
            if resp.HasField("summary"):
                self.summary = resp.summary
            if resp.delta:
                if self.first_delta_seconds is None:
                    self.first_delta_seconds = time.perf_counter() - self._started
                self._parts.append(resp.delta)
                return str(resp.delta)
        raise StopIteration

    def text(self) -> str:
        """Consume the stream; the whole reply so far (deltas already iterated included)."""
        for _ in self:
            pass
        return "".join(self._parts)

    def cancel(self) -> None:
        """Cancel the call if it has not ended; iteration then stops without an error."""
        if not self._done:
            self._cancelled = True
            self._done = True
            self._stream.cancel()

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class SearchResults(list[types_pb2.SearchHit]):
    """The hits of a search, best first, plus the raw :class:`SearchResponse` for timings and headers."""

    def __init__(self, response: memos_pb2.SearchResponse) -> None:
        super().__init__(response.hits)
        self.response = response

    @property
    def took_us(self) -> int:
        return self.response.took_us

    @property
    def embed_us(self) -> int:
        return self.response.embed_us


class DiffChanges(Iterator[types_pb2.ItemChange]):
    """The item changes of a diff, fetched page by page as they are iterated.

    ``adapter_change`` is the AdapterChange once the first page has arrived
    (None before, and when the cube's adapter is the same at both revisions);
    ``from_revision``/``to_revision`` are the revisions compared as the daemon
    resolved them (a ``to_revision`` of 0 becomes HEAD's number). Call
    :meth:`fetch_first` to know them before iterating.
    """

    def __init__(self, fetch: Callable[[str], memos_pb2.DiffResponse]) -> None:
        self._fetch = fetch
        self._pending: deque[types_pb2.ItemChange] = deque()
        self._token = ""
        self._started = False
        self.adapter_change: types_pb2.AdapterChange | None = None
        self.from_revision = 0
        self.to_revision = 0

    def _load(self) -> None:
        resp = self._fetch(self._token)
        if not self._started:
            self._started = True
            self.from_revision, self.to_revision = resp.from_revision, resp.to_revision
            if resp.HasField("adapter_change"):
                self.adapter_change = resp.adapter_change
        self._pending.extend(resp.changes)
        self._token = resp.next_page_token

    def fetch_first(self) -> DiffChanges:
        """Fetch the first page now, if iterating has not already."""
        if not self._started:
            self._load()
        return self

    def __iter__(self) -> DiffChanges:
        return self

    def __next__(self) -> types_pb2.ItemChange:
        self.fetch_first()
        while not self._pending and self._token:
            self._load()
        if not self._pending:
            raise StopIteration
        return self._pending.popleft()


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
    (see :mod:`memos.auth`). ``tls_ca`` (a PEM file, or True for the system
    roots) connects with TLS; ``tls_cert`` and ``tls_key`` add a client
    certificate (mTLS). A ``channel`` passed in is used as is and stays open on
    :meth:`close`: its owner closes it.
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
              retry_on: frozenset[grpc.StatusCode] = _NO_RETRY, timeout: float | None = None) -> _T:
        """One unary call (``timeout``: the deadline, when longer than the client's), retried as ``retry_on``
        allows, with the same request each time."""
        deadline = self.timeout if timeout is None else timeout
        return self._retrying(lambda: rpc(request, timeout=deadline), retry_on)

    def _retrying(self, attempt: Callable[[], _T], retry_on: frozenset[grpc.StatusCode]) -> _T:
        # The one place a gRPC failure becomes a MemosError.
        retries = 0
        while True:
            try:
                return attempt()
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                retries += 1
                if code not in retry_on or retries >= self.retry.attempts:
                    raise from_rpc_error(e) from e
            time.sleep(self.retry.delay(retries))

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
        self, name: str, description: str = "", labels: Mapping[str, str] | None = None
    ) -> types_pb2.Cube:
        req = memos_pb2.AllocCubeRequest(name=name, description=description, labels=labels)
        return self._call(self._stub.AllocCube, req).cube

    def free_cube(self, cube: str) -> memos_pb2.FreeCubeResponse:
        """Delete a cube (id or name) with everything in it. Irreversible."""
        return self._call(self._stub.FreeCube, memos_pb2.FreeCubeRequest(cube=cube))

    def stat_cube(self, cube: str) -> types_pb2.Cube:
        return self._call(self._stub.StatCube, memos_pb2.StatCubeRequest(cube=cube), retry_on=_RETRY_READ).cube

    def list_cubes(self, page_size: int = 0) -> Iterator[types_pb2.Cube]:
        def fetch(token: str) -> tuple[Sequence[types_pb2.Cube], str]:
            resp = self._call(
                self._stub.ListCubes, memos_pb2.ListCubesRequest(page_size=page_size, page_token=token),
                retry_on=_RETRY_READ,
            )
            return resp.cubes, resp.next_page_token

        return self._pages(fetch)

    # -- mounts --------------------------------------------------------------

    def mount(self, cube: str, revision: int = 0, writable: bool = False) -> MountHandle:
        """Open a mount on a cube (id or name) at ``revision`` (0: HEAD). Use it as a context manager."""
        mode = types_pb2.MOUNT_MODE_READ_WRITE if writable else types_pb2.MOUNT_MODE_READ_ONLY
        resp = self._call(self._stub.Mount, memos_pb2.MountRequest(cube=cube, revision=revision, mode=mode))
        return MountHandle(self, resp.mount)

    def unmount(self, mount_id: str) -> memos_pb2.UnmountResponse:
        """Close a mount, discarding its staged changes (the response says how many)."""
        return self._call(self._stub.Unmount, memos_pb2.UnmountRequest(mount_id=mount_id))

    # -- items ---------------------------------------------------------------

    def write_raw(
        self,
        mount_id: str,
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
        inputs = [_item_input(item, list(tags), source, when, ttl_seconds) for item in items]
        req = memos_pb2.WriteRequest(mount_id=mount_id, items=inputs, request_id=request_id or new_request_id())
        return self._call(self._stub.Write, req, retry_on=_RETRY_WITH_ID,
                          timeout=self._longer(self.deadlines.per_item * len(inputs)))

    def write(
        self,
        mount_id: str,
        items: Sequence[ItemLike],
        *,
        tags: Sequence[str] = (),
        source: str = "",
        event_time: TimeLike | None = None,
        ttl_seconds: int = 0,
        request_id: str = "",
    ) -> list[str]:
        """Stage items in a read-write mount in one call; returns their ids in order.

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
        mount_id: str,
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
        for batch in _chunks(items, batch_size):
            ids += self.write(mount_id, batch, tags=tags, source=source, event_time=event_time,
                              ttl_seconds=ttl_seconds)
            if progress is not None:
                progress(len(batch))
        return ids

    def read(self, mount_id: str, item_ids: Sequence[str]) -> list[types_pb2.Item]:
        """Read items by id, as the mount sees them (raises ItemNotFound for an invisible id)."""
        resp = self._call(self._stub.Read, memos_pb2.ReadRequest(mount_id=mount_id, item_ids=item_ids),
                          retry_on=_RETRY_READ)
        return list(resp.items)

    def iter_items(self, mount_id: str, page_size: int = 0) -> Iterator[types_pb2.Item]:
        """Every item the mount sees, ordered by item id."""

        def fetch(token: str) -> tuple[Sequence[types_pb2.Item], str]:
            req = memos_pb2.ReadRequest(mount_id=mount_id, page_size=page_size, page_token=token)
            resp = self._call(self._stub.Read, req, retry_on=_RETRY_READ)
            return resp.items, resp.next_page_token

        return self._pages(fetch)

    def forget(self, mount_id: str, item_ids: Sequence[str] = (), *, adapter: bool = False) -> types_pb2.Mount:
        """Stage the removal of items, and with ``adapter`` of the cube's adapter; returns the mount.

        ``item_ids`` may be empty when ``adapter`` is set. The mount returned
        carries the new staging counts (``staged_adapter`` included).
        """
        req = memos_pb2.ForgetRequest(mount_id=mount_id, item_ids=item_ids, adapter=adapter)
        return self._call(self._stub.Forget, req).mount

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
            mount_id=_mount_id(mount), messages=[_conversation_message(m, session_id) for m in messages],
            commit_message=commit_message, author=author, tags=tags, source=source,
            request_id=request_id or new_request_id(),
        )
        return self._call(self._stub.Ingest, req, retry_on=_RETRY_WITH_ID,
                          timeout=self._longer(self.deadlines.per_item * len(req.messages)))

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
        pending = [_conversation_message(m, session_id) for m in messages]
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
            if isinstance(mount, MountHandle):
                mount.info = resp.mount
            responses.append(resp)
            start += len(batch)
            if progress is not None:
                progress(len(batch))
        return responses

    def search(
        self,
        mount_ids: str | Sequence[str],
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
        """Top-``k`` items for ``query`` over one or more mounts.

        Returns a list of SearchHit, best first; ``.response`` holds the whole
        SearchResponse (headers, ``took_us``, ``embed_us``). ``since``/``until``
        bound the items' event_time as [since, until). ``mode`` is "hybrid",
        "dense" or "lexical". ``speakers`` / ``session_ids`` keep conversation
        turns said by one of them / in one of them; ``context_turns`` (0 to 10)
        returns that many turns before and after each hit in its session
        (``hit.context_before``, ``hit.context_after``, oldest first). Archived
        items are left out unless ``include_archived``; expired ones always are.
        """
        if mode not in _SEARCH_MODES:
            raise ValueError(f"mode must be one of {sorted(_SEARCH_MODES)}, not {mode!r}")
        window = types_pb2.TimeRange(
            start=to_timestamp(since) if since is not None else None,
            end=to_timestamp(until) if until is not None else None,
        )
        req = memos_pb2.SearchRequest(
            mount_ids=_as_list(mount_ids),
            query=query,
            k=k,
            tags=types_pb2.TagFilter(all_of=tags_all, any_of=tags_any, none_of=tags_none),
            event_time=window,
            mode=_SEARCH_MODES[mode],
            speakers=_as_list(speakers),
            session_ids=_as_list(session_ids),
            context_turns=context_turns,
            include_archived=include_archived,
        )
        return SearchResults(self._call(self._stub.Search, req, retry_on=_RETRY_READ))

    # -- history -------------------------------------------------------------

    def commit(self, mount_id: str, message: str = "", author: str = "", *, request_id: str = ""
               ) -> memos_pb2.CommitResponse:
        """Apply the mount's staged changes as a new revision (``.revision``); raises CommitConflict.

        ``request_id`` (default: a fresh uuid4) makes a resent call return the first one's revision."""
        req = memos_pb2.CommitRequest(mount_id=mount_id, message=message, author=author,
                                      request_id=request_id or new_request_id())
        return self._call(self._stub.Commit, req, retry_on=_RETRY_WITH_ID)

    def log(self, cube: str, page_size: int = 0) -> Iterator[types_pb2.Revision]:
        """The cube's revisions, newest first."""

        def fetch(token: str) -> tuple[Sequence[types_pb2.Revision], str]:
            req = memos_pb2.LogRequest(cube=cube, page_size=page_size, page_token=token)
            resp = self._call(self._stub.Log, req, retry_on=_RETRY_READ)
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
            return self._call(self._stub.Diff, req, retry_on=_RETRY_READ)

        return DiffChanges(fetch)

    def rollback(self, cube: str, to_revision: int, message: str = "", author: str = "") -> types_pb2.Revision:
        """Make a new revision whose content equals ``to_revision``'s."""
        req = memos_pb2.RollbackRequest(cube=cube, to_revision=to_revision, message=message, author=author)
        return self._call(self._stub.Rollback, req).revision

    def stats(self) -> memos_pb2.StatsResponse:
        return self._call(self._stub.Stats, memos_pb2.StatsRequest(), retry_on=_RETRY_READ)

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
        schedules = {"manual": types_pb2.SCHEDULE_POLICY_MANUAL, "auto": types_pb2.SCHEDULE_POLICY_AUTO_ACTIVATE}
        if schedule not in schedules:
            raise ValueError(f"schedule is {schedule!r}; use 'manual' or 'auto'")
        policy = types_pb2.CubePolicy(schedule=schedules[schedule], working_set_size=working_set_size,
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
        if state not in _ITEM_STATES:
            raise ValueError(f"state is {state!r}; use one of {sorted(_ITEM_STATES)}")
        req = memos_pb2.SetItemStateRequest(cube=cube, item_ids=item_ids, state=_ITEM_STATES[state],
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
        timeout: float | None = None,
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
        mount's cube's adapter; None is the base model. ``timeout`` bounds the
        whole stream (default: the client's plus ``deadlines.per_token`` for each
        token it may generate). Errors are raised while iterating.
        """
        if isinstance(mounts, str | MountHandle):
            mounts = [mounts]
        req = memos_pb2.GenerateRequest(
            messages=_chat_messages(messages),
            mount_ids=[_mount_id(m) for m in mounts],
            options=types_pb2.GenerationOptions(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(stop), seed=seed,
                bypass_kv_cache=bypass_kv_cache,
                adapter_mount_id=_mount_id(adapter_mount) if adapter_mount is not None else "",
            ),
        )
        if retrieve_k is not None:
            req.retrieve_k = retrieve_k
        started = time.perf_counter()
        if timeout is None:
            timeout = self._longer(self.deadlines.per_token * (max_tokens or DEFAULT_MAX_TOKENS))
        stream: _ResponseStream = self._stub.Generate(req, timeout=timeout)
        return Generation(stream, started)

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
        config, weights = _adapter_bytes(source)
        mount_id, request_id = _mount_id(mount), request_id or new_request_id()
        if timeout is None:
            timeout = self._longer(self.deadlines.per_mib * (len(config) + len(weights)) / _MIB)

        def upload() -> memos_pb2.ImportAdapterResponse:
            requests = _adapter_upload(mount_id, config, weights, chunk_bytes, request_id)
            resp: memos_pb2.ImportAdapterResponse = self._stub.ImportAdapter(requests, timeout=timeout)
            return resp

        return self._retrying(upload, _RETRY_WITH_ID)

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
        adapter: types_pb2.Adapter | None = None
        parts: dict[int, list[bytes]] = {types_pb2.ADAPTER_FILE_CONFIG: [], types_pb2.ADAPTER_FILE_WEIGHTS: []}
        try:
            for resp in stream:
                if adapter is None and resp.HasField("adapter"):
                    adapter = resp.adapter
                if resp.HasField("chunk"):
                    if resp.chunk.file not in parts:
                        raise DataLoss(f"the export sent a chunk of unknown file {resp.chunk.file}")
                    parts[resp.chunk.file].append(resp.chunk.data)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()  # a no-op once the stream has ended
        if adapter is None:
            raise DataLoss("the export ended before sending the adapter")
        config = b"".join(parts[types_pb2.ADAPTER_FILE_CONFIG])
        weights = b"".join(parts[types_pb2.ADAPTER_FILE_WEIGHTS])
        if (len(config), len(weights)) != (adapter.config_bytes, adapter.weights_bytes):
            raise DataLoss(
                f"the export of adapter {adapter.digest[:12] or '?'} delivered {len(config)} + {len(weights)} "
                f"bytes (config + weights), not the {adapter.config_bytes} + {adapter.weights_bytes} it announced"
            )
        if adapter.digest and adapter_digest(config, weights) != adapter.digest:
            raise DataLoss(f"the exported files do not hash to the adapter's digest {adapter.digest}")
        if directory is not None:
            path = os.fspath(directory)
            os.makedirs(path, exist_ok=True)
            _write_file(os.path.join(path, ADAPTER_CONFIG_FILE), config)
            _write_file(os.path.join(path, ADAPTER_WEIGHTS_FILE), weights)
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
        return list(self._call(self._stub.ListJobs, memos_pb2.ListJobsRequest(cube=cube), retry_on=_RETRY_READ).jobs)

    # -- governance ------------------------------------------------------------
    def whoami(self) -> types_pb2.Principal:
        """The principal this client's token belongs to."""
        return self._call(self._stub.WhoAmI, memos_pb2.WhoAmIRequest(), retry_on=_RETRY_READ).principal

    def create_principal(self, name: str, *, kind: str = "user", admin: bool = False
                         ) -> tuple[types_pb2.Principal, str]:
        """Create a user or agent (admins only); returns it and its token, which is shown only this once."""
        if kind not in _KINDS:
            raise ValueError(f"kind is {kind!r}; use one of {sorted(_KINDS)}")
        resp = self._call(self._stub.CreatePrincipal,
                          memos_pb2.CreatePrincipalRequest(name=name, kind=_KINDS[kind], admin=admin))
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
        req = memos_pb2.GrantRequest(cube=cube, principal=principal, rights=_rights(rights))
        if expires is not None:
            req.expire_time.CopyFrom(to_timestamp(expires))
        return self._call(self._stub.Grant, req).grant

    def revoke(self, cube: str, principal: str, rights: Sequence[str] = ()) -> memos_pb2.RevokeResponse:
        """Take rights back (all when none are named); the principal's mounts of the cube close."""
        return self._call(self._stub.Revoke,
                          memos_pb2.RevokeRequest(cube=cube, principal=principal, rights=_rights(rights)))

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
        if outcome and outcome not in _OUTCOMES:
            raise ValueError(f"outcome is {outcome!r}; use one of {sorted(_OUTCOMES)}")
        req = memos_pb2.AuditRequest(after_seq=after_seq, limit=limit, cube=cube, principal_id=principal_id,
                                     method=method, outcome=_OUTCOMES.get(outcome, types_pb2.AUDIT_OUTCOME_UNSPECIFIED),
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


def _rights(names: Sequence[str]) -> list[types_pb2.Right.ValueType]:
    unknown = [n for n in names if n not in RIGHTS]
    if unknown:
        raise ValueError(f"unknown rights {unknown}; use some of {list(RIGHTS)}")
    return [types_pb2.Right.Value(f"RIGHT_{n.upper()}") for n in names]


def _mount_id(mount: str | MountHandle) -> str:
    return mount if isinstance(mount, str) else mount.mount_id


class MountHandle:
    """An open mount, with the item and history calls bound to it.

    ``info`` is the Mount message, refreshed from each response that carries it
    (staging counts; the base revision after a commit). As a context manager it
    unmounts on exit, discarding whatever is still staged.
    """

    def __init__(self, client: Client, info: types_pb2.Mount) -> None:
        self.client = client
        self.info = info

    @property
    def mount_id(self) -> str:
        return self.info.mount_id

    @property
    def cube_id(self) -> str:
        return self.info.cube_id

    @property
    def base_revision(self) -> int:
        return self.info.base_revision

    def __repr__(self) -> str:
        return f"MountHandle(mount_id={self.mount_id!r}, cube_id={self.cube_id!r}, base={self.base_revision})"

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()

    def unmount(self) -> int:
        """Close the mount; returns the number of staged changes discarded (0 if already closed)."""
        try:
            discarded: int = self.client.unmount(self.mount_id).discarded_changes
        except MountNotFound:
            return 0
        return discarded

    def _update(self, response: Any) -> None:
        if response.HasField("mount"):
            self.info = response.mount

    def write(
        self,
        items: Sequence[ItemLike],
        *,
        tags: Sequence[str] = (),
        source: str = "",
        event_time: TimeLike | None = None,
        ttl_seconds: int = 0,
        request_id: str = "",
    ) -> list[str]:
        resp = self.client.write_raw(self.mount_id, items, tags=tags, source=source, event_time=event_time,
                                     ttl_seconds=ttl_seconds, request_id=request_id)
        self._update(resp)
        return list(resp.item_ids)

    def write_many(
        self,
        items: Iterable[ItemLike],
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
        *,
        tags: Sequence[str] = (),
        source: str = "",
        event_time: TimeLike | None = None,
        ttl_seconds: int = 0,
    ) -> list[str]:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        ids: list[str] = []
        for batch in _chunks(items, batch_size):
            ids += self.write(batch, tags=tags, source=source, event_time=event_time, ttl_seconds=ttl_seconds)
            if progress is not None:
                progress(len(batch))
        return ids

    def read(self, item_ids: Sequence[str]) -> list[types_pb2.Item]:
        return self.client.read(self.mount_id, item_ids)

    def iter_items(self, page_size: int = 0) -> Iterator[types_pb2.Item]:
        return self.client.iter_items(self.mount_id, page_size)

    def forget(self, item_ids: Sequence[str] = (), *, adapter: bool = False) -> types_pb2.Mount:
        mount = self.client.forget(self.mount_id, item_ids, adapter=adapter)
        if mount.mount_id:
            self.info = mount
        return mount

    def search(
        self,
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
        return self.client.search(
            self.mount_id, query, k, tags_all=tags_all, tags_any=tags_any, tags_none=tags_none,
            since=since, until=until, mode=mode, speakers=speakers, session_ids=session_ids,
            context_turns=context_turns, include_archived=include_archived,
        )

    def ingest(
        self,
        messages: Sequence[ConversationLike],
        *,
        session_id: str = "",
        tags: Sequence[str] = (),
        source: str = "",
        commit_message: str = "",
        author: str = "",
        request_id: str = "",
    ) -> memos_pb2.IngestResponse:
        resp = self.client.ingest(self, messages, session_id=session_id, tags=tags, source=source,
                                  commit_message=commit_message, author=author, request_id=request_id)
        self._update(resp)
        return resp

    def ingest_many(
        self,
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
        return self.client.ingest_many(self, messages, batch_size, progress, session_id=session_id, tags=tags,
                                       source=source, commit_message=commit_message, author=author)

    def commit(self, message: str = "", author: str = "", *, request_id: str = "") -> memos_pb2.CommitResponse:
        resp = self.client.commit(self.mount_id, message, author, request_id=request_id)
        self._update(resp)
        return resp

    def activate(self, *, items: Sequence[str] | None = None, tag: str | None = None,
                 working_set: int | None = None) -> types_pb2.Activation:
        return self.client.activate(self.mount_id, items=items, tag=tag, working_set=working_set)

    def import_adapter(
        self, source: AdapterSource, *, chunk_bytes: int = 1 << 20, timeout: float | None = None,
        request_id: str = "",
    ) -> memos_pb2.ImportAdapterResponse:
        resp = self.client.import_adapter(self.mount_id, source, chunk_bytes=chunk_bytes, timeout=timeout,
                                          request_id=request_id)
        self._update(resp)
        return resp

    def export_adapter(
        self, directory: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> tuple[types_pb2.Adapter, bytes, bytes]:
        return self.client.export_adapter(self.mount_id, directory, timeout=timeout)

    def train(
        self,
        *,
        steps: int = 0,
        rank: int = 0,
        learning_rate: float = 0.0,
        seed: int = 0,
        message: str = "",
        author: str = "",
    ) -> types_pb2.Job:
        return self.client.train(
            self.mount_id, steps=steps, rank=rank, learning_rate=learning_rate, seed=seed,
            message=message, author=author,
        )
