"""Stats: the daemon's counters, read from every part into one plain value (the Stats syscall and the
Prometheus gauges both read it; syscalls/convert_stats.py makes the message)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from memosd import __version__
from memosd.activation.activator import Activator
from memosd.cluster.node import ClusterStatus
from memosd.governance.audit import AuditLog
from memosd.kernel.kernel import Kernel
from memosd.runtime.host import ModelHost
from memosd.runtime.kvpool import PoolStats


@dataclass(frozen=True)
class ModelStats:
    """The model: its load state ("disabled", "loading", "ready", "failed"), what is loaded, the worker."""

    state: str
    error: str
    name: str
    fingerprint: str
    device: str
    dtype: str
    context_length: int
    queue_depth: int
    active_generations: int
    worker_jobs_started: int
    engine: str = "transformers"
    engine_stats: ServingStats | None = None  # the vllm engine's, once it is running


@dataclass(frozen=True)
class ServingStats:
    """The vllm engine's counters (runtime.engine.EngineStats, less what ModelStats says already)."""

    kv_cache_tokens: int
    blocks_loaded: int
    blocks_saved: int
    load_errors: int
    steps: int
    max_requests_per_step: int
    generations: int
    prefills: int
    block_size: int


@dataclass(frozen=True)
class KVPoolStats(PoolStats):
    """The KV pool (in memory, the pool's own counters), and the bytes of KV caches persisted in the store
    over all cubes."""

    persisted_bytes: int


@dataclass(frozen=True)
class AdapterPoolStats:
    """Adapters resident in the model, and those held by any revision of any cube (``stored``)."""

    resident: int
    max_resident: int
    loads: int
    evictions: int
    stored: int
    stored_bytes: int
    switches: int
    switch_us_total: int
    load_us_total: int


@dataclass(frozen=True)
class Stats:
    """The daemon as a whole (the field names are StatsResponse's; the call counts are the gate's)."""

    version: str
    uptime_seconds: int
    cube_count: int
    mount_count: int
    item_count: int
    version_count: int
    embedder: str
    embedding_dim: int
    store_bytes: int
    dense_index_bytes: int
    lexical_index_bytes: int
    rss_bytes: int
    model: ModelStats
    kv_pool: KVPoolStats
    adapters: AdapterPoolStats
    disk_full: bool
    disk_free_bytes: int
    audit_unaudited_calls: int
    cluster: ClusterStatus | None = None  # None: a single node ([cluster] etcd = [])


def rss_bytes() -> int:
    """The daemon's resident set size (0 where /proc is not there to say)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class StatsService:
    """Owns the one assembly of the daemon's counters: Stats, SchedulerStatus and the Prometheus gauges
    all read this value, so they cannot disagree on what a counter counts. Each counter is read from the
    one part that keeps it (kernel, store, model host, activator, audit log). Raises nothing of its own;
    the parts are read one after another, not under one lock, so two counters may be a moment apart."""

    def __init__(self, kernel: Kernel, host: ModelHost, activator: Activator, audit: AuditLog,
                 started: float, cluster: Callable[[], ClusterStatus] | None = None) -> None:
        self.kernel = kernel
        self.cluster = cluster  # ClusterNode.status: from memory, it never waits on etcd
        self.host = host
        self.activator = activator
        self.audit = audit
        self.started = started  # time.time() when the daemon was built

    def stats(self) -> Stats:
        held = self.kernel.totals()
        return Stats(
            version=__version__, uptime_seconds=int(time.time() - self.started), cube_count=held.cube_count,
            mount_count=held.mount_count, item_count=held.item_count, version_count=held.version_count,
            embedder=self.kernel.embedder.name, embedding_dim=self.kernel.embedder.dim,
            store_bytes=held.store_bytes, dense_index_bytes=held.dense_index_bytes,
            lexical_index_bytes=held.lexical_index_bytes, rss_bytes=rss_bytes(), model=self._model(),
            kv_pool=self._kv_pool(), adapters=self._adapters(held.adapter_count, held.adapter_bytes),
            disk_full=held.disk_full, disk_free_bytes=held.disk_free_bytes,
            audit_unaudited_calls=self.audit.unaudited_calls,
            cluster=self.cluster() if self.cluster is not None else None)

    def _model(self) -> ModelStats:
        host = self.host
        # The state before the loaded model: a load finishing in between shows "loading" with the model's
        # name, never "ready" without it.
        state, error = host.state, host.error
        queue_depth, active = host.worker.queue_depth, host.active_generations
        jobs = sum(host.worker.started.values())
        loaded = host.loaded_now()
        if loaded is None:
            return ModelStats(state=state, error=error, name=host.config.model, fingerprint="", device="",
                              dtype="", context_length=0, queue_depth=queue_depth, active_generations=active,
                              worker_jobs_started=jobs, engine=host.engine_kind)
        return ModelStats(state=state, error=error, name=loaded.name, fingerprint=loaded.fingerprint,
                          device=loaded.device, dtype=loaded.dtype, context_length=loaded.context_length,
                          queue_depth=queue_depth, active_generations=active,
                          worker_jobs_started=jobs, engine=host.engine_kind, engine_stats=self._serving())

    def _serving(self) -> ServingStats | None:
        engine = self.host.engine
        if engine is None:
            return None
        s = engine.stats()
        return ServingStats(kv_cache_tokens=engine.kv_cache_tokens, blocks_loaded=s.blocks_loaded,
                            blocks_saved=s.blocks_saved, load_errors=s.load_errors,
                            steps=int(s.extra.get("steps", 0)),
                            max_requests_per_step=int(s.extra.get("max_requests_per_step", 0)),
                            generations=s.generations, prefills=s.prefills, block_size=s.block_size)

    def _kv_pool(self) -> KVPoolStats:
        persisted = self.activator.persisted_bytes()
        return KVPoolStats(**asdict(self.host.pool.stats()), persisted_bytes=persisted)

    def _adapters(self, stored: int, stored_bytes: int) -> AdapterPoolStats:
        pool = self.host.adapters
        return AdapterPoolStats(resident=len(pool), max_resident=pool.max_resident, loads=pool.loads,
                                evictions=pool.evictions, stored=stored, stored_bytes=stored_bytes,
                                switches=pool.switches, switch_us_total=int(pool.switch_seconds * 1e6),
                                load_us_total=int(pool.load_seconds * 1e6))
