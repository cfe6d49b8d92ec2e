"""Hardening through a real daemon: bad timestamps and page tokens, names, huge input, Diff, auth headers, audit.

The daemon runs without a model: every check here is on plaintext syscalls.
"""

from __future__ import annotations

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from expect import expect
from google.protobuf.timestamp_pb2 import Timestamp
from memos import Client
from memos.errors import from_rpc_error
from memos.v1 import memos_pb2 as pb
from memos.v1 import types_pb2 as t
from memos.v1.memos_pb2_grpc import MemOSStub

from memosd.kernel.paging import encode_token

daemon = daemon_fixture("hardening")
admin = client_fixture(timeout=30, scope="module")


def _user(daemon: DaemonProcess, admin: Client, name: str) -> Client:
    _, token = admin.create_principal(name)
    return Client(daemon.address, token=token, timeout=30)


def _audit_raw(client: Client, request: pb.AuditRequest) -> None:
    try:
        list(client._stub.Audit(request, timeout=30))
    except grpc.RpcError as e:
        raise from_rpc_error(e) from e


def _seed(client: Client, name: str, texts: list[str]) -> str:
    cube_id = client.alloc_cube(name).cube_id
    with client.mount(cube_id, writable=True) as m:
        m.write(texts)
        m.commit("seed")
    return cube_id


def test_out_of_range_timestamps_and_hand_made_page_tokens(admin: Client) -> None:
    cube = _seed(admin, "stamps", ["first"])
    with admin.mount(cube, writable=True) as m:
        m.write(["second"])
        m.commit("two")
    bad = [Timestamp(seconds=10**12), Timestamp(seconds=1, nanos=-1)]
    with admin.mount(cube, writable=True) as m:
        for stamp in bad:
            expect(lambda stamp=stamp: admin._call(admin._stub.Write, pb.WriteRequest(
                mount_id=m.mount_id, items=[t.ItemInput(text="x", event_time=stamp)])),
                "INVALID_ARGUMENT", "INVALID_FIELD", "items[0].event_time", "Timestamp")
            expect(lambda stamp=stamp: admin._call(admin._stub.Ingest, pb.IngestRequest(
                mount_id=m.mount_id, messages=[t.ConversationMessage(speaker="a", text="x", session_id="s",
                                                                     time=stamp)])),
                "INVALID_ARGUMENT", "INVALID_FIELD", "messages[0].time")
            expect(lambda stamp=stamp: admin._call(admin._stub.Search, pb.SearchRequest(
                mount_ids=[m.mount_id], query="x", event_time=t.TimeRange(start=stamp))),
                "INVALID_ARGUMENT", "INVALID_FIELD", "event_time.start")
            expect(lambda stamp=stamp: admin._call(admin._stub.Grant, pb.GrantRequest(
                cube=cube, principal="nobody", rights=[t.RIGHT_READ], expire_time=stamp)),
                "INVALID_ARGUMENT", "INVALID_FIELD", "expire_time")
            expect(lambda stamp=stamp: _audit_raw(admin, pb.AuditRequest(time_range=t.TimeRange(end=stamp))),
                   "INVALID_ARGUMENT", "INVALID_FIELD", "time_range.end")
    # A token of the right list with a cursor of the wrong type, and one that is not base64 JSON at all.
    for token in (encode_token(f"log:{cube}", "abc"), "abc"):
        expect(lambda token=token: admin._call(admin._stub.Log, pb.LogRequest(cube=cube, page_size=1, page_token=token)),
               "INVALID_ARGUMENT", "INVALID_PAGE_TOKEN", "page_token")
    assert [r.number for r in admin.log(cube, page_size=1)] == [2, 1]  # still serving, pages intact


def test_names_with_a_trailing_newline_are_refused(admin: Client) -> None:
    admin.alloc_cube("notes")
    expect(lambda: admin.alloc_cube("notes\n"), "INVALID_ARGUMENT", "INVALID_FIELD", "cube name")
    expect(lambda: admin.create_principal("admin\n"), "INVALID_ARGUMENT", "INVALID_FIELD", "principal name")
    expect(lambda: admin.alloc_cube("labelled", labels={"team\n": "x"}), "INVALID_ARGUMENT", "INVALID_FIELD",
           "label")
    assert [c.name for c in admin.list_cubes() if c.name.startswith("notes")] == ["notes"]


def test_refusals_of_huge_input_stay_small(admin: Client) -> None:
    huge = "x" * 12_000
    for call, code, reason in [
        (lambda: admin.stat_cube(huge), "NOT_FOUND", "CUBE_NOT_FOUND"),
        (lambda: admin.alloc_cube(huge), "INVALID_ARGUMENT", "INVALID_FIELD"),
        (lambda: admin.read("mnt_" + huge, ["itm_aaaaaaaaaaaaaaaaaaaa"]), "NOT_FOUND", "MOUNT_NOT_FOUND"),
        (lambda: admin.commit("mnt_" + "é" * 12_000), "NOT_FOUND", "MOUNT_NOT_FOUND"),
    ]:
        error = expect(call, code, reason, "characters, shortened")
        assert len(error.message.encode()) <= 1024
        assert all(len(v.encode()) <= 200 for v in error.metadata.values()), error.metadata


def test_diff_with_reversed_revisions_is_refused(admin: Client) -> None:
    cube = _seed(admin, "diffed", ["one"])
    with admin.mount(cube, writable=True) as m:
        m.write(["two"])
        m.commit("two")
    assert [c.kind for c in admin.diff(cube, 1, 2)] == [t.CHANGE_KIND_ADDED]
    expect(lambda: list(admin.diff(cube, 2, 1)), "INVALID_ARGUMENT", "INVALID_FIELD", "from_revision 2",
           "swap them")


def test_two_authorization_headers_are_refused(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        stub = MemOSStub(channel)
        for second in (daemon.token, "mtk.wrong"):
            with pytest.raises(grpc.RpcError) as caught:
                stub.WhoAmI(pb.WhoAmIRequest(), timeout=10, metadata=[
                    ("authorization", f"Bearer {daemon.token}"), ("authorization", f"Bearer {second}")])
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "send one" in caught.value.details()
        who = stub.WhoAmI(pb.WhoAmIRequest(), timeout=10, metadata=[("authorization", f"Bearer {daemon.token}")])
        assert who.principal.admin


def test_a_taken_name_reveals_nothing_of_the_cube(daemon: DaemonProcess, admin: Client) -> None:
    with _user(daemon, admin, "dora") as dora, _user(daemon, admin, "eve") as eve:
        cube_id = dora.alloc_cube("dora-secret").cube_id
        error = expect(lambda: eve.alloc_cube("dora-secret"), "ALREADY_EXISTS", "CUBE_NAME_TAKEN",
                       "shared by all principals")
        own = expect(lambda: dora.alloc_cube("dora-secret"), "ALREADY_EXISTS", "CUBE_NAME_TAKEN")
        assert error.message == own.message and error.metadata == own.metadata == {"name": "dora-secret"}
        assert cube_id not in error.message and "dora" not in error.message.replace("dora-secret", "")


def test_an_owners_audit_names_only_its_cubes_items(daemon: DaemonProcess, admin: Client) -> None:
    with (_user(daemon, admin, "alice") as alice, _user(daemon, admin, "bob") as bob,
          _user(daemon, admin, "carol") as carol):
        a = _seed(alice, "alice-owls", ["owls hunt at night", "owls are quiet"])
        b = _seed(bob, "bob-owls", ["owls nest in barns", "barn owls are pale"])
        alice.grant(a, "carol", ["read"])
        bob.grant(b, "carol", ["read"])
        with carol.mount(a) as ma, carol.mount(b) as mb:
            a_items = {i.item_id for i in ma.iter_items()}
            b_items = {i.item_id for i in mb.iter_items()}
            hits = carol.search([ma.mount_id, mb.mount_id], "owls", k=10)
        assert {h.item.item_id for h in hits} == a_items | b_items
        alice_sees = [r for r in alice.audit(cube=a) if r.method == "Search"]
        bob_sees = [r for r in bob.audit(cube=b) if r.method == "Search"]
        assert len(alice_sees) == len(bob_sees) == 1
        assert set(alice_sees[0].item_ids) == a_items and set(bob_sees[0].item_ids) == b_items
        assert alice_sees[0].principal_id == bob_sees[0].principal_id == carol.whoami().principal_id
        # Admins see both records of the call, one after the other.
        searches = [r for r in admin.audit(method="Search") if r.principal_id == alice_sees[0].principal_id]
        assert [r.cube_id for r in searches] == [a, b] and searches[1].seq == searches[0].seq + 1
