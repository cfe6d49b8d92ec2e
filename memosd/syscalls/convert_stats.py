"""The Stats value (services/stats.py) -> memos.v1 messages (Stats, SchedulerStatus)."""

from __future__ import annotations

from dataclasses import asdict

from memosd_client.v1 import memos_pb2 as pb

from memosd.cluster.node import ClusterStatus
from memosd.services.stats import AdapterPoolStats, KVPoolStats, ModelStats, Stats
from memosd.syscalls.convert import ts


def model(value: ModelStats) -> pb.ModelStats:
    serving = value.engine_stats
    return pb.ModelStats(state=value.state, error=value.error, name=value.name, fingerprint=value.fingerprint,
                         device=value.device, dtype=value.dtype, context_length=value.context_length,
                         queue_depth=value.queue_depth, active_generations=value.active_generations,
                         worker_jobs_started=value.worker_jobs_started, engine=value.engine,
                         engine_stats=pb.EngineStats(**asdict(serving)) if serving is not None else None)


def kv_pool(value: KVPoolStats) -> pb.KVPoolStats:
    return pb.KVPoolStats(entries=value.entries, bytes_used=value.bytes_used, budget_bytes=value.budget_bytes,
                          hits=value.hits, misses=value.misses, evictions=value.evictions,
                          persisted_bytes=value.persisted_bytes)


def cluster(value: ClusterStatus | None) -> pb.ClusterStats | None:
    if value is None:
        return None  # a single node: the field stays unset
    return pb.ClusterStats(node_name=value.node_name, address=value.address, joined=value.joined,
                           members=list(value.members), members_age_seconds=value.members_age_seconds,
                           lease_renewals=value.lease_renewals, last_error=value.last_error,
                           not_served=list(value.not_served), missing=list(value.missing),
                           forwarded_calls=value.forwarded_calls, moves_out=value.moves_out,
                           moves_failed=value.moves_failed, moves_in=value.moves_in, moving=list(value.moving),
                           member_records=[pb.ClusterMember(name=m.name, address=m.address,
                                                            started=ts(int(m.started * 1e9)), version=m.version)
                                           for m in value.member_records],
                           cubes_per_node=dict(value.cubes_per_node), etcd_endpoints=list(value.etcd_endpoints))


def adapters(value: AdapterPoolStats) -> pb.AdapterPoolStats:
    return pb.AdapterPoolStats(resident=value.resident, max_resident=value.max_resident, loads=value.loads,
                               evictions=value.evictions, stored=value.stored, stored_bytes=value.stored_bytes,
                               switches=value.switches, switch_us_total=value.switch_us_total,
                               load_us_total=value.load_us_total)


def stats(value: Stats, calls: dict[str, int] | None = None) -> pb.StatsResponse:
    """The StatsResponse; ``calls`` (the gate's counts by syscall) fills its map."""
    response = pb.StatsResponse(
        version=value.version, uptime_seconds=value.uptime_seconds, cube_count=value.cube_count,
        mount_count=value.mount_count, item_count=value.item_count, version_count=value.version_count,
        embedder=value.embedder, embedding_dim=value.embedding_dim, store_bytes=value.store_bytes,
        dense_index_bytes=value.dense_index_bytes, lexical_index_bytes=value.lexical_index_bytes,
        rss_bytes=value.rss_bytes, model=model(value.model), kv_pool=kv_pool(value.kv_pool),
        adapters=adapters(value.adapters), disk_full=value.disk_full, disk_free_bytes=value.disk_free_bytes,
        audit_unaudited_calls=value.audit_unaudited_calls, cluster=cluster(value.cluster))
    response.calls.update(calls or {})
    return response
