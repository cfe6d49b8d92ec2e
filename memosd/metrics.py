"""Prometheus metrics: what each call did, recorded as it ends; everything else, read when scraped.

One ``Metrics`` per daemon, with its own ``CollectorRegistry`` (not
prometheus_client's global one), so two daemons in one process, or tests,
never share series. The gate reports every syscall (method, gRPC code, wall
time) and every streamed response (Generate's summary carries the TTFT); that
is all the instrumentation in the call path. Gauges and the pool's and
adapters' own counters are read from the daemon's Stats snapshot at scrape
time, so no code path has to keep a gauge up to date and /metrics always
agrees with the Stats syscall.

``MetricsServer`` serves the text format over HTTP (unauthenticated, like
node_exporter: keep ``metrics.listen`` on loopback or behind a firewall).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# From a StatCube (well under 1 ms) to a long Generate or a Purge's scrub (tens of seconds).
SYSCALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A pooled prefix on a GPU (a few ms) to a full prefill of thousands of tokens on CPU (seconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Snapshot = Callable[[], Any]  # returns the Stats syscall's response message (Daemon.stats)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.syscalls = Counter("memosd_syscalls", "Syscalls finished, by method and gRPC status code.",
                                ("method", "code"), registry=self.registry)
        self.syscall_seconds = Histogram(
            "memosd_syscall_seconds", "Syscall wall time, from arrival to the last response (streams: the "
            "whole stream).", ("method",), buckets=SYSCALL_BUCKETS, registry=self.registry)
        self.ttft = Histogram("memosd_generate_ttft_seconds", "Generate's time to first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tokens = Counter(
            "memosd_generate_tokens", "Generate's tokens: prompt tokens reused from a KV cache, prompt tokens "
            "prefilled, and completion tokens.", ("kind",), registry=self.registry)
        # process_resident_memory_bytes, CPU seconds, open fds: the names every dashboard already knows.
        ProcessCollector(registry=self.registry)

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.syscalls.labels(method, code).inc()
        self.syscall_seconds.labels(method).observe(seconds)

    def observe_response(self, method: str, response: Any) -> None:
        """Each streamed response. Generate's last one carries its summary: the one place outside the
        handler where a generation's TTFT and token counts can be seen."""
        if method != "Generate" or not response.HasField("summary"):
            return
        summary = response.summary
        self.ttft.observe(summary.ttft_us / 1e6)
        self.tokens.labels("reused").inc(summary.reused_tokens)
        self.tokens.labels("prefilled").inc(summary.prefilled_tokens)
        self.tokens.labels("completion").inc(summary.completion_tokens)

    def watch(self, snapshot: Snapshot, audit_records: Callable[[], int]) -> None:
        """Serve the daemon's live state: ``snapshot`` is called once per scrape."""
        self.registry.register(_LiveCollector(snapshot, audit_records))


class _LiveCollector(Collector):
    """Reads the daemon's state when scraped."""

    def __init__(self, snapshot: Snapshot, audit_records: Callable[[], int]) -> None:
        self._snapshot = snapshot
        self._audit_records = audit_records

    def describe(self) -> list[Any]:
        return []  # no registration-time collect(): the daemon is not serving yet

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        yield _gauge("memosd_cubes", "Cubes.", s.cube_count)
        yield _gauge("memosd_mounts", "Open mounts.", s.mount_count)
        yield _gauge("memosd_items", "Items at the cubes' HEAD.", s.item_count)
        yield _gauge("memosd_store_bytes", "RocksDB's size on disk.", s.store_bytes)
        yield _gauge("memosd_disk_full", "1 while the data dir's disk is full (writes refused, reads served).",
                     int(s.disk_full))
        yield _gauge("memosd_disk_free_bytes", "Bytes free on the data dir's file system.", s.disk_free_bytes)
        index = GaugeMetricFamily("memosd_index_bytes", "Index files on disk, all cubes.", labels=("kind",))
        index.add_metric(("dense",), s.dense_index_bytes)
        index.add_metric(("lexical",), s.lexical_index_bytes)
        yield index

        pool = s.kv_pool
        yield _gauge("memosd_kv_pool_bytes", "KV caches held in the pool.", pool.bytes_used)
        yield _gauge("memosd_kv_pool_budget_bytes", "The KV pool's budget (runtime.pool_bytes).", pool.budget_bytes)
        yield _gauge("memosd_kv_pool_entries", "KV caches in the pool.", pool.entries)
        yield _counter("memosd_kv_pool_hits", "KV cache lookups served from the pool.", pool.hits)
        yield _counter("memosd_kv_pool_misses", "KV cache lookups not in the pool (loaded or computed).",
                       pool.misses)
        yield _counter("memosd_kv_pool_evictions", "KV caches dropped from the pool.", pool.evictions)
        yield _gauge("memosd_kv_persisted_bytes", "KV caches persisted in the store.", pool.persisted_bytes)

        model = s.model
        yield _gauge("memosd_model_ready", "1 when the model is loaded and serving activation memory.",
                     model.state == "ready")
        yield _gauge("memosd_runtime_queue_depth", "Model work waiting for the runtime worker.", model.queue_depth)
        yield _gauge("memosd_active_generations", "Generate calls in progress.", model.active_generations)

        adapters = s.adapters
        yield _gauge("memosd_adapters_resident", "LoRA adapters loaded in the model.", adapters.resident)
        yield _gauge("memosd_adapters_max_resident", "runtime.max_adapters.", adapters.max_resident)
        yield _counter("memosd_adapter_loads", "LoRA adapters loaded into the model.", adapters.loads)
        yield _counter("memosd_adapter_evictions", "LoRA adapters unloaded from the model.", adapters.evictions)
        yield _counter("memosd_adapter_switches", "Changes of the adapter the model runs with.", adapters.switches)

        yield _counter("memosd_audit_records", "Records in the audit log (its last sequence number).",
                       self._audit_records())
        if s.HasField("cluster"):  # a cluster node: its own view (each node is scraped on its own)
            yield from _cluster(s.cluster)


def _cluster(c: Any) -> Iterator[Any]:
    """The Stats syscall's cluster section as series (a single node has none)."""
    yield _gauge("memosd_cluster_joined", "1 while this node is registered under a live etcd lease.", float(c.joined))
    yield _gauge("memosd_cluster_etcd_ok", "1 when this node's last call to etcd worked (0: no quorum or no "
                 "endpoint answered; directory and grant changes are refused meanwhile).", float(not c.last_error))
    yield _gauge("memosd_cluster_members", "Live cluster members, as this node last read them.", len(c.members))
    cubes = GaugeMetricFamily("memosd_cluster_cubes", "Cubes by owner node, from this node's directory view.",
                              labels=("node",))
    counts = {node: 0 for node in c.members} | dict(c.cubes_per_node)  # a live member with none shows 0
    for node, count in sorted(counts.items()):
        cubes.add_metric([node], count)
    yield cubes
    yield _gauge("memosd_cluster_cubes_not_served", "Local cubes the directory gives to another node.",
                 len(c.not_served))
    yield _gauge("memosd_cluster_cubes_missing", "Cubes the directory gives to this node that it does not hold.",
                 len(c.missing))
    yield _gauge("memosd_cluster_cubes_moving", "Cubes being moved out of or into this node now.", len(c.moving))
    yield _counter("memosd_cluster_forwarded_calls", "Calls this node forwarded to their cube's owner.",
                   c.forwarded_calls)
    moves = CounterMetricFamily("memosd_cluster_moves", "Cube moves: driven out and finished, given up, received.",
                                labels=("outcome",))
    for outcome, count in (("out", c.moves_out), ("given_up", c.moves_failed), ("in", c.moves_in)):
        moves.add_metric([outcome], count)
    yield moves
    yield _counter("memosd_cluster_lease_renewals", "Membership leases granted again after one lapsed.",
                   c.lease_renewals)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every 15 s would drown the log."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper never holds up shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The /metrics endpoint: bound when made (so a taken port fails startup), served from ``start``."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        bare = host.strip("[]")  # "[::1]" in config, "::1" to the socket
        # The family of whatever the host resolves to (an IPv6 literal needs AF_INET6); OSError if none.
        family = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        self._httpd = make_server(bare, int(port), make_wsgi_app(registry), server_class, _QuietHandler)
        self.address = f"{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, which never began otherwise
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
