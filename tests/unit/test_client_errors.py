"""memos.Client against an in-process fake MemOS server: error mapping, request building, paging.

The server is real gRPC (port 0); its servicer aborts with google.rpc.Status
details exactly as memosd does, so the whole decode path is exercised.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import memos
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from memos import errors
from memos.v1 import memos_pb2, memos_pb2_grpc, types_pb2

C = grpc.StatusCode
# Each memos.v1.ErrorReason with the code the contract gives it and the class the client raises.
REASONS: dict[str, tuple[grpc.StatusCode, type[errors.MemosError]]] = {
    "CUBE_NOT_FOUND": (C.NOT_FOUND, errors.CubeNotFound),
    "MOUNT_NOT_FOUND": (C.NOT_FOUND, errors.MountNotFound),
    "REVISION_NOT_FOUND": (C.NOT_FOUND, errors.RevisionNotFound),
    "ITEM_NOT_FOUND": (C.NOT_FOUND, errors.ItemNotFound),
    "CUBE_NAME_TAKEN": (C.ALREADY_EXISTS, errors.CubeNameTaken),
    "INVALID_FIELD": (C.INVALID_ARGUMENT, errors.InvalidField),
    "TEXT_EMPTY": (C.INVALID_ARGUMENT, errors.TextEmpty),
    "TEXT_TOO_LARGE": (C.INVALID_ARGUMENT, errors.TextTooLarge),
    "TOO_MANY_ITEMS": (C.INVALID_ARGUMENT, errors.TooManyItems),
    "INVALID_PAGE_TOKEN": (C.INVALID_ARGUMENT, errors.InvalidPageToken),
    "MALFORMED_REQUEST": (C.INVALID_ARGUMENT, errors.MalformedRequest),
    "MOUNT_READ_ONLY": (C.FAILED_PRECONDITION, errors.MountReadOnly),
    "COMMIT_CONFLICT": (C.ABORTED, errors.CommitConflict),
    "STAGING_FULL": (C.RESOURCE_EXHAUSTED, errors.StagingFull),
    "SHUTTING_DOWN": (C.UNAVAILABLE, errors.ShuttingDown),
    "INTERNAL_ERROR": (C.INTERNAL, errors.InternalError),
    "CUBE_EMPTY": (C.FAILED_PRECONDITION, errors.CubeEmpty),
    "CONTEXT_EXCEEDED": (C.OUT_OF_RANGE, errors.ContextExceeded),
    "POOL_TOO_SMALL": (C.RESOURCE_EXHAUSTED, errors.PoolTooSmall),
    "MODEL_UNAVAILABLE": (C.FAILED_PRECONDITION, errors.ModelUnavailable),
    "ADAPTER_INVALID": (C.INVALID_ARGUMENT, errors.AdapterInvalid),
    "ADAPTER_TOO_LARGE": (C.RESOURCE_EXHAUSTED, errors.AdapterTooLarge),
    "ADAPTER_MISMATCH": (C.FAILED_PRECONDITION, errors.AdapterMismatch),
    "ADAPTER_NOT_FOUND": (C.NOT_FOUND, errors.AdapterNotFound),
    "JOB_NOT_FOUND": (C.NOT_FOUND, errors.JobNotFound),
    "TRAINING_IN_PROGRESS": (C.FAILED_PRECONDITION, errors.TrainingInProgress),
    "JOB_FINISHED": (C.FAILED_PRECONDITION, errors.JobFinished),
    "UNAUTHENTICATED": (C.UNAUTHENTICATED, errors.AuthenticationFailed),
    "PERMISSION_DENIED": (C.PERMISSION_DENIED, errors.AccessDenied),
    "PRINCIPAL_NOT_FOUND": (C.NOT_FOUND, errors.PrincipalNotFound),
    "PRINCIPAL_NAME_TAKEN": (C.ALREADY_EXISTS, errors.PrincipalNameTaken),
    "CUBE_FROZEN": (C.FAILED_PRECONDITION, errors.CubeFrozen),
    "REVISION_COMPACTED": (C.OUT_OF_RANGE, errors.RevisionCompacted),
    "DISK_FULL": (C.RESOURCE_EXHAUSTED, errors.DiskFull),
    "QUOTA_EXCEEDED": (C.RESOURCE_EXHAUSTED, errors.QuotaExceeded),
    "STREAM_IDLE": (C.DEADLINE_EXCEEDED, errors.StreamIdle),
    "REQUEST_ID_REUSED": (C.INVALID_ARGUMENT, errors.RequestIdReused),
    "ARCHIVE_INVALID": (C.INVALID_ARGUMENT, errors.ArchiveInvalid),
    "EXTRACTION_IN_PROGRESS": (C.FAILED_PRECONDITION, errors.ExtractionInProgress),
    "CLUSTER_UNAVAILABLE": (C.UNAVAILABLE, errors.ClusterUnavailable),
    "CUBE_UNAVAILABLE": (C.UNAVAILABLE, errors.CubeUnavailable),
    "CUBE_MOVING": (C.UNAVAILABLE, errors.CubeMoving),
    "MOVE_REFUSED": (C.FAILED_PRECONDITION, errors.MoveRefused),
}


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str = "",
          domain: str = "memosd.v1", **metadata: str) -> None:
    details = []
    if reason:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
        details.append(detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


class Fake(memos_pb2_grpc.MemOSServicer):
    """StatCube fails as its ``cube`` field says ("REASON" or "REASON@domain" or "!CODE"); the rest record."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.unmount_fails = False
        self.generation_cancelled = threading.Event()
        self.watch_cancelled = threading.Event()
        # What ExportAdapter serves: the Adapter it announces, then these files' chunks.
        self.export_config = b'{"r": 4}'
        self.export_weights = bytes(range(256)) * 5
        self.export_adapter: types_pb2.Adapter | None = None

    def StatCube(self, request: memos_pb2.StatCubeRequest, context: grpc.ServicerContext) -> Any:
        spec = request.cube
        if spec.startswith("!"):
            abort(context, grpc.StatusCode[spec[1:]], f"bare {spec[1:]}")
        reason, _, domain = spec.partition("@")
        code = REASONS[reason][0] if reason in REASONS else C.NOT_FOUND
        abort(context, code, f"failed: {reason}", reason, domain or "memosd.v1", cube=spec, limit="3")

    def ListCubes(self, request: memos_pb2.ListCubesRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListCubes", request))
        start = int(request.page_token or 0)
        names = [f"c{i}" for i in range(5)]
        end = start + 2
        return memos_pb2.ListCubesResponse(
            cubes=[types_pb2.Cube(name=n) for n in names[start:end]],
            next_page_token=str(end) if end < len(names) else "",
        )

    def Mount(self, request: memos_pb2.MountRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Mount", request))
        return memos_pb2.MountResponse(mount=types_pb2.Mount(mount_id="mnt_1", cube_id="cube_1", mode=request.mode))

    def Unmount(self, request: memos_pb2.UnmountRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Unmount", request))
        if self.unmount_fails:
            abort(context, C.NOT_FOUND, "gone", "MOUNT_NOT_FOUND")
        return memos_pb2.UnmountResponse(discarded_changes=2)

    def Write(self, request: memos_pb2.WriteRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Write", request))
        n = sum(1 for name, _ in self.requests if name == "Write")
        ids = [f"itm_{n}_{i}" for i in range(len(request.items))]
        return memos_pb2.WriteResponse(
            item_ids=ids, mount=types_pb2.Mount(mount_id=request.mount_id, staged_adds=len(ids))
        )

    def Search(self, request: memos_pb2.SearchRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Search", request))
        hits = [types_pb2.SearchHit(item=types_pb2.Item(item_id=f"itm_{i}"), score=1.0 / (i + 1)) for i in range(3)]
        return memos_pb2.SearchResponse(hits=hits, took_us=1500, embed_us=700)

    def Commit(self, request: memos_pb2.CommitRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Commit", request))
        return memos_pb2.CommitResponse(
            revision=types_pb2.Revision(number=4, message=request.message),
            mount=types_pb2.Mount(mount_id=request.mount_id, cube_id="cube_1", base_revision=4),
        )

    def Activate(self, request: memos_pb2.ActivateRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Activate", request))
        if request.mount_id == "mnt_empty":
            abort(context, C.FAILED_PRECONDITION, "revision 0 has no items", "CUBE_EMPTY")
        return memos_pb2.ActivateResponse(activation=types_pb2.Activation(
            cube_id="cube_1", revision=4, tokens=900, tokens_computed=100, tokens_reused=800,
            source=types_pb2.ACTIVATION_SOURCE_COMPUTED, pooled=True,
        ))

    def Evict(self, request: memos_pb2.EvictRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Evict", request))
        return memos_pb2.EvictResponse(caches_dropped=1, pool_bytes_freed=4096,
                                       persisted_bytes_deleted=8192 if request.delete_persisted else 0)

    def Generate(self, request: memos_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        """Replies by the last message: "slow" streams until cancelled, "fail..." fails, "trickle" takes 1 s
        before the fixed reply, else the fixed reply."""
        self.requests.append(("Generate", request))
        last = request.messages[-1].content if request.messages else ""
        if last == "fail at once":
            abort(context, C.FAILED_PRECONDITION, "no model configured", "MODEL_UNAVAILABLE")
        if last == "slow":
            # A callback: gRPC may never resume a generator whose call was cancelled while it was suspended.
            context.add_callback(self.generation_cancelled.set)
            yield memos_pb2.GenerateResponse(delta="tick")
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return
        if last == "trickle":  # a slow model: a token every 0.1 s, 1 s in all
            for _ in range(10):
                time.sleep(0.1)
                yield memos_pb2.GenerateResponse(delta="t")
        for delta in ("Hello", "", ", ", "world"):
            yield memos_pb2.GenerateResponse(delta=delta)
        if last == "fail midway":
            abort(context, C.OUT_OF_RANGE, "the prompt outgrew the context", "CONTEXT_EXCEEDED")
        yield memos_pb2.GenerateResponse(summary=types_pb2.GenerationSummary(
            finish_reason=types_pb2.FINISH_REASON_END, prompt_tokens=30, reused_tokens=20, prefilled_tokens=10,
            completion_tokens=3, ttft_us=1000, total_us=5000,
            memory=[types_pb2.MemoryUse(mount_id=m, activated=True) for m in request.mount_ids],
        ))

    def Forget(self, request: memos_pb2.ForgetRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Forget", request))
        return memos_pb2.ForgetResponse(mount=types_pb2.Mount(
            mount_id=request.mount_id, staged_forgets=len(request.item_ids), staged_adapter=request.adapter))

    def Diff(self, request: memos_pb2.DiffRequest, context: grpc.ServicerContext) -> Any:
        """Two pages of one change each; the first carries an adapter change when ``cube`` is "adapted"."""
        self.requests.append(("Diff", request))
        page = int(request.page_token or 0)
        resp = memos_pb2.DiffResponse(
            changes=[types_pb2.ItemChange(kind=types_pb2.CHANGE_KIND_ADDED, item_id=f"itm_{page}")],
            next_page_token="" if page else "1", from_revision=request.from_revision, to_revision=7,
        )
        if request.cube == "adapted" and not page:
            resp.adapter_change.CopyFrom(types_pb2.AdapterChange(
                kind=types_pb2.CHANGE_KIND_ADDED, after=types_pb2.Adapter(digest="ab" * 32)))
        return resp

    def ImportAdapter(self, request_iterator: Iterator[memos_pb2.ImportAdapterRequest],
                      context: grpc.ServicerContext) -> Any:
        messages = list(request_iterator)
        self.requests.append(("ImportAdapter", messages))
        header = messages[0].header
        if header.mount_id == "mnt_bad":
            abort(context, C.FAILED_PRECONDITION, "rank 4 adapter for another model", "ADAPTER_MISMATCH")
        adapter = types_pb2.Adapter(digest=header.digest, staged=True, config_bytes=header.config_bytes,
                                    weights_bytes=header.weights_bytes, rank=4)
        mount = types_pb2.Mount(mount_id=header.mount_id, cube_id="cube_1", staged_adapter=True)
        return memos_pb2.ImportAdapterResponse(adapter=adapter, mount=mount)

    def ExportAdapter(self, request: memos_pb2.ExportAdapterRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ExportAdapter", request))
        if request.mount_id == "mnt_none":
            abort(context, C.NOT_FOUND, "cube_1 has no adapter at revision 4", "ADAPTER_NOT_FOUND")
        config, weights = self.export_config, self.export_weights
        adapter = self.export_adapter or types_pb2.Adapter(
            digest=hashlib.sha256(config + weights).hexdigest(), born_revision=4, config_bytes=len(config),
            weights_bytes=len(weights), rank=4)
        yield memos_pb2.ExportAdapterResponse(adapter=adapter, header=types_pb2.ResponseHeader(cube_id="cube_1"))
        for file, data in ((types_pb2.ADAPTER_FILE_CONFIG, config), (types_pb2.ADAPTER_FILE_WEIGHTS, weights)):
            for start in range(0, len(data), 500):
                yield memos_pb2.ExportAdapterResponse(chunk=types_pb2.AdapterChunk(file=file,
                                                                                   data=data[start:start + 500]))

    def Train(self, request: memos_pb2.TrainRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("Train", request))
        if request.mount_id == "mnt_busy":
            abort(context, C.FAILED_PRECONDITION, "cube_1 is training (job_0)", "TRAINING_IN_PROGRESS")
        return memos_pb2.TrainResponse(job=types_pb2.Job(
            job_id="job_1", state=types_pb2.JOB_STATE_QUEUED, cube_id="cube_1", revision=4,
            settings=request.settings))

    def WatchJob(self, request: memos_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Any:
        """job_1 runs 3 steps and succeeds; job_slow runs until the watch is cancelled; others do not exist."""
        self.requests.append(("WatchJob", request))
        if request.job_id == "job_slow":
            context.add_callback(self.watch_cancelled.set)
            yield memos_pb2.WatchJobResponse(job=types_pb2.Job(job_id="job_slow", state=types_pb2.JOB_STATE_RUNNING))
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return
        if request.job_id != "job_1":
            abort(context, C.NOT_FOUND, f"no job {request.job_id!r}", "JOB_NOT_FOUND")
        yield memos_pb2.WatchJobResponse(job=types_pb2.Job(job_id="job_1", state=types_pb2.JOB_STATE_QUEUED))
        for step in (1, 2, 3):
            yield memos_pb2.WatchJobResponse(job=types_pb2.Job(
                job_id="job_1", state=types_pb2.JOB_STATE_RUNNING, step=step, total_steps=3, loss=1.0 / step))
        yield memos_pb2.WatchJobResponse(job=types_pb2.Job(
            job_id="job_1", state=types_pb2.JOB_STATE_SUCCEEDED, step=3, total_steps=3, result_revision=5,
            adapter_digest="cd" * 32))

    def CancelJob(self, request: memos_pb2.CancelJobRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("CancelJob", request))
        if request.job_id == "job_done":
            abort(context, C.FAILED_PRECONDITION, "job_done has succeeded", "JOB_FINISHED")
        return memos_pb2.CancelJobResponse(job=types_pb2.Job(job_id=request.job_id,
                                                             state=types_pb2.JOB_STATE_CANCELLED))

    def ListJobs(self, request: memos_pb2.ListJobsRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(("ListJobs", request))
        jobs = [types_pb2.Job(job_id="job_2", cube_id="cube_2"), types_pb2.Job(job_id="job_1", cube_id="cube_1")]
        return memos_pb2.ListJobsResponse(jobs=[j for j in jobs if request.cube in ("", j.cube_id)])

    def of(self, name: str) -> list[Any]:
        return [req for n, req in self.requests if n == name]


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake: Fake) -> Iterator[memos.Client]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    memos_pb2_grpc.add_MemOSServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with memos.Client(f"127.0.0.1:{port}", timeout=5) as c:
        yield c
    server.stop(None)


# -- error mapping -------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_each_reason_raises_its_class(client: memos.Client, reason: str) -> None:
    code, cls = REASONS[reason]
    with pytest.raises(cls) as info:
        client.stat_cube(reason)
    e = info.value
    assert type(e) is cls
    assert (e.code, e.reason, e.message) == (code, reason, f"failed: {reason}")
    assert e.metadata == {"cube": reason, "limit": "3"}
    assert isinstance(e.__cause__, grpc.RpcError)
    assert str(e) == f"{reason}: failed: {reason}"


def test_every_contract_reason_has_a_class() -> None:
    names = {n for n in types_pb2.ErrorReason.DESCRIPTOR.values_by_name if n != "ERROR_REASON_UNSPECIFIED"}
    assert names == set(REASONS)
    for name in names:
        assert errors.error_class(REASONS[name][0], name).default_reason == name


def test_client_codes_agree_with_the_daemons_errors() -> None:
    daemon_errors = pytest.importorskip("memosd.errors")
    for cls in daemon_errors.ALL_ERRORS:
        assert REASONS[cls.reason][0].name == cls.code


def test_group_bases_catch_broadly(client: memos.Client) -> None:
    with pytest.raises(errors.NotFound):
        client.stat_cube("ITEM_NOT_FOUND")
    with pytest.raises(errors.InvalidArgument):
        client.stat_cube("TEXT_TOO_LARGE")
    with pytest.raises(errors.Unavailable):
        client.stat_cube("SHUTTING_DOWN")
    with pytest.raises(memos.MemosError):
        client.stat_cube("COMMIT_CONFLICT")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (C.UNAVAILABLE, errors.Unavailable),
        (C.UNAUTHENTICATED, errors.Unauthenticated),
        (C.PERMISSION_DENIED, errors.PermissionDenied),
        (C.UNIMPLEMENTED, errors.Unimplemented),
        (C.NOT_FOUND, errors.NotFound),
        (C.DATA_LOSS, errors.DataLoss),
    ],
)
def test_reasonless_errors_map_by_code(client: memos.Client, code: grpc.StatusCode,
                                       cls: type[errors.MemosError]) -> None:
    with pytest.raises(cls) as info:
        client.stat_cube(f"!{code.name}")
    assert type(info.value) is cls
    assert (info.value.code, info.value.reason, info.value.metadata) == (code, "", {})
    assert str(info.value) == f"{code.name}: bare {code.name}"


def test_unknown_reason_keeps_reason_and_maps_by_code(client: memos.Client) -> None:
    with pytest.raises(errors.NotFound) as info:
        client.stat_cube("SOMETHING_NEW")
    assert type(info.value) is errors.NotFound
    assert info.value.reason == "SOMETHING_NEW"


def test_foreign_domain_reason_is_not_trusted(client: memos.Client) -> None:
    with pytest.raises(errors.NotFound) as info:
        client.stat_cube("CUBE_NOT_FOUND@proxy.example")
    assert type(info.value) is errors.NotFound
    assert info.value.reason == "CUBE_NOT_FOUND"


def test_unreachable_daemon_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with memos.Client(f"127.0.0.1:{port}", timeout=5) as c:
        with pytest.raises(errors.Unavailable) as info:
            c.stats()
        assert not c.is_ready(timeout=0.1)
    assert info.value.reason == ""


def test_non_call_rpc_error_is_unknown() -> None:
    e = errors.from_rpc_error(grpc.RpcError("odd"))
    assert type(e) is errors.Unknown
    assert e.code == C.UNKNOWN


# -- requests and responses ------------------------------------------------------


def test_write_builds_items(client: memos.Client, fake: Fake) -> None:
    when = datetime(2024, 5, 1, 12, 0)  # naive: UTC
    item = types_pb2.ItemInput(text="as is", tags=["own"])
    ids = client.write(
        "mnt_1",
        ["plain", {"text": "dict", "event_time": "2020-01-01T00:00:00Z"}, {"text": "t", "tags": "one"}, item],
        tags=["shared"], source="unit", event_time=when,
    )
    assert ids == ["itm_1_0", "itm_1_1", "itm_1_2", "itm_1_3"]
    plain, d, t, passed = fake.of("Write")[0].items
    assert (list(plain.tags), plain.source) == (["shared"], "unit")
    assert plain.event_time.ToDatetime(tzinfo=UTC) == when.replace(tzinfo=UTC)
    assert (list(d.tags), d.source, d.event_time.seconds) == (["shared"], "unit", 1577836800)
    assert list(t.tags) == ["one"]
    assert passed == item


def test_write_rejects_unknown_item_keys(client: memos.Client) -> None:
    with pytest.raises(ValueError, match="txt"):
        client.write("mnt_1", [{"txt": "typo"}])


def test_write_many_batches_and_reports_progress(client: memos.Client, fake: Fake) -> None:
    seen: list[int] = []
    ids = client.write_many("mnt_1", (f"item {i}" for i in range(5)), batch_size=2, progress=seen.append)
    assert [len(r.items) for r in fake.of("Write")] == [2, 2, 1]
    assert seen == [2, 2, 1]
    assert len(ids) == 5 and len(set(ids)) == 5


def test_list_cubes_follows_page_tokens(client: memos.Client, fake: Fake) -> None:
    assert [c.name for c in client.list_cubes(page_size=2)] == ["c0", "c1", "c2", "c3", "c4"]
    assert [r.page_token for r in fake.of("ListCubes")] == ["", "2", "4"]
    assert all(r.page_size == 2 for r in fake.of("ListCubes"))


def test_search_request_and_results(client: memos.Client, fake: Fake) -> None:
    since = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    res = client.search("mnt_1", "q", 3, tags_all=["a"], tags_any=["b", "c"], tags_none=["d"],
                        since=since, mode="lexical")
    assert [h.item.item_id for h in res] == ["itm_0", "itm_1", "itm_2"]
    assert (res.took_us, res.embed_us, len(res.response.hits)) == (1500, 700, 3)
    req = fake.of("Search")[0]
    assert list(req.mount_ids) == ["mnt_1"] and req.k == 3 and req.mode == types_pb2.SEARCH_MODE_LEXICAL
    assert (list(req.tags.all_of), list(req.tags.any_of), list(req.tags.none_of)) == (["a"], ["b", "c"], ["d"])
    assert req.event_time.HasField("start") and not req.event_time.HasField("end")
    assert req.event_time.start.ToDatetime(tzinfo=UTC) == since
    with pytest.raises(ValueError, match="mode"):
        client.search(["mnt_1"], "q", mode="fuzzy")


def test_mount_handle_binds_calls_and_unmounts(client: memos.Client, fake: Fake) -> None:
    with client.mount("notes", revision=3, writable=True) as m:
        assert (m.mount_id, m.cube_id) == ("mnt_1", "cube_1")
        m.write(["a", "b"])
        assert m.info.staged_adds == 2
        assert m.commit("msg", "me").revision.number == 4
        assert m.base_revision == 4
    mount_req = fake.of("Mount")[0]
    assert (mount_req.cube, mount_req.revision, mount_req.mode) == ("notes", 3, types_pb2.MOUNT_MODE_READ_WRITE)
    assert [r.mount_id for r in fake.of("Unmount")] == ["mnt_1"]


def test_client_calls_on_a_mount_take_its_handle_and_refresh_it(client: memos.Client, fake: Fake) -> None:
    handle = memos.MountHandle(client, types_pb2.Mount(mount_id="mnt_h"))
    assert client.write(handle, ["a", "b"]) == ["itm_1_0", "itm_1_1"]
    assert handle.info.staged_adds == 2
    client.forget(handle, ["itm_1_0"])
    assert handle.info.staged_forgets == 1
    assert client.commit(handle, "msg").revision.number == 4
    assert handle.base_revision == 4
    client.search([handle, "mnt_2"], "q")
    client.search(iter(["mnt_3", handle]), "q")  # any iterable of mounts, as before handles were taken
    assert [r.mount_id for r in fake.of("Write") + fake.of("Forget") + fake.of("Commit")] == ["mnt_h"] * 3
    assert [list(r.mount_ids) for r in fake.of("Search")] == [["mnt_h", "mnt_2"], ["mnt_3", "mnt_h"]]


def test_mount_handle_write_many_refreshes_after_each_batch(client: memos.Client, fake: Fake) -> None:
    with client.mount("notes", writable=True) as m:
        # The fake's staged_adds is each Write's own count: what the handle shows as each batch ends.
        seen: list[int] = []
        ids = m.write_many(["a", "b", "c"], 2, lambda n: seen.append(m.info.staged_adds))
        assert [len(r.items) for r in fake.of("Write")] == [2, 1]
        assert len(ids) == 3 and seen == [2, 1]


def test_mount_handle_exit_ignores_mount_not_found(client: memos.Client, fake: Fake) -> None:
    fake.unmount_fails = True
    with client.mount("notes") as m:
        pass
    assert m.unmount() == 0


def test_to_timestamp_treats_naive_as_utc() -> None:
    naive = memos.to_timestamp(datetime(2024, 1, 1))
    aware = memos.to_timestamp(datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))))
    assert naive == aware == memos.to_timestamp("2024-01-01T00:00:00Z")
    assert memos.parse_time("2024-01-01").tzinfo is not None


# -- activation memory and generation -----------------------------------------------


def test_activate_and_evict_requests(client: memos.Client, fake: Fake) -> None:
    act = client.activate("mnt_9")
    assert (act.cube_id, act.tokens, act.tokens_reused, act.source) == (
        "cube_1", 900, 800, types_pb2.ACTIVATION_SOURCE_COMPUTED)
    with client.mount("notes") as m:
        assert m.activate().revision == 4
    assert [r.mount_id for r in fake.of("Activate")] == ["mnt_9", "mnt_1"]
    with pytest.raises(errors.CubeEmpty):
        client.activate("mnt_empty")
    assert client.evict("notes").persisted_bytes_deleted == 0
    resp = client.evict("notes", delete_persisted=True)
    assert (resp.caches_dropped, resp.pool_bytes_freed, resp.persisted_bytes_deleted) == (1, 4096, 8192)
    assert [(r.cube, r.delete_persisted) for r in fake.of("Evict")] == [("notes", False), ("notes", True)]


def test_generate_builds_the_request(client: memos.Client, fake: Fake) -> None:
    handle = memos.MountHandle(client, types_pb2.Mount(mount_id="mnt_h"))
    messages: list[memos.MessageLike] = [
        types_pb2.ChatMessage(role="system", content="be brief"),
        ("user", "hi"),
        {"role": "assistant", "content": "hello"},
        ("user", "again"),
    ]
    client.generate(messages, [handle, "mnt_s"], max_tokens=7, temperature=0.5, top_p=0.9,
                    stop=["\n\n", "END"], seed=42).text()
    client.generate("one message", "mnt_s", retrieve_k=0).text()
    full, short = fake.of("Generate")
    assert [(m.role, m.content) for m in full.messages] == [
        ("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "again")]
    assert list(full.mount_ids) == ["mnt_h", "mnt_s"]
    o = full.options
    assert (o.max_tokens, o.temperature, round(o.top_p, 6), list(o.stop), o.seed) == (
        7, 0.5, 0.9, ["\n\n", "END"], 42)
    assert not full.HasField("retrieve_k")  # None: the daemon's default
    assert [(m.role, m.content) for m in short.messages] == [("user", "one message")]
    assert list(short.mount_ids) == ["mnt_s"]
    assert short.HasField("retrieve_k") and short.retrieve_k == 0
    assert short.options == types_pb2.GenerationOptions()


def test_generate_rejects_malformed_messages(client: memos.Client, fake: Fake) -> None:
    with pytest.raises(TypeError, match="single user message"):
        client.generate(["user", "hi"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="text"):
        client.generate([{"role": "user", "text": "hi"}])
    assert fake.of("Generate") == []


def test_generation_iterates_deltas_then_has_the_summary(client: memos.Client, fake: Fake) -> None:
    gen = client.generate("hi", ["mnt_1"])
    assert gen.summary is None and gen.first_delta_seconds is None
    it = iter(gen)
    assert next(it) == "Hello"
    assert gen.first_delta_seconds is not None and gen.first_delta_seconds > 0
    assert gen.summary is None and not gen.done
    assert list(it) == [", ", "world"]  # the empty delta is skipped
    assert gen.done and not gen.cancelled
    assert gen.summary is not None
    assert (gen.summary.prompt_tokens, gen.summary.completion_tokens) == (30, 3)
    assert [u.mount_id for u in gen.summary.memory] == ["mnt_1"]
    assert gen.text() == "Hello, world"  # the deltas already iterated are part of the text
    assert list(gen) == []


def test_generation_text_consumes_the_stream(client: memos.Client) -> None:
    gen = client.generate("hi")
    assert gen.text() == "Hello, world"
    assert gen.summary is not None and gen.summary.finish_reason == types_pb2.FINISH_REASON_END


def test_generation_errors_are_converted_while_iterating(client: memos.Client) -> None:
    gen = client.generate("fail at once")  # nothing is raised before iterating
    with pytest.raises(errors.ModelUnavailable) as info:
        next(iter(gen))
    assert info.value.code == C.FAILED_PRECONDITION and isinstance(info.value.__cause__, grpc.RpcError)
    gen = client.generate("fail midway")
    seen: list[str] = []
    with pytest.raises(errors.ContextExceeded):
        for delta in gen:
            seen.append(delta)
    assert seen == ["Hello", ", ", "world"]
    assert gen.done and gen.summary is None


def test_generation_cancel_ends_iteration_quietly(client: memos.Client, fake: Fake) -> None:
    gen = client.generate("slow")
    assert next(gen) == "tick"
    gen.cancel()
    assert list(gen) == []
    assert gen.cancelled and gen.done and gen.summary is None
    assert gen.text() == "tick"
    assert fake.generation_cancelled.wait(2)  # the server saw the call end
    gen.cancel()  # twice is harmless


def test_generation_cancel_from_another_thread(client: memos.Client, fake: Fake) -> None:
    gen = client.generate("slow")
    threading.Timer(0.3, gen.cancel).start()
    assert list(gen) == ["tick"]  # blocked in the stream until the cancel, then ends without error
    assert gen.cancelled and fake.generation_cancelled.wait(2)


def test_generation_context_manager_cancels_unfinished(client: memos.Client, fake: Fake) -> None:
    with client.generate("slow") as gen:
        assert next(gen) == "tick"
    assert gen.cancelled and fake.generation_cancelled.wait(2)
    with client.generate("hi") as done:
        done.text()
    assert not done.cancelled and done.summary is not None


def test_generation_deadline_is_the_clients_or_its_own(client: memos.Client) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.generate("slow", timeout=0.2).text()


def test_generation_idle_timeout_bounds_silence_not_the_whole_stream(client: memos.Client, fake: Fake) -> None:
    # 1 s of steady progress: a 0.4 s whole-stream deadline cuts it off, a 0.4 s idle timeout does not.
    with pytest.raises(errors.DeadlineExceeded):
        client.generate("trickle", timeout=0.4).text()
    gen = client.generate("trickle", idle_timeout=0.4)
    assert gen.text() == "t" * 10 + "Hello, world" and gen.summary is not None
    # Silence past the idle timeout: cancelled (the server sees it) and reported as a deadline.
    gen = client.generate("slow", idle_timeout=0.3)
    with pytest.raises(errors.DeadlineExceeded, match=r"no response from the daemon for 0.3 s"):
        gen.text()
    assert fake.generation_cancelled.wait(2) and gen.done and not gen.cancelled


def test_generate_adapter_mount(client: memos.Client, fake: Fake) -> None:
    handle = memos.MountHandle(client, types_pb2.Mount(mount_id="mnt_h"))
    client.generate("hi", ["mnt_a", handle], adapter_mount=handle).text()
    client.generate("hi", "mnt_a", adapter_mount="mnt_a", bypass_kv_cache=True).text()
    with_handle, with_id = fake.of("Generate")
    assert with_handle.options.adapter_mount_id == "mnt_h"
    assert (with_id.options.adapter_mount_id, with_id.options.bypass_kv_cache) == ("mnt_a", True)


# -- parametric memory ---------------------------------------------------------------


def adapter_dir(path: Path, config: bytes = b'{"r": 4, "target_modules": ["q_proj"]}',
                weights: bytes = b"W" * 2500) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(config)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_import_adapter_sends_header_then_chunks(client: memos.Client, fake: Fake) -> None:
    config, weights = b'{"r": 4}', bytes(range(256)) * 10
    resp = client.import_adapter("mnt_1", (config, weights), chunk_bytes=1000)
    (messages,) = fake.of("ImportAdapter")
    header = messages[0].header
    assert messages[0].WhichOneof("part") == "header"
    assert (header.mount_id, header.config_bytes, header.weights_bytes) == ("mnt_1", len(config), len(weights))
    assert header.digest == hashlib.sha256(config + weights).hexdigest() == memos.client.adapter_digest(
        config, weights)
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.WhichOneof("part") == "chunk" for m in messages[1:])
    # The config first, then the weights, each cut in chunk_bytes pieces.
    assert [(c.file, len(c.data)) for c in chunks] == [
        (types_pb2.ADAPTER_FILE_CONFIG, len(config)), (types_pb2.ADAPTER_FILE_WEIGHTS, 1000),
        (types_pb2.ADAPTER_FILE_WEIGHTS, 1000), (types_pb2.ADAPTER_FILE_WEIGHTS, 560)]
    assert b"".join(c.data for c in chunks if c.file == types_pb2.ADAPTER_FILE_CONFIG) == config
    assert b"".join(c.data for c in chunks if c.file == types_pb2.ADAPTER_FILE_WEIGHTS) == weights
    assert (resp.adapter.digest, resp.adapter.staged, resp.mount.staged_adapter) == (header.digest, True, True)


def test_import_adapter_from_a_directory_through_a_handle(client: memos.Client, fake: Fake, tmp_path: Path) -> None:
    path = adapter_dir(tmp_path / "lora")
    with client.mount("notes", writable=True) as m:
        resp = m.import_adapter(str(path))
        assert m.info.staged_adapter  # the handle took the response's mount
    (messages,) = fake.of("ImportAdapter")
    data = b"".join(msg.chunk.data for msg in messages[1:])
    assert data == (path / "adapter_config.json").read_bytes() + (path / "adapter_model.safetensors").read_bytes()
    assert len(messages) == 3  # header, one chunk per file (default 1 MiB chunks)
    assert resp.adapter.weights_bytes == 2500
    client.import_adapter("mnt_1", path)  # a Path works too
    assert len(fake.of("ImportAdapter")) == 2


def test_import_adapter_rejects_a_bad_source_before_sending(client: memos.Client, fake: Fake,
                                                             tmp_path: Path) -> None:
    path = adapter_dir(tmp_path / "lora")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        client.import_adapter("mnt_1", path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        client.import_adapter("mnt_1", tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        client.import_adapter("mnt_1", tmp_path / "missing")
    with pytest.raises(ValueError, match="chunk_bytes"):
        client.import_adapter("mnt_1", (b"{}", b"w"), chunk_bytes=0)
    with pytest.raises(TypeError):
        client.import_adapter("mnt_1", ("{}", "w"))  # type: ignore[arg-type]
    assert fake.of("ImportAdapter") == []


def test_import_adapter_errors_are_converted(client: memos.Client) -> None:
    with pytest.raises(errors.AdapterMismatch) as info:
        client.import_adapter("mnt_bad", (b"{}", b"w" * 10))
    assert info.value.code == C.FAILED_PRECONDITION and "another model" in info.value.message


def test_export_adapter_returns_and_writes_identical_bytes(client: memos.Client, fake: Fake,
                                                           tmp_path: Path) -> None:
    adapter, config, weights = client.export_adapter("mnt_1")
    assert (config, weights) == (fake.export_config, fake.export_weights)
    assert (adapter.born_revision, adapter.weights_bytes) == (4, len(weights))
    out = tmp_path / "a" / "b"  # created, parents included
    with client.mount("notes") as m:
        adapter2, config2, weights2 = m.export_adapter(out)
    assert (adapter2, config2, weights2) == (adapter, config, weights)
    assert (out / "adapter_config.json").read_bytes() == fake.export_config
    assert (out / "adapter_model.safetensors").read_bytes() == fake.export_weights
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # What was exported imports back byte for byte.
    client.import_adapter("mnt_1", out)
    header = fake.of("ImportAdapter")[0][0].header
    assert header.digest == adapter.digest


def test_export_adapter_detects_a_size_mismatch(client: memos.Client, fake: Fake, tmp_path: Path) -> None:
    config, weights = fake.export_config, fake.export_weights
    fake.export_adapter = types_pb2.Adapter(digest=hashlib.sha256(config + weights).hexdigest(),
                                            config_bytes=len(config), weights_bytes=len(weights) + 1)
    with pytest.raises(errors.DataLoss, match=rf"{len(config)} \+ {len(weights)} bytes \(config \+ weights\), not the {len(config)} \+ {len(weights) + 1}"):
        client.export_adapter("mnt_1", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    fake.export_adapter = types_pb2.Adapter(digest="00" * 32, config_bytes=len(config),
                                            weights_bytes=len(weights))
    with pytest.raises(errors.DataLoss, match="digest"):
        client.export_adapter("mnt_1")


def test_export_adapter_errors_are_converted(client: memos.Client) -> None:
    with pytest.raises(errors.AdapterNotFound) as info:
        client.export_adapter("mnt_none")
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_forget_adapter_without_items(client: memos.Client, fake: Fake) -> None:
    mount = client.forget("mnt_1", adapter=True)
    assert mount.staged_adapter
    with client.mount("notes", writable=True) as m:
        m.forget(["itm_1"])
        assert m.info.staged_forgets == 1 and not m.info.staged_adapter
    first, second = fake.of("Forget")
    assert (list(first.item_ids), first.adapter) == ([], True)
    assert (list(second.item_ids), second.adapter) == (["itm_1"], False)


def test_diff_carries_the_adapter_change(client: memos.Client, fake: Fake) -> None:
    diff = client.diff("adapted", 2)
    assert diff.adapter_change is None  # nothing fetched yet
    assert [c.item_id for c in diff] == ["itm_0", "itm_1"]  # both pages
    assert diff.adapter_change is not None and diff.adapter_change.after.digest == "ab" * 32
    assert (diff.from_revision, diff.to_revision) == (2, 7)
    plain = client.diff("notes", 1).fetch_first()
    assert plain.adapter_change is None and len(fake.of("Diff")) == 3
    assert len(list(plain)) == 2


def test_train_builds_the_request(client: memos.Client, fake: Fake) -> None:
    job = client.train("mnt_1", steps=50, rank=8, learning_rate=1e-3, seed=7, message="learn", author="me")
    assert (job.job_id, job.state, job.settings.steps) == ("job_1", types_pb2.JOB_STATE_QUEUED, 50)
    with client.mount("notes") as m:
        m.train()
    full, default = fake.of("Train")
    assert (full.mount_id, full.message, full.author) == ("mnt_1", "learn", "me")
    s = full.settings
    assert (s.steps, s.rank, round(s.learning_rate, 9), s.seed) == (50, 8, 1e-3, 7)
    assert default.mount_id == "mnt_1" and default.settings == types_pb2.TrainSettings()
    with pytest.raises(errors.TrainingInProgress):
        client.train("mnt_busy")


def test_watch_job_yields_every_state(client: memos.Client) -> None:
    jobs = list(client.watch_job("job_1"))
    assert [(j.state, j.step) for j in jobs] == [
        (types_pb2.JOB_STATE_QUEUED, 0), (types_pb2.JOB_STATE_RUNNING, 1), (types_pb2.JOB_STATE_RUNNING, 2),
        (types_pb2.JOB_STATE_RUNNING, 3), (types_pb2.JOB_STATE_SUCCEEDED, 3)]
    assert jobs[-1].state in memos.client.JOB_TERMINAL_STATES
    with pytest.raises(errors.JobNotFound):
        list(client.watch_job("job_nope"))


def test_wait_job_returns_the_final_state(client: memos.Client) -> None:
    seen: list[int] = []
    job = client.wait_job("job_1", on_update=lambda j: seen.append(j.step))
    assert (job.state, job.result_revision, job.adapter_digest) == (types_pb2.JOB_STATE_SUCCEEDED, 5, "cd" * 32)
    assert seen == [0, 1, 2, 3, 3]
    with pytest.raises(errors.JobNotFound):
        client.wait_job("job_nope")


def test_watch_job_closed_early_cancels_the_stream(client: memos.Client, fake: Fake) -> None:
    watch = client.watch_job("job_slow")
    assert next(watch).state == types_pb2.JOB_STATE_RUNNING
    watch.close()
    assert fake.watch_cancelled.wait(2)
    assert fake.of("CancelJob") == []  # the job itself is left alone


def test_watch_job_timeout(client: memos.Client) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client.wait_job("job_slow", timeout=0.2)


def test_cancel_and_list_jobs(client: memos.Client, fake: Fake) -> None:
    assert client.cancel_job("job_1").state == types_pb2.JOB_STATE_CANCELLED
    with pytest.raises(errors.JobFinished):
        client.cancel_job("job_done")
    assert [r.job_id for r in fake.of("CancelJob")] == ["job_1", "job_done"]
    assert [j.job_id for j in client.list_jobs()] == ["job_2", "job_1"]
    assert [j.job_id for j in client.list_jobs("cube_1")] == ["job_1"]
    assert [r.cube for r in fake.of("ListJobs")] == ["", "cube_1"]
