"""The MemReader as a job's work: the extractors, the turns it reads, and the one commit of its result.

The pure steps are memosd/reader/ (prompt, strict parse, support check, reconcile plan); this module gives
them a model and a cube. ``ModelExtractor`` runs the in-process model on the runtime worker (greedy, on the
base model, a bounded answer); ``EndpointExtractor`` asks an OpenAI-compatible chat endpoint over stdlib
HTTP. Either answer goes through the same safeguards. ``commit_result`` reconciles the kept items with the
cube's derived items at HEAD and commits them as one revision through a read-write mount of its own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from memosd.errors import MountNotFound, PermissionDenied
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput
from memosd.reader import reconcile
from memosd.reader.pipeline import AnswerUnavailable, Turn
from memosd.reader.types import ITEM_KINDS, KIND_TAG_PREFIX, Candidate, Counts, ItemKind
from memosd.runtime.complete import GreedyDecode, PromptTooLong
from memosd.runtime.engine import PRIORITY_BACKGROUND as ENGINE_BACKGROUND
from memosd.runtime.engine import Engine, Finished, Sampling, StreamEvent, TokenStream
from memosd.runtime.host import ModelHost
from memosd.runtime.model import LoadedModel
from memosd.runtime.tokens import chat_token_ids
from memosd.runtime.worker import PRIORITY_BACKGROUND

SOURCE = "memosd:extract"  # the source of every item an Extract job writes
MAX_RESPONSE_BYTES = 1 << 20  # an endpoint's whole HTTP answer (the content itself is bounded by parse.py)
ENDPOINT_TIMEOUT_S = 300.0  # one endpoint call, request to the last byte of its answer
_READ_CHUNK = 64 * 1024
_POLL_S = 0.2  # how often a job thread waiting on an endpoint looks at its stop


class EndpointError(Exception):
    """The extractor endpoint could not be asked (network, HTTP status, not a chat completion): the job fails."""


class Cancelled(Exception):
    """The job's stop was set while an extractor worked on a prompt: it stopped without an answer."""


class ModelExtractor:
    """The in-process model: greedy, on the base model, at most ``max_tokens`` new tokens a prompt, the answer
    held to the prompt's JSON schema (reader/schema.py) when one is given. ``stop`` is seen between steps.

    On the vllm engine (``engine`` given) a prompt is one generation of the serving engine at background
    priority, constrained by vLLM's structured outputs: it batches with the Generates beside it, which go
    ahead of it, and needs no second copy of the weights. On transformers a prompt is decoded in short steps
    (runtime/complete.GreedyDecode: a prefill chunk, or a few tokens, with xgrammar's mask), each one task on
    the runtime worker at background priority, so a Generate waits for one step, not for a whole prompt
    (~30 s of SmolLM2 on a CPU). Without a schema the answer is started with "[" for the model, so it writes
    the array rather than a preamble. Whatever it writes is parsed as strictly as any answer."""

    def __init__(self, host: ModelHost, loaded: LoadedModel, max_tokens: int,
                 stop: threading.Event | None = None, *, engine: Engine | None = None, salt: str = "") -> None:
        self._host, self._loaded, self._max_tokens = host, loaded, max_tokens
        self._stop = stop if stop is not None else threading.Event()
        self._engine, self._salt = engine, salt or SOURCE

    def complete(self, messages: Sequence[tuple[str, str]], schema: Mapping[str, Any] | None = None) -> str:
        schema_text = json.dumps(schema, separators=(",", ":")) if schema is not None else ""
        if self._engine is not None:
            return self._on_engine(self._engine, messages, schema_text)

        def start() -> GreedyDecode:  # the tokenizer (and the grammar's compile), too, on the worker only
            return GreedyDecode(self._loaded, messages, self._max_tokens, prefix="" if schema_text else "[",
                                schema=schema_text)

        try:
            decode = self._host.run(start, priority=PRIORITY_BACKGROUND)
        except PromptTooLong:
            raise AnswerUnavailable("prompt_too_long") from None

        def step() -> None:
            if self._loaded is self._host.loaded_now():  # the serving model: no cube's adapter may be on
                self._host.adapters.use(self._loaded, None)  # (a Generate between two steps may have put one)
            decode.step()

        while not decode.done:
            if self._stop.is_set():
                raise Cancelled()
            self._host.run(step, priority=PRIORITY_BACKGROUND)
        return decode.text()

    def _on_engine(self, engine: Engine, messages: Sequence[tuple[str, str]], schema_text: str) -> str:
        loaded = self._loaded
        ids = self._host.run(lambda: chat_token_ids(loaded.tokenizer, [{"role": r, "content": c} for r, c in messages],
                                                    generation_prompt=True), priority=PRIORITY_BACKGROUND)
        if len(ids) + self._max_tokens > loaded.context_length:
            raise AnswerUnavailable("prompt_too_long")
        sampling = Sampling(max_tokens=self._max_tokens, temperature=0.0, logprobs=False, json_schema=schema_text)
        # Not reused: no cube's blocks are read or written for it (its salt is the reader's, not a cube's).
        stream = engine.generate(ids, sampling, salt=self._salt, priority=ENGINE_BACKGROUND, reuse=False)
        parts: list[str] = []
        while True:
            event = self._next(stream)
            if isinstance(event, Finished):
                if event.reason == "error":
                    raise RuntimeError(f"the engine failed an extraction prompt: {event.error}")
                if event.reason == "aborted":  # the engine stopped under it (memosd stopping)
                    raise Cancelled()
                return "".join(parts)
            if not event.end:
                parts.append(event.text)

    def _next(self, stream: TokenStream) -> StreamEvent:
        """The stream's next event; a stop aborts the generation (the engine frees its slot at once)."""
        future = stream.next()
        while True:
            if self._stop.is_set():
                stream.abort()
                raise Cancelled()
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                continue


class EndpointExtractor:
    """An OpenAI-compatible endpoint (``POST <url>/chat/completions``), at temperature 0.

    A call is bounded: its whole answer must come within ``timeout`` seconds (a socket timeout bounds each
    socket operation, not the call: an endpoint that trickles bytes would hold it for good), else the job
    fails. The request runs on a thread of its own and the job thread waits for it, or for ``stop`` (a
    CancelJob, memosd stopping), whichever comes first: a cancel does not wait for the endpoint. An abandoned
    call does not linger either: the job thread shuts its socket down, which ends the request thread's
    blocked read at once (only a connect still in progress runs on, to its own timeout, and then stops).

    Plain ``http.client``, which follows no redirect: a 3xx is an error naming its status, never followed, so
    the caller's token (and the cube's turns) never go to a host the operator did not allow ([reader]
    endpoints)."""

    def __init__(self, url: str, token: str, model: str, max_tokens: int, timeout: float = ENDPOINT_TIMEOUT_S,
                 stop: threading.Event | None = None) -> None:
        self._url = urllib.parse.urlsplit(url.rstrip("/") + "/chat/completions")
        self._token, self._model, self._max_tokens, self._timeout = token, model, max_tokens, timeout
        self._stop = stop if stop is not None else threading.Event()

    def complete(self, messages: Sequence[tuple[str, str]], schema: Mapping[str, Any] | None = None) -> str:
        # ``schema`` is not sent: not every OpenAI-compatible server takes response_format's json_schema,
        # and the answer is parsed strictly either way.
        body = json.dumps({"model": self._model, "temperature": 0, "max_tokens": self._max_tokens,
                           "messages": [{"role": r, "content": c} for r, c in messages]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        deadline = time.monotonic() + self._timeout
        answer: Future[bytes] = Future()
        call = _Call()
        threading.Thread(target=self._fetch, args=(body, headers, deadline, answer, call), name="extract-endpoint",
                         daemon=True).start()
        try:
            while True:
                if self._stop.is_set():
                    raise Cancelled()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EndpointError(f"the extractor endpoint did not answer within {self._timeout:g} s")
                try:
                    raw = answer.result(timeout=min(left, _POLL_S))
                    break
                except FutureTimeout:
                    continue
        finally:
            call.abandon()  # a no-op once the answer is in; else the request thread's read ends now
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError("the extractor endpoint's answer is not a chat completion") from None
        if not isinstance(content, str):
            raise EndpointError("the extractor endpoint's answer has no text content")
        return content

    def _fetch(self, body: bytes, headers: dict[str, str], deadline: float, answer: Future[bytes], call: _Call
               ) -> None:
        """The HTTP call (on its own thread): the answer's bytes, or an EndpointError, into ``answer``."""
        try:
            answer.set_result(self._read(body, headers, deadline, call))
        except EndpointError as error:
            answer.set_exception(error)
        except Exception as error:  # the job thread reports it; this thread must not die silently
            answer.set_exception(EndpointError(f"the extractor endpoint could not be asked ({type(error).__name__})"))

    def _read(self, body: bytes, headers: dict[str, str], deadline: float, call: _Call) -> bytes:
        url = self._url
        timeout = max(0.1, deadline - time.monotonic())  # each socket operation: what is left of the call
        conn = (http.client.HTTPSConnection(url.hostname or "", url.port, timeout=timeout,
                                            context=ssl.create_default_context())
                if url.scheme == "https" else http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout))
        try:
            conn.connect()
            if not call.hold(conn):  # abandoned while connecting
                raise EndpointError("the extractor endpoint's answer was abandoned (stopped or too slow)")
            conn.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=body, headers=headers)
            response = conn.getresponse()
            if not 200 <= response.status < 300:
                raise EndpointError(f"the extractor endpoint answered HTTP {response.status} ({response.reason})")
            parts: list[bytes] = []
            size = 0
            while size <= MAX_RESPONSE_BYTES:
                if call.abandoned or time.monotonic() > deadline:
                    raise EndpointError("the extractor endpoint's answer was abandoned (stopped or too slow)")
                part = response.read(min(_READ_CHUNK, MAX_RESPONSE_BYTES + 1 - size))
                if not part:
                    break
                parts.append(part)
                size += len(part)
        except (OSError, http.client.HTTPException) as error:
            if call.abandoned:
                raise EndpointError("the extractor endpoint's answer was abandoned (stopped or too slow)") from None
            raise EndpointError(f"the extractor endpoint could not be reached: {error}") from None
        finally:
            conn.close()
        if size > MAX_RESPONSE_BYTES:
            raise EndpointError(f"the extractor endpoint's answer is over {MAX_RESPONSE_BYTES} bytes")
        return b"".join(parts)


class _Call:
    """One endpoint call's connection, shared by the job thread (which may abandon it) and the request thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.abandoned = False

    def hold(self, conn: http.client.HTTPConnection) -> bool:
        """Keep ``conn`` (connected) for ``abandon``; False when the call was abandoned already."""
        with self._lock:
            self._conn = conn
            return not self.abandoned

    def abandon(self) -> None:
        """Shut the call's socket down: a read blocked on it in the request thread returns at once."""
        with self._lock:
            self.abandoned = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already (the call ended)
                sock.shutdown(socket.SHUT_RDWR)


def turns_at(kernel: Kernel, cube_id: str, revision: int, since: int = 0) -> list[Turn]:
    """The conversation turns (items with a speaker, not themselves derived) alive and neither archived nor
    expired at ``revision``, in the order they were said; with ``since``, only those whose version was born
    after that revision (ingested or edited since: an incremental read)."""
    metas = [m for m in kernel.visible_items(cube_id, revision, time.time_ns())
             if m.speaker and not m.derived_from and m.born > since]
    versions = kernel.versions(cube_id, [(m.item_id, m.born) for m in metas])
    turns = [Turn(v.item_id, v.speaker, v.text, v.event_ns) for v in versions if v is not None]
    return sorted(turns, key=lambda t: (t.event_ns, t.item_id))


def _kind_of(tags: Sequence[str]) -> ItemKind | None:
    for tag in tags:
        kind = tag.removeprefix(KIND_TAG_PREFIX)
        if tag.startswith(KIND_TAG_PREFIX) and kind in ITEM_KINDS:
            return kind  # ``in ITEM_KINDS`` narrowed it
    return None


@dataclass(frozen=True)
class Committed:
    revision: int  # 0: nothing to commit
    plan: reconcile.ReconcilePlan
    sources_gone: int  # kept items dropped because a source turn was forgotten or purged since the read


def open_commit_mount(kernel: Kernel, cube_id: str, principal: str) -> str:
    """The read-write mount a job commits through, opened at HEAD when the job starts, as the principal that
    started it: a Revoke or DisablePrincipal meanwhile closes it (AccessControl.close_mounts), and the job then
    commits nothing. (The kernel serializes the commit and the close on the mount's lock: one lands first.)"""
    return kernel.mount(cube_id, 0, True, principal).record.mount_id


def close_commit_mount(kernel: Kernel, mount_id: str) -> None:
    with contextlib.suppress(MountNotFound):  # closed already (a Revoke, FreeCube)
        kernel.unmount(mount_id)


def commit_result(kernel: Kernel, cube_id: str, mount_id: str, candidates: Sequence[Candidate], *, job_id: str,
                  message: str, author: str) -> Committed:
    """Reconcile ``candidates`` with the cube's derived items at HEAD now and commit the plan as one revision
    through the job's mount. Raises PermissionDenied when the mount was closed under the job."""
    try:
        # The mount was opened at HEAD when the job started, minutes ago perhaps; a commit with nothing staged
        # moves its base to HEAD now, so reconcile compares with a derived item another writer committed
        # meanwhile too (a client's structured Write), not only with what the cube held at the start.
        kernel.commit(mount_id, "", author)
        mount = kernel.mount_info(kernel.mount_state(mount_id)).record
    except MountNotFound:
        raise PermissionDenied(f"the job's mount {mount_id} was closed while it ran (a Revoke, DisablePrincipal or "
                               f"FreeCube): nothing was committed to cube {cube_id}") from None
    try:
        head = mount.base
        alive = kernel.visible_items(cube_id, head, time.time_ns())
        visible = {m.item_id for m in alive}
        fresh = [c for c in candidates if all(s in visible for s in c.sources)]
        derived = [m for m in alive if m.derived_from and _kind_of(tuple(m.tags)) is not None]
        versions = [v for v in kernel.versions(cube_id, [(m.item_id, m.born) for m in derived]) if v is not None]
        texts = [v.text for v in versions] + [c.text for c in fresh]
        vectors = kernel.embedder.embed(texts) if texts else None
        existing = [reconcile.Existing(v.item_id, _kind_of(v.tags) or "fact", v.text, tuple(v.derived_from),
                                       None if vectors is None else vectors[i]) for i, v in enumerate(versions)]
        when = {m.item_id: m.event_ns for m in alive}
        plan = reconcile.plan(fresh, existing, None if vectors is None else vectors[len(versions):])
        inputs = [_input(c, "", job_id, when) for c in plan.adds]
        inputs += [_input(c, item_id, job_id, when) for item_id, c in plan.updates]
        for start in range(0, len(inputs), kernel.limits.max_items_per_write):
            kernel.write(mount.mount_id, inputs[start:start + kernel.limits.max_items_per_write])
        if plan.retires:
            kernel.forget(mount.mount_id, plan.retires)
        result = kernel.commit(mount.mount_id, message, author)
        return Committed(result.revision.number if result.revision else 0, plan, len(candidates) - len(fresh))
    except MountNotFound:
        raise PermissionDenied(f"the job's mount {mount_id} was closed while it committed (a Revoke, "
                               f"DisablePrincipal or FreeCube): nothing was committed to cube {cube_id}") from None


def _input(candidate: Candidate, item_id: str, job_id: str, when: dict[str, int]) -> ItemInput:
    """An item of the result: its kind as a tag, its day (else its latest source's time) as its event time."""
    if candidate.date is not None:
        event_ns = int(datetime(candidate.date.year, candidate.date.month, candidate.date.day,
                                tzinfo=UTC).timestamp()) * 1_000_000_000
    else:
        event_ns = max(when.get(s, 0) for s in candidate.sources)
    return ItemInput(candidate.text, item_id=item_id, tags=(f"{KIND_TAG_PREFIX}{candidate.kind}",), source=SOURCE,
                     event_ns=event_ns, derived_from=candidate.sources, derived_job=job_id)


def progress_of(counts: Counts, turns_total: int) -> dict[str, Any]:
    """A job's ``progress`` from the read's Counts (reader/types.py)."""
    return {"turns_total": turns_total, "turns_read": counts.turns, "proposed": counts.proposed,
            "kept": counts.kept, "dropped": dict(counts.dropped), "refused": dict(counts.refused),
            "answers_dropped": dict(counts.answers_dropped)}

