"""memosctl against an in-process FAKE MemOS server: the CLI layer only (parsing, output, exit codes).

The fake keeps just enough state (cubes, HEAD items, revisions, mounts with
staging) to make the commands meaningful; the real daemon is tested end to end
elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from memos.cli.main import main
from memos.v1 import memos_pb2, memos_pb2_grpc, types_pb2

C = grpc.StatusCode


def fail(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str) -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="memosd.v1"))
    context.abort_with_status(rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])))


class FakeMemOS(memos_pb2_grpc.MemOSServicer):
    """Cubes with HEAD-only items, a log, and mounts that stage writes and forgets until Commit.

    Parametric memory: each cube has an adapter history (the adapter at each
    revision), mounts stage an imported adapter or its removal, and training
    jobs run as the Train message says (see :meth:`WatchJob`).
    """

    PAGE = 2  # small, so every list command has to follow page tokens

    def __init__(self) -> None:
        self.cubes: dict[str, types_pb2.Cube] = {}
        self.items: dict[str, dict[str, types_pb2.Item]] = {}
        self.log: dict[str, list[types_pb2.Revision]] = {}
        self.mounts: dict[str, tuple[types_pb2.Mount, list[types_pb2.Item], list[str]]] = {}
        self.requests: list[tuple[str, Any]] = []
        self.cluster_config = memos_pb2.ClusterConfigResponse()
        self.slow_stats = 0.0
        self.model_states = ["ready"]  # what Stats reports, one a call; the last one stays ("!": refused)
        self.stats_calls = 0
        self.generation_cancelled = threading.Event()
        self._seq = 0
        # cube id -> [(revision, (adapter, config, weights) or None for none)], oldest first
        self.adapter_log: dict[str, list[tuple[int, tuple[types_pb2.Adapter, bytes, bytes] | None]]] = {}
        # mount id -> the staged adapter, or None for a staged removal
        self.staged_adapters: dict[str, tuple[types_pb2.Adapter, bytes, bytes] | None] = {}
        self.uploads: list[tuple[Any, list[Any]]] = []  # ImportAdapter: (header, chunks)
        self.export_truncated = False  # ExportAdapter drops its last chunk
        self.jobs: dict[str, types_pb2.Job] = {}
        self.job_changed = threading.Condition()
        self.watch_cancelled = threading.Event()
        self.scripts: dict[str, tuple[str, str]] = {}  # job id -> (Train message, author)

    def _id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}_{self._seq:04d}"

    def _cube(self, ref: str, context: grpc.ServicerContext) -> types_pb2.Cube:
        for cube in self.cubes.values():
            if ref in (cube.cube_id, cube.name):
                return cube
        fail(context, C.NOT_FOUND, "CUBE_NOT_FOUND", f"no cube {ref!r}")
        raise AssertionError

    def _mount(self, mount_id: str, context: grpc.ServicerContext) -> Any:
        if mount_id not in self.mounts:
            fail(context, C.NOT_FOUND, "MOUNT_NOT_FOUND", f"no mount {mount_id!r}")
        return self.mounts[mount_id]

    @staticmethod
    def _page(values: list[Any], token: str) -> tuple[list[Any], str]:
        start = int(token or 0)
        end = start + FakeMemOS.PAGE
        return values[start:end], str(end) if end < len(values) else ""

    def AllocCube(self, request: Any, context: grpc.ServicerContext) -> Any:
        if any(c.name == request.name for c in self.cubes.values()):
            fail(context, C.ALREADY_EXISTS, "CUBE_NAME_TAKEN", f"a cube is named {request.name!r}")
        cube = types_pb2.Cube(cube_id=self._id("cube"), name=request.name, description=request.description,
                              labels=request.labels)
        cube.create_time.FromSeconds(1714560000)
        self.cubes[cube.cube_id], self.items[cube.cube_id], self.log[cube.cube_id] = cube, {}, []
        return memos_pb2.AllocCubeResponse(cube=cube)

    def FreeCube(self, request: Any, context: grpc.ServicerContext) -> Any:
        cube = self._cube(request.cube, context)
        del self.cubes[cube.cube_id]
        return memos_pb2.FreeCubeResponse(revisions_deleted=len(self.log.pop(cube.cube_id)))

    def StatCube(self, request: Any, context: grpc.ServicerContext) -> Any:
        return memos_pb2.StatCubeResponse(cube=self._cube(request.cube, context))

    def ListCubes(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListCubes", request))
        cubes, token = self._page(sorted(self.cubes.values(), key=lambda c: c.cube_id), request.page_token)
        return memos_pb2.ListCubesResponse(cubes=cubes, next_page_token=token)

    def GetClusterConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.cluster_config

    def SetClusterConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("SetClusterConfig", request))
        self.cluster_config.settings[request.key] = request.value
        self.cluster_config.revision += 1
        return self.cluster_config

    def Mount(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Mount", request))
        cube = self._cube(request.cube, context)
        mount = types_pb2.Mount(mount_id=self._id("mnt"), cube_id=cube.cube_id, mode=request.mode,
                                base_revision=request.revision or cube.head_revision)
        self.mounts[mount.mount_id] = (mount, [], [])
        return memos_pb2.MountResponse(mount=mount)

    def Unmount(self, request: Any, context: grpc.ServicerContext) -> Any:
        _, staged, forgets = self._mount(request.mount_id, context)
        del self.mounts[request.mount_id]
        adapter = self.staged_adapters.pop(request.mount_id, False) is not False
        return memos_pb2.UnmountResponse(discarded_changes=len(staged) + len(forgets) + adapter)

    def Write(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Write", request))
        mount, staged, _ = self._mount(request.mount_id, context)
        if mount.mode != types_pb2.MOUNT_MODE_READ_WRITE:
            fail(context, C.FAILED_PRECONDITION, "MOUNT_READ_ONLY", "read-only mount")
        if any(not it.text for it in request.items):
            fail(context, C.INVALID_ARGUMENT, "TEXT_EMPTY", "items[0].text is empty")
        ids = []
        for it in request.items:
            item = types_pb2.Item(item_id=self._id("itm"), text=it.text, tags=it.tags, source=it.source,
                                  event_time=it.event_time if it.HasField("event_time") else None, staged=True)
            staged.append(item)
            ids.append(item.item_id)
        mount.staged_adds = len(staged)
        return memos_pb2.WriteResponse(item_ids=ids, mount=mount)

    def _visible(self, mount_id: str, context: grpc.ServicerContext) -> dict[str, types_pb2.Item]:
        mount, staged, forgets = self._mount(mount_id, context)
        items = {**self.items[mount.cube_id], **{it.item_id: it for it in staged}}
        return {k: v for k, v in sorted(items.items()) if k not in forgets}

    def Read(self, request: Any, context: grpc.ServicerContext) -> Any:
        items = self._visible(request.mount_id, context)
        if not request.item_ids:
            page, token = self._page(list(items.values()), request.page_token)
            return memos_pb2.ReadResponse(items=page, next_page_token=token)
        missing = [i for i in request.item_ids if i not in items]
        if missing:
            fail(context, C.NOT_FOUND, "ITEM_NOT_FOUND", f"no item {missing[0]!r}")
        return memos_pb2.ReadResponse(items=[items[i] for i in request.item_ids])

    def Forget(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Forget", request))
        mount, _, forgets = self._mount(request.mount_id, context)
        forgets.extend(request.item_ids)
        mount.staged_forgets = len(forgets)
        if request.adapter:
            self.staged_adapters[request.mount_id] = None
            mount.staged_adapter = True
        return memos_pb2.ForgetResponse(mount=mount)

    def Search(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Search", request))
        hits: list[types_pb2.SearchHit] = []
        for mount_id in request.mount_ids:
            mount = self._mount(mount_id, context)[0]
            for item in self._visible(mount_id, context).values():
                if request.query.lower() in item.text.lower():
                    hits.append(types_pb2.SearchHit(item=item, mount_id=mount_id, cube_id=mount.cube_id,
                                                    score=0.5, dense_score=0.75, dense_rank=len(hits) + 1))
        return memos_pb2.SearchResponse(hits=hits[: request.k or 10], took_us=1234)

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Commit", request))
        mount, staged, forgets = self._mount(request.mount_id, context)
        cube = self.cubes[mount.cube_id]
        items = self.items[cube.cube_id]
        rev = types_pb2.Revision(number=cube.head_revision + 1, parent=cube.head_revision, author=request.author,
                                 message=request.message, kind=types_pb2.REVISION_KIND_COMMIT,
                                 added=len(staged), forgotten=len(forgets))
        for it in staged:
            it.staged, it.born_revision = False, rev.number
            items[it.item_id] = it
        for item_id in forgets:
            items.pop(item_id, None)
        rev.item_count = cube.item_count = len(items)
        if request.mount_id in self.staged_adapters:
            self._set_adapter(cube.cube_id, rev, self.staged_adapters.pop(request.mount_id))
        else:
            current = self._adapter_at(cube.cube_id, cube.head_revision)
            rev.adapter_digest = current[0].digest if current else ""
        cube.head_revision = rev.number
        self.log[cube.cube_id].insert(0, rev)
        staged.clear()
        forgets.clear()
        mount.base_revision, mount.staged_adds, mount.staged_forgets = rev.number, 0, 0
        mount.staged_adapter = False
        return memos_pb2.CommitResponse(revision=rev, mount=mount)

    def _set_adapter(self, cube_id: str, rev: types_pb2.Revision,
                     adapter: tuple[types_pb2.Adapter, bytes, bytes] | None) -> None:
        if adapter is not None:
            meta = types_pb2.Adapter()
            meta.CopyFrom(adapter[0])
            meta.born_revision, meta.staged = rev.number, False
            adapter = (meta, adapter[1], adapter[2])
        self.adapter_log.setdefault(cube_id, []).append((rev.number, adapter))
        rev.adapter_changed, rev.adapter_digest = True, adapter[0].digest if adapter else ""

    def _adapter_at(self, cube_id: str, revision: int) -> tuple[types_pb2.Adapter, bytes, bytes] | None:
        current = None
        for number, adapter in self.adapter_log.get(cube_id, []):
            if number <= revision:
                current = adapter
        return current

    def Log(self, request: Any, context: grpc.ServicerContext) -> Any:
        revs, token = self._page(self.log[self._cube(request.cube, context).cube_id], request.page_token)
        return memos_pb2.LogResponse(revisions=revs, next_page_token=token)

    def Diff(self, request: Any, context: grpc.ServicerContext) -> Any:
        cube = self._cube(request.cube, context)
        items = self.items[cube.cube_id]
        to = request.to_revision or cube.head_revision
        changes = [types_pb2.ItemChange(kind=types_pb2.CHANGE_KIND_ADDED, item_id=i, after=it)
                   for i, it in items.items() if request.from_revision < it.born_revision <= to]
        resp = memos_pb2.DiffResponse(changes=changes, from_revision=request.from_revision, to_revision=to)
        before, after = self._adapter_at(cube.cube_id, request.from_revision), self._adapter_at(cube.cube_id, to)
        if (before and before[0].digest) != (after and after[0].digest):
            kind = (types_pb2.CHANGE_KIND_CHANGED if before and after
                    else types_pb2.CHANGE_KIND_ADDED if after else types_pb2.CHANGE_KIND_FORGOTTEN)
            resp.adapter_change.CopyFrom(types_pb2.AdapterChange(
                kind=kind, before=before[0] if before else None, after=after[0] if after else None))
        return resp

    def Rollback(self, request: Any, context: grpc.ServicerContext) -> Any:
        cube = self._cube(request.cube, context)
        if request.to_revision >= cube.head_revision:
            fail(context, C.NOT_FOUND, "REVISION_NOT_FOUND", f"cannot roll back to {request.to_revision}")
        cube.head_revision += 1
        rev = types_pb2.Revision(number=cube.head_revision, kind=types_pb2.REVISION_KIND_ROLLBACK,
                                 restored_revision=request.to_revision, message=request.message)
        self.log[cube.cube_id].insert(0, rev)
        return memos_pb2.RollbackResponse(revision=rev)

    def Stats(self, request: Any, context: grpc.ServicerContext) -> Any:
        time.sleep(self.slow_stats)
        self.stats_calls += 1
        state = self.model_states.pop(0) if len(self.model_states) > 1 else self.model_states[0]
        if state == "!":  # as memosd answers a caller who is not an admin
            fail(context, C.PERMISSION_DENIED, "PERMISSION_DENIED", "Stats is for admins")
        return memos_pb2.StatsResponse(
            version="0.1.0-fake", uptime_seconds=3725, cube_count=len(self.cubes),
            embedder="fake", embedding_dim=8, store_bytes=3 * 1024 * 1024, calls={"Stats": 1},
            model=memos_pb2.ModelStats(state=state, name="tiny-llama", device="cpu", dtype="float32",
                                       context_length=2048, active_generations=1),
            kv_pool=memos_pb2.KVPoolStats(entries=2, bytes_used=1024 * 1024, budget_bytes=64 * 1024 * 1024,
                                          hits=5, misses=2, persisted_bytes=2 * 1024 * 1024),
            adapters=memos_pb2.AdapterPoolStats(resident=1, max_resident=4, loads=3, evictions=2, stored=2,
                                                stored_bytes=5 * 1024 * 1024),
        )

    def Activate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Activate", request))
        mount = self._mount(request.mount_id, context)[0]
        n = len(self.items[mount.cube_id])
        if not n:
            fail(context, C.FAILED_PRECONDITION, "CUBE_EMPTY", f"revision {mount.base_revision} has no items")
        adapter = self._adapter_at(mount.cube_id, mount.base_revision)
        return memos_pb2.ActivateResponse(activation=types_pb2.Activation(
            cube_id=mount.cube_id, revision=mount.base_revision, cache_key="ab" * 32, model_fingerprint="cd" * 32,
            item_count=n, tokens=40 * n, tokens_computed=40 * n - 30, tokens_reused=30, pool_bytes=2 * 1024 * 1024,
            persisted_bytes=1024 * 1024, source=types_pb2.ACTIVATION_SOURCE_COMPUTED, took_us=1500, pooled=True,
            adapter_digest=adapter[0].digest if adapter else "",
        ))

    # -- parametric memory ---------------------------------------------------------

    def ImportAdapter(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        messages = list(request_iterator)
        header, chunks = messages[0].header, [m.chunk for m in messages[1:]]
        self.uploads.append((header, chunks))
        mount = self._mount(header.mount_id, context)[0]
        if mount.mode != types_pb2.MOUNT_MODE_READ_WRITE:
            fail(context, C.FAILED_PRECONDITION, "MOUNT_READ_ONLY", "read-only mount")
        config = b"".join(c.data for c in chunks if c.file == types_pb2.ADAPTER_FILE_CONFIG)
        weights = b"".join(c.data for c in chunks if c.file == types_pb2.ADAPTER_FILE_WEIGHTS)
        if (len(config), len(weights)) != (header.config_bytes, header.weights_bytes):
            fail(context, C.INVALID_ARGUMENT, "ADAPTER_INVALID", "the upload is truncated")
        try:
            cfg = json.loads(config)
        except ValueError:
            fail(context, C.INVALID_ARGUMENT, "ADAPTER_INVALID", "adapter_config.json is not JSON")
        adapter = types_pb2.Adapter(
            digest=hashlib.sha256(config + weights).hexdigest(), staged=True, config_bytes=len(config),
            weights_bytes=len(weights), rank=cfg.get("r", 0), target_modules=cfg.get("target_modules", []),
            base_model=cfg.get("base_model_name_or_path", ""),
            lineage=types_pb2.AdapterLineage(origin="imported", model_fingerprint="cd" * 8),
        )
        adapter.lineage.create_time.FromSeconds(1714560000)
        self.staged_adapters[header.mount_id] = (adapter, config, weights)
        mount.staged_adapter = True
        return memos_pb2.ImportAdapterResponse(adapter=adapter, mount=mount)

    def ExportAdapter(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ExportAdapter", request))
        mount = self._mount(request.mount_id, context)[0]
        if request.mount_id in self.staged_adapters:
            adapter = self.staged_adapters[request.mount_id]
        else:
            adapter = self._adapter_at(mount.cube_id, mount.base_revision)
        if adapter is None:
            fail(context, C.NOT_FOUND, "ADAPTER_NOT_FOUND", f"no adapter at revision {mount.base_revision}")
            return
        meta, config, weights = adapter
        yield memos_pb2.ExportAdapterResponse(adapter=meta)
        chunks = [types_pb2.AdapterChunk(file=file, data=data[i:i + 1000])
                  for file, data in ((types_pb2.ADAPTER_FILE_CONFIG, config), (types_pb2.ADAPTER_FILE_WEIGHTS, weights))
                  for i in range(0, len(data), 1000)]
        for chunk in chunks[:-1] if self.export_truncated else chunks:
            yield memos_pb2.ExportAdapterResponse(chunk=chunk)

    def _job_update(self, job: types_pb2.Job, **fields: Any) -> None:
        with self.job_changed:
            for k, v in fields.items():
                setattr(job, k, v)
            self.job_changed.notify_all()

    def Train(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Train", request))
        mount = self._mount(request.mount_id, context)[0]
        if any(j.cube_id == mount.cube_id and j.state in (types_pb2.JOB_STATE_QUEUED, types_pb2.JOB_STATE_RUNNING)
               for j in self.jobs.values()):
            fail(context, C.FAILED_PRECONDITION, "TRAINING_IN_PROGRESS", f"{mount.cube_id} is training")
        job = types_pb2.Job(job_id=self._id("job"), state=types_pb2.JOB_STATE_QUEUED, cube_id=mount.cube_id,
                            revision=mount.base_revision, settings=request.settings,
                            total_steps=request.settings.steps or 4)
        job.create_time.FromSeconds(1714560000)
        self.jobs[job.job_id] = job
        # The script the job follows: its message says how it ends.
        self.scripts[job.job_id] = (request.message, request.author)
        return memos_pb2.TrainResponse(job=job)

    def Extract(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Extract", request))
        mount = self._mount(request.mount_id, context)[0]
        job = types_pb2.Job(job_id=self._id("job"), state=types_pb2.JOB_STATE_QUEUED, cube_id=mount.cube_id,
                            revision=mount.base_revision, kind=types_pb2.JOB_KIND_EXTRACT,
                            total_steps=0,  # as the daemon's: its prompts are counted when it starts
                            extract=types_pb2.ExtractProgress(turns_total=3))
        job.create_time.FromSeconds(1714560000)
        self.jobs[job.job_id] = job
        self.scripts[job.job_id] = (request.message, request.author)
        return memos_pb2.ExtractResponse(job=job)

    def _watch_extract(self, job: types_pb2.Job) -> Any:
        """An Extract job as it is watched: two prompts, then it succeeds, committing a revision."""
        job.total_steps = 2
        for step, (read, kept, dropped, refused) in enumerate(((2, 1, 1, 0), (3, 2, 1, 1)), start=1):
            x = types_pb2.ExtractProgress(turns_total=3, turns_read=read, proposed=kept + dropped + refused,
                                          kept=kept, dropped=dropped, refused=refused,
                                          dropped_by_reason={"unknown_key": dropped},
                                          refused_by_reason={"unsupported": refused} if refused else {})
            job.extract.CopyFrom(x)
            self._job_update(job, state=types_pb2.JOB_STATE_RUNNING, step=step)
            yield memos_pb2.WatchJobResponse(job=job)
        cube = self.cubes[job.cube_id]
        cube.head_revision += 1
        job.extract.added = 2
        self._job_update(job, state=types_pb2.JOB_STATE_SUCCEEDED, result_revision=cube.head_revision)

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Runs the job as it is watched: its steps, then by its Train message "fail" fails, "cancelled" is
        cancelled after step 1, "hang" runs step 1 then waits for CancelJob; anything else succeeds,
        committing a trained adapter."""
        self.requests.append(("WatchJob", request))
        job = self.jobs.get(request.job_id)
        if job is None:
            fail(context, C.NOT_FOUND, "JOB_NOT_FOUND", f"no job {request.job_id!r}")
            return
        finished = False

        def ended() -> None:  # gRPC stops pulling a cancelled stream, so only a callback sees it
            if not finished:
                self.watch_cancelled.set()
                with self.job_changed:  # wakes a "hang" step waiting for the job to end
                    self.job_changed.notify_all()

        context.add_callback(ended)
        terminal = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)
        if job.state in terminal:
            finished = True
            yield memos_pb2.WatchJobResponse(job=job)
            return
        message, author = self.scripts[job.job_id]
        yield memos_pb2.WatchJobResponse(job=job)
        if job.kind == types_pb2.JOB_KIND_EXTRACT:
            yield from self._watch_extract(job)
            finished = True
            yield memos_pb2.WatchJobResponse(job=job)
            return
        for step in range(1, job.total_steps + 1):
            if job.state in terminal:
                break
            self._job_update(job, state=types_pb2.JOB_STATE_RUNNING, step=step, loss=2.0 / step,
                             eta_seconds=float(job.total_steps - step) * 30)
            yield memos_pb2.WatchJobResponse(job=job)
            if message == "hang":
                with self.job_changed:
                    self.job_changed.wait_for(lambda: job.state in terminal or not context.is_active(), timeout=10)
            elif message == "cancelled":
                self._job_update(job, state=types_pb2.JOB_STATE_CANCELLED, eta_seconds=0.0)
            time.sleep(0.01)
        if job.state not in terminal:
            if message == "fail":
                self._job_update(job, state=types_pb2.JOB_STATE_FAILED, error="loss diverged", eta_seconds=0.0)
            else:
                cube = self.cubes[job.cube_id]
                cube.head_revision += 1
                rev = types_pb2.Revision(number=cube.head_revision, parent=cube.head_revision - 1, author=author,
                                         message=message, kind=types_pb2.REVISION_KIND_COMMIT,
                                         item_count=cube.item_count)
                config, weights = b'{"r": 8}', b"T" * 4096
                meta = types_pb2.Adapter(
                    digest=hashlib.sha256(config + weights).hexdigest(), config_bytes=len(config),
                    weights_bytes=len(weights), rank=8, target_modules=["q_proj", "v_proj"],
                    lineage=types_pb2.AdapterLineage(origin="trained", source_cube_id=job.cube_id,
                                                     source_revision=job.revision, job_id=job.job_id,
                                                     source_item_ids=list(self.items[job.cube_id]),
                                                     settings={"steps": str(job.total_steps)}))
                self._set_adapter(job.cube_id, rev, (meta, config, weights))
                self.log[job.cube_id].insert(0, rev)
                self._job_update(job, state=types_pb2.JOB_STATE_SUCCEEDED, result_revision=rev.number,
                                 adapter_digest=meta.digest, eta_seconds=0.0)
        finished = True
        yield memos_pb2.WatchJobResponse(job=job)

    def CancelJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("CancelJob", request))
        job = self.jobs.get(request.job_id)
        if job is None:
            fail(context, C.NOT_FOUND, "JOB_NOT_FOUND", f"no job {request.job_id!r}")
            raise AssertionError
        if job.state not in (types_pb2.JOB_STATE_QUEUED, types_pb2.JOB_STATE_RUNNING):
            fail(context, C.FAILED_PRECONDITION, "JOB_FINISHED", f"job {job.job_id} has ended")
        self._job_update(job, state=types_pb2.JOB_STATE_CANCELLED, eta_seconds=0.0)
        return memos_pb2.CancelJobResponse(job=job)

    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListJobs", request))
        cube_id = self._cube(request.cube, context).cube_id if request.cube else ""
        jobs = [j for j in reversed(self.jobs.values()) if cube_id in ("", j.cube_id)]
        return memos_pb2.ListJobsResponse(jobs=jobs)

    def Evict(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Evict", request))
        self._cube(request.cube, context)
        return memos_pb2.EvictResponse(caches_dropped=1, pool_bytes_freed=2 * 1024 * 1024, took_us=250,
                                       adapters_unloaded=1,
                                       persisted_bytes_deleted=1024 * 1024 if request.delete_persisted else 0)

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Echoes the last message in deltas ("boom" fails midway; "interrupt me" streams until cancelled)."""
        self.requests.append(("Generate", request))
        last = request.messages[-1].content
        if last == "interrupt me":
            finished = False

            def ended() -> None:  # gRPC stops pulling a cancelled stream, so only a callback sees it
                if not finished:
                    self.generation_cancelled.set()

            context.add_callback(ended)
            yield memos_pb2.GenerateResponse(delta="Once")
            yield memos_pb2.GenerateResponse(delta=" upon")  # the test's stdout raises KeyboardInterrupt here
            for _ in range(1000):  # 10 s, far past the test's cancel
                yield memos_pb2.GenerateResponse(delta=" more")
                time.sleep(0.01)
            finished = True
            return
        if last == "trickle":  # a slow CPU: a token every 0.1 s, 1 s in all
            for _ in range(10):
                time.sleep(0.1)
                yield memos_pb2.GenerateResponse(delta=".")
        for delta in ("echo", "", ": ", last):
            yield memos_pb2.GenerateResponse(delta=delta)
        if last == "boom":
            fail(context, C.OUT_OF_RANGE, "CONTEXT_EXCEEDED", "the prompt does not fit")
        memory = []
        for mount_id in request.mount_ids:
            mount = self.mounts[mount_id][0]
            items = list(self.items[mount.cube_id].values())
            memory.append(types_pb2.MemoryUse(
                mount_id=mount_id, cube_id=mount.cube_id, revision=mount.base_revision, activated=bool(items),
                cache_key="ef" * 32 if items else "", cache_source=types_pb2.ACTIVATION_SOURCE_POOL,
                block_tokens=100 if items else 0, block_reused_tokens=96 if items else 0,
                block_computed_tokens=4 if items else 0,
                block_reuse=types_pb2.BLOCK_REUSE_EXACT if items else types_pb2.BLOCK_REUSE_UNSPECIFIED,
                block_items=[types_pb2.UsedItem(item_id=it.item_id, born_revision=it.born_revision) for it in items],
                retrieved_items=[types_pb2.UsedItem(item_id=it.item_id, born_revision=it.born_revision, score=0.75)
                                 for it in items[:1]],
            ))
        summary = types_pb2.GenerationSummary(
            finish_reason=types_pb2.FINISH_REASON_END, prompt_tokens=120, reused_tokens=100, prefilled_tokens=20,
            completion_tokens=11, ttft_us=120_000, total_us=1_120_000, memory=memory, model_fingerprint="cd" * 32,
        )
        if request.options.remember_mount_id:  # a revision with the provenance, as the daemon makes
            cube = self.cubes[self._mount(request.options.remember_mount_id, context)[0].cube_id]
            cube.head_revision += 1
            rev = types_pb2.Revision(
                number=cube.head_revision, added=2, message="remember a generation", request_id=request.request_id,
                generation=types_pb2.GenerationProvenance(model_fingerprint="cd" * 32, hidden_sources=1, sources=[
                    types_pb2.GenerationSource(cube_id=u.cube_id, revision=u.revision,
                                               block_item_ids=[i.item_id for i in u.block_items],
                                               retrieved_item_ids=[i.item_id for i in u.retrieved_items])
                    for u in memory]))
            self.log[cube.cube_id].insert(0, rev)
            summary.remembered.CopyFrom(rev)
            summary.remembered_item_ids.extend(["itm_u", "itm_a"])
        yield memos_pb2.GenerateResponse(summary=summary)


@pytest.fixture
def fake() -> FakeMemOS:
    return FakeMemOS()


@pytest.fixture
def health() -> Any:
    # grpcio-health-checking is the daemon's dependency, not the client's: the health test skips without it.
    try:
        from grpc_health.v1 import health
    except ImportError:
        return None
    return health.HealthServicer()


@pytest.fixture
def target(fake: FakeMemOS, health: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("MEMOS_AUTHOR", raising=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    memos_pb2_grpc.add_MemOSServicer_to_server(fake, server)
    if health is not None:
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


class Run:
    """memosctl's exit code and captured output."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def ctl(target: str, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*argv: str) -> Run:
        code = main(["--target", target, "--timeout", "5", *argv])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- cubes -----------------------------------------------------------------------


def test_cube_alloc_table_and_json(ctl: Any) -> None:
    r = ctl("cube", "alloc", "notes", "--description", "my notes", "--label", "team=ml", "--label", "env=dev")
    assert r.code == 0, r.err
    assert "name:          notes" in r.out
    assert "labels:        env=dev,team=ml" in r.out
    r = ctl("-o", "json", "cube", "alloc", "other")
    doc = r.json()
    assert (doc["name"], doc["head_revision"], doc["labels"]) == ("other", "0", {})


def test_cube_list_pages_through_everything(ctl: Any) -> None:
    for name in ("a", "b", "c"):
        assert ctl("cube", "alloc", name).code == 0
    r = ctl("cube", "list")
    lines = r.out.splitlines()
    assert lines[0].split() == ["CUBE", "ID", "NAME", "HEAD", "ITEMS", "MOUNTS", "CREATED", "DESCRIPTION"]
    assert [ln.split()[1] for ln in lines[1:]] == ["a", "b", "c"]
    assert [c["name"] for c in ctl("-o", "json", "cube", "list").json()["cubes"]] == ["a", "b", "c"]


def test_cube_list_on_a_cluster_shows_each_owner_node_and_down_ones(ctl: Any, fake: FakeMemOS) -> None:
    for name in ("a", "b"):
        assert ctl("cube", "alloc", name).code == 0
    first, second = sorted(fake.cubes.values(), key=lambda c: c.cube_id)
    first.owner_node = "alpha"
    second.owner_node, second.unavailable = "beta", True
    lines = ctl("cube", "list").out.splitlines()
    assert lines[0].split()[:4] == ["CUBE", "ID", "NAME", "NODE"]
    assert lines[1].split()[1:3] == ["a", "alpha"]
    assert lines[2].split()[1:4] == ["b", "beta", "(DOWN)"] and "unavailable" in lines[2]
    assert ctl("cube", "list", "--local").code == 0
    asked = [r for m, r in fake.requests if m == "ListCubes"]
    assert [r.local for r in asked] == [False, True]


def test_cluster_config_get_and_set(ctl: Any, fake: FakeMemOS) -> None:
    fake.cluster_config = memos_pb2.ClusterConfigResponse(
        node="alpha", revision=7, created_by="alpha", fixed={"security.auth": "true"},
        settings={"quotas.max_mounts_per_principal": "1024"})
    out = ctl("cluster", "config", "get").out
    assert "security.auth" in out and "fixed (every node must agree)" in out and "1024" in out
    r = ctl("-o", "json", "cluster", "config", "set", "quotas.max_mounts_per_principal", "64")
    assert r.code == 0 and r.json()["settings"]["quotas.max_mounts_per_principal"] == "64"
    [(_, request)] = [x for x in fake.requests if x[0] == "SetClusterConfig"]
    assert (request.key, request.value) == ("quotas.max_mounts_per_principal", "64")


def test_cube_stat_missing_is_exit_3(ctl: Any) -> None:
    r = ctl("cube", "stat", "nope")
    assert r.code == 3
    assert r.out == ""
    assert r.err == "memosctl: error: CUBE_NOT_FOUND: no cube 'nope'\n"


def test_cube_alloc_duplicate_is_exit_3(ctl: Any) -> None:
    assert ctl("cube", "alloc", "dup").code == 0
    r = ctl("cube", "alloc", "dup")
    assert (r.code, r.err.startswith("memosctl: error: CUBE_NAME_TAKEN: ")) == (3, True)


def test_cube_free_needs_yes(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "doomed")
    r = ctl("cube", "free", "doomed")
    assert r.code == 2
    assert "--yes" in r.err
    assert len(fake.cubes) == 1
    r = ctl("cube", "free", "doomed", "--yes")
    assert r.code == 0, r.err
    assert "freed:" in r.out and not fake.cubes


# -- usage and connectivity -----------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["cube"],
        ["--output", "xml", "stats"],
        ["mem", "search", "notes"],
        ["cube", "alloc", "x", "--label", "novalue"],
        ["mem", "search", "notes", "-q", "x", "--since", "yesterday"],
        ["diff", "notes", "one"],
        ["bogus"],
        ["cube", "activate"],
        ["cube", "activate", "notes", "--revision", "-1"],
        ["cube", "evict"],
        ["chat"],
        ["chat", "notes", "--max-tokens", "-1"],
        ["chat", "notes", "-k", "many"],
        ["adapter"],
        ["adapter", "import", "notes"],
        ["adapter", "export", "notes", "out", "--revision", "x"],
        ["adapter", "show"],
        ["train"],
        ["train", "notes", "--steps", "-1"],
        ["train", "notes", "--lr", "fast"],
        ["job"],
        ["job", "watch"],
        ["job", "cancel"],
    ],
)
def test_bad_arguments_are_exit_2(ctl: Any, argv: list[str]) -> None:
    r = ctl(*argv)
    assert r.code == 2
    assert "usage:" in r.err or "error:" in r.err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "4  the daemon is unreachable" in out


def test_no_arguments_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # no command is a usage error, but the answer is the help, not an argparse complaint
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: memosctl") and "exit codes:" in captured.out
    assert "cube" in captured.out and captured.err == ""


def test_output_json_is_accepted_after_the_command_too(ctl: Any) -> None:
    assert ctl("cube", "alloc", "a").code == 0
    before = ctl("-o", "json", "cube", "list").json()
    assert ctl("cube", "list", "-o", "json").json() == before
    assert ctl("cube", "list", "--output", "json").json() == before
    assert ctl("cube", "-o", "json", "list").json() == before
    assert ctl("chat", "a", "-m", "hi", "-o", "json").json()["summary"]["finish_reason"]
    # Not given after the command, the top-level -o (or the table default) stands.
    assert ctl("cube", "list").out.startswith("CUBE")
    assert ctl("-o", "json", "cube", "stat", "a").json()["name"] == "a"
    r = ctl("cube", "list", "-o", "yaml")
    assert r.code == 2 and "invalid choice: 'yaml'" in r.err


def test_closed_port_is_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--target", f"127.0.0.1:{closed_port()}", "--timeout", "2", "stats"])
    err = capsys.readouterr().err
    assert code == 4
    assert err.startswith("memosctl: error: UNAVAILABLE: ") and "is memosd running" in err


def test_silent_listener_is_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    # Accepts TCP but never speaks HTTP/2: the call can only time out, never having connected.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        code = main(["--target", f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "0.5", "stats"])
    assert code == 4
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_slow_daemon_is_exit_3(ctl: Any, fake: FakeMemOS, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    fake.slow_stats = 1.0
    code = main(["--target", target, "--timeout", "0.3", "stats"])
    assert code == 3
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


# -- mem ---------------------------------------------------------------------------


def test_mem_write_args_commits_and_unmounts(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("mem", "write", "notes", "Ada was born in 1815", "Grace wrote a compiler", "--tag", "people",
            "--source", "unit", "--event-time", "2024-05-01T12:00:00Z")
    assert r.code == 0, r.err
    assert "revision:" in r.out and "written:  2" in r.out
    assert r.out.count("itm_") == 2
    assert "[" not in r.err  # no progress bar for plain arguments
    commit = next(req for n, req in fake.requests if n == "Commit")
    assert commit.message == "memosctl write"
    items = next(req for n, req in fake.requests if n == "Write").items
    assert (list(items[0].tags), items[0].source, items[0].event_time.seconds) == (["people"], "unit", 1714564800)
    assert not fake.mounts
    assert fake.cubes[next(iter(fake.cubes))].head_revision == 1


def test_mem_write_jsonl_shows_progress(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    path = tmp_path / "items.jsonl"
    lines = [{"text": f"fact {i}", "tags": ["own"]} for i in range(5)]
    lines[0]["event_time"] = "2020-01-01T00:00:00Z"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    r = ctl("mem", "write", "notes", "--file", str(path), "--batch-size", "2", "--tag", "bulk", "-m", "import")
    assert r.code == 0, r.err
    assert "\r" in r.err and "5/5" in r.err and r.err.count("\n") == 1  # one line, redrawn in place
    writes = [req for n, req in fake.requests if n == "Write"]
    assert [len(w.items) for w in writes] == [2, 2, 1]
    assert list(writes[0].items[0].tags) == ["own", "bulk"]
    assert writes[0].items[0].event_time.seconds == 1577836800
    assert next(req for n, req in fake.requests if n == "Commit").message == "import"


def test_mem_write_json_and_quiet_have_no_progress(ctl: Any, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    path = tmp_path / "items.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    r = ctl("-o", "json", "mem", "write", "notes", "-f", str(path))
    assert r.code == 0 and r.err == ""
    doc = r.json()
    assert doc["committed"] is True and len(doc["item_ids"]) == 2 and doc["revision"]["number"] == "1"
    r = ctl("-q", "mem", "write", "notes", "-f", str(path))
    assert r.code == 0 and r.err == ""


def test_mem_write_bad_jsonl_is_exit_2_before_mounting(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    r = ctl("mem", "write", "notes", "--file", str(path))
    assert r.code == 2
    assert f"{path}:2: unknown keys" in r.err
    assert not any(n == "Mount" for n, _ in fake.requests)
    assert ctl("mem", "write", "notes").code == 2  # nothing to write


def test_ingest_bad_conversation_is_exit_2_before_mounting(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    path = tmp_path / "chat.jsonl"
    for lines, needle in [
        ('{"speaker": "u", "text": "hi", "session_id": "s"}\n{"speaker": "u", "txt": "typo"}\n', ":2: unknown keys"),
        ('{"speaker": "", "text": "hi", "session_id": "s"}\n', "'speaker' must be a non-empty string"),
        ('{"speaker": "u", "text": "hi"}\n', "'session_id' must be a non-empty string (or give --session)"),
        ('{"speaker": "u", "text": "hi", "session_id": "s", "time": "yesterday"}\n', "not an ISO 8601 time"),
    ]:
        path.write_text(lines)
        r = ctl("ingest", "notes", "--file", str(path))
        assert r.code == 2 and needle in r.err, r.err
    assert ctl("ingest", "notes", "--file", str(path), "--batch-size", "0").code == 2
    assert not any(n == "Mount" for n, _ in fake.requests)


def test_mem_write_failure_commits_nothing(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    path = tmp_path / "items.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ""}\n')
    r = ctl("mem", "write", "notes", "--file", str(path), "--batch-size", "1")
    assert r.code == 3 and "TEXT_EMPTY" in r.err
    assert not fake.mounts and not any(n == "Commit" for n, _ in fake.requests)


def test_mem_write_no_commit_then_commit_mount(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("mem", "write", "notes", "staged only", "--no-commit")
    assert r.code == 0, r.err
    (mount_id,) = fake.mounts
    assert f"memosctl commit --mount {mount_id}" in r.err
    assert f"{mount_id} (not committed)" in r.out
    r = ctl("commit", "--mount", mount_id, "-m", "later")
    assert r.code == 0, r.err
    assert "revision:  1" in r.out and "message:   later" in r.out
    assert not fake.mounts
    assert ctl("commit", "--mount", mount_id).code == 3  # gone: MOUNT_NOT_FOUND


def test_mem_read_all_and_by_id(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ids = ctl("-o", "json", "mem", "write", "notes", "a1", "b2", "c3", "--tag", "x").json()["item_ids"]
    r = ctl("mem", "read", "notes")
    lines = r.out.splitlines()
    assert lines[0].split() == ["ITEM", "ID", "REV", "STATE", "EVENT", "TIME", "TAGS", "SOURCE", "TEXT"]
    assert [ln.split()[0] for ln in lines[1:]] == ids  # all three, across two pages
    doc = ctl("-o", "json", "mem", "read", "notes", ids[1]).json()
    assert [i["text"] for i in doc["items"]] == ["b2"]
    assert ctl("mem", "read", "notes", "itm_missing").code == 3
    assert not fake.mounts


def test_mem_search_table_and_json(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ctl("cube", "alloc", "other")
    ctl("mem", "write", "notes", "Ada was born in 1815 " + "and more words " * 20)
    ctl("mem", "write", "other", "Ada Lovelace")
    r = ctl("mem", "search", "notes", "other", "-q", "ada", "-k", "5", "--tag", "t1", "--any-tag", "t2",
            "--not-tag", "t3", "--since", "2024-01-01", "--until", "2025-01-01T00:00:00Z", "--mode", "dense")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["RANK", "SCORE", "DENSE", "LEXICAL", "ITEM", "ID", "CUBE", "TEXT"]
    assert lines[1].split()[:4] == ["1", "0.5000", "0.7500", "-"]
    assert lines[1].split()[5] == "notes" and lines[2].split()[5] == "other"
    assert lines[1].endswith("…") and len(lines[1]) <= 120
    req = next(req for n, req in fake.requests if n == "Search")
    assert (req.k, req.mode, list(req.tags.any_of)) == (5, types_pb2.SEARCH_MODE_DENSE, ["t2"])
    assert req.event_time.start.seconds == 1704067200 and req.event_time.end.seconds == 1735689600
    doc = ctl("-o", "json", "mem", "search", "notes", "-q", "ada").json()
    assert doc["hits"][0]["item"]["text"].startswith("Ada") and doc["took_us"] == "1234"
    assert not fake.mounts


def test_mem_forget_commits(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ids = ctl("-o", "json", "mem", "write", "notes", "a", "b").json()["item_ids"]
    r = ctl("mem", "forget", "notes", ids[0], "-m", "gdpr", "--author", "ops")
    assert r.code == 0, r.err
    assert "revision:  2" in r.out and "forgotten: 1" in r.out and "author:    ops" in r.out
    assert [i["item_id"] for i in ctl("-o", "json", "mem", "read", "notes").json()["items"]] == ids[1:]


# -- history and stats ------------------------------------------------------------


def test_log_diff_rollback(ctl: Any) -> None:
    ctl("cube", "alloc", "notes")
    for text in ("one", "two", "three"):
        ctl("mem", "write", "notes", text, "-m", f"add {text}")
    r = ctl("log", "notes")
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["REV", "KIND", "AUTHOR"]
    assert [ln.split()[0] for ln in lines[1:]] == ["3", "2", "1"]  # three revisions over two pages
    assert lines[1].endswith("add three")
    assert len(ctl("-o", "json", "log", "notes", "-n", "2").json()["revisions"]) == 2
    r = ctl("diff", "notes", "1")
    assert [ln.split()[:2] for ln in r.out.splitlines()[1:]] == [["+", "added"], ["+", "added"]]
    r = ctl("rollback", "notes", "1", "-m", "undo")
    assert r.code == 0, r.err
    assert "revision:  4" in r.out and "restored:  1" in r.out
    assert ctl("rollback", "notes", "9").code == 3


def test_stats_table_and_json(ctl: Any) -> None:
    r = ctl("stats")
    assert r.code == 0, r.err
    assert "uptime:" in r.out and "1h02m05s" in r.out and "3.0 MiB" in r.out and "calls Stats:" in r.out
    assert "tiny-llama (ready, cpu float32, context 2048)" in r.out
    assert "2 caches, 1.0 MiB of 64.0 MiB" in r.out and "5 hits, 2 misses, 0 evictions" in r.out
    assert "adapters:" in r.out and "1 of 4 resident, 3 loads, 2 evictions" in r.out
    assert "2 (5.0 MiB)" in r.out
    doc = ctl("-o", "json", "stats").json()
    assert doc["version"] == "0.1.0-fake" and doc["calls"] == {"Stats": "1"}
    assert doc["adapters"]["max_resident"] == 4 and doc["adapters"]["stored_bytes"] == str(5 * 1024 * 1024)


def test_stats_of_a_daemon_without_a_model_says_disabled_plainly(ctl: Any, fake: FakeMemOS) -> None:
    fake.model_states = ["disabled"]  # runtime.model = none: the fake still names a device and dtype
    r = ctl("stats")
    assert r.code == 0 and "model:           tiny-llama (disabled: no activation memory or chat)" in r.out, r.out



def test_health(ctl: Any, health: Any) -> None:
    if health is None:
        pytest.skip("grpcio-health-checking is not installed")
    from grpc_health.v1 import health_pb2

    r = ctl("health")
    assert (r.code, r.out) == (0, "SERVING\n")
    health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    r = ctl("-o", "json", "health")
    assert r.code == 3 and r.json() == {"status": "NOT_SERVING"}


# -- activation memory and chat ------------------------------------------------------


class Recorder(io.TextIOBase):
    """A stdout that records each write and flush (to see streaming), optionally raising Ctrl-C on a text."""

    def __init__(self, inner: Any, interrupt_on: str | None = None) -> None:
        self.inner, self.interrupt_on = inner, interrupt_on
        self.events: list[str] = []

    def write(self, text: str) -> int:
        if text == self.interrupt_on:
            self.interrupt_on = None
            raise KeyboardInterrupt
        self.events.append(text)
        return int(self.inner.write(text))

    def flush(self) -> None:
        self.events.append("<flush>")
        self.inner.flush()


def requests_of(fake: FakeMemOS, name: str) -> list[Any]:
    return [req for n, req in fake.requests if n == name]


def messages_of(req: Any) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in req.messages]


def test_cube_activate_table_and_json(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ctl("mem", "write", "notes", "Ada was born in 1815", "Grace wrote a compiler")
    ctl("mem", "write", "notes", "third")
    r = ctl("cube", "activate", "notes")
    assert r.code == 0, r.err
    block = dict(line.split(":", 1) for line in r.out.splitlines())
    assert {k: v.strip() for k, v in block.items()} == {
        "cube id": "cube_0001", "revision": "2", "items": "3", "tokens": "120", "computed": "90", "reused": "30",
        "pool bytes": "2.0 MiB", "persisted bytes": "1.0 MiB", "source": "computed", "pooled": "yes",
        "cache key": "ab" * 32, "model": "cd" * 32, "adapter": "-", "selector": "all", "took": "1.5 ms",
    }
    doc = ctl("-o", "json", "cube", "activate", "notes", "--revision", "1").json()
    assert (doc["revision"], doc["tokens"], doc["source"], doc["pooled"]) == (
        "1", 120, "ACTIVATION_SOURCE_COMPUTED", True)
    mounts = requests_of(fake, "Mount")[-2:]
    assert [(m.cube, m.revision, m.mode) for m in mounts] == [
        ("notes", 0, types_pb2.MOUNT_MODE_READ_ONLY), ("notes", 1, types_pb2.MOUNT_MODE_READ_ONLY)]
    assert len(requests_of(fake, "Activate")) == 2
    assert not fake.mounts  # unmounted after each


def test_cube_activate_empty_is_exit_3_and_unmounts(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "empty")
    r = ctl("cube", "activate", "empty")
    assert (r.code, r.out) == (3, "")
    assert r.err == "memosctl: error: CUBE_EMPTY: revision 0 has no items\n"
    assert not fake.mounts
    assert ctl("cube", "activate", "missing").code == 3


def test_cube_evict_and_delete(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("cube", "evict", "notes")
    assert r.code == 0, r.err
    assert "evicted:           notes" in r.out and "caches dropped:    1" in r.out
    assert "adapters unloaded: 1" in r.out
    assert "pool bytes freed:  2.0 MiB" in r.out and "persisted deleted: 0 B" in r.out and "0.2 ms" in r.out
    doc = ctl("-o", "json", "cube", "evict", "notes", "--delete").json()
    assert (doc["caches_dropped"], doc["persisted_bytes_deleted"]) == (1, str(1024 * 1024))
    assert [(e.cube, e.delete_persisted) for e in requests_of(fake, "Evict")] == [("notes", False), ("notes", True)]
    assert ctl("cube", "evict", "nope").code == 3


def test_chat_one_shot_streams_reply_and_summary(ctl: Any, fake: FakeMemOS, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "notes")
    ctl("cube", "alloc", "other")
    ctl("mem", "write", "notes", "Ada was born in 1815")
    stdout = Recorder(sys.stdout)
    monkeypatch.setattr(sys, "stdout", stdout)
    r = ctl("chat", "notes", "other", "-m", "when was Ada born?", "--system", "be brief", "--max-tokens", "5",
            "--temperature", "0.5", "--top-p", "0.9", "--stop", "\n\n", "--stop", "END", "--seed", "7", "-k", "0")
    assert r.code == 0, r.err
    assert r.out == "echo: when was Ada born?\n"
    # Each delta is written and flushed as it arrives; the empty one is not written.
    assert stdout.events[:6] == ["echo", "<flush>", ": ", "<flush>", "when was Ada born?", "<flush>"]
    assert r.err == ("prompt 120 tokens (100 reused, 20 prefilled), 11 generated (end), "
                     "ttft 120.0 ms, total 1120.0 ms, 10.0 tokens/s\n")
    (req,) = requests_of(fake, "Generate")
    assert messages_of(req) == [("system", "be brief"), ("user", "when was Ada born?")]
    mounts = requests_of(fake, "Mount")[-2:]
    assert [m.cube for m in mounts] == ["notes", "other"]
    assert all(m.mode == types_pb2.MOUNT_MODE_READ_ONLY for m in mounts)
    assert list(req.mount_ids) == sorted(req.mount_ids) and len(req.mount_ids) == 2
    o = req.options
    assert (o.max_tokens, o.temperature, round(o.top_p, 6), list(o.stop), o.seed) == (5, 0.5, 0.9, ["\n\n", "END"], 7)
    assert req.HasField("retrieve_k") and req.retrieve_k == 0
    assert not fake.mounts


def test_chat_says_the_model_is_loading_and_waits_for_it(ctl: Any, fake: FakeMemOS,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memos.cli.chat.MODEL_POLL_SECONDS", 0.01)
    ctl("cube", "alloc", "notes")
    fake.model_states = ["loading", "loading", "loading", "ready"]
    r = ctl("chat", "notes", "-m", "hi")
    assert r.code == 0 and r.out == "echo: hi\n", r.err
    assert r.err.startswith("memosctl: the model is loading (")
    assert r.err.count("the model is loading") == 1 and fake.stats_calls == 4  # polled until ready
    fake.stats_calls = 0
    r = ctl("chat", "notes", "-m", "hi")
    assert "loading" not in r.err and fake.stats_calls == 1  # ready: one look, no note


def test_chat_reply_making_progress_outlasts_the_timeout(target: str, fake: FakeMemOS,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # 1 s of steady tokens; --timeout 0.4 with --max-tokens 1 was a 0.9 s whole-stream deadline. With the
    # model ready, the deadline is on silence only.
    base = ["--target", target, "--timeout", "0.4"]
    assert main([*base, "cube", "alloc", "notes"]) == 0
    assert main([*base, "chat", "notes", "--max-tokens", "1", "-m", "trickle"]) == 0
    assert capsys.readouterr().out.endswith(".........." + "echo: trickle\n")
    # A caller that may not read Stats (the model state unknown) keeps the whole-stream deadline.
    fake.model_states = ["!"]
    assert main([*base, "chat", "notes", "--max-tokens", "1", "-m", "trickle"]) == 3
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_chat_defaults_leave_options_to_the_daemon(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("-q", "chat", "notes", "-m", "hi")
    assert (r.code, r.out, r.err) == (0, "echo: hi\n", "")  # -q: no summary line
    (req,) = requests_of(fake, "Generate")
    assert messages_of(req) == [("user", "hi")]
    assert not req.HasField("retrieve_k") and req.options == types_pb2.GenerationOptions()


def test_chat_show_memory(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ids = ctl("-o", "json", "mem", "write", "notes", "a", "b").json()["item_ids"]
    blank_id = ctl("-o", "json", "cube", "alloc", "blank").json()["cube_id"]
    r = ctl("chat", "notes", "blank", "-m", "hi", "--show-memory")
    assert r.code == 0, r.err
    lines = r.err.splitlines()
    assert lines[1:] == [
        "memory used:",
        f"  notes (cube_0001) at revision 1: activated, 96 of 100 block tokens reused from pool (key {'ef' * 6})",
        f"    block items (2): {ids[0]}@1, {ids[1]}@1",
        f"    retrieved (1): {ids[0]}@1 (0.750)",
        f"  blank ({blank_id}) at revision 0: not activated",
        "    block items (0): -",
        "    retrieved (0): -",
    ]


def test_chat_remember_mounts_that_cube_read_write_and_says_where(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ctl("cube", "alloc", "journal")
    ids = ctl("-o", "json", "mem", "write", "notes", "a").json()["item_ids"]
    # A cube of the chat: mounted once, read-write, and both read and remembered.
    r = ctl("chat", "notes", "--remember", "notes", "--session", "s-1", "-m", "hi")
    assert r.code == 0, r.err
    assert r.err.splitlines()[1] == "remembered in notes at revision 2 (2 turns, session s-1)"
    [mount] = requests_of(fake, "Mount")[-1:]
    assert mount.cube == "notes" and mount.mode == types_pb2.MOUNT_MODE_READ_WRITE
    [req] = requests_of(fake, "Generate")
    assert req.options.remember_mount_id == req.mount_ids[0] and req.options.session_id == "s-1"
    assert req.request_id  # a fresh one per reply
    # Another cube: mounted read-write besides the read-only memory, and not read; a session of its own.
    r = ctl("chat", "notes", "--remember", "journal", "-m", "hi")
    assert r.code == 0, r.err
    memory, journal = requests_of(fake, "Mount")[-2:]
    assert (memory.cube, memory.mode) == ("notes", types_pb2.MOUNT_MODE_READ_ONLY)
    assert (journal.cube, journal.mode) == ("journal", types_pb2.MOUNT_MODE_READ_WRITE)
    req = requests_of(fake, "Generate")[-1]
    assert req.options.remember_mount_id not in req.mount_ids and req.options.session_id.startswith("chat-")
    # memosctl log lists what the remembered revision was generated with.
    out = ctl("log", "journal").out
    assert "remembered generations:" in out and f"block {ids[0]}; retrieved {ids[0]}" in out
    assert "and 1 cube(s) you cannot read" in out
    assert ctl("chat", "notes", "--session", "s", "-m", "hi").code == 2  # --session without --remember
    assert not fake.mounts


def test_chat_json_is_one_object(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("-o", "json", "chat", "notes", "-m", "hi", "--show-memory")
    assert r.code == 0 and r.err == ""
    doc = r.json()
    assert doc["text"] == "echo: hi"
    summary = doc["summary"]
    assert (summary["prompt_tokens"], summary["finish_reason"], summary["ttft_us"]) == (
        120, "FINISH_REASON_END", "120000")
    assert summary["memory"][0]["mount_id"] == requests_of(fake, "Generate")[0].mount_ids[0]


def test_chat_error_midway_is_exit_3(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("chat", "notes", "-m", "boom")
    assert r.code == 3
    assert r.out == "echo: boom\n"  # the partial reply's line is ended
    assert r.err == "memosctl: error: CONTEXT_EXCEEDED: the prompt does not fit\n"
    assert not fake.mounts


def test_chat_usage_errors(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("chat", "notes", "-m", "  ")
    assert r.code == 2 and "empty" in r.err
    assert not requests_of(fake, "Mount")
    assert ctl("chat", "missing", "-m", "hi").code == 3


def test_chat_interactive_keeps_history(ctl: Any, fake: FakeMemOS, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "notes")
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n\n  second  \n/exit\nnever sent\n"))
    r = ctl("chat", "notes", "--system", "sys")
    assert r.code == 0, r.err
    assert r.out == "echo: first\necho: second\n"  # no prompt: stdin is not a terminal
    assert r.err.count("tokens/s") == 2
    one, two = requests_of(fake, "Generate")
    assert messages_of(one) == [("system", "sys"), ("user", "first")]
    assert messages_of(two) == [("system", "sys"), ("user", "first"), ("assistant", "echo: first"),
                                ("user", "second")]
    assert list(one.mount_ids) == list(two.mount_ids)  # one mount for the whole session
    assert len(requests_of(fake, "Mount")) == 1 and not fake.mounts


def test_chat_interactive_json_and_eof(ctl: Any, fake: FakeMemOS, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "notes")
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo"))  # ends without /exit nor a newline
    r = ctl("-o", "json", "chat", "notes")
    assert r.code == 0 and r.err == ""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(r.out.rstrip()):
        doc, pos = decoder.raw_decode(r.out, pos)
        docs.append(doc)
        pos += 1
    assert [d["text"] for d in docs] == ["echo: one", "echo: two"]
    assert messages_of(requests_of(fake, "Generate")[1])[-2:] == [("assistant", "echo: one"), ("user", "two")]


def test_chat_interactive_ctrl_c_cancels_the_reply(ctl: Any, fake: FakeMemOS,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "notes")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\ninterrupt me\nafter\n"))
    monkeypatch.setattr(sys, "stdout", Recorder(sys.stdout, interrupt_on=" upon"))
    r = ctl("chat", "notes")
    assert r.code == 0, r.err
    assert r.out == "echo: hello\nOnce\necho: after\n"
    assert "(reply cancelled)" in r.err
    assert fake.generation_cancelled.wait(5)  # the daemon saw the call cancelled
    last = requests_of(fake, "Generate")[-1]
    # The cancelled turn is not part of the conversation.
    assert messages_of(last) == [("user", "hello"), ("assistant", "echo: hello"), ("user", "after")]
    assert not fake.mounts


# -- parametric memory: adapters -------------------------------------------------------

ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
                             "base_model_name_or_path": "tiny-llama"}).encode()


def make_adapter(path: Path, weights: bytes = bytes(range(256)) * 9) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(ADAPTER_CONFIG)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def block_of(out: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def test_adapter_import_uploads_commits_and_unmounts(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    ctl("mem", "write", "notes", "a fact")
    src = make_adapter(tmp_path / "lora")
    r = ctl("adapter", "import", "notes", str(src), "-m", "add lora", "--author", "ops")
    assert r.code == 0, r.err
    weights = (src / "adapter_model.safetensors").read_bytes()
    digest = hashlib.sha256(ADAPTER_CONFIG + weights).hexdigest()
    (header, chunks), = fake.uploads
    assert (header.config_bytes, header.weights_bytes, header.digest) == (len(ADAPTER_CONFIG), len(weights), digest)
    assert [c.file for c in chunks] == [types_pb2.ADAPTER_FILE_CONFIG, types_pb2.ADAPTER_FILE_WEIGHTS]
    assert b"".join(c.data for c in chunks) == ADAPTER_CONFIG + weights
    mount = requests_of(fake, "Mount")[-1]
    assert (mount.cube, mount.revision, mount.mode) == ("notes", 0, types_pb2.MOUNT_MODE_READ_WRITE)
    commit = requests_of(fake, "Commit")[-1]
    assert (commit.message, commit.author) == ("add lora", "ops")
    block = block_of(r.out)
    assert block["digest"] == digest and block["revision"] == "2" and block["born revision"] == "2"
    assert (block["rank"], block["target modules"], block["base model"]) == ("8", "q_proj,v_proj", "tiny-llama")
    assert (block["config bytes"], block["weights bytes"], block["origin"]) == (
        f"{len(ADAPTER_CONFIG)} B", "2.2 KiB", "imported")
    assert not fake.mounts
    doc = ctl("-o", "json", "adapter", "import", "notes", str(src)).json()
    assert doc["adapter"]["digest"] == digest and doc["revision"]["number"] == "3"
    assert (doc["adapter"]["born_revision"], doc["adapter"]["staged"]) == ("3", False)
    assert requests_of(fake, "Commit")[-1].message == "memosctl adapter import"


def test_adapter_import_bad_directory_is_exit_2_before_mounting(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    src = make_adapter(tmp_path / "lora")
    (src / "adapter_model.safetensors").unlink()
    r = ctl("adapter", "import", "notes", str(src))
    assert r.code == 2 and "adapter_model.safetensors" in r.err
    r = ctl("adapter", "import", "notes", str(tmp_path / "missing"))
    assert r.code == 2 and "not a directory" in r.err
    assert not requests_of(fake, "Mount") and not fake.uploads


def test_adapter_import_refused_commits_nothing(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    src = make_adapter(tmp_path / "lora")
    (src / "adapter_config.json").write_text("not json")
    r = ctl("adapter", "import", "notes", str(src))
    assert (r.code, r.out) == (3, "")
    assert r.err == "memosctl: error: ADAPTER_INVALID: adapter_config.json is not JSON\n"
    assert not requests_of(fake, "Commit") and not fake.mounts


def test_adapter_export_writes_identical_files(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    src = make_adapter(tmp_path / "lora")
    ctl("adapter", "import", "notes", str(src))
    ctl("mem", "write", "notes", "later")
    dest = tmp_path / "out" / "lora"
    r = ctl("adapter", "export", "notes", str(dest))
    assert r.code == 0, r.err
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    block = block_of(r.out)
    assert (block["revision"], block["born revision"], block["rank"]) == ("2", "1", "8")
    assert str(dest / "adapter_model.safetensors") in block["written"]
    doc = ctl("-o", "json", "adapter", "export", "notes", str(tmp_path / "again"), "--revision", "1").json()
    assert doc["revision"] == 1 and doc["files"] == [str(tmp_path / "again" / "adapter_config.json"),
                                                       str(tmp_path / "again" / "adapter_model.safetensors")]
    assert requests_of(fake, "Mount")[-1].revision == 1
    assert requests_of(fake, "Mount")[-1].mode == types_pb2.MOUNT_MODE_READ_ONLY
    assert not fake.mounts


def test_adapter_export_size_mismatch_is_exit_3_and_writes_nothing(ctl: Any, fake: FakeMemOS,
                                                                   tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    ctl("adapter", "import", "notes", str(make_adapter(tmp_path / "lora")))
    fake.export_truncated = True
    r = ctl("adapter", "export", "notes", str(tmp_path / "out"))
    assert r.code == 3 and r.err.startswith("memosctl: error: DATA_LOSS: ")
    assert not (tmp_path / "out").exists() and not fake.mounts


def test_adapter_show_and_missing(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("adapter", "show", "notes")
    assert r.code == 3 and "ADAPTER_NOT_FOUND" in r.err
    src = make_adapter(tmp_path / "lora")
    ctl("adapter", "import", "notes", str(src))
    before = set(tmp_path.iterdir())
    r = ctl("adapter", "show", "notes")
    assert r.code == 0, r.err
    block = block_of(r.out)
    assert (block["cube id"], block["revision"], block["born revision"], block["origin"]) == (
        "cube_0001", "1", "1", "imported")
    assert "trained from" not in block and set(tmp_path.iterdir()) == before  # metadata only, no files
    doc = ctl("-o", "json", "adapter", "show", "notes", "--revision", "1").json()
    assert doc["adapter"]["rank"] == 8 and doc["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert not fake.mounts


def test_adapter_remove_forgets_and_commits(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    ctl("adapter", "import", "notes", str(make_adapter(tmp_path / "lora")))
    r = ctl("adapter", "remove", "notes", "--author", "ops")
    assert r.code == 0, r.err
    (forget,) = requests_of(fake, "Forget")
    assert (list(forget.item_ids), forget.adapter) == ([], True)
    assert requests_of(fake, "Mount")[-1].mode == types_pb2.MOUNT_MODE_READ_WRITE
    commit = requests_of(fake, "Commit")[-1]
    assert (commit.message, commit.author) == ("memosctl adapter remove", "ops")
    block = block_of(r.out)
    assert (block["revision"], block["adapter"]) == ("2", "removed")
    assert ctl("adapter", "show", "notes").code == 3
    assert ctl("adapter", "show", "notes", "--revision", "1").code == 0  # history keeps it
    assert not fake.mounts


def test_log_and_diff_show_adapter_changes(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    ctl("mem", "write", "notes", "one", "-m", "add one")
    src = make_adapter(tmp_path / "lora")
    digest = ctl("-o", "json", "adapter", "import", "notes", str(src), "-m", "lora").json()["adapter"]["digest"]
    ctl("mem", "write", "notes", "two", "-m", "add two")
    ctl("adapter", "remove", "notes", "-m", "drop lora")
    lines = ctl("log", "notes").out.splitlines()
    assert lines[0].split() == ["REV", "KIND", "AUTHOR", "CREATED", "ADDED", "CHANGED", "FORGOTTEN", "ITEMS",
                                "ADAPTER", "MESSAGE"]
    marks = {ln.split()[0]: ln.split()[8] for ln in lines[1:]}  # the ADAPTER column
    assert marks == {"4": "removed", "3": "-", "2": digest[:12], "1": "-"}
    assert lines[1].endswith("drop lora")
    doc = ctl("-o", "json", "log", "notes").json()
    assert [(r["adapter_changed"], r["adapter_digest"]) for r in doc["revisions"]] == [
        (True, ""), (False, digest), (True, digest), (False, "")]

    r = ctl("diff", "notes", "1", "3")
    rows = [ln.split(None, 3) for ln in r.out.splitlines()[1:]]
    assert rows[0][:3] == ["+", "added", "adapter"]
    assert rows[0][3].startswith(f"{digest[:12]} (rank 8, 2.2 KiB, imported)")
    assert [row[:2] for row in rows[1:]] == [["+", "added"]]
    r = ctl("diff", "notes", "2", "4")
    assert r.out.splitlines()[1].split() == ["-", "forgotten", "adapter", digest[:12], "removed"]
    doc = ctl("-o", "json", "diff", "notes", "0", "2").json()
    assert doc["adapter_change"]["kind"] == "CHANGE_KIND_ADDED"
    assert doc["adapter_change"]["after"]["digest"] == digest and "before" not in doc["adapter_change"]
    assert ctl("-o", "json", "diff", "notes", "0", "1").json()["adapter_change"] is None
    r = ctl("diff", "notes", "0", "1")
    assert "adapter" not in r.out


def test_chat_adapter_uses_that_cubes_mount(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    other_id = ctl("-o", "json", "cube", "alloc", "other").json()["cube_id"]
    assert ctl("chat", "notes", "other", "-m", "hi", "--adapter", "other").code == 0
    assert ctl("chat", "notes", "other", "-m", "hi", "--adapter", other_id).code == 0
    assert ctl("chat", "notes", "other", "-m", "hi", "--adapter", "notes").code == 0
    by_name, by_id, first = requests_of(fake, "Generate")
    assert by_name.options.adapter_mount_id == by_name.mount_ids[1]
    assert by_id.options.adapter_mount_id == by_id.mount_ids[1]
    assert first.options.adapter_mount_id == first.mount_ids[0]
    r = ctl("chat", "notes", "-m", "hi", "--adapter", "other")
    assert r.code == 2 and "--adapter 'other' is not one of the chat's cubes" in r.err
    assert len(requests_of(fake, "Generate")) == 3 and not fake.mounts


def test_chat_defaults_to_the_adapter_of_the_first_cube_holding_one(ctl: Any, fake: FakeMemOS,
                                                                       tmp_path: Path) -> None:
    # After `memosctl train notes` the cube's block is activated under its adapter: plain `chat notes` must
    # generate with it, or the block is prefilled again and the trained memory is left out.
    ctl("cube", "alloc", "notes")
    ctl("cube", "alloc", "other")
    assert ctl("-q", "chat", "notes", "other", "-m", "hi").code == 0  # no adapter anywhere: the base model
    digest = ctl("-o", "json", "adapter", "import", "other", str(make_adapter(tmp_path / "lora")),
                 "-m", "lora").json()["adapter"]["digest"]
    r = ctl("chat", "notes", "other", "-m", "hi")
    assert r.code == 0 and f"generating with the adapter of cube 'other' ({digest[:12]})" in r.err
    assert "--no-adapter" in r.err
    assert ctl("chat", "notes", "other", "-m", "hi", "--no-adapter").code == 0
    assert ctl("chat", "notes", "other", "-m", "hi", "--adapter", "notes").code == 0  # explicit wins
    none, auto, base, explicit = requests_of(fake, "Generate")
    assert none.options.adapter_mount_id == "" and base.options.adapter_mount_id == ""
    assert auto.options.adapter_mount_id == auto.mount_ids[1] and len(auto.mount_ids) == 2
    assert explicit.options.adapter_mount_id == explicit.mount_ids[0]
    r = ctl("chat", "notes", "-m", "hi", "--adapter", "notes", "--no-adapter")
    assert r.code == 2 and "not allowed with argument" in r.err


def test_chat_adapter_only_sends_the_adapter_and_no_memory(ctl: Any, fake: FakeMemOS, tmp_path: Path) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("chat", "notes", "--adapter-only", "-m", "hi")
    assert r.code == 2 and "none of the chat's cubes holds an adapter" in r.err
    ctl("adapter", "import", "notes", str(make_adapter(tmp_path / "lora")), "-m", "lora")
    r = ctl("chat", "notes", "--adapter-only", "-k", "3", "-m", "hi")
    assert r.code == 2 and "--adapter-only retrieves nothing" in r.err
    assert ctl("chat", "notes", "--adapter-only", "-m", "hi").code == 0
    assert ctl("chat", "notes", "--adapter", "notes", "--adapter-only", "-m", "hi").code == 0
    for req in requests_of(fake, "Generate"):
        # No mount in mount_ids: neither the block nor retrieval feeds the prompt; the adapter's mount is
        # named only as the adapter to generate with.
        assert list(req.mount_ids) == [] and req.options.adapter_mount_id
    assert not fake.mounts


# -- parametric memory: training jobs ---------------------------------------------------


class InterruptingStderr(io.TextIOBase):
    """A stderr that raises KeyboardInterrupt (once) on the first write containing ``marker``."""

    def __init__(self, inner: Any, marker: str) -> None:
        self.inner, self.marker = inner, marker

    def write(self, text: str) -> int:
        if self.marker and self.marker in text:
            self.marker = ""
            raise KeyboardInterrupt
        return int(self.inner.write(text))

    def flush(self) -> None:
        self.inner.flush()


def test_train_shows_progress_and_succeeds(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    ctl("mem", "write", "notes", "a", "b")
    r = ctl("train", "notes", "--steps", "3", "--rank", "8", "--lr", "0.001", "--seed", "7", "-m", "learn",
            "--author", "ops")
    assert r.code == 0, r.err
    (req,) = requests_of(fake, "Train")
    s = req.settings
    assert (s.steps, s.rank, round(s.learning_rate, 9), s.seed, req.message, req.author) == (
        3, 8, 0.001, 7, "learn", "ops")
    mount = requests_of(fake, "Mount")[-1]
    assert (mount.cube, mount.revision, mount.mode) == ("notes", 0, types_pb2.MOUNT_MODE_READ_ONLY)
    assert "job job_0006: training cube cube_0001 at revision 1 (Ctrl-C cancels it)" in r.err
    assert "\r" in r.err and "step 1/3" in r.err and "loss 2.0000" in r.err and "eta 1m00s" in r.err
    assert "step 3/3 100%" in r.err
    block = block_of(r.out)
    assert (block["job id"], block["state"], block["step"], block["result revision"]) == (
        "job_0006", "succeeded", "3/3", "2")
    assert block["settings"] == "steps 3, rank 8, lr 0.001, seed 7"
    assert len(block["adapter"]) == 64
    assert not fake.mounts
    # The trained adapter is the cube's, with its lineage.
    shown = block_of(ctl("adapter", "show", "notes").out)
    assert (shown["origin"], shown["trained from"], shown["job"]) == (
        "trained", "cube_0001 at revision 1 (2 items)", "job_0006")


def test_mem_extract_follows_the_job_and_passes_the_token_from_the_environment(
        ctl: Any, fake: FakeMemOS, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "chat")
    monkeypatch.setenv("EXTRACT_TOKEN", "sk-secret")
    r = ctl("mem", "extract", "chat", "--url", "http://127.0.0.1:9/v1", "--token-env", "EXTRACT_TOKEN",
            "--model", "m", "--max-tokens", "64", "-m", "read it", "--author", "ops")
    assert r.code == 0, r.err
    (req,) = requests_of(fake, "Extract")
    x = req.extractor
    assert (x.url, x.token, x.model, x.max_tokens, req.message, req.author) == (
        "http://127.0.0.1:9/v1", "sk-secret", "m", 64, "read it", "ops")
    assert not req.reread  # incremental unless asked
    assert requests_of(fake, "Mount")[-1].mode == types_pb2.MOUNT_MODE_READ_WRITE
    assert "reading 3 turns of cube cube_0001" in r.err and "prompt 2/2 100% kept 2 dropped 1 refused 1" in r.err
    assert "reading [" in r.err and "training" not in r.err  # queued too: the bar is named for the job's kind
    block = block_of(r.out)
    assert (block["kind"], block["state"], block["prompts"], block["turns"], block["result revision"]) == (
        "extract", "succeeded", "2/2", "3/3", "1")
    assert block["items"] == "kept 2, dropped 1, refused 1 of 4 proposed"
    assert (block["dropped"], block["refused"]) == ("unknown_key 1", "unsupported 1")
    assert "sk-secret" not in r.out + r.err and not fake.mounts
    listed = ctl("job", "list")
    assert "kept 2, dropped 1, refused 1 of 4 proposed" in listed.out
    r = ctl("mem", "extract", "chat", "--token-env", "NOT_SET_ANYWHERE")
    assert r.code != 0 and "NOT_SET_ANYWHERE" in r.err and len(requests_of(fake, "Extract")) == 1
    assert ctl("mem", "extract", "chat", "--reread").code == 0
    assert requests_of(fake, "Extract")[-1].reread


def test_train_json_and_quiet_have_no_progress(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("-o", "json", "train", "notes")
    assert r.code == 0 and "\r" not in r.err and "step" not in r.err  # the note, but no progress frames
    doc = r.json()
    assert (doc["state"], doc["step"], doc["total_steps"]) == ("JOB_STATE_SUCCEEDED", 4, 4)
    assert requests_of(fake, "Train")[0].settings == types_pb2.TrainSettings()
    assert requests_of(fake, "Train")[0].message == "memosctl train"
    r = ctl("-q", "train", "notes")
    assert r.code == 0 and r.err == ""


@pytest.mark.parametrize(("message", "state", "error"), [
    ("fail", "failed", "memosctl: error: JOB_FAILED: job job_0003 failed: loss diverged\n"),
    ("cancelled", "cancelled", "memosctl: error: JOB_CANCELLED: job job_0003 was cancelled\n"),
])
def test_train_that_does_not_succeed_is_exit_3(ctl: Any, fake: FakeMemOS, message: str, state: str,
                                               error: str) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("train", "notes", "-m", message)
    assert r.code == 3
    assert r.err.endswith(error)
    assert block_of(r.out)["state"] == state
    assert fake.cubes["cube_0001"].head_revision == 0 and not fake.mounts
    doc = ctl("-o", "json", "job", "watch", "job_0003")
    assert doc.code == 3 and doc.json()["state"] == f"JOB_STATE_{state.upper()}"


def test_train_detach_returns_at_once(ctl: Any, fake: FakeMemOS) -> None:
    ctl("cube", "alloc", "notes")
    r = ctl("train", "notes", "--detach", "-m", "hang")  # a job that waits for CancelJob; detach must not watch it
    assert r.code == 0, r.err
    assert block_of(r.out)["state"] == "queued"
    assert "memosctl job watch job_0003" in r.err
    assert not requests_of(fake, "WatchJob") and not fake.mounts
    r = ctl("train", "notes", "--detach")  # refused: the cube is busy
    assert r.code == 3 and "TRAINING_IN_PROGRESS" in r.err and not fake.mounts
    assert ctl("-o", "json", "train", "notes", "--detach").code == 3


def test_train_ctrl_c_cancels_the_job(ctl: Any, fake: FakeMemOS, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "notes")
    monkeypatch.setattr(sys, "stderr", InterruptingStderr(sys.stderr, "step 1/"))
    r = ctl("train", "notes", "-m", "hang")
    assert r.code == 130
    assert "memosctl: cancelled job job_0003" in r.err and "interrupted" in r.err
    assert fake.watch_cancelled.wait(5)  # the watch was closed
    assert [c.job_id for c in requests_of(fake, "CancelJob")] == ["job_0003"]
    assert fake.jobs["job_0003"].state == types_pb2.JOB_STATE_CANCELLED
    assert not fake.mounts


def test_job_list_watch_cancel(ctl: Any, fake: FakeMemOS, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl("cube", "alloc", "notes")
    ctl("cube", "alloc", "other")
    assert ctl("-q", "train", "notes").code == 0  # job_0004 succeeds
    assert ctl("train", "other", "--detach", "-m", "hang").code == 0  # job_0006 queued
    r = ctl("job", "list")
    lines = r.out.splitlines()
    assert lines[0].split() == ["JOB", "ID", "STATE", "CUBE", "REV", "STEP", "LOSS", "CREATED", "RESULT"]
    assert [ln.split()[:3] for ln in lines[1:]] == [["job_0006", "queued", "other"], ["job_0004", "succeeded", "notes"]]
    assert "revision 1, adapter " in lines[2]
    doc = ctl("-o", "json", "job", "list", "notes").json()
    assert [j["job_id"] for j in doc["jobs"]] == ["job_0004"]
    assert requests_of(fake, "ListJobs")[-1].cube == "notes"

    r = ctl("job", "watch", "job_0004")  # already finished: its final state at once
    assert r.code == 0 and block_of(r.out)["state"] == "succeeded"

    # Ctrl-C while watching stops the watch only; the job goes on.
    monkeypatch.setattr(sys, "stderr", InterruptingStderr(sys.stderr, "step 1/"))
    r = ctl("job", "watch", "job_0006")
    assert r.code == 130 and not requests_of(fake, "CancelJob")
    assert fake.jobs["job_0006"].state == types_pb2.JOB_STATE_RUNNING

    r = ctl("job", "cancel", "job_0006")
    assert r.code == 0, r.err
    assert block_of(r.out)["state"] == "cancelled"
    r = ctl("job", "cancel", "job_0006")
    assert r.code == 3 and "JOB_FINISHED" in r.err
    r = ctl("job", "watch", "job_0006")
    assert r.code == 3 and "JOB_CANCELLED" in r.err


def test_job_not_found_is_exit_3_without_progress_junk(ctl: Any) -> None:
    r = ctl("job", "watch", "job_nope")
    assert (r.code, r.out) == (3, "")
    assert r.err == "memosctl: error: JOB_NOT_FOUND: no job 'job_nope'\n"
    assert ctl("job", "cancel", "job_nope").code == 3


def test_completion_bash_completes_commands_and_options_without_a_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    empty = tmp_path / "no-daemon"
    empty.mkdir()
    monkeypatch.setenv("MEMOSD_DATA_DIR", str(empty))  # no daemon.json: a daemon call would fail with exit 4
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "memosctl.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        # Sourced inside a function, as bash-completion's loader does: the tables must still be global.
        shell = (f'load() {{ source "{script}"; }}; load; COMP_WORDS=(memosctl {line}); '
                 f'COMP_CWORD={len(words)}; _memosctl; echo "${{COMPREPLY[*]}}"')
        done = subprocess.run([bash, "-c", shell], capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.split()

    assert complete("cu") == ["cube"]
    assert complete("cube", "l") == ["list"]
    assert "completion" in complete("") and "chat" in complete("")
    assert complete("--target", "h:1", "cube", "list", "--o") == ["--output"]
    assert "--query" in complete("mem", "search", "notes", "--")
    assert complete("cube", "alloc", "notes", "--desc") == ["--description"]


def test_chat_compose_sends_the_mode_and_fraction_and_show_memory_says_how_each_block_was_reused(
        ctl: Any, fake: FakeMemOS) -> None:
    from memosd_client.cli.chat import memory_lines

    ctl("cube", "alloc", "notes")
    assert ctl("chat", "notes", "-m", "hi", "--compose", "composed", "--recompute", "0.1").code == 0
    (req,) = requests_of(fake, "Generate")
    assert req.options.compose == types_pb2.COMPOSE_MODE_COMPOSED
    assert req.options.HasField("compose_recompute") and abs(req.options.compose_recompute - 0.1) < 1e-6
    assert ctl("chat", "notes", "-m", "hi", "--compose", "sideways").code == 2
    summary = types_pb2.GenerationSummary(memory=[
        types_pb2.MemoryUse(mount_id="m1", cube_id="c1", revision=2, activated=True, block_tokens=700,
                            block_reused_tokens=665, block_computed_tokens=35, cache_key="ab" * 32,
                            cache_source=types_pb2.ACTIVATION_SOURCE_POOL,
                            block_reuse=types_pb2.BLOCK_REUSE_COMPOSED),
        types_pb2.MemoryUse(mount_id="m2", cube_id="c2", revision=1, activated=True, block_tokens=50,
                            block_computed_tokens=50, block_reuse=types_pb2.BLOCK_REUSE_EXACT,
                            block_note="its blocks are not in the engine's block store: computed"),
    ])
    lines = memory_lines(summary, {"m1": "team", "m2": "session"})
    assert lines[1] == ("  team (c1) at revision 2: activated, composed: 665 of 700 block tokens placed from its "
                        f"own cache from pool (key {'ab' * 6}), 35 recomputed")
    assert lines[4] == "  session (c2) at revision 1: activated, block prefilled (50 tokens)"
    assert lines[5] == "    not composed: its blocks are not in the engine's block store: computed"
