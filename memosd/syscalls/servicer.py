"""The MemOS service: one short handler per syscall (convert the request, call the kernel or the service
(services/) that does the work, convert the result back, note what was used).

Authentication, the rights check, the audit record and error mapping happen
around every handler, in ``gate.Gate``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.activation.activator import Activator
from memosd.activation.generator import GenerationReport, Generator
from memosd.activation.scheduler import Scheduler
from memosd.cluster.move import CubeMover
from memosd.cluster.node import ClusterNode
from memosd.cluster.settings import as_text
from memosd.errors import InvalidField, MoveRefused
from memosd.governance.access import Right
from memosd.kernel.ids import CUBE_ID_RE
from memosd.kernel.kernel import Kernel
from memosd.kernel.requests import RequestRef, request_ref
from memosd.kernel.search import Searcher
from memosd.kernel.types import ItemView
from memosd.kernel.usage import CubeUsage, UsageTracker
from memosd.parametric.adapters import AdapterService
from memosd.parametric.jobs import JobManager
from memosd.park import Park
from memosd.services.cubes import CubeRemoval
from memosd.services.erasure import Erasure
from memosd.services.remember import Remembering
from memosd.services.stats import Stats
from memosd.syscalls import adapter_stream, cube_stream
from memosd.syscalls import convert as cv
from memosd.syscalls import convert_activation as ca
from memosd.syscalls import convert_stats as cs
from memosd.syscalls.cluster_list import ClusterLister
from memosd.syscalls.gate import Call, Gate
from memosd.syscalls.governance import GovernanceHandlers
from memosd.syscalls.move_peer import GrpcMovePeer


class MemOSServicer(GovernanceHandlers):
    """Each public method is a syscall; ``Gate`` wraps them all (authentication, rights, audit, errors)."""

    def __init__(self, kernel: Kernel, searcher: Searcher, activator: Activator, generator: Generator,
                 adapters: AdapterService, jobs: JobManager, stats: Callable[[], Stats],
                 gate: Gate, usage: UsageTracker | None = None, scheduler: Scheduler | None = None, *,
                 erasure: Erasure | None = None, removal: CubeRemoval | None = None) -> None:
        self.kernel = kernel
        self.searcher = searcher
        self.activator = activator
        self.generator = generator
        self.adapters = adapters
        self.jobs = jobs
        self._stats = stats
        self.gate = gate
        self.access = gate.access
        self.usage = usage
        self.scheduler = scheduler
        # The daemon passes the Erasure it gives the lifecycle loop too (one purge path); left out, they
        # are made from this servicer's own parts.
        self.erasure = erasure or Erasure(kernel, activator, usage)
        self.removal = removal or CubeRemoval(kernel, adapters, activator, gate.access, usage)
        self.remembering = Remembering(kernel)
        self.mover: CubeMover | None = None  # a cluster node's (set by the wiring)
        self.cluster: ClusterNode | None = None  # a cluster node's: its name and the cluster config
        self.lister: ClusterLister | None = None  # a cluster node's: ListCubes across the cluster
        self.max_message_bytes = 64 << 20  # the server's limit, for calls to other nodes (set by the wiring)

    # -- cubes ----------------------------------------------------------
    def AllocCube(self, req: pb.AllocCubeRequest, call: Call) -> pb.AllocCubeResponse:
        info = self.kernel.alloc_cube(req.name, req.description, dict(req.labels), owner=call.caller.principal_id,
                                      cube_id=call.placed_cube_id)
        cube = cv.cube(info)
        cube.owner_node = self._node_name()  # where placement put it
        return pb.AllocCubeResponse(header=cv.header(info.record.cube_id, info.record.head), cube=cube)

    def FreeCube(self, req: pb.FreeCubeRequest, call: Call) -> pb.FreeCubeResponse:
        freed = self.removal.free(req.cube)
        return pb.FreeCubeResponse(header=cv.header(freed.cube_id), revisions_deleted=freed.revisions,
                                   versions_deleted=freed.versions, mounts_closed=freed.mounts)

    def _node_name(self) -> str:
        """This node's cluster name ("" on a single node): a cube this node answers for is its own."""
        return self.cluster.config.node_name if self.cluster is not None else ""

    def StatCube(self, req: pb.StatCubeRequest, call: Call) -> pb.StatCubeResponse:
        info = self.kernel.cube_info(self.kernel.cube(req.cube))
        cube = cv.cube(info, self._cube_usage(info.record.cube_id))
        cube.owner_node = self._node_name()
        return pb.StatCubeResponse(header=cv.header(info.record.cube_id, info.record.head), cube=cube)

    def ListCubes(self, req: pb.ListCubesRequest, call: Call) -> pb.ListCubesResponse:
        page = self.kernel.list_cubes(req.page_size, req.page_token,
                                      lambda cube: self.access.visible(call.caller, cube))
        cubes = [cv.cube(c, self._cube_usage(c.record.cube_id)) for c in page.entries]
        next_token = page.next_token
        if self.lister is not None:  # a cluster node: its own, or the cluster's (syscalls/cluster_list.py)
            for cube in cubes:
                cube.owner_node = self.lister.node
            if not req.local:
                caller = call.caller
                cubes, next_token = self.lister.page(
                    req, call.authorization, cubes, next_token,
                    lambda entry: (bool(entry.principal) and entry.principal == caller.principal_id)
                    or self.access.visible_by_id(caller, entry.cube_id))
        return pb.ListCubesResponse(header=cv.header(), cubes=cubes, next_page_token=next_token)

    def ExportCube(self, req: pb.ExportCubeRequest, call: Call) -> Iterator[pb.ExportCubeResponse]:
        with cube_stream.export(self.kernel, req.cube, with_kv=req.with_kv, spool=self.adapters.spool) as (
                info, summary, chunks):
            call.note(cube_id=info.record.cube_id, revision=info.record.head,
                      artifacts=[f"archive:{summary.sha256}"])
            yield pb.ExportCubeResponse(header=cv.header(info.record.cube_id, info.record.head),
                                        archive=cube_stream.archive_message(summary))
            for data in chunks:
                yield pb.ExportCubeResponse(data=data)

    def ImportCube(self, requests: Iterator[pb.ImportCubeRequest], call: Call) -> pb.ImportCubeResponse:
        fingerprints, kv_unavailable = self.activator.kv_fingerprints()
        result = cube_stream.receive_import(self.kernel, requests, self.adapters.spool,
                                            owner=call.caller.principal_id, accept_kv=fingerprints.__contains__,
                                            kv_unavailable=kv_unavailable)
        record = result.cube.record
        if result.kv_loaded:
            self.activator.note_imported(record.cube_id)
        call.note(cube_id=record.cube_id, revision=record.head, artifacts=[f"archive:{result.archive.sha256}"])
        return pb.ImportCubeResponse(
            header=cv.header(record.cube_id, record.head), cube=cv.cube(result.cube),
            archive=cube_stream.archive_message(result.archive), reembedded=result.reembedded,
            kept_cube_id=result.kept_cube_id, kv_loaded=result.kv_loaded, kv_skipped=result.kv_skipped,
            kv_skipped_reason=result.kv_skipped_reason)

    # -- moving a cube between cluster nodes (cluster/move.py) -----------
    def _mover(self) -> CubeMover:
        if self.mover is None:
            raise MoveRefused("this memosd is a single node (cluster.etcd is empty): there is no other node to "
                              "move a cube to or from")
        return self.mover

    def MoveCube(self, req: pb.MoveCubeRequest, call: Call) -> Iterator[pb.MoveCubeProgress]:
        mover = self._mover()
        if not req.to_node:
            raise InvalidField("to_node is required: the node name of a live cluster member", field="to_node")
        peer = GrpcMovePeer(mover.node, call.authorization, max_message_bytes=self.max_message_bytes)
        for step in mover.move(req.cube, req.to_node, req.drain_seconds, peer):
            message = pb.MoveCubeProgress(step=step.step, from_node=step.from_node, to_node=step.to_node,
                                          epoch=step.epoch, archive_bytes=step.archive_bytes,
                                          elapsed_seconds=step.elapsed_seconds)
            if step.cube is not None:
                record = step.cube.record
                message.header.CopyFrom(cv.header(record.cube_id, record.head))
                message.cube.CopyFrom(cv.cube(step.cube))
                call.note(cube_id=record.cube_id, revision=record.head)
            yield message

    def ReceiveCube(self, requests: Iterator[pb.ReceiveCubeRequest], call: Call) -> pb.ReceiveCubeResponse:
        mover = self._mover()
        fingerprints, kv_unavailable = self.activator.kv_fingerprints()
        result = cube_stream.receive_moved(self.kernel, mover, requests, self.adapters.spool,
                                           accept_kv=fingerprints.__contains__, kv_unavailable=kv_unavailable)
        record = result.cube.record
        if result.kv_loaded:
            self.activator.note_imported(record.cube_id)
        call.note(cube_id=record.cube_id, revision=record.head, artifacts=[f"archive:{result.archive.sha256}"])
        return pb.ReceiveCubeResponse(header=cv.header(record.cube_id, record.head), cube=cv.cube(result.cube))

    def SettleCube(self, req: pb.SettleCubeRequest, call: Call) -> pb.SettleCubeResponse:
        if not CUBE_ID_RE.fullmatch(req.cube_id):
            raise InvalidField("cube_id must be a cube id", field="cube_id")
        kept = self._mover().settle(req.cube_id)
        call.note(cube_id=req.cube_id)
        return pb.SettleCubeResponse(header=cv.header(req.cube_id, self.kernel.head(req.cube_id)), kept=kept)

    # -- the cluster config (cluster/settings.py) ------------------------
    def _cluster_node(self) -> ClusterNode:
        if self.cluster is None or self.cluster.settings is None:
            raise InvalidField("this memosd is a single node (cluster.etcd is empty): it has no cluster config; its "
                               "settings are its own configuration's (memosd --print-config)", field="key")
        return self.cluster

    def _config_response(self, node: ClusterNode) -> pb.ClusterConfigResponse:
        settings = node.settings
        assert settings is not None
        response = pb.ClusterConfigResponse(header=cv.header(), fixed=as_text(settings.fixed),
                                            settings=as_text(settings.settings), revision=settings.revision,
                                            created_by=settings.created_by, updated_by=settings.updated_by,
                                            node=node.config.node_name)
        if settings.update_ns:
            response.update_time.CopyFrom(cv.ts(settings.update_ns))
        return response

    def GetClusterConfig(self, req: pb.GetClusterConfigRequest, call: Call) -> pb.ClusterConfigResponse:
        return self._config_response(self._cluster_node())

    def SetClusterConfig(self, req: pb.SetClusterConfigRequest, call: Call) -> pb.ClusterConfigResponse:
        node = self._cluster_node()
        if not req.key:
            raise InvalidField("key is required: a cluster setting such as quotas.max_mounts_per_principal",
                               field="key")
        node.set_setting(req.key, req.value)
        return self._config_response(node)

    # -- mounts ---------------------------------------------------------
    def Mount(self, req: pb.MountRequest, call: Call) -> pb.MountResponse:
        info = self.kernel.mount(req.cube, req.revision, cv.writable(req.mode), call.caller.principal_id)
        call.note(artifacts=[f"mount:{info.record.mount_id}"])
        return pb.MountResponse(header=cv.mount_header(info), mount=cv.mount(info))

    def Unmount(self, req: pb.UnmountRequest, call: Call) -> pb.UnmountResponse:
        info, discarded = self.kernel.unmount(req.mount_id)
        return pb.UnmountResponse(header=cv.mount_header(info), discarded_changes=discarded)

    # -- items ----------------------------------------------------------
    def Write(self, req: pb.WriteRequest, call: Call) -> pb.WriteResponse:
        item_ids, info = self.kernel.write(req.mount_id, cv.item_inputs(list(req.items)),
                                           request=request_ref(call.caller.principal_id, req.request_id))
        call.note(items=item_ids)
        return pb.WriteResponse(header=cv.mount_header(info), item_ids=item_ids, mount=cv.mount(info))

    def Read(self, req: pb.ReadRequest, call: Call) -> pb.ReadResponse:
        if req.item_ids:
            views, info = self.kernel.read(req.mount_id, list(req.item_ids))
            call.note(items=[v.item_id for v in views])
            cube_id = info.record.cube_id
            self._record("read", [cube_id], [(cube_id, v.item_id) for v in views if not v.staged])
            return pb.ReadResponse(header=cv.mount_header(info), items=[self._item(cube_id, v) for v in views])
        page, info = self.kernel.list_items(req.mount_id, req.page_size, req.page_token)
        call.note(items=[v.item_id for v in page.entries])
        return pb.ReadResponse(header=cv.mount_header(info),
                               items=[self._item(info.record.cube_id, v) for v in page.entries],
                               next_page_token=page.next_token)

    def Forget(self, req: pb.ForgetRequest, call: Call) -> pb.ForgetResponse:
        info = self.kernel.forget(req.mount_id, list(req.item_ids), adapter=req.adapter)
        call.note(items=req.item_ids)
        return pb.ForgetResponse(header=cv.mount_header(info), mount=cv.mount(info))

    def Search(self, req: pb.SearchRequest, call: Call) -> pb.SearchResponse:
        result = self.searcher.search(list(req.mount_ids), req.query, req.k, cv.search_filter(req),
                                      cv.search_mode(req.mode), req.context_turns)
        # Every cube searched gets a record (audit.py), naming its hits, then the context turns returned.
        for header in result.headers:
            call.note_cube(header.cube_id)
        for h in result.hits:
            call.note_cube(h.cube_id, items=[h.item.item_id])
        for h in result.hits:
            call.note_cube(h.cube_id, items=[c.item_id for c in (*h.context_before, *h.context_after)])
        self._record("search", [h.cube_id for h in result.headers],
                     [(h.cube_id, h.item.item_id) for h in result.hits if not h.item.staged])
        return pb.SearchResponse(headers=[cv.search_header(h) for h in result.headers],
                                 hits=[cv.hit(h) for h in result.hits], took_us=result.took_us,
                                 embed_us=result.embed_us)

    def Ingest(self, req: pb.IngestRequest, call: Call) -> pb.IngestResponse:
        result = self.kernel.ingest(req.mount_id, cv.messages(list(req.messages)), tags=list(req.tags),
                                    source=req.source, message=req.commit_message,
                                    author=req.author or call.caller.name,
                                    request=request_ref(call.caller.principal_id, req.request_id))
        call.note(items=result.item_ids, revision=result.revision.number)
        r = result.mount.record
        return pb.IngestResponse(header=cv.header(r.cube_id, result.mount.head, r.base), item_ids=result.item_ids,
                                 revision=cv.revision(result.revision), mount=cv.mount(result.mount))

    # -- revisions ------------------------------------------------------
    def Commit(self, req: pb.CommitRequest, call: Call) -> pb.CommitResponse:
        result = self.kernel.commit(req.mount_id, req.message, req.author or call.caller.name,
                                    request=request_ref(call.caller.principal_id, req.request_id))
        response = pb.CommitResponse(header=cv.header(result.mount.record.cube_id, result.head,
                                                      result.mount.record.base),
                                     mount=cv.mount(result.mount))
        if result.revision is not None:
            response.revision.CopyFrom(cv.revision(result.revision))
            call.note(revision=result.revision.number)
        return response

    def Log(self, req: pb.LogRequest, call: Call) -> pb.LogResponse:
        page, head = self.kernel.log(req.cube, req.page_size, req.page_token)
        cube_id = self.kernel.cube(req.cube).cube_id
        readable = self._readable(call, cube_id)
        return pb.LogResponse(header=cv.header(cube_id, head),
                              revisions=[cv.revision(r, readable) for r in page.entries],
                              next_page_token=page.next_token)

    def _readable(self, call: Call, own_cube_id: str) -> Callable[[str], bool]:
        """Which cubes a remembered revision's provenance may name to the caller: its own cube (it reads
        that one), and the others it holds the read right on now."""
        def readable(cube_id: str) -> bool:
            if cube_id == own_cube_id:
                return True
            record = self.kernel.cube_record(cube_id)
            return record is not None and Right.READ in self.access.rights(call.caller, record)
        return readable

    def Diff(self, req: pb.DiffRequest, call: Call) -> pb.DiffResponse:
        page, older, newer = self.kernel.diff(req.cube, req.from_revision, req.to_revision, req.page_size,
                                              req.page_token)
        cube = self.kernel.cube(req.cube)
        response = pb.DiffResponse(header=cv.header(cube.cube_id, cube.head),
                                   changes=[cv.change(c) for c in page.entries], next_page_token=page.next_token,
                                   from_revision=older, to_revision=newer)
        adapter_change = cv.adapter_change(*self.kernel.adapter_change(req.cube, older, newer))
        if adapter_change is not None and not req.page_token:
            response.adapter_change.CopyFrom(adapter_change)
        return response

    def Rollback(self, req: pb.RollbackRequest, call: Call) -> pb.RollbackResponse:
        revision = self.kernel.rollback(req.cube, req.to_revision, req.message, req.author or call.caller.name)
        cube_id = self.kernel.cube(req.cube).cube_id
        return pb.RollbackResponse(header=cv.header(cube_id, revision.number), revision=cv.revision(revision))

    # -- activation memory ----------------------------------------------
    def Activate(self, req: pb.ActivateRequest, call: Call) -> pb.ActivateResponse:
        outcome = self.activator.activate(req.mount_id, call.cancelled(), ca.selector(req))
        self._record("activate", [outcome.record.cube_id], [])  # heats the cube: it is about to be used
        digest = outcome.record.adapter_digest
        call.note(items=[str(item_id) for item_id, _born in outcome.record.items],
                  artifacts=[f"kv:{outcome.record.cache_key}", f"adapter:{digest}" if digest else ""])
        head = self.kernel.head(outcome.record.cube_id)
        return pb.ActivateResponse(header=cv.header(outcome.record.cube_id, head, outcome.record.revision),
                                   activation=ca.activation(outcome))

    def Evict(self, req: pb.EvictRequest, call: Call) -> pb.EvictResponse:
        return ca.evict_response(self.activator.evict(req.cube, req.delete_persisted))

    def Generate(self, req: pb.GenerateRequest, call: Call) -> Iterator[pb.GenerateResponse | Park]:
        params = ca.generate_params(req)
        remember = ca.remember(req, call.caller.principal_id)
        if remember is not None:
            self.remembering.check(remember, params)  # a read-only remember mount is refused before any model work
        arrived_ns, reply = time.time_ns(), list[str]()
        for event in self.generator.generate(params, call.cancelled(), park=True):
            if isinstance(event, Park):
                yield event  # a wait on the runtime worker: the gate awaits it holding no thread
            elif isinstance(event, GenerationReport):
                summary = ca.summary(event)
                _note_generation(call, summary, event.adapter_digest)
                self._record("generate", [use.cube_id for use in summary.memory],
                             [(use.cube_id, u.item_id) for use in summary.memory
                              for u in [*use.block_items, *use.retrieved_items] if u.born_revision])
                if remember is not None:  # only a reply that ended gets here: a cancelled one has no report
                    result = self.remembering.remember(remember, params, "".join(reply), event,
                                                       arrived_ns=arrived_ns, ended_ns=time.time_ns(),
                                                       author=call.caller.name)
                    summary.remembered.CopyFrom(cv.revision(result.revision))
                    summary.remembered_item_ids.extend(result.item_ids)
                    call.note_cube(result.mount.record.cube_id, items=result.item_ids,
                                   artifacts=[f"remembered:{result.revision.number}"])
                yield pb.GenerateResponse(summary=summary)
            else:
                reply.append(event)
                yield pb.GenerateResponse(delta=event)

    # -- parametric memory ----------------------------------------------
    def ImportAdapter(self, requests: Iterator[pb.ImportAdapterRequest],
                      call: Call) -> pb.ImportAdapterResponse:
        requests, request = _upload_request_id(requests, call.caller.principal_id)
        record, info = adapter_stream.import_adapter(self.adapters, requests, request)
        return pb.ImportAdapterResponse(header=cv.mount_header(info), adapter=cv.adapter(record, staged=True),
                                        mount=cv.mount(info))

    def ExportAdapter(self, req: pb.ExportAdapterRequest,
                      call: Call) -> Iterator[pb.ExportAdapterResponse]:
        adapter, staged, mount, chunks = adapter_stream.export(self.adapters, req.mount_id)
        call.note(artifacts=[f"adapter:{adapter.digest}"])
        yield pb.ExportAdapterResponse(adapter=cv.adapter(adapter, staged=staged), header=cv.mount_header(mount))
        for chunk in chunks:
            yield pb.ExportAdapterResponse(chunk=chunk)

    def Train(self, req: pb.TrainRequest, call: Call) -> pb.TrainResponse:
        job = self.jobs.train(req.mount_id, cv.train_settings(req.settings), req.message,
                              req.author or call.caller.name, principal=call.caller.principal_id)
        call.note(artifacts=[f"job:{job.job_id}"])
        return pb.TrainResponse(header=cv.header(job.cube_id, self.kernel.head(job.cube_id), job.revision),
                                job=cv.job(job))

    def Extract(self, req: pb.ExtractRequest, call: Call) -> pb.ExtractResponse:
        x = req.extractor
        job = self.jobs.extract(req.mount_id, x.url, x.token, x.model, x.max_tokens, req.message,
                                req.author or call.caller.name, principal=call.caller.principal_id,
                                reread=req.reread)
        call.note(artifacts=[f"job:{job.job_id}"])
        return pb.ExtractResponse(header=cv.header(job.cube_id, self.kernel.head(job.cube_id), job.revision),
                                  job=cv.job(job))

    def WatchJob(self, req: pb.WatchJobRequest, call: Call) -> Iterator[pb.WatchJobResponse | Park]:
        for job in self.jobs.watch(req.job_id, call.cancelled(), park=True):
            yield job if isinstance(job, Park) else pb.WatchJobResponse(job=cv.job(job))

    def CancelJob(self, req: pb.CancelJobRequest, call: Call) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=cv.job(self.jobs.cancel(req.job_id)))

    def ListJobs(self, req: pb.ListJobsRequest, call: Call) -> pb.ListJobsResponse:
        cube_id = self.kernel.cube(req.cube).cube_id if req.cube else ""
        records = {record.cube_id: record for record in self.kernel.cube_records()}
        jobs = [j for j in self.jobs.list_jobs(cube_id)
                if j.cube_id in records and self.access.visible(call.caller, records[j.cube_id])]
        return pb.ListJobsResponse(jobs=[cv.job(j) for j in jobs])

    # -- daemon ---------------------------------------------------------
    def Stats(self, req: pb.StatsRequest, call: Call) -> pb.StatsResponse:
        return cs.stats(self._stats(), self.gate.call_counts())  # this very call is counted already

    def SetCubePolicy(self, req: pb.SetCubePolicyRequest, call: Call) -> pb.SetCubePolicyResponse:
        info = self.kernel.set_policy(req.cube, cv.policy_values(req.policy))
        return pb.SetCubePolicyResponse(header=cv.header(info.record.cube_id, info.record.head),
                                        cube=cv.cube(info, self._cube_usage(info.record.cube_id)))

    def FreezeCube(self, req: pb.FreezeCubeRequest, call: Call) -> pb.FreezeCubeResponse:
        info = self.kernel.set_frozen(req.cube, True)
        return pb.FreezeCubeResponse(header=cv.header(info.record.cube_id, info.record.head),
                                     cube=cv.cube(info, self._cube_usage(info.record.cube_id)))

    def ThawCube(self, req: pb.ThawCubeRequest, call: Call) -> pb.ThawCubeResponse:
        info = self.kernel.set_frozen(req.cube, False)
        return pb.ThawCubeResponse(header=cv.header(info.record.cube_id, info.record.head),
                                   cube=cv.cube(info, self._cube_usage(info.record.cube_id)))

    def SetItemState(self, req: pb.SetItemStateRequest, call: Call) -> pb.SetItemStateResponse:
        revision = self.kernel.set_item_state(req.cube, list(req.item_ids), cv.item_state(req.state), req.message,
                                              req.author or call.caller.name)
        cube = self.kernel.cube(req.cube)
        call.note(items=list(dict.fromkeys(req.item_ids)), revision=revision.number if revision else 0)
        response = pb.SetItemStateResponse(header=cv.header(cube.cube_id, cube.head))
        if revision is not None:
            response.revision.CopyFrom(cv.revision(revision))
        return response

    def SetRetention(self, req: pb.SetRetentionRequest, call: Call) -> pb.SetRetentionResponse:
        info = self.kernel.set_retention(req.cube, req.retention.keep_last, req.retention.keep_seconds)
        return pb.SetRetentionResponse(header=cv.header(info.record.cube_id, info.record.head),
                                       cube=cv.cube(info, self._cube_usage(info.record.cube_id)))

    def Compact(self, req: pb.CompactRequest, call: Call) -> pb.CompactResponse:
        result = self.kernel.compact(req.cube)
        call.note(revision=result.oldest_revision,
                  artifacts=[f"compacted:{result.revisions_compacted}:{result.versions_removed}"])
        cube = self.kernel.cube(req.cube)
        return pb.CompactResponse(header=cv.header(cube.cube_id, cube.head),
                                  revisions_compacted=result.revisions_compacted,
                                  versions_removed=result.versions_removed, oldest_revision=result.oldest_revision)

    def SchedulerStatus(self, req: pb.SchedulerStatusRequest, call: Call) -> pb.SchedulerStatusResponse:
        stats = self._stats()
        response = pb.SchedulerStatusResponse(enabled=self.scheduler is not None,
                                              queue_depth=stats.model.queue_depth)
        response.kv_pool.CopyFrom(cs.kv_pool(stats.kv_pool))
        response.adapters.CopyFrom(cs.adapters(stats.adapters))
        if self.scheduler is not None:
            state, decisions = self.scheduler.status()
            response.interval_seconds = self.scheduler.interval
            response.running_cube_id = state.running
            response.pending_cube_ids.extend(state.pending)
            response.ticks, response.activations = state.ticks, state.activations
            response.decisions.extend(
                pb.SchedulerDecision(time=cv.ts(d.time_ns), cube_id=d.cube_id, action=d.action, reason=d.reason,
                                     tokens_reused=d.tokens_reused, tokens_computed=d.tokens_computed)
                for d in decisions)
        return response

    # -- usage ----------------------------------------------------------
    def _record(self, kind: str, cube_ids: list[str], items: list[tuple[str, str]]) -> None:
        if self.usage is not None:
            self.usage.record(kind, cube_ids, items)

    def _cube_usage(self, cube_id: str) -> CubeUsage | None:
        return self.usage.cube(cube_id) if self.usage is not None else None

    def _item(self, cube_id: str, view: ItemView) -> t.Item:
        return cv.item(view, self.usage.item(cube_id, view.item_id) if self.usage is not None else None)


def _upload_request_id(requests: Iterator[pb.ImportAdapterRequest], principal_id: str
                       ) -> tuple[Iterator[pb.ImportAdapterRequest], RequestRef | None]:
    """The upload's request id (from its header, the first message), and the stream as it was."""
    first = next(requests, None)
    if first is None:
        return iter(()), None
    request_id = first.header.request_id if first.WhichOneof("part") == "header" else ""
    return itertools.chain([first], requests), request_ref(principal_id, request_id, "header.request_id")


def _note_generation(call: Call, summary: t.GenerationSummary, adapter_digest: str) -> None:
    """What memory went into the answer: the block and retrieved items, the KV caches and the adapter."""
    for use in summary.memory:
        call.note_cube(use.cube_id, items=[u.item_id for u in use.block_items] + [u.item_id for u in use.retrieved_items],
                       artifacts=[f"kv:{use.cache_key}" if use.cache_key else ""])
    call.note(artifacts=[f"adapter:{adapter_digest}" if adapter_digest else ""])
