"""Bad input: each case is a clear gRPC error with a stable reason; nothing is lost; the daemon serves on."""

from __future__ import annotations

import grpc
import pytest
from daemon_proc import DaemonProcess
from expect import expect
from memos import Client
from memos.auth import TokenInterceptor
from memos.v1 import memos_pb2 as pb
from memos.v1 import types_pb2 as t
from memos.v1.memos_pb2_grpc import MemOSStub


@pytest.fixture
def seeded(client: Client, cube_name: str) -> str:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        m.write(["precious memory"])
        m.commit()
    return cube_name


def assert_intact(client: Client, cube: str) -> None:
    with client.mount(cube) as m:
        assert [i.text for i in m.iter_items()] == ["precious memory"]
    assert client.stats().cube_count >= 1


def test_unknown_cube_mount_revision_item(client: Client, seeded: str) -> None:
    expect(lambda: client.stat_cube("no-such-cube"), "NOT_FOUND", "CUBE_NOT_FOUND", "no-such-cube")
    expect(lambda: client.mount("cube_aaaaaaaaaaaaaaaaaaaa"), "NOT_FOUND", "CUBE_NOT_FOUND")
    expect(lambda: client.read("mnt_aaaaaaaaaaaaaaaaaaaa", ["x"]), "NOT_FOUND", "MOUNT_NOT_FOUND")
    expect(lambda: client.commit("mnt_zzz"), "NOT_FOUND", "MOUNT_NOT_FOUND")
    expect(lambda: client.mount(seeded, revision=99), "NOT_FOUND", "REVISION_NOT_FOUND", "99", "HEAD is 1")
    expect(lambda: list(client.diff(seeded, 0, 42)), "NOT_FOUND", "REVISION_NOT_FOUND")
    with client.mount(seeded) as m:
        expect(lambda: m.read(["itm_aaaaaaaaaaaaaaaaaaaa"]), "NOT_FOUND", "ITEM_NOT_FOUND")
    assert_intact(client, seeded)


def test_empty_and_oversized_text(client: Client, seeded: str) -> None:
    with client.mount(seeded, writable=True) as m:
        expect(lambda: m.write([""]), "INVALID_ARGUMENT", "TEXT_EMPTY", "items[0].text")
        expect(lambda: m.write(["ok", "   "]), "INVALID_ARGUMENT", "TEXT_EMPTY", "items[1].text")
        big = "x" * 40_000
        error = expect(lambda: m.write([big]), "INVALID_ARGUMENT", "TEXT_TOO_LARGE", "40000 bytes", "32768")
        assert error.metadata["limit"] == "32768"
        expect(lambda: m.write(["x"] * 1025), "INVALID_ARGUMENT", "TOO_MANY_ITEMS", "1024")
        expect(lambda: m.write([]), "INVALID_ARGUMENT", "INVALID_FIELD", "items")
        expect(lambda: m.search(""), "INVALID_ARGUMENT", "TEXT_EMPTY", "query")
        # A failed write stages nothing: the valid item in the same call is not kept either.
        assert m.info.staged_adds == 0
        assert [i.text for i in m.iter_items()] == ["precious memory"]
    assert_intact(client, seeded)


def test_commit_conflict_is_aborted(client: Client, seeded: str) -> None:
    with client.mount(seeded) as ro:
        [item] = [i.item_id for i in ro.iter_items()]
    with client.mount(seeded, writable=True) as a, client.mount(seeded, writable=True) as b:
        a.forget([item])
        b.forget([item])
        a.commit()
        expect(lambda: b.commit(), "ABORTED", "COMMIT_CONFLICT", item)
        # The staging is kept: b reads its base revision, which still has the item, without it.
        assert b.base_revision == 1 and client.read(b.mount_id, []) == []
        with client.mount(seeded, revision=1) as base:
            assert [i.item_id for i in base.iter_items()] == [item]


def test_an_edit_against_an_edit_conflicts_and_keeps_the_staging(client: Client, seeded: str) -> None:
    with client.mount(seeded) as ro:
        [item] = [i.item_id for i in ro.iter_items()]
    with client.mount(seeded, writable=True) as a, client.mount(seeded, writable=True) as b:
        a.write([t.ItemInput(item_id=item, text="edited by a")])
        b.write([t.ItemInput(item_id=item, text="edited by b")])
        assert a.commit().revision.number == 2
        expect(lambda: b.commit(), "ABORTED", "COMMIT_CONFLICT", item, "HEAD (revision 2)")
        # Nothing of b's was committed, and b's staged edit is still there to re-apply.
        with client.mount(seeded) as head:
            assert head.base_revision == 2 and [i.text for i in head.iter_items()] == ["edited by a"]
        assert [i.text for i in b.iter_items()] == ["edited by b"] and b.base_revision == 1
        # Once b sees HEAD (mounted again) the same edit commits.
        with client.mount(seeded, writable=True) as again:
            again.write([t.ItemInput(item_id=item, text="edited by b")])
            assert again.commit().revision.number == 3


def test_read_only_mount_write(client: Client, seeded: str) -> None:
    with client.mount(seeded) as ro:
        expect(lambda: ro.write(["nope"]), "FAILED_PRECONDITION", "MOUNT_READ_ONLY", "read-only")
    assert_intact(client, seeded)


def test_malformed_requests(client: Client, daemon: DaemonProcess, seeded: str) -> None:
    # Bytes that are not a protobuf message at all.
    with grpc.insecure_channel(daemon.address) as plain:
        channel = grpc.intercept_channel(plain, TokenInterceptor(daemon.token))
        raw = channel.unary_unary("/memos.v1.MemOS/Write", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid memos.v1.WriteRequest" in caught.value.details()
        stub = MemOSStub(channel)
        # Well-formed bytes with invalid contents.
        for request, call, words in [
            (pb.AllocCubeRequest(name="bad name!"), stub.AllocCube, ["name"]),
            (pb.AllocCubeRequest(name=""), stub.AllocCube, ["name"]),
            (pb.MountRequest(cube=seeded, mode=7), stub.Mount, ["MountMode"]),
            (pb.SearchRequest(query="x"), stub.Search, ["mount_ids"]),
            (pb.ListCubesRequest(page_token="not-a-token"), stub.ListCubes, ["page_token"]),
            (pb.StatCubeRequest(), stub.StatCube, ["cube"]),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            for word in words:
                assert word in caught.value.details()
    with client.mount(seeded) as m:
        expect(lambda: client.search(m.mount_id, "x", k=5000), "INVALID_ARGUMENT", "INVALID_FIELD", "k")
        expect(lambda: client._call(client._stub.Search, pb.SearchRequest(
            mount_ids=[m.mount_id], query="x", mode=t.SearchMode.ValueType(9))), "INVALID_ARGUMENT", "INVALID_FIELD")
    expect(lambda: client.alloc_cube(seeded), "ALREADY_EXISTS", "CUBE_NAME_TAKEN", seeded)
    assert_intact(client, seeded)
