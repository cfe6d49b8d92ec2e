"""The MemOS service: one short handler per syscall (check, call the kernel, map)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from memos.v1 import memos_pb2 as pb

from memosd.activation.activator import Activator
from memosd.activation.generator import GenerationReport, Generator
from memosd.errors import MemosError, ShuttingDown
from memosd.kernel.kernel import Kernel
from memosd.kernel.search import Searcher
from memosd.logfmt import log_event
from memosd.parametric.adapters import AdapterService
from memosd.parametric.jobs import JobManager
from memosd.runtime.kvcache import ComputeCancelled
from memosd.syscalls import convert as cv
from memosd.syscalls import convert_activation as ca
from memosd.syscalls.errors import internal, to_status

log = logging.getLogger("memosd.syscalls")

Handler = Callable[[Any, grpc.ServicerContext], Any]
StreamHandler = Callable[[Any, grpc.ServicerContext], Iterator[Any]]


def _cancel_event(context: grpc.ServicerContext) -> threading.Event:
    """Set when the call ends for any reason: the client cancelled, its deadline passed, or it finished."""
    event = threading.Event()
    if not context.add_callback(event.set):
        event.set()  # already over
    return event


class MemOSServicer:
    """Each public method is a syscall; `dispatch` wraps them all with error mapping."""

    def __init__(self, kernel: Kernel, searcher: Searcher, activator: Activator, generator: Generator,
                 adapters: AdapterService, jobs: JobManager, stats: Callable[[], pb.StatsResponse]) -> None:
        self.kernel = kernel
        self.searcher = searcher
        self.activator = activator
        self.generator = generator
        self.adapters = adapters
        self.jobs = jobs
        self._stats = stats
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()
        self.draining = False

    def _begin(self, name: str) -> None:
        with self._calls_lock:
            self.calls[name] += 1
        if self.draining:
            raise ShuttingDown("memosd is shutting down; retry against the restarted daemon")

    def _fail(self, name: str, started: float, exc: Exception, context: grpc.ServicerContext) -> None:
        took_ms = round((time.perf_counter() - started) * 1000, 2)
        if isinstance(exc, MemosError):
            log_event(log, "syscall", method=name, code=exc.code, reason=exc.reason, took_ms=took_ms)
            context.abort_with_status(to_status(exc))
        if isinstance(exc, ComputeCancelled):  # the caller went away mid-prefill; nobody reads this
            log_event(log, "syscall", method=name, code="CANCELLED", took_ms=took_ms)
            context.abort(grpc.StatusCode.CANCELLED, str(exc))
        context.abort_with_status(to_status(internal(name, exc)))

    def dispatch(self, name: str, handler: Handler) -> Handler:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                self._begin(name)
                response = handler(request, context)
            except Exception as exc:
                self._fail(name, started, exc, context)
            log_event(log, "syscall", level=logging.DEBUG, method=name, code="OK",
                      took_ms=round((time.perf_counter() - started) * 1000, 2))
            return response

        return run

    def dispatch_stream(self, name: str, handler: StreamHandler) -> StreamHandler:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                self._begin(name)
                yield from handler(request, context)
            except Exception as exc:
                self._fail(name, started, exc, context)
            log_event(log, "syscall", level=logging.DEBUG, method=name, code="OK",
                      took_ms=round((time.perf_counter() - started) * 1000, 2))

        return run

    # -- cubes ----------------------------------------------------------
    def AllocCube(self, req: pb.AllocCubeRequest, ctx: grpc.ServicerContext) -> pb.AllocCubeResponse:
        info = self.kernel.alloc_cube(req.name, req.description, dict(req.labels))
        return pb.AllocCubeResponse(header=cv.header(info.record.cube_id, info.record.head), cube=cv.cube(info))

    def FreeCube(self, req: pb.FreeCubeRequest, ctx: grpc.ServicerContext) -> pb.FreeCubeResponse:
        cube = self.kernel.cube(req.cube)
        cube_id, versions = cube.cube_id, list(cube.adapters)
        freed = self.kernel.free_cube(req.cube)
        self.adapters.unload_cube(cube_id, versions)
        # The store rows went with the cube's key range; its pooled KV caches go now.
        self.activator.drop_pooled(cube_id)
        self.activator.forget_persisted(cube_id)
        return pb.FreeCubeResponse(header=cv.header(cube_id), revisions_deleted=freed.revisions,
                                   versions_deleted=freed.versions, mounts_closed=freed.mounts)

    def StatCube(self, req: pb.StatCubeRequest, ctx: grpc.ServicerContext) -> pb.StatCubeResponse:
        info = self.kernel.cube_info(self.kernel.cube(req.cube))
        return pb.StatCubeResponse(header=cv.header(info.record.cube_id, info.record.head), cube=cv.cube(info))

    def ListCubes(self, req: pb.ListCubesRequest, ctx: grpc.ServicerContext) -> pb.ListCubesResponse:
        page = self.kernel.list_cubes(req.page_size, req.page_token)
        return pb.ListCubesResponse(header=cv.header(), cubes=[cv.cube(c) for c in page.entries],
                                    next_page_token=page.next_token)

    # -- mounts ---------------------------------------------------------
    def Mount(self, req: pb.MountRequest, ctx: grpc.ServicerContext) -> pb.MountResponse:
        info = self.kernel.mount(req.cube, req.revision, cv.writable(req.mode))
        return pb.MountResponse(header=cv.mount_header(info), mount=cv.mount(info))

    def Unmount(self, req: pb.UnmountRequest, ctx: grpc.ServicerContext) -> pb.UnmountResponse:
        info, discarded = self.kernel.unmount(req.mount_id)
        return pb.UnmountResponse(header=cv.mount_header(info), discarded_changes=discarded)

    # -- items ----------------------------------------------------------
    def Write(self, req: pb.WriteRequest, ctx: grpc.ServicerContext) -> pb.WriteResponse:
        item_ids, info = self.kernel.write(req.mount_id, cv.item_inputs(list(req.items)))
        return pb.WriteResponse(header=cv.mount_header(info), item_ids=item_ids, mount=cv.mount(info))

    def Read(self, req: pb.ReadRequest, ctx: grpc.ServicerContext) -> pb.ReadResponse:
        if req.item_ids:
            views, info = self.kernel.read(req.mount_id, list(req.item_ids))
            return pb.ReadResponse(header=cv.mount_header(info), items=[cv.item(v) for v in views])
        page, info = self.kernel.list_items(req.mount_id, req.page_size, req.page_token)
        return pb.ReadResponse(header=cv.mount_header(info), items=[cv.item(v) for v in page.entries],
                               next_page_token=page.next_token)

    def Forget(self, req: pb.ForgetRequest, ctx: grpc.ServicerContext) -> pb.ForgetResponse:
        info = self.kernel.forget(req.mount_id, list(req.item_ids), adapter=req.adapter)
        return pb.ForgetResponse(header=cv.mount_header(info), mount=cv.mount(info))

    def Search(self, req: pb.SearchRequest, ctx: grpc.ServicerContext) -> pb.SearchResponse:
        result = self.searcher.search(list(req.mount_ids), req.query, req.k, cv.search_filter(req),
                                      cv.search_mode(req.mode))
        return pb.SearchResponse(headers=[cv.search_header(h) for h in result.headers],
                                 hits=[cv.hit(h) for h in result.hits], took_us=result.took_us,
                                 embed_us=result.embed_us)

    # -- revisions ------------------------------------------------------
    def Commit(self, req: pb.CommitRequest, ctx: grpc.ServicerContext) -> pb.CommitResponse:
        result = self.kernel.commit(req.mount_id, req.message, req.author)
        response = pb.CommitResponse(header=cv.header(result.mount.record.cube_id, result.head,
                                                      result.mount.record.base),
                                     mount=cv.mount(result.mount))
        if result.revision is not None:
            response.revision.CopyFrom(cv.revision(result.revision))
        return response

    def Log(self, req: pb.LogRequest, ctx: grpc.ServicerContext) -> pb.LogResponse:
        page, head = self.kernel.log(req.cube, req.page_size, req.page_token)
        cube_id = self.kernel.cube(req.cube).cube_id
        return pb.LogResponse(header=cv.header(cube_id, head), revisions=[cv.revision(r) for r in page.entries],
                              next_page_token=page.next_token)

    def Diff(self, req: pb.DiffRequest, ctx: grpc.ServicerContext) -> pb.DiffResponse:
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

    def Rollback(self, req: pb.RollbackRequest, ctx: grpc.ServicerContext) -> pb.RollbackResponse:
        revision = self.kernel.rollback(req.cube, req.to_revision, req.message, req.author)
        cube_id = self.kernel.cube(req.cube).cube_id
        return pb.RollbackResponse(header=cv.header(cube_id, revision.number), revision=cv.revision(revision))

    # -- activation memory ----------------------------------------------
    def Activate(self, req: pb.ActivateRequest, ctx: grpc.ServicerContext) -> pb.ActivateResponse:
        outcome = self.activator.activate(req.mount_id, _cancel_event(ctx))
        head = self.kernel.cubes[outcome.record.cube_id].head if outcome.record.cube_id in self.kernel.cubes else 0
        return pb.ActivateResponse(header=cv.header(outcome.record.cube_id, head, outcome.record.revision),
                                   activation=ca.activation(outcome))

    def Evict(self, req: pb.EvictRequest, ctx: grpc.ServicerContext) -> pb.EvictResponse:
        return ca.evict_response(self.activator.evict(req.cube, req.delete_persisted))

    def Generate(self, req: pb.GenerateRequest, ctx: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        for event in self.generator.generate(ca.generate_params(req), _cancel_event(ctx)):
            if isinstance(event, GenerationReport):
                yield pb.GenerateResponse(summary=ca.summary(event))
            else:
                yield pb.GenerateResponse(delta=event)

    # -- parametric memory ----------------------------------------------
    def ImportAdapter(self, requests: Iterator[pb.ImportAdapterRequest],
                      ctx: grpc.ServicerContext) -> pb.ImportAdapterResponse:
        record, info = self.adapters.import_adapter(requests)
        return pb.ImportAdapterResponse(header=cv.mount_header(info), adapter=cv.adapter(record, staged=True),
                                        mount=cv.mount(info))

    def ExportAdapter(self, req: pb.ExportAdapterRequest,
                      ctx: grpc.ServicerContext) -> Iterator[pb.ExportAdapterResponse]:
        adapter, staged, mount, chunks = self.adapters.export(req.mount_id)
        yield pb.ExportAdapterResponse(adapter=cv.adapter(adapter, staged=staged),
                                       header=cv.mount_header(self.kernel.mount_info(mount)))
        for chunk in chunks:
            yield pb.ExportAdapterResponse(chunk=chunk)

    def Train(self, req: pb.TrainRequest, ctx: grpc.ServicerContext) -> pb.TrainResponse:
        job = self.jobs.train(req.mount_id, cv.train_settings(req.settings), req.message, req.author)
        cube = self.kernel.cubes.get(job.cube_id)
        return pb.TrainResponse(header=cv.header(job.cube_id, cube.head if cube else 0, job.revision),
                                job=cv.job(job))

    def WatchJob(self, req: pb.WatchJobRequest, ctx: grpc.ServicerContext) -> Iterator[pb.WatchJobResponse]:
        for job in self.jobs.watch(req.job_id, _cancel_event(ctx)):
            yield pb.WatchJobResponse(job=cv.job(job))

    def CancelJob(self, req: pb.CancelJobRequest, ctx: grpc.ServicerContext) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=cv.job(self.jobs.cancel(req.job_id)))

    def ListJobs(self, req: pb.ListJobsRequest, ctx: grpc.ServicerContext) -> pb.ListJobsResponse:
        cube_id = self.kernel.cube(req.cube).cube_id if req.cube else ""
        return pb.ListJobsResponse(jobs=[cv.job(j) for j in self.jobs.list_jobs(cube_id)])

    # -- daemon ---------------------------------------------------------
    def Stats(self, req: pb.StatsRequest, ctx: grpc.ServicerContext) -> pb.StatsResponse:
        response = self._stats()
        with self._calls_lock:
            response.calls.update(self.calls)
        return response
