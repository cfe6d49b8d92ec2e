"""syscalls/router.py's choice of owner, against a fake directory view (no etcd, no second node): which
request field routes each kind of call, and what stays local (and where the HTTP surface runs a chat).
tests/cluster/test_routing.py forwards for real."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from memosd_client.v1 import memos_pb2 as pb

from memosd.cluster.directory import Entry
from memosd.cluster.view import Owner, node_tag
from memosd.errors import CubeUnavailable, InvalidField
from memosd.kernel import ids
from memosd.syscalls.convert_openai import chat_request
from memosd.syscalls.openai_owner import chat_owner
from memosd.syscalls.router import HOP, Router

CUBE = ids.new_id(ids.CUBE_PREFIX)


class FakeView:
    def __init__(self) -> None:
        self.entries = {CUBE: Entry(CUBE, "beta", 1, "notes")}
        self.live = {"alpha": "127.0.0.1:1", "beta": "127.0.0.1:2"}
        self.lookups: list[str] = []

    def entry(self, ref: str) -> Entry | None:
        return next((e for e in self.entries.values() if ref in (e.cube_id, e.name)), None)

    def lookup(self, ref: str) -> Entry | None:
        self.lookups.append(ref)
        return self.entry(ref)

    def node_of_tag(self, tag: bytes) -> str:
        return next((n for n in ("alpha", "beta", "gone") if node_tag(n) == tag), "")

    def owner(self, node: str) -> Owner:
        return Owner(node, self.live.get(node, "127.0.0.1:3"), node in self.live)

    def live_members(self) -> list[str]:
        return sorted(self.live)


class Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


@pytest.fixture
def view() -> FakeView:
    return FakeView()


def _route(view: FakeView, method: str, request: Any, context: Context | None = None) -> str:
    router = Router(view, "alpha", max_message_bytes=1 << 20)  # type: ignore[arg-type]
    return asyncio.run(router._route(method, request, context or Context()))


def test_a_cube_by_id_or_name_goes_to_its_owner(view: FakeView) -> None:
    assert _route(view, "StatCube", pb.StatCubeRequest(cube=CUBE)) == "beta"
    assert _route(view, "Mount", pb.MountRequest(cube="notes")) == "beta"
    assert view.lookups == []  # both found in the cache
    assert _route(view, "StatCube", pb.StatCubeRequest(cube="unknown")) == ""  # the local CUBE_NOT_FOUND
    assert view.lookups == ["unknown"]  # a miss asks the directory once


def test_mounts_and_jobs_go_by_their_node_tag(view: FakeView) -> None:
    on_beta = ids.new_id(ids.MOUNT_PREFIX, node_tag("beta"))
    assert _route(view, "Write", pb.WriteRequest(mount_id=on_beta)) == "beta"
    assert _route(view, "Search", pb.SearchRequest(mount_ids=["", on_beta])) == "beta"  # the first mount
    assert _route(view, "Write", pb.WriteRequest(mount_id=ids.new_id(ids.MOUNT_PREFIX, node_tag("alpha")))) == ""
    assert _route(view, "Write", pb.WriteRequest(mount_id=ids.new_id(ids.MOUNT_PREFIX))) == ""  # untagged: here
    job = ids.new_id(ids.JOB_PREFIX, node_tag("beta"))
    assert _route(view, "WatchJob", pb.WatchJobRequest(job_id=job)) == "beta"


def test_calls_naming_no_cube_stay_here(view: FakeView) -> None:
    for method, request in (("ListCubes", pb.ListCubesRequest()), ("Stats", pb.StatsRequest()),
                            ("WhoAmI", pb.WhoAmIRequest())):
        assert _route(view, method, request) == ""


def test_a_dead_owner_or_a_second_hop_is_cube_unavailable(view: FakeView) -> None:
    with pytest.raises(CubeUnavailable, match="was forwarded here already and is not forwarded twice"):
        _route(view, "StatCube", pb.StatCubeRequest(cube=CUBE), Context((HOP, "gamma")))
    del view.live["beta"]
    with pytest.raises(CubeUnavailable, match=r"cube 'notes' is served by cluster node 'beta' at 127.0.0.1:3, "
                       "which is not a live cluster member") as refused:
        _route(view, "StatCube", pb.StatCubeRequest(cube="notes"))
    assert refused.value.metadata == {"owner": "beta", "address": "127.0.0.1:3"}


def _chat(cubes: list[str], adapter: str = "", remember: str = "") -> Any:
    memos: dict[str, Any] = {"cubes": cubes}
    if adapter:
        memos["adapter"] = adapter
    if remember:
        memos["remember"] = remember
    return chat_request({"model": "memosd", "messages": [{"role": "user", "content": "hi"}], "memos": memos})


def test_a_chat_runs_where_all_its_cubes_are(view: FakeView) -> None:
    """syscalls/openai_owner.py: the HTTP surface's choice of node, on the router's view."""
    view.entries["cube_here"] = Entry("cube_here", "alpha", 1, "mine")
    view.entries["cube_gamma"] = Entry("cube_gamma", "gamma", 1, "far")
    router = Router(view, "alpha", max_message_bytes=1 << 20)  # type: ignore[arg-type]

    def owner(chat: Any) -> str:
        return asyncio.run(chat_owner(router, chat))

    assert owner(_chat(["notes"])) == "beta"  # another node's cube: run there
    assert owner(_chat(["notes", "unknown"], remember="notes")) == "beta"  # no directory names "unknown"
    assert owner(_chat(["mine"])) == ""  # this node's own: run here
    assert owner(_chat(["unknown"])) == ""  # the local CUBE_NOT_FOUND
    with pytest.raises(InvalidField) as refused:  # the adapter counts: it is mounted too
        owner(_chat(["notes"], adapter="far"))
    assert "'notes' on 'beta', 'far' on 'gamma'" in refused.value.message
    assert refused.value.metadata["field"] == "memos.cubes"
    with pytest.raises(InvalidField, match="'mine' on 'alpha', 'notes' on 'beta'"):
        owner(_chat(["mine"], remember="notes"))
