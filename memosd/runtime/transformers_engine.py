"""The transformers engine's generation: a prompt in, a ``TokenStream`` out, on the runtime worker.

It keeps the contract of ``engine.Engine.generate`` (``Token`` events, then
one ``Finished``; ``abort``), so Generate consumes either engine's stream with
the same code and reports the same counts. What differs is where the prompt's
prefix comes from: vLLM finds cached blocks by hashing the prompt, while here
the caller hands the prefix ``KVCache`` it found in the KV pool or the store
(the activator's whole-block caches), and the prefill extends a fresh copy of
it (``kvcache.prepare_generation``), so the pooled cache never changes.

The work is cut into worker jobs at interactive priority: the prefill (in
chunks, stopping at once if the call is cancelled or the stream aborted) and
the first token in one job, so nothing queued slips in between; then one job
per token, queued only when the consumer asks for the next event
(``_PulledStream.next``), so concurrent generations interleave, no reply runs
ahead of its reader, and a stream that stops being read leaves nothing queued. A token's forward pass runs only when the token after it is wanted: the
first token comes straight from the prefill's logits and the last costs no
pass at all.

An exception in a job ends the stream with ``Finished(reason="error")`` that
carries it (``Finished.exception``), so the caller raises the very error the
model work raised (an adapter refused, a cancellation), not a generic one.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memosd.runtime.decode import Sampler, TextStream
from memosd.runtime.engine import Finished, Sampling, StreamEvent, Token, TokenStream
from memosd.runtime.kvcache import (
    ComputeCancelled,
    KVCache,
    growing_cache,
    prepare_generation,
    snapshot_prefix,
)
from memosd.runtime.kvcompose import (
    NO_ADJUSTMENT,
    PlacedAttention,
    Placement,
    compose_prefill,
    decode_mask,
    placed_keys,
)
from memosd.runtime.model import LoadedModel
from memosd.runtime.worker import PRIORITY_INTERACTIVE, RuntimeWorker, WorkerClosedError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KeepPrefix:
    """After the prefill, hand the KV of the prompt's first ``n_tokens`` to ``sink`` as a ``KVCache`` with
    this salt, extra and ``also_holds`` (Generate keeps a combination of memory blocks this way)."""

    n_tokens: int
    salt: bytes
    extra: bytes
    also_holds: tuple[bytes, ...]
    sink: Callable[[KVCache], object]


@dataclass
class _Generation:
    """One stream's state; its tensors are touched only on the worker thread."""

    stream: TokenStream
    loaded: LoadedModel
    sampling: Sampling
    prepare: Callable[[], None]  # puts the model in this generation's adapter state; run before each pass
    cancel: threading.Event  # the caller's: set when the call is cancelled
    prompt_tokens: int
    cached_tokens: int
    started: float
    keep: KeepPrefix | None = None
    aborted: threading.Event = field(default_factory=threading.Event)
    cache: Any = None  # the DynamicCache being extended
    logits: torch.Tensor | None = None
    sampler: Sampler | None = None
    text: TextStream | None = None
    eos: frozenset[int] = frozenset()
    pending: int | None = None  # the last token picked, not yet run through the model
    picked: int = 0  # tokens picked so far, the end token included
    ttft_us: int = 0
    due: bool = False  # a step is owed: queued at the consumer's next ``next()``
    attention: PlacedAttention = NO_ADJUSTMENT  # composed: APE's adjustment of the placed keys (kvcompose)
    placed: slice = field(default_factory=lambda: slice(0))  # composed: where the placed keys are in the cache (kvcompose.placed_keys)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stopping(self) -> bool:
        return self.aborted.is_set() or self.cancel.is_set()


class _PulledStream(TokenStream):
    """A ``TokenStream`` that asks for the next step when its reader wants an event it does not have."""

    def __init__(self, request_id: str, abort: Callable[[str], None], on_demand: Callable[[], None]) -> None:
        super().__init__(request_id, abort)
        self._on_demand = on_demand

    def next(self) -> Future[StreamEvent]:
        future = super().next()
        if not future.done():
            self._on_demand()
        return future


class TransformersEngine:
    """Generation with the transformers model on the one runtime worker."""

    def __init__(self, worker: RuntimeWorker, *, prefill_chunk: int) -> None:
        self.worker = worker
        self.prefill_chunk = prefill_chunk

    def generate(self, loaded: LoadedModel, token_ids: Sequence[int], sampling: Sampling, *,
                 prefix: KVCache | None, prepare: Callable[[], None], cancel: threading.Event,
                 keep: KeepPrefix | None = None, placements: Sequence[Placement] = (),
                 attention: PlacedAttention = NO_ADJUSTMENT) -> TokenStream:
        """Stream the reply to ``token_ids``, whose first ``prefix.n_tokens`` are ``prefix``'s tokens; with
        ``keep``, also hand over the KV of a longer prefix once it is computed. ``placements`` (in prompt
        order, after the prefix) are memory blocks composed from their own caches (``kvcompose``): the
        prompt between them is computed as usual, and every query (the prefill's and each decoded token's)
        attends to their placed keys as ``attention`` says. ``keep`` is for exact prefixes only: never with
        them."""
        if keep is not None and placements:
            raise ValueError("a composed prefix is not exact: it cannot be kept as a combination")
        if sampling.json_schema:  # no caller asks it of this engine; ignoring it would answer unconstrained
            raise ValueError("the transformers engine's Generate does not constrain to a schema "
                             "(runtime/complete.GreedyDecode does)")
        box: list[_Generation] = []
        stream = _PulledStream(uuid.uuid4().hex, lambda _rid: box[0].aborted.set(), lambda: self._step_if_due(box[0]))
        reused = (prefix.n_tokens if prefix is not None else 0) + sum(p.placed_tokens for p in placements)
        gen = _Generation(stream, loaded, sampling, prepare, cancel, len(token_ids), reused, time.perf_counter(),
                          keep, attention=attention if placements else NO_ADJUSTMENT)
        box.append(gen)
        prompt = list(token_ids)
        self._queue(gen, lambda: self._start(gen, prefix, prompt, tuple(placements)))
        return stream

    def _step_if_due(self, gen: _Generation) -> None:
        with gen.lock:
            due, gen.due = gen.due, False
        if due:
            self._queue(gen, lambda: self._step(gen))

    def _queue(self, gen: _Generation, job: Callable[[], None]) -> None:
        def run() -> None:
            try:
                job()
            except Exception as error:  # handed to the consumer, which raises it
                gen.cache = None
                gen.stream.push(self._finished(gen, "error", error))

        def unrun(future: Future[None]) -> None:  # the worker stopped (memosd is stopping) before running it
            if future.cancelled():
                gen.cache = None
                gen.stream.push(self._finished(gen, "aborted"))

        try:
            self.worker.submit(run, priority=PRIORITY_INTERACTIVE).add_done_callback(unrun)
        except WorkerClosedError as error:
            gen.stream.push(self._finished(gen, "error", error))

    def _start(self, gen: _Generation, prefix: KVCache | None, prompt: list[int],
               placements: tuple[Placement, ...]) -> None:
        gen.prepare()
        self._prefill(gen, prefix, prompt, placements)
        self._pick(gen)

    def _prefill(self, gen: _Generation, prefix: KVCache | None, prompt: list[int],
                 placements: tuple[Placement, ...]) -> None:
        # Room for the prompt and the reply: no forward pass copies the cache (kvcache.GrowingLayer).
        capacity = min(len(prompt) + max(gen.sampling.max_tokens, 1), gen.loaded.context_length)
        if prefix is not None:
            gen.cache, _ = prepare_generation(gen.loaded, prefix, prompt, capacity=capacity)
            done = prefix.n_tokens
        else:
            gen.cache, done = growing_cache(capacity), 0
        if placements:
            def check() -> None:
                if gen.stopping:
                    raise ComputeCancelled("generation cancelled during prefill")
            gen.placed = placed_keys(done, placements)
            logits: torch.Tensor | None = compose_prefill(gen.loaded, gen.cache, prompt, done, placements,
                                                          chunk=self.prefill_chunk, check=check,
                                                          attention=gen.attention)
        else:
            logits = self._forward(gen, prompt[done:])  # its last token's logits pick the first token
        if logits is None:
            raise ValueError("the prompt needs at least one token after its reused KV")
        keep = gen.keep
        if keep is not None and gen.cached_tokens < keep.n_tokens < len(prompt):
            keep.sink(snapshot_prefix(gen.cache, prompt[:keep.n_tokens], fingerprint=gen.loaded.fingerprint,
                                      salt=keep.salt, extra=keep.extra, also_holds=keep.also_holds))
        gen.logits = logits[0, -1]
        seed = gen.sampling.seed or 0
        gen.sampler = Sampler(temperature=gen.sampling.temperature, top_p=gen.sampling.top_p, seed=seed,
                              device=gen.loaded.model.device)
        gen.text = TextStream(gen.loaded.tokenizer, gen.sampling.stop)
        gen.eos = eos_token_ids(gen.loaded)

    def _forward(self, gen: _Generation, ids: list[int]) -> torch.Tensor | None:
        """Run ``ids`` through the model on the generation's cache, in chunks; the last chunk's logits."""
        import torch

        model: Any = gen.loaded.model
        logits = None
        with torch.no_grad():
            for pos in range(0, len(ids), self.prefill_chunk):
                if gen.stopping:
                    raise ComputeCancelled("generation cancelled during prefill")
                piece = torch.tensor([ids[pos:pos + self.prefill_chunk]], dtype=torch.long, device=model.device)
                logits = model(input_ids=piece, past_key_values=gen.cache, use_cache=True, logits_to_keep=1).logits
        return logits

    def _step(self, gen: _Generation) -> None:
        """Run the previous token through the model, then pick the next one."""
        import torch

        if gen.stopping:
            gen.cache = None
            gen.stream.push(self._finished(gen, "aborted"))
            return
        gen.prepare()  # other requests' jobs may have switched the adapter since the last step
        model: Any = gen.loaded.model
        with torch.no_grad():
            piece = torch.tensor([[gen.pending]], dtype=torch.long, device=model.device)
            # A composed prompt's scale on its placed keys holds for every decoded token too (its temperature
            # is in the placed keys themselves); None otherwise: the model's own mask.
            mask = decode_mask(gen.attention, gen.placed, gen.cache, dtype=next(model.parameters()).dtype,
                               device=model.device)
            out = model(input_ids=piece, past_key_values=gen.cache, use_cache=True, logits_to_keep=1,
                        attention_mask=mask)
        gen.logits = out.logits[0, -1]
        self._pick(gen)

    def _pick(self, gen: _Generation) -> None:
        """Pick a token from the last logits and push it; queue the next step unless the reply is over."""
        import torch

        assert gen.logits is not None and gen.sampler is not None and gen.text is not None
        if gen.sampling.max_tokens <= 0:
            self._end(gen, "length")
            return
        token = gen.sampler.pick(gen.logits)
        logprob = float(torch.log_softmax(gen.logits.float(), dim=-1)[token])
        gen.picked += 1
        if not gen.ttft_us:
            gen.ttft_us = int((time.perf_counter() - gen.started) * 1e6)
        if token in gen.eos and not gen.sampling.ignore_eos:
            gen.stream.push(Token(token, logprob, gen.text.flush(), end=True))
            self._end(gen, "end")
            return
        delta = gen.text.push(token)
        last = gen.picked >= gen.sampling.max_tokens
        if gen.text.stopped or last:
            gen.stream.push(Token(token, logprob, delta + gen.text.flush()))
            self._end(gen, "stop" if gen.text.stopped else "length")
            return
        gen.pending = token
        with gen.lock:
            gen.due = True  # before the push: a reader that has the token and asks again finds the step owed
        gen.stream.push(Token(token, logprob, delta))

    def _end(self, gen: _Generation, reason: str) -> None:
        gen.cache = None  # free the generation's KV copy now, not when the stream object dies
        gen.stream.push(self._finished(gen, reason))

    @staticmethod
    def _finished(gen: _Generation, reason: str, error: BaseException | None = None) -> Finished:
        total = int((time.perf_counter() - gen.started) * 1e6)
        completion = gen.picked - (1 if reason == "end" else 0)
        return Finished(reason, gen.prompt_tokens, gen.cached_tokens, max(completion, 0), gen.ttft_us or total,
                        total, error=str(error) if error is not None else "", exception=error)


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """The token ids that end a reply: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
