"""Generate: a reply to a conversation, with the memory of mounts, streamed.

The prompt is built by ``render``: the memory blocks of the mounts whose cube
is activated at the mount's revision, the items retrieved for the last user
message (hybrid search over all the mounts, minus items already in a block),
then the conversation. The first activated block's KV cache is the prompt's
prefix: a fresh copy of it is extended by the prefill of the rest, so the
pooled and stored cache never change. Later blocks are reused only as part of
a combination seen before (the same cubes, order and revisions: the KV of a
block is exact only after the very same blocks), else prefilled as tokens.

The model work is an engine's (``runtime/``): the vLLM engine finds the
prefix's blocks itself; the transformers engine (``runtime.transformers_engine``)
is handed the prefix cache found here, and runs the prefill and each token as
runtime-worker jobs. Either returns a ``TokenStream``, which ``_stream``
consumes the same way: a cancelled call aborts it within one token, and the
report's counts are the engine's. With ``park`` (the gRPC path), every wait on
the worker, the model load and the stream is a ``Park`` yielded to the gate,
which awaits it on the event loop: a generation holds no syscall thread while
its tokens are computed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Generator as Steps
from dataclasses import dataclass, field
from typing import TypeVar

from memosd.activation import render
from memosd.activation.activator import Activator, cube_salt
from memosd.errors import AdapterNotFound, ContextExceeded, ModelUnavailable
from memosd.kernel import validate
from memosd.kernel.kernel import CubeState
from memosd.kernel.memory_text import memory_text
from memosd.kernel.search import Searcher
from memosd.kernel.types import SearchFilter
from memosd.park import Park
from memosd.runtime.engine import Composition, Engine, Finished, Sampling, TokenStream
from memosd.runtime.host import ModelHost
from memosd.runtime.kvcache import ComputeCancelled, KVCache
from memosd.runtime.kvcompose import (
    PlacedAttention,
    Placement,
    compose_unsupported,
    deviating_tokens,
    recompute_tokens,
)
from memosd.runtime.model import LoadedModel
from memosd.runtime.transformers_engine import KeepPrefix
from memosd.runtime.vllm_compose import Segment
from memosd.runtime.worker import PRIORITY_DEFAULT
from memosd.store.records import ActivationRecord, AdapterRecord

# A conversation of B bytes is at least B / longest_token_bytes tokens. Twice that many bytes are let
# through to the tokenizer, for tokenizers whose normalizer shrinks text (NFKC folds some 3-byte characters
# into 2 bytes): the bound must never refuse a prompt that fits, only bound what reaches the worker.
PROMPT_BYTES_SLACK = 2

T = TypeVar("T")


@dataclass(frozen=True)
class GenerateParams:
    messages: list[tuple[str, str]]  # (role, content)
    mount_ids: list[str]
    max_tokens: int = 0  # 0: the configured default
    temperature: float = 0.0
    top_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    retrieve_k: int | None = None  # None: the configured default
    bypass_kv_cache: bool = False  # prefill activated blocks instead of reusing their caches
    adapter_mount_id: str = ""  # generate with this mount's cube's adapter; "" for the base model
    compose: str = ""  # exact | composed | auto for the blocks after the first; "": runtime.compose
    compose_recompute: float | None = None  # composed: the share of a block's tokens recomputed; None: config


@dataclass(frozen=True)
class UsedItem:
    item_id: str
    born: int
    score: float = 0.0


@dataclass
class MemoryUse:
    mount_id: str
    cube_id: str
    revision: int
    activated: bool = False
    cache_key: str = ""
    cache_source: str = ""  # "pool" | "store" when cache_key is set
    block_items: list[UsedItem] = field(default_factory=list)
    retrieved_items: list[UsedItem] = field(default_factory=list)
    # The memory block's tokens in the prompt, how many were reused (not computed) and computed, and how
    # they were reused: "exact" (the KV of these very tokens after this very prefix, or computed) or
    # "composed" (its own KV placed here, its first tokens recomputed). 0 / "" unactivated.
    block_tokens: int = 0
    block_reused_tokens: int = 0
    block_computed_tokens: int = 0
    block_mode: str = ""
    block_note: str = ""  # why a block composition was asked for was not composed


@dataclass
class _Block:
    """An activated mount's memory block in the prompt: where it starts, and its activation."""

    use: MemoryUse
    cube: CubeState
    record: ActivationRecord
    start: int
    placement: Placement | None = None  # composed from its own cache (transformers engine)


@dataclass
class GenerationReport:
    finish_reason: str = ""  # "end" | "length" | "stop"
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    completion_tokens: int = 0
    ttft_us: int = 0
    total_us: int = 0
    memory: list[MemoryUse] = field(default_factory=list)
    model_fingerprint: str = ""
    adapter_digest: str = ""  # the adapter generated with; "" for the base model
    token_ids: list[int] = field(default_factory=list)  # the completion, the end token not included
    token_logprobs: list[float] = field(default_factory=list)  # each one's log-probability under the model


class Generator:
    def __init__(self, host: ModelHost, activator: Activator, searcher: Searcher) -> None:
        self.host = host
        self.activator = activator
        self.searcher = searcher
        self.kernel = activator.kernel

    def generate(self, params: GenerateParams, cancel: threading.Event, *,
                 park: bool = False) -> Iterator[str | GenerationReport | Park]:
        """Text deltas, then one ``GenerationReport``. Validation errors raise before the first delta.

        With ``park``, waits are yielded as ``Park`` (see memosd.park) instead of blocking the thread."""
        started = time.perf_counter()
        max_tokens, k = self._validate(params)
        mounts = [self.kernel.mount_state(m) for m in dict.fromkeys(params.mount_ids)]
        cubes = [self.kernel.cube_of(m) for m in mounts]
        loading = self.host.loading
        if park and loading is not None and not loading.done():
            yield Park(loading)  # the model is still loading; host.model() then returns (or raises) at once
        loaded = self.host.model()
        self._check_prompt_bytes(params, loaded)  # before any tokenizing: that runs on the one worker
        adapter_cube, adapter = self._adapter(params)
        digest = adapter.digest if adapter is not None else ""
        if adapter is not None and self.host.engine is None:  # the engine loads its LoRA itself (engine_adapter)
            self.activator.adapters.make_resident(adapter_cube, adapter)
        report = GenerationReport(model_fingerprint=loaded.fingerprint, adapter_digest=digest)
        uses = {m.mount_id: MemoryUse(m.mount_id, c.cube_id, m.record.base) for m, c in zip(mounts, cubes, strict=True)}
        report.memory = list(uses.values())

        # Memory blocks: each activated cube once, in mount order; the first one's cache is the prefix.
        engine = self.host.engine
        fingerprint = engine.fingerprint if engine is not None else loaded.fingerprint  # the records' key
        block_ids: list[int] = []
        blocks: list[_Block] = []
        in_blocks: set[str] = set()
        seen_cubes: set[str] = set()
        for mount, cube in zip(mounts, cubes, strict=True):
            record = self.activator.store.get_activation(cube.cube_id, fingerprint)
            if cube.cube_id in seen_cubes or record is None or record.revision != mount.record.base:
                continue
            seen_cubes.add(cube.cube_id)
            use = uses[mount.mount_id]
            use.activated = True
            use.block_items = [UsedItem(item_id, born) for item_id, born in record.items]
            in_blocks.update(item_id for item_id, _ in record.items)
            blocks.append(_Block(use, cube, record, len(block_ids)))
            block_ids.extend(record.token_ids)
        prefix_use: MemoryUse | None = None  # on vllm: the use whose blocks the engine may reuse
        prefix_key = ""
        # A cache computed under another adapter (or none) is never reused: its block is prefilled.
        first = blocks[0] if blocks and not params.bypass_kv_cache and blocks[0].record.adapter_digest == digest \
            else None
        if engine is not None and first is not None:
            prefix_use, prefix_key = first.use, first.record.cache_key
        compose, fraction = self._compose_mode(params)
        prefix, keep = self._transformers_prefix(loaded, blocks, first, digest, params, compose) \
            if engine is None else (None, None)
        composition: Composition | None = None
        if compose != "exact" and len(blocks) > 1 and not params.bypass_kv_cache:
            if engine is not None:
                composition = self._engine_composition(engine, loaded, blocks, first, digest, fraction,
                                                       auto=compose == "auto")
            elif self._compose(loaded, blocks, prefix, digest, fraction):
                keep = None  # a composed prefix is not exact: never kept as a combination
        placements = [b.placement for b in blocks if b.placement is not None]

        retrieved = self._retrieve(params, k, in_blocks, uses)
        conversation = [{"role": role, "content": content} for role, content in params.messages]
        tail = yield from self._on_worker(lambda: render.tail_token_ids(
            loaded.tokenizer, [t for t, _ in retrieved], conversation, after_block=bool(block_ids)), park)
        prompt = block_ids + tail
        if len(prompt) >= loaded.context_length:
            raise ContextExceeded(
                f"the prompt is {len(prompt)} tokens (memory blocks {len(block_ids)}, retrieved items and "
                f"conversation {len(tail)}); the model's context is {loaded.context_length}. Shorten the "
                "conversation, lower retrieve_k, or use fewer activated mounts",
                tokens=len(prompt), context=loaded.context_length)
        report.prompt_tokens = len(prompt)
        max_tokens = min(max_tokens, loaded.context_length - len(prompt))
        sampling = Sampling(max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p or 1.0,
                            seed=params.seed or None, stop=params.stop)
        if engine is not None:
            # The engine's cache is isolated per cube: the prefix cube's, else the first mount's (a prompt of
            # retrieved items reuses nothing of another cube's).
            salt = prefix_use.cube_id if prefix_use is not None else cubes[0].cube_id if cubes else ""
            served = self.activator.adapters.engine_adapter(adapter_cube, adapter) if adapter is not None else None

            def start() -> TokenStream:
                assert engine is not None
                return engine.generate(prompt, sampling, salt=salt, adapter=served,
                                       reuse=not params.bypass_kv_cache, compose=composition)
        else:
            def prepare() -> None:  # the request's adapter state, before each forward pass
                self.activator.adapters.prepare(loaded, adapter_cube, adapter)

            def start() -> TokenStream:
                stream = self.host.transformers.generate(loaded, prompt, sampling, prefix=prefix, prepare=prepare,
                                                         cancel=cancel, keep=keep, placements=placements,
                                                         attention=self._placed_attention())
                if compose == "auto" and placements and prefix is not None:
                    # Composed this time; computed exactly behind it (queued after this prefill, at background
                    # priority), so the same combination is reused exactly the next time.
                    self.activator.build_combination(loaded, [b.cube for b in blocks], [b.record for b in blocks],
                                                     prefix, adapter_cube, adapter)
                return stream
        yield from self._stream(start, cancel, report, started, park, prefix_use, prefix_key, blocks)

    def _engine_composition(self, engine: Engine, loaded: LoadedModel, blocks: list[_Block], first: _Block | None,
                            digest: str, fraction: float, *, auto: bool) -> Composition | None:
        """On vLLM: the blocks as the segments of a composed request (the engine finds each one's own stored
        blocks, under its cube's salt), or None (exact) with each later block's note saying why."""
        why = compose_unsupported(loaded) or engine.compose_unsupported
        if not why and first is None:
            why = "the first block's KV was computed under another adapter than this request's: exact"
        if why:
            for block in blocks[1:]:
                block.use.block_note = why
            return None
        segments = []
        for i, block in enumerate(blocks):
            size = len(block.record.token_ids)
            if i and block.record.adapter_digest != digest:
                block.use.block_note = "its KV was computed under another adapter than this request's: computed"
                recompute = size  # all of it: nothing of its own is placed
            else:
                recompute = 0 if i == 0 else recompute_tokens(size, fraction)
            segments.append(Segment(block.cube.cube_id, block.start, size, recompute))
        return Composition(tuple(segments), auto=auto)

    def _placed_attention(self) -> PlacedAttention:
        config = self.host.config
        return PlacedAttention(config.compose_temperature, config.compose_scale)

    def _compose_mode(self, params: GenerateParams) -> tuple[str, float]:
        config = self.host.config
        fraction = config.compose_recompute if params.compose_recompute is None else params.compose_recompute
        return params.compose or config.compose, fraction

    def _compose(self, loaded: LoadedModel, blocks: list[_Block], prefix: KVCache | None, digest: str,
                 fraction: float) -> bool:
        """Plan the later blocks the exact prefix does not cover as placements of their own caches; a block
        that cannot be composed is computed, and its use says why. True if any block is composed."""
        unsupported = compose_unsupported(loaded)
        covered = prefix.n_tokens if prefix is not None else 0
        for block in blocks[1:]:
            if block.start < covered:  # exact: a combination seen before covers (some of) it
                continue
            use = block.use
            if unsupported:
                use.block_note = unsupported
                continue
            if block.record.adapter_digest != digest:
                use.block_note = "its KV was computed under another adapter than this request's: computed"
                continue
            cache, source = self.activator.cache_of(block.record, loaded)
            # Its own cube's cache of its very tokens, or nothing: a cube's KV never stands in for another's.
            if cache is None or cache.salt != cube_salt(block.cube.cube_id) or \
                    cache.token_ids != tuple(block.record.token_ids):
                use.block_note = "its KV cache is in neither the pool nor the store: computed"
                continue
            first = recompute_tokens(cache.n_tokens, fraction)
            deviating = deviating_tokens(cache.n_tokens, self.host.config.compose_deviation, first)
            block.placement = Placement(block.start, cache, first, deviating)
            use.cache_key, use.cache_source = block.record.cache_key, source
        return any(block.placement is not None for block in blocks)

    def _transformers_prefix(self, loaded: LoadedModel, blocks: list[_Block], first: _Block | None, digest: str,
                             params: GenerateParams, compose: str) -> tuple[KVCache | None, KeepPrefix | None]:
        """On the transformers engine: the cache the prompt starts from, and what to keep of this prefill.

        The longest pooled prefix of the memory blocks (``Activator.longest_prefix``: a combination of the
        same leading cubes at the same revisions seen before, cropped to what it shares), or the first
        block's own cache (from the pool or the store) if that is longer. With several blocks not all
        reused, the KV of all of them is kept once the prefill has computed it, for the next Generate over
        the same combination. Either way the KV is exact: the same tokens, in the same positions, after
        the same prefix, under the same adapter. In composed mode, only the first block's own cache: the
        later blocks are all composed."""
        if params.bypass_kv_cache or not blocks:
            return None, None
        block_ids = [t for b in blocks for t in b.record.token_ids]
        lead = blocks[0]
        # A pooled combination only if it covers more than the first block's own cache would.
        own_tokens = len(first.record.token_ids) if first is not None else 0
        prefix = self.activator.longest_prefix(loaded, block_ids, lead.cube.cube_id, digest, own_tokens) \
            if len(blocks) > 1 and compose != "composed" else None
        source = "pool"
        if prefix is None and first is not None:
            prefix, source = self.activator.cache_of(first.record, loaded)
        if prefix is not None:
            own_key = prefix.key == lead.record.cache_key
            for block in blocks:
                if block.start < prefix.n_tokens:
                    block.use.cache_key = lead.record.cache_key if own_key else prefix.key
                    block.use.cache_source = source
        keep = None
        if len(blocks) > 1 and (prefix is None or prefix.n_tokens < len(block_ids)):
            cubes, records = [b.cube for b in blocks], [b.record for b in blocks]
            keep = KeepPrefix(len(block_ids), cube_salt(lead.cube.cube_id), digest.encode(),
                              tuple(cube_salt(b.cube.cube_id) for b in blocks[1:]),
                              lambda cache: self.activator.keep_combination(cubes, records, cache))
        return prefix, keep

    def _stream(self, start: Callable[[], TokenStream], cancel: threading.Event, report: GenerationReport,
                started: float, park: bool, prefix_use: MemoryUse | None, prefix_key: str, blocks: list[_Block]
                ) -> Iterator[str | GenerationReport | Park]:
        """Either engine's stream: its tokens as they come; the report's counts are the engine's own.

        A cancelled call raises ``ComputeCancelled`` at the next event and aborts the stream (the engine
        frees its KV); a reply that ends yields the report last."""
        if cancel.is_set():
            raise ComputeCancelled("generation cancelled before it started")
        self.host.generation_started()
        finished: Finished | None = None
        stream: TokenStream | None = None
        try:
            stream = start()
            while True:
                if cancel.is_set():
                    raise ComputeCancelled("generation cancelled")
                future = stream.next()
                if park:
                    yield Park(future)
                event = future.result()
                if isinstance(event, Finished):
                    finished = event
                    break
                if not report.ttft_us:
                    report.ttft_us = int((time.perf_counter() - started) * 1e6)
                if not event.end:  # the end-of-sequence token is not part of the reply, its text (a tail) is
                    report.token_ids.append(event.token_id)
                    report.token_logprobs.append(event.logprob if event.logprob is not None else 0.0)
                if event.text:
                    yield event.text
        finally:
            if finished is None and stream is not None:
                stream.abort()
            self.host.generation_ended()
        if cancel.is_set():
            raise ComputeCancelled("generation cancelled")
        if finished.reason == "error":
            if finished.exception is not None:
                raise finished.exception
            raise ModelUnavailable(f"the engine failed this generation: {finished.error}")
        if finished.reason == "aborted":
            raise ComputeCancelled("the engine stopped this generation (memosd is stopping)")
        report.finish_reason = finished.reason
        report.completion_tokens = len(report.token_ids)
        report.reused_tokens = finished.cached_tokens
        report.prefilled_tokens = report.prompt_tokens - report.reused_tokens
        source = "store" if finished.loaded_tokens else "pool"
        if prefix_use is not None and finished.cached_tokens:
            prefix_use.cache_key = prefix_key
            prefix_use.cache_source = source
        if finished.composed:  # composed on the engine: per block, its own KV reused (the first exactly)
            for i, block in enumerate(blocks):
                use, size = block.use, len(block.record.token_ids)
                use.block_tokens, use.block_reused_tokens = size, min(finished.composed[i], size)
                use.block_computed_tokens = size - use.block_reused_tokens
                # A later block the engine composed has no note (placed, or with a fraction of 1 recomputed whole).
                composed = i > 0 and not finished.notes[i] and not use.block_note
                use.block_mode = "composed" if composed else "exact"
                if i and finished.notes[i]:
                    use.block_note = finished.notes[i]
                if composed:
                    use.cache_key, use.cache_source = block.record.cache_key, source
            report.total_us = int((time.perf_counter() - started) * 1e6)
            yield report
            return
        for i, note in enumerate(finished.notes):  # asked to compose, and the engine did not
            if i and note and i < len(blocks):
                blocks[i].use.block_note = note
        # Exact reuse is a prefix of the prompt: each block's share of it. A composed block reused its own.
        exact_end = finished.cached_tokens - sum(b.placement.placed_tokens for b in blocks if b.placement)
        for block in blocks:
            size = len(block.record.token_ids)
            use = block.use
            use.block_tokens = size
            if block.placement is not None:
                use.block_reused_tokens, use.block_mode = block.placement.placed_tokens, "composed"
            else:
                use.block_reused_tokens, use.block_mode = min(max(exact_end - block.start, 0), size), "exact"
            use.block_computed_tokens = size - use.block_reused_tokens
        report.total_us = int((time.perf_counter() - started) * 1e6)
        yield report

    def _check_prompt_bytes(self, params: GenerateParams, loaded: LoadedModel) -> None:
        """Refuse a conversation whose bytes alone cannot fit the context (CONTEXT_EXCEEDED), so a huge one
        never reaches the worker, where its tokenization would hold up every other generation."""
        token_bytes = self.host.token_bytes
        if not token_bytes:  # not measured (a host built without a model load): the token count decides
            return
        size = sum(len(content.encode()) for _, content in params.messages)
        limit = loaded.context_length * token_bytes * PROMPT_BYTES_SLACK
        if size > limit:
            raise ContextExceeded(
                f"the conversation is {size} bytes; the model's context is {loaded.context_length} tokens and no "
                f"token stands for more than {token_bytes} bytes, so no conversation over {limit} bytes can fit. "
                "Shorten the conversation", bytes=size, limit=limit, context=loaded.context_length)

    def _on_worker(self, fn: Callable[[], T], park: bool, priority: int = PRIORITY_DEFAULT) -> Steps[Park, None, T]:
        """``fn``'s result, run on the runtime worker; with ``park`` the wait is a yielded ``Park``."""
        if not park:
            return self.host.run(fn, priority=priority)
        future = self.host.worker.submit(fn, priority=priority)
        yield Park(future)
        return future.result()

    def _adapter(self, params: GenerateParams) -> tuple[str, AdapterRecord | None]:
        """The cube and the adapter the request generates with (None: the base model)."""
        if not params.adapter_mount_id:
            return "", None
        mount = self.kernel.mount_state(params.adapter_mount_id)
        cube = self.kernel.cube_of(mount)
        adapter, _ = self.kernel.adapter_in(mount)
        if adapter is None:
            raise AdapterNotFound(f"options.adapter_mount_id names a mount of cube {cube.record.name!r}, which "
                                  f"has no adapter at revision {mount.record.base}; import or train one, or leave "
                                  "it empty for the base model", cube=cube.cube_id, revision=mount.record.base)
        return cube.cube_id, adapter

    def _validate(self, params: GenerateParams) -> tuple[int, int]:
        config = self.host.config
        max_tokens = params.max_tokens or config.max_tokens
        k = config.retrieve_k if params.retrieve_k is None else params.retrieve_k
        validate.generate(params.messages, params.mount_ids, max_tokens, config.max_tokens_limit, params.temperature,
                          params.top_p, params.stop, k, self.kernel.limits)
        return max_tokens, k

    def _retrieve(self, params: GenerateParams, k: int, exclude: set[str],
                  uses: dict[str, MemoryUse]) -> list[tuple[str, UsedItem]]:
        """Top-k items for the last user message that are not already in a memory block."""
        if k == 0 or not uses:
            return []
        query = _clip_utf8(params.messages[-1][1], self.kernel.limits.max_query_bytes)
        result = self.searcher.search(list(uses), query, min(k + len(exclude), self.kernel.limits.max_k),
                                      SearchFilter(), "hybrid")
        out: list[tuple[str, UsedItem]] = []
        for hit in result.hits:
            if hit.item.item_id in exclude:
                continue
            used = UsedItem(hit.item.item_id, hit.item.born, hit.score)
            uses[hit.mount_id].retrieved_items.append(used)
            out.append((memory_text(hit.item.text, hit.item.speaker, hit.item.event_ns), used))
            if len(out) == k:
                break
        return out


def _clip_utf8(text: str, limit: int) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")
