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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memosd.runtime.engine import (
    PRIORITY_INTERACTIVE,
    Adapter,
    EngineStats,
    Finished,
    PrefillResult,
    Sampling,
    Token,
    TokenStream,
)
from memosd.runtime.kvblocks import BlockStore, block_keys
from memosd.runtime.kvcache import BLOCK

log = logging.getLogger("memosd.vllm")

_FINISH = {"stop": "end", "length": "length", "abort": "aborted"}


@dataclass
class _Live:
    """A generation on the engine thread."""

    stream: TokenStream
    started: float
    prompt_tokens: int
    ttft_s: float | None = None
    tokens: int = 0


@dataclass
class _Prefill:
    """An activation on the engine thread."""

    future: Future[PrefillResult]
    tokens: int
    started: float
    missing: list[str]  # keys of its full blocks the store did not have when it was added


@dataclass(frozen=True)
class VllmConfig:
    model_dir: Path  # a Hugging Face directory (memosd's dequantized cache of the GGUF)
    fingerprint: str  # the model's memosd fingerprint: in every stored block's key
    dtype: str = "float32"
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (whole GiB): the engine's paged cache
    threads: int = 1  # OpenMP threads for the forward pass
    max_model_len: int = 8192
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048  # per step: bounds a step's time, so decode interleaves with prefill
    max_loras: int = 0  # 0: LoRA disabled
    max_lora_rank: int = 16
    load_timeout_s: float = 600.0


class VllmEngine:
    def __init__(self, config: VllmConfig, store: BlockStore) -> None:
        self.config = config
        self._store_name = f"memosd-{uuid.uuid4().hex[:8]}"
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._ids = itertools.count()
        self._lora_ids: dict[str, int] = {}
        self._streams: dict[str, _Live] = {}
        self._prefills: dict[str, _Prefill] = {}
        self._store = store
        self._llm: Any = None
        self._steps = 0
        self._max_batch = 0  # the most requests one step returned output for: batching, observed
        self._tokenizer: Any = None
        self._loaded: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(store,), name="memosd-vllm", daemon=True)
        self._thread.start()
        self._loaded.result(config.load_timeout_s)

    # -- the Engine interface ---------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint

    @property
    def block_size(self) -> int:
        return BLOCK

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def prefill(self, token_ids: Sequence[int], *, salt: str, adapter: Adapter | None = None,
                priority: int = PRIORITY_INTERACTIVE) -> Future[PrefillResult]:
        future: Future[PrefillResult] = Future()
        ids = list(token_ids)
        request_id = f"a{next(self._ids)}"
        params = self._sampling(Sampling(max_tokens=1, logprobs=False), persist_tokens=len(ids))

        def add() -> None:
            # The blocks this prefill should write: counted again at its end (exact, whatever runs beside it).
            keys = block_keys(ids, fingerprint=self.fingerprint, salt=salt.encode(),
                              extra=adapter.digest.encode() if adapter is not None else b"")
            missing = [k for k in keys if not self._store.has(k)]
            self._prefills[request_id] = _Prefill(future, len(ids), time.perf_counter(), missing)
            self._add(request_id, ids, params, salt, adapter, priority)

        self._submit(add)
        return future

    def generate(self, token_ids: Sequence[int], sampling: Sampling, *, salt: str,
                 adapter: Adapter | None = None, priority: int = PRIORITY_INTERACTIVE,
                 reuse: bool = True) -> TokenStream:
        ids = list(token_ids)
        request_id = f"g{next(self._ids)}"
        stream = TokenStream(request_id, self.abort)
        params = self._sampling(sampling, persist_tokens=0, reuse=reuse)

        def add() -> None:
            self._streams[request_id] = _Live(stream, time.perf_counter(), len(ids))
            self._add(request_id, ids, params, salt, adapter, priority)

        self._submit(add)
        return stream

    def abort(self, request_id: str) -> None:
        def run() -> None:
            live = self._streams.pop(request_id, None)
            if live is None:
                return  # finished already (or never ours)
            self._llm.abort_request([request_id])
            live.stream.push(self._finished(live, "aborted", 0))

        self._submit(run)

    def forget(self) -> Future[bool]:
        future: Future[bool] = Future()
        self._submit(lambda: future.set_result(bool(self._llm.reset_prefix_cache())))
        return future

    def stats(self) -> EngineStats:
        s = self._stats
        extra = {"connector_hit_tokens": float(s.hit_tokens), "steps": float(self._steps),
                 "max_requests_per_step": float(self._max_batch)}
        return EngineStats(model=str(self.config.model_dir), fingerprint=self.fingerprint, block_size=BLOCK,
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

    def _run(self, store: BlockStore) -> None:
        try:
            self._build(store)
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
            if self._llm.has_unfinished_requests():
                outputs = self._llm.step()
                self._steps += 1
                self._max_batch = max(self._max_batch, len(outputs))
                self._dispatch(outputs)
            else:
                self._wake.wait(0.5)
                self._wake.clear()
        # Closed: whoever still waits is told, rather than left waiting on a future nobody will set.
        for live in self._streams.values():
            live.stream.push(self._finished(live, "aborted", 0))
        for prefill in self._prefills.values():
            prefill.future.set_exception(RuntimeError("the engine closed before the prefill finished"))
        self._streams.clear()
        self._prefills.clear()
        from memosd.runtime.vllm_connector import unregister_store

        unregister_store(self._store_name)

    def _build(self, store: BlockStore) -> None:
        c = self.config
        # Read by vLLM at import or engine start: in-process engine core (no subprocess, no IPC), the
        # paged cache size, and the OpenMP threads ("nobind": other processes share the cores).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(c.kv_cache_gib)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        import torch

        torch.set_num_threads(c.threads)
        from vllm import EngineArgs, LLMEngine
        from vllm.config import KVTransferConfig

        from memosd.runtime import vllm_connector

        self._stats = vllm_connector.register_store(self._store_name, store, c.fingerprint)
        transfer = KVTransferConfig(
            kv_connector=vllm_connector.CONNECTOR_NAME, kv_connector_module_path=vllm_connector.__name__,
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"memosd_store": self._store_name})
        lora: dict[str, Any] = {}
        if c.max_loras > 0:
            lora = {"enable_lora": True, "max_loras": c.max_loras, "max_lora_rank": c.max_lora_rank}
        args = EngineArgs(model=str(c.model_dir), dtype=c.dtype, enforce_eager=True, enable_prefix_caching=True,
                          block_size=BLOCK, max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
                          max_num_batched_tokens=c.max_num_batched_tokens, scheduling_policy="priority",
                          kv_transfer_config=transfer, **lora)
        self._llm = LLMEngine.from_engine_args(args)
        self._tokenizer = self._llm.get_tokenizer()

    def _sampling(self, s: Sampling, *, persist_tokens: int, reuse: bool = True) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=list(s.stop) or None, logprobs=0 if s.logprobs else None, ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            # Not reusing skips vLLM's own prefix cache and the connector's loads alike.
            skip_reading_prefix_cache=not reuse,
            extra_args={"kv_transfer_params": {"memosd": {"load": reuse, "persist_tokens": persist_tokens}}})

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
            live = self._streams.pop(request_id, None)
            if live is not None:
                live.stream.push(self._finished(live, f"error: {e}", 0))

    def _dispatch(self, outputs: list[Any]) -> None:
        now = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            prefill = self._prefills.get(rid)
            if prefill is not None:
                if out.finished:
                    del self._prefills[rid]
                    cached = int(out.num_cached_tokens or 0)
                    saved = sum(1 for k in prefill.missing if self._store.has(k))
                    prefill.future.set_result(PrefillResult(
                        tokens=prefill.tokens, cached_tokens=cached, computed_tokens=prefill.tokens - cached,
                        blocks_saved=saved, took_us=int((now - prefill.started) * 1e6)))
                continue
            live = self._streams.get(rid)
            if live is None:
                continue
            completion = out.outputs[0]
            lps = completion.logprobs or []
            for i, token_id in enumerate(completion.token_ids):
                if live.ttft_s is None:
                    live.ttft_s = now - live.started
                lp = lps[i].get(token_id) if i < len(lps) else None
                # DELTA outputs carry the text of all of this step's tokens at once: hand it with the last.
                text = completion.text if i == len(completion.token_ids) - 1 else ""
                live.tokens += 1
                live.stream.push(Token(int(token_id), float(lp.logprob) if lp is not None else None, text))
            if out.finished:
                del self._streams[rid]
                reason = _FINISH.get(str(completion.finish_reason), str(completion.finish_reason))
                if reason == "end" and completion.stop_reason is not None:
                    reason = "stop"  # a stop string, not an end-of-sequence token
                live.stream.push(self._finished(live, reason, int(out.num_cached_tokens or 0)))

    @staticmethod
    def _finished(live: _Live, reason: str, cached: int) -> Finished:
        total = time.perf_counter() - live.started
        ttft = live.ttft_s if live.ttft_s is not None else total
        return Finished(reason, live.prompt_tokens, cached, live.tokens, int(ttft * 1e6), int(total * 1e6))
