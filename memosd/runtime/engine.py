"""The serving engine interface: what activation and generation ask of a model runtime.

One engine per daemon owns the model, its KV cache and its adapters, and runs
on its own thread. Everything here is plain values and thread-safe calls that
return ``concurrent.futures.Future``s, so the syscall layer can park on them
(``memosd.park``) as it parks on the runtime worker's jobs today:

* ``prefill`` is Activate: compute a cube's memory block (under the cube's
  adapter, if any) and persist its full KV blocks through the engine's block
  store; blocks already stored or cached are not computed again, which is what
  makes an append-only commit cost only its new tokens.
* ``generate`` is Generate: a prompt whose leading blocks are a memory block
  has them loaded (engine cache, else block store) instead of computed
  (``reuse=False``, Generate's ``bypass_kv_cache``: the whole prompt is
  computed). It returns a ``TokenStream``; ``abort`` (or
  ``TokenStream.abort``) cancels it.
* ``forget`` drops cached blocks (Evict, Purge): the engine cache cannot drop
  one cube's blocks selectively, so it drops all unused ones; the block store
  is the daemon's to delete from.

A request names its cube by ``salt`` (``activator.cube_salt``'s text, i.e.
the cube id): blocks of different salts are never shared, and the stored
keys are memosd's chained block hashes over (fingerprint, tokens, salt,
adapter digest) (``kvblocks.block_keys``).

Implementations: ``vllm_engine.VllmEngine`` (vLLM, paged, batched), the whole
interface; and ``transformers_engine.TransformersEngine``, which streams a
generation with the same ``TokenStream`` / ``Finished`` contract on the runtime
worker, from a prefix cache its caller found (the activator's pool and store
of whole-block caches, ``kvcache``) rather than by hashing the prompt.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from memosd.runtime.vllm_compose import Segment

# Priorities: lower runs first (vLLM's convention). Interactive work (Generate, Activate called by a
# client) goes ahead of the scheduler's background activations.
PRIORITY_INTERACTIVE = 0
PRIORITY_BACKGROUND = 10


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as the engine loads it: a PEFT directory written from memosd's store."""

    digest: str  # names it in the engine and is the ``extra`` of every KV key computed under it
    path: Path


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = True  # each token's log-probability under the model (before temperature and top-p)
    ignore_eos: bool = False  # benchmarks: always max_tokens
    # A JSON schema's text the answer is held to (schema-constrained decoding; the MemReader's extraction):
    # the vllm engine only (vLLM's structured outputs); the transformers engine's reader constrains its own
    # decode (runtime/complete.py), and its Generate refuses a schema rather than ignore it.
    json_schema: str = ""


@dataclass(frozen=True)
class PrefillResult:
    tokens: int  # the block's tokens
    cached_tokens: int  # found in the engine's cache or the block store (not computed)
    loaded_tokens: int  # of those, loaded from the block store
    computed_tokens: int
    blocks_saved: int  # new blocks written to the block store
    took_us: int


@dataclass(frozen=True)
class Token:
    token_id: int
    logprob: float | None
    text: str  # the decoded delta this token adds (may be empty mid-character)
    end: bool = False  # the end-of-sequence token: it ends the reply and is not part of it


@dataclass(frozen=True)
class Finished:
    reason: str  # "end", "length", "stop", "aborted", "error"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens not computed: engine cache hits and blocks loaded from the store
    completion_tokens: int
    ttft_us: int
    total_us: int
    loaded_tokens: int = 0  # of cached_tokens, loaded from the block store
    error: str = ""  # reason "error": what failed (the request, not the engine)
    # A composed generation (``Composition``): per segment, its tokens reused (the first: exactly; a later
    # one: placed from its own blocks) and why a later one was not composed ("" if it was). Empty: not
    # composed (exact), whatever was asked.
    composed: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    # reason "error" on the transformers engine: the exception the model work raised, for the caller to raise
    exception: BaseException | None = field(default=None, compare=False, repr=False)


StreamEvent = Token | Finished


@dataclass(frozen=True)
class Composition:
    """Generate with the prompt's memory blocks composed (``runtime.vllm_compose``): each block's own KV,
    the later ones placed at their offsets with their first tokens recomputed. ``auto``: exact instead once
    the engine has computed this combination exactly (which it then does behind a composed reply)."""

    segments: tuple[Segment, ...]
    auto: bool = False


@dataclass
class EngineStats:
    model: str
    fingerprint: str
    block_size: int
    generations: int  # streams not finished
    prefills: int  # activations not finished
    blocks_loaded: int
    blocks_saved: int
    load_errors: int
    extra: dict[str, float] = field(default_factory=dict)


class TokenStream:
    """A generation's events, handed from the engine thread to any consumer.

    ``next()`` returns a future of the next event (a ``Token``, then one
    ``Finished``), so a consumer can block on it or park on it. One consumer.
    """

    def __init__(self, request_id: str, abort: _Aborter) -> None:
        self.request_id = request_id
        self._abort = abort
        self._lock = threading.Lock()
        self._ready: deque[StreamEvent] = deque()
        self._waiting: Future[StreamEvent] | None = None
        self._closed = False

    def next(self) -> Future[StreamEvent]:
        future: Future[StreamEvent] = Future()
        with self._lock:
            if self._ready:
                future.set_result(self._ready.popleft())
            elif self._closed:
                raise RuntimeError(f"stream {self.request_id} has finished")
            else:
                self._waiting = future
        return future

    def events(self, timeout: float | None = None) -> list[StreamEvent]:
        """Every event to the end, blocking (for scripts and tests)."""
        out: list[StreamEvent] = []
        while not out or not isinstance(out[-1], Finished):
            out.append(self.next().result(timeout))
        return out

    def abort(self) -> None:
        self._abort(self.request_id)

    # engine side
    def push(self, event: StreamEvent) -> None:
        with self._lock:
            if self._closed:
                return
            if isinstance(event, Finished):
                self._closed = True
            waiting, self._waiting = self._waiting, None
            if waiting is None:
                self._ready.append(event)
        if waiting is not None and not waiting.cancelled():
            try:
                waiting.set_result(event)
                return
            except InvalidStateError:  # cancelled meanwhile (the consumer stopped waiting): keep the event
                pass
        if waiting is not None:
            with self._lock:
                self._ready.appendleft(event)


class _Aborter(Protocol):
    def __call__(self, request_id: str, /) -> None: ...


class Engine(Protocol):
    """The calls memosd makes of a model runtime. All are thread-safe."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def block_size(self) -> int: ...

    @property
    def kv_cache_tokens(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    def prefill(self, token_ids: Sequence[int], *, salt: str, adapter: Adapter | None = None,
                priority: int = PRIORITY_INTERACTIVE) -> Future[PrefillResult]: ...

    @property
    def compose_unsupported(self) -> str:
        """Why this engine cannot compose blocks ("" if it can), in words for Generate's summary."""
        ...

    def generate(self, token_ids: Sequence[int], sampling: Sampling, *, salt: str,
                 adapter: Adapter | None = None, priority: int = PRIORITY_INTERACTIVE,
                 reuse: bool = True, compose: Composition | None = None) -> TokenStream: ...

    def abort(self, request_id: str) -> None: ...

    def forget(self) -> Future[bool]: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
