"""memos.Client's request ids, safe retries and deadlines, against an in-process fake MemOS server.

The server is real gRPC (port 0); each method fails with the status codes queued for it, then answers, and
records every request it got (and the deadline it had left), so the tests see exactly what was resent.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import memos
import pytest
from memos import errors
from memos.v1 import memos_pb2, memos_pb2_grpc, types_pb2

C = grpc.StatusCode
FAST = memos.RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.01)


class Flaky(memos_pb2_grpc.MemOSServicer):
    """Fails each call with the next code queued for its method, then answers; records requests."""

    def __init__(self) -> None:
        self.fail: dict[str, list[grpc.StatusCode]] = {}
        self.requests: dict[str, list[Any]] = {}
        self.time_left: dict[str, list[float]] = {}

    def _seen(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.setdefault(method, []).append(request)
        self.time_left.setdefault(method, []).append(context.time_remaining() or 0.0)
        queued = self.fail.get(method)
        if queued:
            code = queued.pop(0)
            context.abort(code, f"injected {code.name}")

    def Ingest(self, request: memos_pb2.IngestRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Ingest", request, context)
        return memos_pb2.IngestResponse(item_ids=[f"itm_{i}" for i in range(len(request.messages))],
                                        revision=types_pb2.Revision(number=1))

    def Write(self, request: memos_pb2.WriteRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Write", request, context)
        return memos_pb2.WriteResponse(item_ids=[f"itm_{i}" for i in range(len(request.items))])

    def Commit(self, request: memos_pb2.CommitRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Commit", request, context)
        return memos_pb2.CommitResponse(revision=types_pb2.Revision(number=2))

    def Search(self, request: memos_pb2.SearchRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Search", request, context)
        return memos_pb2.SearchResponse()

    def Mount(self, request: memos_pb2.MountRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Mount", request, context)
        return memos_pb2.MountResponse(mount=types_pb2.Mount(mount_id="mnt_1"))

    def ImportAdapter(self, request_iterator: Iterator[memos_pb2.ImportAdapterRequest],
                      context: grpc.ServicerContext) -> Any:
        messages = list(request_iterator)
        self._seen("ImportAdapter", messages, context)
        return memos_pb2.ImportAdapterResponse(adapter=types_pb2.Adapter(digest=messages[0].header.digest))

    def Generate(self, request: memos_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Generate", request, context)
        yield memos_pb2.GenerateResponse(delta="hi")


@pytest.fixture
def fake() -> Flaky:
    return Flaky()


@pytest.fixture
def server(fake: Flaky) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    memos_pb2_grpc.add_MemOSServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(server: str) -> Iterator[memos.Client]:
    with memos.Client(server, timeout=5, retry=FAST) as c:
        yield c


MESSAGES = [{"speaker": "user", "text": "hello", "session_id": "s1"}]


def test_ingest_is_retried_with_the_same_request_id(client: memos.Client, fake: Flaky) -> None:
    fake.fail["Ingest"] = [C.UNAVAILABLE, C.DEADLINE_EXCEEDED]
    resp = client.ingest("mnt_1", MESSAGES)
    assert resp.revision.number == 1
    sent = fake.requests["Ingest"]
    assert len(sent) == 3
    assert sent[0].request_id and all(r == sent[0] for r in sent)  # the very same request, id included


def test_write_commit_and_upload_are_retried_with_their_ids(client: memos.Client, fake: Flaky) -> None:
    fake.fail = {"Write": [C.DEADLINE_EXCEEDED], "Commit": [C.UNAVAILABLE], "ImportAdapter": [C.UNAVAILABLE]}
    assert client.write("mnt_1", ["a", "b"]) == ["itm_0", "itm_1"]
    assert client.commit("mnt_1").revision.number == 2
    client.import_adapter("mnt_1", (b'{"r": 4}', b"weights" * 100), chunk_bytes=64)
    for method in ("Write", "Commit"):
        first, second = fake.requests[method]
        assert first.request_id and first == second
    first_upload, second_upload = fake.requests["ImportAdapter"]
    assert first_upload[0].header.request_id and first_upload == second_upload  # header and every chunk again


def test_each_call_gets_a_fresh_id_unless_one_is_given(client: memos.Client, fake: Flaky) -> None:
    client.ingest("mnt_1", MESSAGES)
    client.ingest("mnt_1", MESSAGES)
    client.ingest("mnt_1", MESSAGES, request_id="my-id-1")
    a, b, c = (r.request_id for r in fake.requests["Ingest"])
    assert a != b and c == "my-id-1"


def test_retries_stop_after_the_policy_attempts(client: memos.Client, fake: Flaky) -> None:
    fake.fail["Commit"] = [C.UNAVAILABLE] * 10
    with pytest.raises(errors.Unavailable):
        client.commit("mnt_1")
    assert len(fake.requests["Commit"]) == FAST.attempts


def test_a_refusal_is_not_retried(client: memos.Client, fake: Flaky) -> None:
    fake.fail["Ingest"] = [C.INVALID_ARGUMENT]
    with pytest.raises(errors.InvalidArgument):
        client.ingest("mnt_1", MESSAGES)
    assert len(fake.requests["Ingest"]) == 1


def test_calls_without_a_request_id_are_not_resent(client: memos.Client, fake: Flaky) -> None:
    fake.fail["Mount"] = [C.UNAVAILABLE]
    with pytest.raises(errors.Unavailable):
        client.mount("c", writable=True)
    assert len(fake.requests["Mount"]) == 1


def test_reads_are_retried_only_when_the_daemon_was_unreachable(client: memos.Client, fake: Flaky) -> None:
    fake.fail["Search"] = [C.UNAVAILABLE]
    client.search("mnt_1", "q")
    assert len(fake.requests["Search"]) == 2
    fake.fail["Search"] = [C.DEADLINE_EXCEEDED]
    with pytest.raises(errors.DeadlineExceeded):
        client.search("mnt_1", "q")
    assert len(fake.requests["Search"]) == 3


def test_no_retry_policy_sends_once(server: str, fake: Flaky) -> None:
    fake.fail["Ingest"] = [C.UNAVAILABLE]
    with memos.Client(server, timeout=5, retry=memos.NO_RETRY) as c, pytest.raises(errors.Unavailable):
        c.ingest("mnt_1", MESSAGES)
    assert len(fake.requests["Ingest"]) == 1


def test_long_calls_get_deadlines_that_fit_them(server: str, fake: Flaky) -> None:
    deadlines = memos.Deadlines(per_item=1.0, per_mib=10.0, per_token=2.0)
    with memos.Client(server, timeout=5, retry=FAST, deadlines=deadlines) as c:
        c.ingest("mnt_1", MESSAGES * 100)  # 5 + 100 x 1 s
        c.write("mnt_1", ["x"] * 50)  # 5 + 50 x 1 s
        c.import_adapter("mnt_1", (b"{}", b"w" * (4 << 20)))  # 5 + 4 MiB x 10 s
        c.generate("hi", max_tokens=100).text()  # 5 + 100 x 2 s
        c.generate("hi").text()  # the daemon's default 256 tokens: 5 + 512 s
        c.generate("hi", timeout=7).text()  # an explicit timeout wins
        c.commit("mnt_1")  # a short call keeps the base
    # The deadline each call arrived with: what the client set (gRPC rounds a deadline on the wire, up to
    # a second or so, hence the slack above) less the moments spent getting there (a generous 10 s below:
    # slow, shared cores).
    def near(method: str, index: int, expected: float) -> bool:
        return expected - 10 <= fake.time_left[method][index] <= expected + 2

    assert near("Ingest", 0, 105)
    assert near("Write", 0, 55)
    assert near("ImportAdapter", 0, 45)
    assert near("Generate", 0, 205) and near("Generate", 1, 517) and near("Generate", 2, 7)
    assert near("Commit", 0, 5)


def test_no_timeout_means_no_deadline_even_for_long_calls(server: str, fake: Flaky) -> None:
    with memos.Client(server, timeout=None, retry=FAST) as c:
        c.ingest("mnt_1", MESSAGES * 10)
        c.generate("hi").text()
    assert fake.time_left["Ingest"][0] > 10**6 and fake.time_left["Generate"][0] > 10**6
