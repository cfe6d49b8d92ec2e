"""Activate and Evict: a cube's memory block as a KV cache, pooled and persisted.

One activation per (cube, model fingerprint) is kept in the store: the
revision it encodes, the block's items and tokens, and its KV cache as
safetensors chunks. The KV pool holds recently used caches in memory.

Activate renders the block at the mount's base revision and hashes its tokens
(the chain of ``runtime.block_hashes``, salted with the cube id). Then, in
order: the cache is in the pool under that key (nothing to do), or persisted
under it (load it, no model work), or it is computed, reusing the longest
block-aligned prefix of the cube's previous cache (an append-only commit
recomputes only the new tokens). A cache is used only under its exact key, so
a cache of another model, another cube, or other tokens is never served.

Tensor work (compute, to/from chunks) runs on the runtime worker; RocksDB
reads and writes run on the calling thread; activations of one cube are
serialized by a per-cube lock.

On the vLLM engine (``host.engine``) the same record is kept, under the
engine's block fingerprint, but its cache is the engine's: Activate submits
the block as a one-token prefill, and the engine's connector persists its full
64-token blocks (RocksDB ``kv_blocks``, keyed by the same chained hashes) and
loads them back for any later request that starts with them, so there are no
chunks and no pool entries; an append-only commit computes only its new
blocks, since the old ones are found by key. Blocks the current activation no
longer uses are deleted when it is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any

from memosd.activation import render, select
from memosd.errors import ContextExceeded, CubeEmpty, PoolTooSmall
from memosd.kernel.kernel import CubeState, Kernel
from memosd.kernel.memory_text import memory_text
from memosd.kernel.usage import UsageTracker
from memosd.logfmt import log_event
from memosd.parametric.adapters import AdapterService
from memosd.runtime import kvpool
from memosd.runtime.engine import PRIORITY_BACKGROUND as ENGINE_BACKGROUND
from memosd.runtime.engine import PRIORITY_INTERACTIVE as ENGINE_INTERACTIVE
from memosd.runtime.engine import Engine, PrefillResult
from memosd.runtime.host import ModelHost
from memosd.runtime.kvblocks import block_keys
from memosd.runtime.kvcache import (
    CacheMismatch,
    ComputeCancelled,
    ComputeStats,
    CorruptCache,
    KVCache,
    block_hashes,
    compute_prefix_cache,
    from_chunks,
    reusable_tokens,
    to_chunks,
)
from memosd.runtime.model import LoadedModel
from memosd.runtime.worker import PRIORITY_BACKGROUND
from memosd.store.records import ActivationRecord, AdapterRecord
from memosd.store.rocks import Store

log = logging.getLogger("memosd.activation")


@dataclass(frozen=True)
class ActivationOutcome:
    record: ActivationRecord
    source: str  # "pool" | "store" | "computed"
    tokens_computed: int
    tokens_reused: int
    pool_bytes: int
    pooled: bool
    took_us: int


@dataclass(frozen=True)
class EvictOutcome:
    cube_id: str
    head: int
    caches_dropped: int
    pool_bytes_freed: int
    persisted_bytes_deleted: int
    took_us: int
    adapters_unloaded: int = 0


def cube_salt(cube_id: str) -> bytes:
    """Keys every cache of the cube apart from every other cube's, even for identical text."""
    return cube_id.encode()


def salt_cube(salt: bytes) -> str:
    """The id of the cube whose caches carry ``salt`` (the inverse of ``cube_salt``); for a combination of
    blocks, the cube whose block leads it (its owner for heat and eviction ranking)."""
    return salt.decode()


class Activator:
    def __init__(self, kernel: Kernel, host: ModelHost, adapters: AdapterService,
                 usage: UsageTracker | None = None, *, store: Store) -> None:
        self.kernel = kernel
        self.host = host
        self.adapters = adapters
        self.usage = usage
        self.store = store  # the activation rows and KV cache chunks are this layer's own column families
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._building: set[str] = set()  # combinations being computed in the background (their keys)
        # Persisted bytes per (cube, model), for Stats without reading every record each time.
        self._persisted = {(r.cube_id, r.fingerprint): r.persisted_bytes for r in self.store.iter_activations()}

    def _cube_lock(self, cube_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(cube_id, threading.Lock())

    # -- Activate ---------------------------------------------------------
    def activate(self, mount_id: str, cancel: threading.Event | None = None,
                 selector: select.Selector = select.ALL) -> ActivationOutcome:
        """Activate: the mount's cube at its base revision, as an interactive call."""
        select.check(selector)
        mount = self.kernel.mount_state(mount_id)
        return self.activate_cube(self.kernel.cube_of(mount), mount.record.base, cancel, selector)

    def activate_cube(self, cube: CubeState, revision: int, cancel: threading.Event | None = None,
                      selector: select.Selector = select.ALL, *, background: bool = False) -> ActivationOutcome:
        """Encode ``selector``'s items of ``cube`` at ``revision``. In the ``background`` (the scheduler), the
        prefill goes to the worker one chunk at a time at background priority: a Generate waits one chunk."""
        started = time.perf_counter()
        refs, texts, label = self.block_items(cube, revision, selector)
        if not refs:
            what = "items" if selector.kind == "all" else f"items selected by {label}"
            raise CubeEmpty(f"cube {cube.record.name!r} has no {what} at revision {revision}: there is nothing to "
                            "activate. Write and commit items first", cube=cube.cube_id, revision=revision)
        loaded = self.host.model()
        ids = self.host.run(lambda: render.block_token_ids(loaded.tokenizer, cube.record.name, texts))
        self._check_fits(loaded, cube, revision, len(ids))
        # A cube with an adapter is activated under it: the adapter becomes resident, and its digest is
        # in the cache key, so this cache is never used under another adapter or the base model.
        adapter = cube.adapter_at(revision)
        if self.host.engine is not None:
            return self._activate_on_engine(self.host.engine, loaded, cube, revision, refs, ids, label, adapter,
                                            cancel, background, started)
        if adapter is not None:
            self.adapters.make_resident(cube.cube_id, adapter)
        extra = adapter.digest.encode() if adapter is not None else b""
        salt = cube_salt(cube.cube_id)
        key = block_hashes(ids, fingerprint=loaded.fingerprint, salt=salt, extra=extra)[-1]

        with self._cube_lock(cube.cube_id):
            old = self.store.get_activation(cube.cube_id, loaded.fingerprint)
            computed = reused = 0
            source = "pool"
            # The scheduler looks without counting: pool hit rates are about what callers asked for.
            cache = self.host.pool.peek(key) if background else self.host.pool.get(key)
            if cache is None and old is not None and old.cache_key == key:
                cache, source = self.load(old, loaded), "store"
            if cache is None:
                # The last cache is only a prefix to reuse, replaced below: look without counting or pooling.
                previous = self.host.pool.peek(old.cache_key) if old is not None else None
                if previous is None and old is not None:
                    previous = self.load(old, loaded)

                def compute() -> tuple[KVCache, ComputeStats]:
                    self.adapters.prepare(loaded, cube.cube_id, adapter)
                    return compute_prefix_cache(loaded, ids, salt=salt, extra=extra, reuse=previous,
                                                chunk_tokens=self.host.config.prefill_chunk, cancel=cancel)

                if background:
                    def step(piece: Callable[[], Any]) -> Any:
                        def run() -> Any:
                            self.adapters.prepare(loaded, cube.cube_id, adapter)  # others ran in between
                            return piece()
                        return self.host.run(run, priority=PRIORITY_BACKGROUND)

                    cache, stats = compute_prefix_cache(loaded, ids, salt=salt, extra=extra, reuse=previous,
                                                        chunk_tokens=self.host.config.background_chunk,
                                                        cancel=cancel, step=step)
                else:
                    cache, stats = self.host.run(compute)
                source, computed, reused = "computed", stats.tokens_computed, stats.tokens_reused
            self._pool(key, cache, replaces=old.cache_key if old is not None else None)
            record = self._persist(cube, loaded, revision, refs, cache, old, label)
        took_us = int((time.perf_counter() - started) * 1e6)
        log_event(log, "activate", cube=cube.cube_id, revision=revision, key=key[:16], source=source,
                  tokens=cache.n_tokens, computed=computed, reused=reused, took_ms=took_us // 1000)
        return ActivationOutcome(record, source, computed, reused, cache.nbytes, key in self.host.pool, took_us)

    def _activate_on_engine(self, engine: Engine, loaded: LoadedModel, cube: CubeState, revision: int,
                            refs: Sequence[tuple[str, int]], ids: list[int], label: str,
                            adapter: AdapterRecord | None, cancel: threading.Event | None, background: bool,
                            started: float) -> ActivationOutcome:
        extra = adapter.digest.encode() if adapter is not None else b""
        key = block_hashes(ids, fingerprint=engine.fingerprint, salt=cube_salt(cube.cube_id), extra=extra,
                           block_size=engine.block_size)[-1]
        served = self.adapters.engine_adapter(cube.cube_id, adapter) if adapter is not None else None
        with self._cube_lock(cube.cube_id):
            old = self.store.get_activation(cube.cube_id, engine.fingerprint)
            future = engine.prefill(ids, salt=cube.cube_id, adapter=served,
                                    priority=ENGINE_BACKGROUND if background else ENGINE_INTERACTIVE)
            result = _wait(future, cancel)
            # The engine computes at least the tokens after the last full block before the last token (the
            # tail it never stores): anything more was computed because it was in neither cache nor store.
            size = engine.block_size
            tail = len(ids) - size * ((len(ids) - 1) // size)
            # A block of one partial KV block (not over one block's tokens) has nothing to reuse: it is
            # computed every time.
            reused_any = result.cached_tokens > 0 and result.computed_tokens <= tail
            source = "computed" if not reused_any else "store" if result.loaded_tokens else "pool"
            record = self._record_served(engine, loaded, cube, revision, refs, ids, key, old, label,
                                         adapter.digest if adapter is not None else "")
        took_us = int((time.perf_counter() - started) * 1e6)
        per_token = loaded.kv_bytes_per_token or 0
        log_event(log, "activate", cube=cube.cube_id, revision=revision, key=key[:16], source=source,
                  tokens=len(ids), computed=result.computed_tokens, reused=result.cached_tokens,
                  loaded=result.loaded_tokens, blocks_saved=result.blocks_saved, engine="vllm",
                  took_ms=took_us // 1000)
        return ActivationOutcome(record, source, result.computed_tokens, result.cached_tokens,
                                 len(ids) * per_token, True, took_us)

    def _record_served(self, engine: Engine, loaded: LoadedModel, cube: CubeState, revision: int,
                       refs: Sequence[tuple[str, int]], ids: list[int], key: str, old: ActivationRecord | None,
                       selector: str, digest: str) -> ActivationRecord:
        """Make the engine's blocks of ``ids`` the cube's activation; drop its blocks no longer used."""
        items = [[item_id, born] for item_id, born in refs]
        stored = self.store.kv_block_bytes(cube.cube_id, engine.fingerprint)
        if old is not None and old.cache_key == key and old.revision == revision and old.selector == selector:
            record = old
        else:
            record = ActivationRecord(
                cube_id=cube.cube_id, fingerprint=engine.fingerprint, revision=revision, cache_key=key,
                chunk_count=0, persisted_bytes=stored, stored_dtype=loaded.dtype, items=items, token_ids=list(ids),
                create_ns=time.time_ns(), adapter_digest=digest, selector=selector)
        keep = set(block_keys(ids, fingerprint=engine.fingerprint, salt=cube_salt(cube.cube_id),
                              extra=digest.encode(), block_size=engine.block_size))
        stale = [k for k in self.store.iter_kv_block_keys(cube.cube_id, engine.fingerprint) if k not in keep]
        batch = self.store.batch()
        batch.put_activation(record, [])

        def persisted() -> None:
            if stale:  # blocks of an older block (another revision, selector or adapter): nothing uses them
                self.store.delete_kv_block_keys(cube.cube_id, engine.fingerprint, stale)
            self._persisted[(cube.cube_id, record.fingerprint)] = self.store.kv_block_bytes(
                cube.cube_id, engine.fingerprint)

        if self.kernel.write_unless_gone(cube, batch, [item_id for item_id, _ in refs], then=persisted) != "written":
            # Freed or purged while the engine computed: the blocks it stored or cached meanwhile must not
            # outlive it.
            self.store.delete_kv_blocks(cube.cube_id, sync=False)
            engine.forget()
        return record

    def block_items(self, cube: CubeState, revision: int, selector: select.Selector = select.ALL
                    ) -> tuple[list[tuple[str, int]], list[str], str]:
        """The items ``selector`` picks at ``revision``, in commit order: (item_id, born), texts, and the
        selector's label (with the working set's size resolved)."""
        size = select.Policy.of(cube.record.policy).working_set_size
        usage = self.usage.items(cube.cube_id) if self.usage is not None and selector.kind == "working_set" else {}
        now = time.time_ns()
        # Archived and expired items are not memory to activate.
        metas = select.select(self.kernel.visible_items(cube.cube_id, revision, now), selector, usage, size)
        refs = [(m.item_id, m.born) for m in metas]
        versions = self.kernel.versions(cube.cube_id, refs)
        return refs, [memory_text(v.text, v.speaker, v.event_ns) for v in versions if v is not None], selector.label(size)

    def _check_fits(self, loaded: LoadedModel, cube: CubeState, revision: int, n_tokens: int) -> None:
        if n_tokens >= loaded.context_length:
            raise ContextExceeded(
                f"the memory block of cube {cube.record.name!r} at revision {revision} is {n_tokens} tokens; "
                f"the model's context is {loaded.context_length} and needs room to generate. Forget items, or "
                "split them over several cubes", cube=cube.cube_id, tokens=n_tokens,
                context=loaded.context_length)
        per_token = loaded.kv_bytes_per_token
        budget = self.host.pool.budget_bytes
        if per_token is not None and n_tokens * per_token > budget:
            raise PoolTooSmall(
                f"the KV cache of cube {cube.record.name!r} would take {n_tokens * per_token} bytes "
                f"({n_tokens} tokens); the KV pool holds {budget}. Raise runtime.pool_bytes",
                cube=cube.cube_id, needed=n_tokens * per_token, budget=budget)

    def _pool(self, key: str, cache: KVCache, *, replaces: str | None) -> None:
        if replaces is not None and replaces != key:
            self.host.pool.evict(replaces)  # the cube's previous cache is no longer current
        try:
            dropped = self.host.pool.put(key, cache)
        except kvpool.PoolTooSmall as error:
            raise PoolTooSmall(f"{error}; raise runtime.pool_bytes", needed=cache.nbytes,
                               budget=self.host.pool.budget_bytes) from None
        for victim, victim_cache in dropped:
            log_event(log, "kv_pool_evict", key=victim[:16], bytes=victim_cache.nbytes, reason="lru")

    def _persist(self, cube: CubeState, loaded: LoadedModel, revision: int, refs: Sequence[tuple[str, int]],
                 cache: KVCache, old: ActivationRecord | None, selector: str = "all") -> ActivationRecord:
        """Make ``cache`` the cube's activation; writes chunks only when the key is new."""
        items = [[item_id, born] for item_id, born in refs]
        chunks: list[bytes] = []
        if old is not None and old.cache_key == cache.key:
            if old.revision == revision and old.selector == selector:
                return old
            # Same tokens at another revision (e.g. a rollback to equal content), or picked by another
            # selector: the chunks stand.
            record = replace(old, revision=revision, items=items, create_ns=time.time_ns(), selector=selector)
        else:
            dtype_name = self.host.config.kv_dtype
            chunks = self.host.run(lambda: to_chunks(cache, dtype=dtype_name))
            record = ActivationRecord(
                cube_id=cube.cube_id, fingerprint=loaded.fingerprint, revision=revision, cache_key=cache.key,
                chunk_count=len(chunks), persisted_bytes=sum(map(len, chunks)), stored_dtype=dtype_name,
                items=items, token_ids=list(cache.token_ids), create_ns=time.time_ns(),
                adapter_digest=cache.extra.decode(), selector=selector)
        batch = self.store.batch()
        batch.put_activation(record, chunks)
        if old is not None and old.cache_key != cache.key:
            batch.delete_kv_cache(cube.cube_id, old.cache_key)

        def persisted() -> None:
            self._persisted[(cube.cube_id, record.fingerprint)] = record.persisted_bytes

        # Freed while we computed: its rows are gone, write none back. Purged: keep no copy either.
        if self.kernel.write_unless_gone(cube, batch, [item_id for item_id, _ in refs], then=persisted) == "purged":
            self.host.pool.evict(cache.key)
        return record

    # -- caches for Generate ------------------------------------------------
    def cache_of(self, record: ActivationRecord, loaded: LoadedModel) -> tuple[KVCache | None, str]:
        """The record's cache from the pool ("pool") or the store ("store", then pooled), or (None, "")."""
        cache = self.host.pool.get(record.cache_key)
        if cache is not None:
            return cache, "pool"
        cache = self.load(record, loaded)
        if cache is None:
            return None, ""
        # The pool may have shrunk since activation (a config change): then use it unpooled.
        with contextlib.suppress(PoolTooSmall):
            self._pool(record.cache_key, cache, replaces=None)
        return cache, "store"

    def load(self, record: ActivationRecord, loaded: LoadedModel) -> KVCache | None:
        """The persisted cache, on the model's device and dtype; None (logged) if it is missing or unusable."""
        chunks = self.store.get_kv_chunks(record)
        if chunks is None:
            log_event(log, "kv_cache_missing", level=logging.WARNING, cube=record.cube_id, key=record.cache_key[:16])
            return None
        salt = cube_salt(record.cube_id)

        def rebuild() -> KVCache:
            return from_chunks(chunks, expected_fingerprint=loaded.fingerprint, expected_salt=salt,
                               dtype=loaded.dtype, device=loaded.device)

        try:
            cache = self.host.run(rebuild)
        except (CorruptCache, CacheMismatch) as error:
            log_event(log, "kv_cache_unusable", level=logging.WARNING, cube=record.cube_id,
                      key=record.cache_key[:16], error=str(error), action="recomputing")
            return None
        if cache.key != record.cache_key:
            log_event(log, "kv_cache_unusable", level=logging.WARNING, cube=record.cube_id,
                      key=record.cache_key[:16], error="stored cache has another key", action="recomputing")
            return None
        return cache

    # -- combinations of blocks (transformers engine) ---------------------------
    def longest_prefix(self, loaded: LoadedModel, token_ids: Sequence[int], cube_id: str, digest: str,
                       longer_than: int = 0) -> KVCache | None:
        """The pooled cache that covers the most of ``token_ids`` (memory blocks, the first one ``cube_id``'s,
        computed under adapter ``digest``), cropped to what it covers: the whole of an equal cache, else its
        full 64-token blocks that chain the same (the salt is the first cube's, so the chain vouches for
        the tokens, their order and the adapter). None unless it covers more than ``longer_than`` tokens;
        only the cache returned counts as a pool hit."""
        salt, extra = cube_salt(cube_id), digest.encode()
        hashes = block_hashes(token_ids, fingerprint=loaded.fingerprint, salt=salt, extra=extra)
        best: KVCache | None = None
        covered = longer_than
        for _, cache in self.host.pool.entries():
            if (cache.salt, cache.extra, cache.fingerprint) != (salt, extra, loaded.fingerprint):
                continue
            n = reusable_tokens(cache, hashes, len(token_ids))
            if n > covered:
                best, covered = cache, n
        if best is None:
            return None
        self.host.pool.get(best.key)  # counted and made recent: it is in use
        return best.crop(covered)

    def keep_combination(self, cubes: Sequence[CubeState], records: Sequence[ActivationRecord],
                         cache: KVCache) -> bool:
        """Pool the KV of several cubes' blocks that a Generate computed (``cache.also_holds`` names the
        cubes after the first, so it goes with any of them), unless one of them was freed or one of its
        blocks' items purged meanwhile (checked after the put, see ``Kernel.still_holds``)."""
        try:
            self._pool(cache.key, cache, replaces=None)
        except PoolTooSmall:
            return False
        for cube, record in zip(cubes, records, strict=True):
            if not self.kernel.still_holds(cube, [item_id for item_id, _ in record.items]):
                self.host.pool.evict(cache.key)
                return False
        log_event(log, "kv_combination_pooled", cubes="+".join(r.cube_id for r in records), key=cache.key[:16],
                  tokens=cache.n_tokens, bytes=cache.nbytes)
        return True

    def build_combination(self, loaded: LoadedModel, cubes: Sequence[CubeState], records: Sequence[ActivationRecord],
                          lead: KVCache, adapter_cube: str, adapter: AdapterRecord | None) -> bool:
        """Compute, in the background, the exact KV of a combination of blocks a Generate composed (ComposeMode
        AUTO), and pool it like one a Generate computed: the next Generate over the same ordered blocks then
        reuses it exactly. From the first block's own cache, the later blocks in ``background_chunk`` pieces
        at background priority, so interactive work waits for one piece at most. False if that combination
        is being built already."""
        digest = adapter.digest if adapter is not None else ""
        ids = [t for r in records for t in r.token_ids]
        salt, extra = cube_salt(records[0].cube_id), digest.encode()
        key = block_hashes(ids, fingerprint=loaded.fingerprint, salt=salt, extra=extra)[-1]
        with self._locks_guard:
            if key in self._building:
                return False
            self._building.add(key)

        def step(piece: Callable[[], Any]) -> Any:
            def run() -> Any:
                self.adapters.prepare(loaded, adapter_cube, adapter)  # other requests ran in between
                return piece()
            return self.host.run(run, priority=PRIORITY_BACKGROUND)

        def build() -> None:
            try:
                cache, _ = compute_prefix_cache(loaded, ids, salt=salt, extra=extra, reuse=lead,
                                                chunk_tokens=self.host.config.background_chunk, step=step)
                also = tuple(cube_salt(r.cube_id) for r in records[1:])
                self.keep_combination(cubes, records, replace(cache, also_holds=also))
            except Exception as error:  # a background nicety: the next Generate composes again
                log_event(log, "kv_combination_failed", level=logging.WARNING, key=key[:16], error=str(error))
            finally:
                with self._locks_guard:
                    self._building.discard(key)

        threading.Thread(target=build, name="memosd-combination", daemon=True).start()
        return True

    # -- Evict --------------------------------------------------------------
    def evict(self, cube_ref: str, delete_persisted: bool) -> EvictOutcome:
        started = time.perf_counter()
        cube = self.kernel.cube(cube_ref)
        with self._cube_lock(cube.cube_id):
            dropped = self._drop_from_pool(cube.cube_id)
            freed = sum(cache.nbytes for _, cache in dropped)
            engine_dropped, engine_freed = self._forget_engine(cube.cube_id, wait=True)
            deleted = 0
            if delete_persisted:
                deleted = sum(self._persisted.get((cube.cube_id, r.fingerprint), r.persisted_bytes)
                              for r in self.store.iter_activations(cube.cube_id))
                batch = self.store.batch()
                batch.delete_activations(cube.cube_id)
                batch.delete_kv_blocks(cube.cube_id)
                self.kernel.write_unless_gone(cube, batch)  # a freed cube's rows went with it
                self.forget_persisted(cube.cube_id)
        dropped_count, freed = len(dropped) + engine_dropped, freed + engine_freed
        unloaded = self.adapters.unload_cube(cube.cube_id, list(cube.adapters))
        log_event(log, "evict", cube=cube.cube_id, dropped=dropped_count, pool_bytes=freed,
                  persisted_deleted=deleted, adapters_unloaded=unloaded)
        return EvictOutcome(cube.cube_id, cube.head, dropped_count, freed, deleted,
                            int((time.perf_counter() - started) * 1e6), unloaded)

    def drop_pooled(self, cube_id: str) -> list[tuple[str, KVCache]]:
        """Drop every pooled cache of the cube (any model): on Evict, and after FreeCube and Purge (where the
        engine's cache is also asked to drop what it holds, without waiting)."""
        self._forget_engine(cube_id, wait=False)
        return self._drop_from_pool(cube_id)

    def _drop_from_pool(self, cube_id: str) -> list[tuple[str, KVCache]]:
        """The cube's own caches and every combination of blocks that holds its block."""
        salt = cube_salt(cube_id)
        return self.host.pool.evict_if(lambda _key, cache: cache.salt == salt or salt in cache.also_holds)

    def _forget_engine(self, cube_id: str, *, wait: bool) -> tuple[int, int]:
        """Drop the engine's cached blocks: (this cube's activations dropped, their KV bytes).

        vLLM cannot drop one cube's blocks, only every block no running request holds, so this costs other
        cubes their engine-cache hits too (they reload from the store, ~5-20x faster than a prefill); and
        while a generation runs it drops nothing (False), which is reported as nothing dropped."""
        engine = self.host.engine
        if engine is None:
            return 0, 0
        future = engine.forget()
        if not wait:
            return 0, 0
        try:
            forgot = future.result(timeout=10)
        except (FutureTimeout, RuntimeError):
            forgot = False
        if not forgot:
            log_event(log, "engine_cache_kept", cube=cube_id, reason="requests hold blocks; they stay cached")
            return 0, 0
        record = self.store.get_activation(cube_id, engine.fingerprint)
        loaded = self.host.loaded_now()
        per_token = loaded.kv_bytes_per_token if loaded is not None else None
        if record is None:
            return 0, 0
        return 1, len(record.token_ids) * (per_token or 0)

    def kv_fingerprints(self) -> tuple[frozenset[str], str]:
        """The model fingerprints this daemon reads stored KV under now (ImportCube loads only those), or
        none and why."""
        loaded = self.host.loaded_now()
        if loaded is None:
            return frozenset(), f"no model is ready here (the model is {self.host.state})"
        engine = self.host.engine
        return frozenset({engine.fingerprint if engine is not None else loaded.fingerprint}), ""

    def note_imported(self, cube_id: str) -> None:
        """ImportCube wrote the cube's stored activations: count their bytes as Activate would have."""
        for record in self.store.iter_activations(cube_id):
            self._persisted[(cube_id, record.fingerprint)] = (
                record.persisted_bytes if record.chunk_count else self.store.kv_block_bytes(cube_id, record.fingerprint))

    def forget_persisted(self, cube_id: str, fingerprints: Collection[str] | None = None) -> None:
        """The cube's stored activations are gone (Evict with delete, or FreeCube's range delete), or those
        for these model fingerprints (a Purge deleted them)."""
        for key in [k for k in self._persisted if k[0] == cube_id and (fingerprints is None or k[1] in fingerprints)]:
            del self._persisted[key]

    def persisted_bytes(self) -> int:
        return sum(self._persisted.values())


def _wait(future: Future[PrefillResult], cancel: threading.Event | None) -> PrefillResult:
    """The engine's prefill result; a cancelled call stops waiting (the engine still finishes and stores
    the blocks, which a later Activate then finds)."""
    while True:
        try:
            return future.result(timeout=0.1 if cancel is not None else None)
        except FutureTimeout:
            if cancel is not None and cancel.is_set():
                raise ComputeCancelled("activation cancelled while the engine prefilled it") from None
