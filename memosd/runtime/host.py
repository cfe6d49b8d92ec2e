"""The model host: the runtime worker, the model it loads in the background, the KV pool, the engine.

The daemon serves plaintext memory at once; the model loads on the worker
thread after start (a second from the dequantized cache, ~15 s the first time),
and activation syscalls that arrive meanwhile wait for it. A model that fails
to load is reported by those syscalls and by Stats, not by refusing to start:
plaintext memory does not need it.

Two engines serve it (``runtime.engine``). **transformers**: the worker thread
loads the transformers model and runs every prefill and token, one request at a
time, with the KV pool and the adapter pool. **vllm** (the default where it is
installed): the worker loads the model *without its weights*
(``load_model(weights=False)``: the tokenizer, for rendering prompts on the
worker; the config, for the context length and KV sizes; the module tree on the
meta device, for checking adapters; the fingerprint stored beside the model),
then a ``VllmEngine`` is started on the model's directory, with its own thread,
batching, paged KV cache (``runtime.pool_bytes``) and LoRA slots
(``runtime.max_adapters``), and its blocks persisted through ``block_stores``.
The one thing vLLM cannot do is train: ``training_model`` loads a transformers
copy for the Train jobs that run, and drops it when the last one ends. The
model is not "ready" until the engine is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from memosd.config import RuntimeConfig
from memosd.errors import ModelUnavailable
from memosd.logfmt import log_event
from memosd.runtime import tokens
from memosd.runtime.adapters import AdapterPool
from memosd.runtime.engine import Engine
from memosd.runtime.kvblocks import BlockStores
from memosd.runtime.kvpool import KVPool
from memosd.runtime.model import LoadedModel, ModelLoadError, ModelSpec, load_model, load_weights
from memosd.runtime.transformers_engine import TransformersEngine
from memosd.runtime.vllm_engine import vllm_importable
from memosd.runtime.worker import PRIORITY_BACKGROUND, PRIORITY_DEFAULT, RuntimeWorker

log = logging.getLogger("memosd.runtime")

T = TypeVar("T")
DISABLED = "none"
# Fingerprint -> the engine's block stores (the daemon's RocksDB ranges per cube).
BlockStoresFactory = Callable[[str], BlockStores]


def resolve_engine(config: RuntimeConfig) -> str:
    """"vllm" or "transformers": auto is vllm where it is installed."""
    if config.engine == "auto":
        return "vllm" if vllm_importable() else "transformers"
    return config.engine


class ModelHost:
    def __init__(self, config: RuntimeConfig, cache_dir: Path, block_stores: BlockStoresFactory | None = None
                 ) -> None:
        self.config = config
        self.engine_kind = resolve_engine(config)
        if self.engine_kind == "vllm" and block_stores is None:
            raise ValueError("the vllm engine needs block stores to persist activations in")
        self._block_stores = block_stores
        self.engine: Engine | None = None  # set, with vllm, when the model and the engine are ready
        self.pool = KVPool(config.pool_bytes)
        self.adapters = AdapterPool(config.max_adapters)  # touched only on the worker
        self.worker = RuntimeWorker()
        # Generation on the transformers engine (runtime.engine = "transformers"): streams on this worker.
        self.transformers = TransformersEngine(self.worker, prefill_chunk=config.prefill_chunk)
        self.active_generations = 0
        # The most bytes of text one token of the loaded model stands for (tokens.longest_token_bytes):
        # Generate refuses a conversation too long for the context by its bytes, before tokenizing it.
        self.token_bytes = 0
        self._lock = threading.Lock()
        # Train on vllm: the transformers copy the running jobs share, and how many hold it.
        self._training_lock = threading.Lock()
        self._training: tuple[LoadedModel, int] | None = None
        self._loading: Future[LoadedModel] | None = None
        if config.model.lower() != DISABLED:
            spec = ModelSpec(source=config.model, device=config.device, dtype=config.dtype)
            self._loading = self.worker.submit(lambda: self._load(spec, cache_dir))

    def _load(self, spec: ModelSpec, cache_dir: Path) -> LoadedModel:
        try:
            # vLLM serves the weights: loading them here too would hold the model's bytes twice.
            loaded = load_model(spec, cache_dir, weights=self.engine_kind != "vllm")
            self.token_bytes = tokens.longest_token_bytes(loaded.tokenizer)  # set before the model is ready
        except Exception as error:
            log_event(log, "model_load_failed", level=logging.ERROR, model=spec.source, error=str(error))
            raise
        log_event(log, "model_loaded", model=loaded.name, fingerprint=loaded.fingerprint[:16],
                  device=loaded.device, dtype=loaded.dtype, origin=loaded.origin, token_bytes=self.token_bytes,
                  weights=loaded.weights is not None, fingerprint_stored=loaded.fingerprint_stored,
                  seconds=round(loaded.load_seconds + loaded.fingerprint_seconds, 2))
        if self.engine_kind == "vllm":
            self.engine = self._start_vllm(loaded)
        return loaded

    def _start_vllm(self, loaded: LoadedModel) -> Engine:
        from memosd.runtime.vllm_engine import VllmConfig, VllmEngine, block_fingerprint, engine_block_size

        assert self._block_stores is not None
        device = "cuda" if loaded.device.startswith("cuda") else "cpu"
        block_size = engine_block_size(device)
        fingerprint = block_fingerprint(loaded.fingerprint, device=device, dtype=loaded.dtype, block_size=block_size)
        c = self.config
        vllm_config = VllmConfig(
            model_dir=loaded.path, fingerprint=fingerprint, dtype=loaded.dtype, device=device,
            kv_cache_bytes=c.pool_bytes, max_model_len=loaded.context_length,
            # A step's prefill budget: it bounds how long a step holds a waiting interactive request.
            max_num_batched_tokens=max(c.prefill_chunk, 256), max_loras=c.max_adapters,
            max_lora_rank=c.max_lora_rank, block_size=block_size)
        started = time.perf_counter()
        try:
            engine = VllmEngine(vllm_config, self._block_stores(fingerprint))
        except Exception as error:
            log_event(log, "engine_start_failed", level=logging.ERROR, engine="vllm", error=str(error))
            raise ModelLoadError(f"the vllm engine did not start: {error}. Set runtime.engine = \"transformers\" "
                                 "to serve without it") from error
        log_event(log, "engine_started", engine="vllm", fingerprint=fingerprint, device=device,
                  kv_cache_tokens=engine.kv_cache_tokens, seconds=round(time.perf_counter() - started, 2))
        return engine

    @property
    def loading(self) -> Future[LoadedModel] | None:
        """The model load's future (None: no model is configured)."""
        return self._loading

    @property
    def state(self) -> str:
        if self._loading is None:
            return "disabled"
        if not self._loading.done():
            return "loading"
        return "failed" if self._loading.exception() is not None else "ready"

    @property
    def error(self) -> str:
        if self._loading is None or not self._loading.done():
            return ""
        error = self._loading.exception()
        return "" if error is None else str(error)

    def loaded_now(self) -> LoadedModel | None:
        """The model if it is ready, without waiting."""
        return self._loading.result() if self.state == "ready" and self._loading is not None else None

    def model(self) -> LoadedModel:
        """The model, waiting for it to finish loading. Raises ``ModelUnavailable``."""
        if self._loading is None:
            raise ModelUnavailable("no model is configured (runtime.model = none); set runtime.model to "
                                   "SmolLM2-135M-Instruct or a local model directory and restart memosd")
        if self.adapters.broken:  # a load changed the base model: serve nothing with it (see AdapterPool)
            raise ModelUnavailable(self.adapters.broken)
        try:
            return self._loading.result()
        except ModelLoadError as error:
            raise ModelUnavailable(f"the model {self.config.model!r} failed to load: {error}; fix "
                                   "runtime.model and restart memosd") from None

    @contextmanager
    def training_model(self) -> Iterator[LoadedModel]:
        """The model with its transformers weights, for a Train job (from any thread but the worker).

        On transformers, the serving model itself. On vllm, a copy loaded on the worker at background
        priority, shared by the jobs that run at once and dropped when the last one leaves; each load and
        drop is logged (``train_model_loaded``, ``train_model_dropped``). For SmolLM2 from the cache: ~0.8 s,
        and its 513 MB of float32 weights, which transformers maps from the safetensors file (file-backed
        pages, in RSS once training touches them). Raises ``ModelUnavailable``.
        """
        serving = self.model()
        if serving.weights is not None:
            yield serving
            return
        with self._training_lock:
            if self._training is None:
                started = time.perf_counter()
                copy = self.run(lambda: load_weights(serving), priority=PRIORITY_BACKGROUND)
                log_event(log, "train_model_loaded", model=copy.name, bytes=_weight_bytes(copy),
                          seconds=round(time.perf_counter() - started, 2),
                          why="the vllm engine serves the weights but cannot train them")
                self._training = (copy, 0)
            copy, holders = self._training
            self._training = (copy, holders + 1)
        try:
            yield copy
        finally:
            with self._training_lock:
                assert self._training is not None  # held by this job until here
                copy, holders = self._training
                self._training = (copy, holders - 1) if holders > 1 else None
            if holders == 1:  # freed once the job lets go of it too (JobManager._train)
                log_event(log, "train_model_dropped", model=copy.name, bytes=_weight_bytes(copy))

    def run(self, fn: Callable[[], T], *, priority: int = PRIORITY_DEFAULT) -> T:
        """Run ``fn`` on the worker thread (the only one that touches torch) and wait for it."""
        return self.worker.call(fn, priority=priority)

    def generation_started(self) -> None:
        with self._lock:
            self.active_generations += 1

    def generation_ended(self) -> None:
        with self._lock:
            self.active_generations -= 1

    def close(self) -> None:
        """Stop the worker after its current job; a model still loading is abandoned, not awaited.

        The first load dequantizes the GGUF (tens of seconds, minutes on a busy machine), and it touches
        only the model cache, which is written to a temporary directory and renamed when whole: a SIGTERM
        during it must not wait for it (systemd would kill the daemon before RocksDB closes). The worker is
        a daemon thread, so the process exits without it.
        """
        loading = self._loading is not None and not self._loading.done()
        if loading:
            log_event(log, "model_load_abandoned", model=self.config.model)
        self.worker.shutdown(wait=not loading, cancel_pending=True)
        if self.engine is not None:
            self.engine.close()
        self.pool.clear()


def _weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*loaded.model.parameters(), *loaded.model.buffers()])
