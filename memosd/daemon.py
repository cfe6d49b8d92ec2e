"""memosd: wiring only. config -> store -> indexes -> kernel -> gRPC server; main().

Data dir layout:
    store/            RocksDB (the source of truth)
    index/{cube_id}/  derived indexes: dense.usearch, lexical/ (rebuilt from store when missing/behind)
    models/{sha16}/   the builtin model's dequantized weights (runtime.cache_dir, if set, holds it instead)
    daemon.json       {"pid", "address", "metrics_address", "http_address"} of the running daemon (removed on clean exit)
    admin.token       the bootstrap admin's token (mode 0600), written at first start
    LOCK              held (flock) while a daemon uses the dir
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from memosd_client.v1 import memos_pb2 as pb

from memosd import __version__, config_toml
from memosd.activation.activator import Activator
from memosd.activation.generator import Generator
from memosd.activation.scheduler import Scheduler
from memosd.cluster.etcd import EtcdError
from memosd.cluster.grants import EtcdGovernance
from memosd.cluster.marks import MoveMarks
from memosd.cluster.move import CubeMover
from memosd.cluster.node import ClusterNode, ClusterStartError, ClusterStatus
from memosd.cluster.settings import ClusterSettings, fixed_of, settings_of
from memosd.config import Config, ConfigError, QuotasConfig, SearchConfig, build_arg_parser, load_config
from memosd.errors import ClusterUnavailable, DiskFull
from memosd.eventloop import EventLoopThread
from memosd.governance.access import AccessControl
from memosd.governance.audit import AuditLog
from memosd.governance.principals import Principals
from memosd.kernel.kernel import Kernel
from memosd.kernel.ports import NO_DIRECTORY, Ranker
from memosd.kernel.search import Searcher, SearchSettings
from memosd.kernel.usage import UsageTracker
from memosd.listen_check import unbindable
from memosd.logfmt import log_event, setup_logging
from memosd.metrics import Metrics, MetricsServer
from memosd.parametric.adapters import SPOOL_PREFIX, AdapterService
from memosd.parametric.jobs import JobManager
from memosd.periodic import Periodic
from memosd.runtime.host import ModelHost
from memosd.sdnotify import SystemdNotifier
from memosd.services.cubes import CubeRemoval
from memosd.services.erasure import Erasure
from memosd.services.lifecycle import LifecycleLoop
from memosd.services.stats import StatsService
from memosd.store.blocks import RocksBlockStores
from memosd.store.rocks import PROBE_MIN_FREE_BYTES, SchemaMismatch, Store
from memosd.store.space import free_bytes, is_no_space
from memosd.syscalls import convert_stats
from memosd.syscalls.cluster_list import ClusterLister
from memosd.syscalls.gate import Gate
from memosd.syscalls.openai_http import HttpServer
from memosd.syscalls.registry import SERVICE_NAME, generic_handler
from memosd.syscalls.router import Router
from memosd.syscalls.servicer import MemOSServicer

log = logging.getLogger("memosd.daemon")

# The health service's name for the write path: NOT_SERVING while the disk is full (reads are still served,
# so "" and memos.v1.MemOS stay SERVING and health-checked channels keep sending reads).
WRITES_HEALTH_SERVICE = f"{SERVICE_NAME}/writes"
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


def _disk_full_at_start(data_dir: Path) -> str:
    return (f"the disk of data dir {data_dir} is full ({free_bytes(data_dir)} bytes free); free space or grow "
            "the volume, then start memosd again")


def _grpc_listen_error(listen: str, reason: str) -> str:
    return (f"cannot listen on {listen}: {reason}; choose another address with --listen HOST:PORT "
            "(config server.listen, env MEMOSD_LISTEN; port 0 picks a free one)")


def _metrics_listen_error(listen: str, reason: str) -> str:
    return (f"cannot serve metrics on {listen}: {reason}; set metrics.listen to a free \"host:port\" "
            '(--set metrics.listen=HOST:PORT, env MEMOSD_METRICS__LISTEN), or "" to turn metrics off')


def _http_listen_error(listen: str, reason: str) -> str:
    return (f"cannot serve the OpenAI-compatible API on {listen}: {reason}; set http.listen to a free \"host:port\" "
            '(--set http.listen=HOST:PORT, env MEMOSD_HTTP__LISTEN), or "" to turn it off')


def check_ports(config: Config) -> None:
    """Every listen address, before anything slow loads: a taken port is the common way a start fails."""
    reason = unbindable(config.server.listen)
    if reason is not None:
        raise StartupError(_grpc_listen_error(config.server.listen, reason))
    if config.metrics.listen:
        reason = unbindable(config.metrics.listen, first_only=True)
        if reason is not None:
            raise StartupError(_metrics_listen_error(config.metrics.listen, reason))
    if config.http.listen:
        reason = unbindable(config.http.listen, first_only=True)
        if reason is not None:
            raise StartupError(_http_listen_error(config.http.listen, reason))


def _lock_data_dir(data_dir: Path) -> IO[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "LOCK", "a+")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(f"data dir {data_dir} is in use by another memosd; stop it or use --data-dir") from None
    return handle


@dataclass
class Daemon:
    config: Config
    kernel: Kernel
    host: ModelHost
    activator: Activator
    server: grpc.aio.Server
    loop: EventLoopThread  # the server's event loop
    servicer: MemOSServicer
    health: health_aio.HealthServicer
    address: str
    lock_handle: IO[str]
    started: float
    stop_event: threading.Event
    audit: AuditLog
    store: Store  # the disk watch and health read its space alarm
    stats_service: StatsService
    metrics_server: MetricsServer | None = None  # None: metrics.listen = ""
    lifecycle: LifecycleLoop | None = None  # None: lifecycle.enabled = false
    http_server: HttpServer | None = None  # None: http.listen = ""
    cluster: ClusterNode | None = None  # None: a single node (cluster.etcd = [])
    router: Router | None = None  # a cluster node's forwarding (syscalls/router.py)
    governance: EtcdGovernance | None = None  # a cluster node's principals and grants (cluster/grants.py)

    def stats(self) -> pb.StatsResponse:
        """The Stats message the metrics gauges read (without the gate's call counts)."""
        return convert_stats.stats(self.stats_service.stats())


def make_ranker(search: SearchConfig) -> Ranker:
    """The search ranker the config asks for: one list as is, or both fused."""
    from memosd.index.fusion import fuse, single

    def rank(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], k: int, mode: str) -> list[Any]:
        if mode != "hybrid":
            return single(dense if mode == "dense" else lexical, k, lexical=mode == "lexical")
        return fuse(dense, lexical, k, method=search.fusion, rrf_k=search.rrf_k,  # type: ignore[arg-type]
                    dense_weight=search.dense_weight, lexical_weight=search.lexical_weight)

    return rank


def _add_port(server: grpc.aio.Server, config: Config) -> int:
    """Plain gRPC by default (loopback); TLS, and mTLS with a client CA, when security.tls_* say so."""
    security = config.security
    if not security.tls_cert_file:
        return int(server.add_insecure_port(config.server.listen))
    try:
        key = Path(security.tls_key_file).expanduser().read_bytes()
        cert = Path(security.tls_cert_file).expanduser().read_bytes()
        client_ca = (Path(security.tls_client_ca_file).expanduser().read_bytes()
                     if security.tls_client_ca_file else None)
    except OSError as error:
        raise StartupError(f"cannot read a TLS file: {error}; check security.tls_*") from None
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    return int(server.add_secure_port(config.server.listen, credentials))


def _node_credentials(config: Config) -> grpc.ChannelCredentials | None:
    """TLS for calls forwarded to the other nodes when this node serves TLS (they are configured alike):
    trusting cluster.tls_ca_file (else the client CA, else the system's roots) and presenting this node's
    own certificate, for the nodes that demand one (mTLS). None: plaintext, as the node serves."""
    security = config.security
    if not security.tls_cert_file:
        return None
    ca_file = config.cluster.tls_ca_file or security.tls_client_ca_file
    try:
        ca = Path(ca_file).expanduser().read_bytes() if ca_file else None
        key = Path(security.tls_key_file).expanduser().read_bytes()
        cert = Path(security.tls_cert_file).expanduser().read_bytes()
    except OSError as error:
        raise StartupError(f"cannot read a TLS file: {error}; check security.tls_* and cluster.tls_ca_file") from None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def build(config: Config) -> Daemon:
    """Open everything and bind the port; nothing is served until `server.start()`."""
    # Imported here: torch and friends take seconds; `memosd --help` should not.
    from memosd.index.cube_index import CubeIndex
    from memosd.index.embedder import Embedder

    lock_handle = _lock_data_dir(config.data_dir)
    try:
        check_ports(config)
    except StartupError:
        lock_handle.close()
        raise
    log_event(log, "ports_free", listen=config.server.listen, metrics=config.metrics.listen or "off",
              http=config.http.listen or "off")
    cluster = None
    if config.cluster.etcd:  # etcd answers and our node name is free, before the slow part too
        cluster = ClusterNode(config.cluster)
        try:
            cluster.check()
        except ClusterStartError as error:
            lock_handle.close()
            raise StartupError(str(error)) from None
        log_event(log, "cluster_checked", etcd=",".join(config.cluster.etcd), node=config.cluster.node_name)
    if free_bytes(config.data_dir) < PROBE_MIN_FREE_BYTES:
        raise StartupError(_disk_full_at_start(config.data_dir))
    embedder = Embedder.load(config.embedder.model, config.embedder.device, config.embedder.batch_size)
    quotas = config.quotas
    if cluster is not None:  # the cluster config: written by the first node, checked by the others
        quotas = _agree(config, cluster, embedder.fingerprint, embedder.dim, lock_handle)
    try:
        store = Store(config.data_dir / "store")
    except SchemaMismatch as error:
        raise StartupError(str(error)) from None
    kernel = Kernel(store, embedder, CubeIndex.open, config.data_dir / "index", config.limits,
                    sync_commits=config.store.sync_commits, quotas=quotas,
                    directory=cluster.claims if cluster is not None else NO_DIRECTORY)
    kernel.open()
    search = config.search
    searcher = Searcher(kernel, make_ranker(search), SearchSettings(
        depth=search.depth, exact_below=search.exact_below, session_match_weight=search.session_match_weight,
        period_lift=search.period_lift))
    # The model loads on the runtime worker in the background; activation syscalls wait for it.
    model_host = ModelHost(config.runtime, Path(config.runtime.cache_dir).expanduser()
                           if config.runtime.cache_dir else config.data_dir,
                           block_stores=lambda fingerprint: RocksBlockStores(store, fingerprint))
    adapters = AdapterService(kernel, model_host, spool=store.path.parent / "uploads")  # beside the store
    usage = UsageTracker(store)
    activator = Activator(kernel, model_host, adapters, usage, store=store)
    generator = Generator(model_host, activator, searcher)

    started = time.time()
    stop_event = threading.Event()
    governance = _cluster_governance(config, cluster, store) if cluster is not None else None
    principals = Principals(governance if governance is not None else store)
    try:  # on a cluster node: the first node to start makes the admin in etcd, the others find it
        token_file = principals.bootstrap_admin(config.data_dir) if config.security.auth else None
    except ClusterUnavailable as error:
        raise StartupError(f"cannot make the cluster's first admin: {error.message}") from None
    if token_file is not None:
        log_event(log, "admin_created", token_file=str(token_file),
                  hint="the admin's token; memosctl reads it from there, or pass it with --token-file")
    if not config.security.auth:
        log_event(log, "auth_disabled", level=logging.WARNING,
                  hint="security.auth = false: every caller acts as an admin; never do this outside a benchmark")
    access = AccessControl(kernel, principals)
    if governance is not None:  # disabled on any node: its mounts here close too
        governance.on_disabled = access.close_mounts
    # A job commits its result only while the principal that started it still holds the train right.
    jobs = JobManager(kernel, model_host,
                      commit_guard=access.still_holds, store=store,
                      extract_endpoints=config.reader.endpoints)
    metrics = Metrics() if config.metrics.listen else None
    audit = AuditLog(store, enabled=config.security.audit,
                     unauthenticated_window=config.security.audit_unauthenticated_window_seconds)
    gate = Gate(principals, access, audit, jobs, auth=config.security.auth, metrics=metrics, server=config.server,
                quotas=quotas)
    if cluster is not None:  # a quota changed with memosctl cluster config set applies here when the watch brings it
        cluster.on_settings.append(lambda found: _apply_quotas(config, kernel, gate, found))
    gate.placement = cluster is not None
    router = (Router(cluster.view, config.cluster.node_name, max_message_bytes=config.server.max_message_bytes,
                     credentials=_node_credentials(config))
              if cluster is not None else None)
    scheduler = (Scheduler(kernel, activator, model_host, usage, jobs=jobs,
                           interval=config.scheduler.interval_seconds, max_per_tick=config.scheduler.max_per_tick)
                 if config.scheduler.enabled else None)
    stats = StatsService(kernel, model_host, activator, audit, started,
                         cluster=_cluster_status(cluster, router) if cluster is not None else None)
    # One Erasure for Purge and the lifecycle loop: the one path by which items are purged.
    erasure = Erasure(kernel, activator, usage)
    removal = CubeRemoval(kernel, adapters, activator, access, usage)
    servicer = MemOSServicer(kernel, searcher, activator, generator, adapters, jobs, stats.stats, gate, usage,
                             scheduler, erasure=erasure, removal=removal)
    servicer.max_message_bytes = config.server.max_message_bytes
    if cluster is not None:  # the cluster config, and ListCubes across the cluster (syscalls/cluster_list.py)
        servicer.cluster = cluster
        servicer.lister = ClusterLister(cluster.view, config.cluster.node_name, credentials=_node_credentials(config),
                                        max_message_bytes=config.server.max_message_bytes)
    if cluster is not None:  # moves between nodes (cluster/move.py), driven by the owner
        cluster.mover = servicer.mover = CubeMover(
            kernel, cluster.client, cluster.view, config.cluster.node_name, MoveMarks(config.data_dir / "moves"),
            adapters.spool, _drop_local(kernel, removal), spool_prefix=SPOOL_PREFIX + "move-")
    # The loop's own changes are not syscalls, so it appends their audit records itself.
    lifecycle = (LifecycleLoop(kernel, audit, erasure.erase, interval=config.lifecycle.interval_seconds,
                               grace_seconds=config.lifecycle.expire_grace_seconds)
                 if config.lifecycle.enabled else None)
    loop = EventLoopThread()
    try:
        server, health_servicer, port = loop.call(_make_server(config, servicer, router))
    except RuntimeError as error:
        loop.close()
        gate.close()
        model_host.close()
        kernel.close()
        raise StartupError(_grpc_listen_error(config.server.listen, str(error))) from None
    metrics_server = None
    if metrics is not None:
        try:
            metrics_server = MetricsServer(config.metrics.listen, metrics.registry)
        except OSError as error:
            loop.close()
            gate.close()
            model_host.close()
            kernel.close()
            raise StartupError(_metrics_listen_error(config.metrics.listen, error.strerror or str(error))) from None
    http_server = None
    if config.http.listen:
        try:
            http_server = HttpServer(config.http.listen, servicer, router)
        except OSError as error:
            if metrics_server is not None:
                metrics_server.stop()
            loop.close()
            gate.close()
            model_host.close()
            kernel.close()
            raise StartupError(_http_listen_error(config.http.listen, error.strerror or str(error))) from None
    host = config.server.listen.rsplit(":", 1)[0]
    # Called from whichever thread noticed: scheduled on the loop, never awaited (it may be the loop's thread).
    store.space.on_change(lambda full: loop.submit(health_servicer.set(
        WRITES_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING if full
        else health_pb2.HealthCheckResponse.SERVING)))
    daemon = Daemon(config, kernel, model_host, activator, server, loop, servicer, health_servicer,
                    f"{host}:{port}", lock_handle, started, stop_event, audit, store, stats, metrics_server,
                    lifecycle, http_server, cluster, router, governance)
    if metrics is not None:
        metrics.watch(daemon.stats, lambda: gate.audit.seq)
    return daemon


def _agree(config: Config, cluster: ClusterNode, fingerprint: str, dim: int, lock_handle: IO[str]) -> QuotasConfig:
    """Write or check the cluster config (cluster/settings.py) before anything is served; the quotas to apply."""
    ours = ClusterSettings(fixed_of(config, fingerprint, dim), settings_of(config.quotas),
                           created_by=config.cluster.node_name, updated_by=config.cluster.node_name,
                           update_ns=time.time_ns())
    try:
        stored = cluster.agree(ours)
    except ClusterStartError as error:
        lock_handle.close()
        raise StartupError(str(error)) from None
    return stored.quotas(config.quotas)


def _apply_quotas(config: Config, kernel: Kernel, gate: Gate, found: ClusterSettings) -> None:
    quotas = found.quotas(config.quotas)
    kernel.set_quotas(quotas)
    gate.admission.set_quotas(quotas)


def _drop_local(kernel: Kernel, removal: CubeRemoval) -> Callable[[str], None]:
    """A move's old copy, or a received one the directory does not give to this node, goes as FreeCube's
    does (store rows, indexes, pooled KV, adapters, grants, usage), this node only: the directory stays."""
    def drop(cube_id: str) -> None:
        if kernel.has_cube(cube_id):
            removal.free(cube_id, local=True)

    return drop
def _cluster_governance(config: Config, cluster: ClusterNode, store: Store) -> EtcdGovernance:
    """A cluster node's principals and grants: etcd's, read before anything is served; this node's own
    (from before it was a member) copied in once where absent (cluster/grants.py, migrate)."""
    lease = config.cluster.lease_seconds
    governance = EtcdGovernance(cluster.client, check_seconds=lease / 3, trust_seconds=lease)
    try:
        governance.start()
        principals, grants = governance.migrate(config.cluster.node_name, store.iter_principals(),
                                                store.iter_grants())
    except (EtcdError, ClusterUnavailable) as error:
        governance.stop()
        raise StartupError(f"cannot read the cluster's principals and grants at {', '.join(config.cluster.etcd)} "
                           f"(cluster.etcd): {error}") from None
    log_event(log, "cluster_access_read", principals=len(governance.principals()), grants=len(governance.grants()),
              migrated_principals=principals, migrated_grants=grants)
    return governance


def _cluster_status(cluster: ClusterNode, router: Router | None) -> Callable[[], ClusterStatus]:
    """Stats' cluster section: the node's status with the router's count of forwarded calls."""
    return lambda: replace(cluster.status(), forwarded_calls=router.forwarded if router is not None else 0,
                           moving=tuple(sorted(cluster.mover.kernel.moving())) if cluster.mover is not None else ())


async def _make_server(config: Config, servicer: MemOSServicer, router: Router | None = None) -> tuple[grpc.aio.Server, health_aio.HealthServicer,
                                                                        int]:
    """The asyncio gRPC server (made on its loop): MemOS, health (answered on the loop, whatever the
    executor is doing), reflection; bound, not started."""
    options = [("grpc.max_receive_message_length", config.server.max_message_bytes),
               ("grpc.max_send_message_length", config.server.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((generic_handler(servicer, router),))
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _serve_reflection(server, (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME))
    return server, health_servicer, _add_port(server, config)


def _serve_reflection(server: grpc.aio.Server, names: tuple[str, ...]) -> None:
    """Server reflection (grpcurl, grpcui, Postman), as v1alpha and as v1.

    grpcio-reflection implements only v1alpha. v1's messages are v1alpha's, field for field (v1 is the
    same proto promoted), so the v1alpha servicer also answers under v1's name: clients that ask for v1
    first (recent grpcurl) get an answer instead of falling back. v1 is not in the listed services: its
    descriptor is not in the pool, and a listed service should describe itself."""
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE, {"ServerReflectionInfo": v1}),))


async def _set_health(servicer: health_aio.HealthServicer, full: bool) -> None:
    for service in ("", SERVICE_NAME):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    await servicer.set(WRITES_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING if full
                       else health_pb2.HealthCheckResponse.SERVING)


def _index_saver(daemon: Daemon) -> None:
    """Persist changed dense indexes now and then; the store stays the source of truth."""
    while not daemon.stop_event.wait(daemon.config.index.save_interval_seconds):
        try:
            daemon.kernel.save_indexes()
        except Exception as exc:  # keep serving; the next start catches up from the store
            log_event(log, "index_save_failed", level=logging.ERROR, error=repr(exc))


def _watch_disk(daemon: Daemon) -> None:
    """While the disk is full, look for room again; close the audit log's ended windows."""
    daemon.store.recheck_space()
    daemon.audit.tick()


def _at_shutdown(step: str, fn: Callable[[], object]) -> None:
    """A shutdown step that needs the disk: with the disk full, log it and go on to close the store."""
    try:
        fn()
    except DiskFull:
        log_event(log, "shutdown_step_skipped", level=logging.WARNING, step=step, reason="disk full")


class StopSignals:
    """SIGTERM / SIGINT, noted by the handler and acted on by the main thread.

    Python runs a signal handler in the main thread, but the kernel may deliver the signal to any
    thread (gRPC's, the runtime worker's): the C-level handler then only flags it, and a main thread
    blocked in ``Event.wait()`` with no timeout is not woken to run the Python handler. Under load the
    daemon ignored SIGTERM this way (no "signal" line, main thread in a lock wait). So ``serve`` waits in
    short slices and checks; and the handler itself only appends to a list (atomic, no Python-level
    lock: a handler that takes a lock the interrupted code holds, the stop Event's or logging's, would
    deadlock).
    """

    POLL_SECONDS = 0.2  # how soon a signal is acted on

    def __init__(self) -> None:
        self.received: list[int] = []

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handler)
        signal.signal(signal.SIGINT, self.handler)

    def wait(self, stop_event: threading.Event) -> None:
        """Until a signal arrives (then sets ``stop_event`` for the daemon's threads) or it is set."""
        while not stop_event.wait(self.POLL_SECONDS):
            if self.received:
                log_event(log, "signal", signal=signal.Signals(self.received[0]).name)
                stop_event.set()


def _stop_if_name_lost(daemon: Daemon, name_lost: threading.Event) -> None:
    """Stop the daemon (exit 1) if another node took our node name while our lease had lapsed: the directory
    and every forwarded call now mean that node by the name, so this one must not serve a cube it owned."""
    assert daemon.cluster is not None and daemon.cluster.registration is not None
    lost = daemon.cluster.registration.lost
    while not daemon.stop_event.is_set():
        if lost.wait(0.5):
            reason = (f"cluster.node_name {daemon.config.cluster.node_name!r} was taken by another member while "
                      "this node's lease had lapsed (etcd was out of reach); this node stops rather than serve "
                      "cubes the directory now gives to that member. Restart it under its name once that "
                      "member is gone, or under another name")
            log_event(log, "cluster_name_lost", level=logging.ERROR, reason=reason)
            print(f"memosd: {reason}", file=sys.stderr)
            name_lost.set()
            daemon.stop_event.set()
            return


def serve(daemon: Daemon, notifier: SystemdNotifier, signals: StopSignals | None = None) -> int:
    """Serve until SIGTERM; returns the exit code (1: the start failed, for lack of disk space or a cluster
    that could not be joined; or a cluster node lost its node name)."""
    disk_watch = Periodic(lambda: _watch_disk(daemon), daemon.config.store.disk_check_seconds, "disk_watch", log)
    disk_watch.start()
    if daemon.servicer.usage is not None:
        daemon.servicer.usage.start()  # its flusher runs only while the daemon serves
    if daemon.servicer.scheduler is not None:
        daemon.servicer.scheduler.start()
    if daemon.lifecycle is not None:
        daemon.lifecycle.start()
    daemon.loop.call(daemon.server.start())
    metrics_address = ""
    if daemon.metrics_server is not None:
        daemon.metrics_server.start()
        metrics_address = daemon.metrics_server.address
    http_address = ""
    if daemon.http_server is not None:
        daemon.loop.call(daemon.http_server.start())
        http_address = daemon.http_server.address
    daemon.loop.call(_set_health(daemon.health, daemon.store.space.full))
    address_file = daemon.config.data_dir / "daemon.json"
    exit_code = 0
    failure = ""
    if daemon.cluster is not None:  # a member in the list is one that serves: joined only now
        try:
            daemon.cluster.join(daemon.address,
                                lambda: [(r.cube_id, r.name, r.owner) for r in daemon.kernel.cube_records()])
        except ClusterStartError as error:
            failure = str(error)
    if not failure:
        try:
            address_file.write_text(json.dumps({"pid": os.getpid(), "address": daemon.address,
                                                "metrics_address": metrics_address, "http_address": http_address}))
        except OSError as error:  # the disk filled up during the start
            if not is_no_space(error):
                raise
            failure = _disk_full_at_start(daemon.config.data_dir)
    if failure:  # stop cleanly, as if asked to
        log_event(log, "startup_failed", level=logging.ERROR, reason=failure)
        print(f"memosd: {failure}", file=sys.stderr)
        daemon.stop_event.set()
        exit_code = 1
    else:
        log_event(log, "serving", address=daemon.address, metrics=metrics_address or "off", http=http_address or "off",
                  data_dir=daemon.config.data_dir, version=__version__, cubes=len(daemon.kernel.cube_ids()))
        notifier.ready(f"serving on {daemon.address}")
        notifier.start_watchdog(lambda: not daemon.stop_event.is_set())
        threading.Thread(target=_index_saver, args=(daemon,), name="index-saver", daemon=True).start()
    name_lost = threading.Event()
    if daemon.cluster is not None and not failure:
        threading.Thread(target=_stop_if_name_lost, args=(daemon, name_lost), name="cluster-name-watch",
                         daemon=True).start()

    (signals or StopSignals()).wait(daemon.stop_event)
    if name_lost.is_set():
        exit_code = 1
    log_event(log, "stopping", grace_seconds=daemon.config.server.grace_seconds)
    notifier.stopping("draining in-flight calls")
    if daemon.cluster is not None:  # out of the member list first, so no one sends us new calls
        daemon.cluster.leave()
    if daemon.governance is not None:
        daemon.governance.stop()
    # Calls that reach the gate from now on (an HTTP chat, a gRPC call racing the stop) are refused with
    # SHUTTING_DOWN, which clients retry against the restarted daemon; calls already in flight finish.
    daemon.servicer.gate.draining = True
    daemon.loop.call(daemon.health.enter_graceful_shutdown())
    # Refuses new calls at once; in-flight calls get up to grace_seconds to finish.
    daemon.loop.call(daemon.server.stop(daemon.config.server.grace_seconds))
    # Before the router: a chat on another node's cubes (syscalls/openai_owner.py) uses its channels.
    if daemon.http_server is not None:  # its open replies see their calls end (gate.close below) and stop
        daemon.loop.call(daemon.http_server.stop())
    if daemon.router is not None:  # its channels to the other nodes, once no call uses them
        daemon.loop.call(daemon.router.close())
    if daemon.servicer.lister is not None:
        daemon.servicer.lister.close()
    daemon.servicer.gate.close()
    daemon.loop.close()
    if daemon.metrics_server is not None:  # before the parts it reads are closed
        daemon.metrics_server.stop()
    notifier.stop_watchdog()
    if daemon.servicer.scheduler is not None:
        daemon.servicer.scheduler.close()  # cancels a background activation between chunks
    if daemon.lifecycle is not None:
        daemon.lifecycle.close()  # finishes its current step (a commit or a purge) first
    daemon.servicer.jobs.close()
    daemon.host.close()
    if daemon.servicer.usage is not None:
        _at_shutdown("usage_flush", daemon.servicer.usage.close)  # the last counts, before the store closes
    disk_watch.close()
    daemon.audit.close()  # pending aggregate records (kept in memory only if the disk is still full)
    daemon.kernel.close()  # with the disk full: the index save and the flush are skipped and logged
    address_file.unlink(missing_ok=True)
    daemon.lock_handle.close()
    log_event(log, "stopped", disk_full=daemon.store.space.full)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"memosd: config error: {error}", file=sys.stderr)
        return 2
    if build_arg_parser().parse_args(sys.argv[1:] if argv is None else argv).print_config:
        print(config_toml.render(config), end="")
        return 0
    setup_logging(config.log.level)
    log_event(log, "starting", version=__version__, pid=os.getpid(), listen=config.server.listen,
              data_dir=config.data_dir, config_file=config.config_file, embedder=config.embedder.model)
    notifier = SystemdNotifier()
    try:
        daemon = build(config)
    except StartupError as error:
        log_event(log, "startup_failed", level=logging.ERROR, reason=str(error))
        print(f"memosd: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the disk filled up while opening: RocksDB is crash-safe, exiting is enough
        if not is_no_space(error):
            raise
        reason = _disk_full_at_start(config.data_dir)
        log_event(log, "startup_failed", level=logging.ERROR, reason=reason)
        print(f"memosd: {reason}", file=sys.stderr)
        return 1

    signals = StopSignals()
    signals.install()
    return serve(daemon, notifier, signals)


if __name__ == "__main__":
    raise SystemExit(main())
