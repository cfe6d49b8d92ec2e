"""What the client's calls return beyond plain protobuf messages: a Generate stream, a search's hits with
their timings, and a diff's changes read page by page."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Protocol

import grpc

from memosd_client.errors import DeadlineExceeded, from_rpc_error
from memosd_client.v1 import memos_pb2, types_pb2

# States a job never leaves.
JOB_TERMINAL_STATES = frozenset(
    {types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED}
)


class ResponseStream(Protocol):
    """What the Generate stub call returns: an iterator of responses that is also a grpc.Call."""

    def __next__(self) -> memos_pb2.GenerateResponse: ...

    def cancel(self) -> bool: ...


class _IdleWatch:
    """Cancels a stream that sends nothing for ``seconds``: a deadline on silence, not on the whole call."""

    def __init__(self, seconds: float, cancel: Callable[[], object]) -> None:
        self.seconds = seconds
        self.fired = False
        self._cancel = cancel
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generate-idle-watch", daemon=True)
        self._thread.start()

    def touch(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(max(0.0, self._last + self.seconds - time.monotonic())):
            if time.monotonic() - self._last >= self.seconds:
                self.fired = True
                self._cancel()
                return


class Generation:
    """A streaming Generate call. Iterate it for the text deltas (str, never empty).

    After the stream ends, ``summary`` is the GenerationSummary (None before, and
    when the call was cancelled). :meth:`text` consumes the rest of the stream
    and returns the whole reply. :meth:`cancel` stops the call; iteration then
    ends quietly. As a context manager it cancels an unfinished call on exit.
    ``first_delta_seconds`` is the client-side time from the call to the first
    delta (None until one arrives). With ``idle_timeout``, a stream that sends
    nothing for that many seconds is cancelled and raises DeadlineExceeded.
    """

    def __init__(self, stream: ResponseStream, started: float, idle_timeout: float | None = None) -> None:
        self._stream = stream
        self._watch = _IdleWatch(idle_timeout, stream.cancel) if idle_timeout is not None else None
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
                self._finish()
                break
            except grpc.RpcError as e:
                self._finish()
                if self._cancelled:
                    break
                if self._watch is not None and self._watch.fired:
                    raise DeadlineExceeded(f"no response from the daemon for {self._watch.seconds:g} s; "
                                           "the reply was cancelled") from e
                raise from_rpc_error(e) from e
            if self._watch is not None:
                self._watch.touch()
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

    def _finish(self) -> None:
        self._done = True
        if self._watch is not None:
            self._watch.stop()

    def cancel(self) -> None:
        """Cancel the call if it has not ended; iteration then stops without an error."""
        if not self._done:
            self._cancelled = True
            self._finish()
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
