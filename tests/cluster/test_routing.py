"""Three real daemons and the real 3-member etcd, on loopback: cubes are claimed in the directory, placed
by rendezvous over the members, and every call is served through any node (forwarded to the owner).

The daemons are started once for the module (in parallel) and shared; the test that SIGKILLs one
restarts it (the tests run in a random order). Auth is off on the three: principals are still per node (a forwarded call needs a token valid on the
owner; docs/ARCHITECTURE.md, Cluster), which is not what these tests are about.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster
from memosd_client import (
    NO_RETRY,
    Client,
    ClusterUnavailable,
    CubeNameTaken,
    CubeUnavailable,
    InvalidArgument,
    ModelUnavailable,
    MountNotFound,
)
from memosd_client.errors import QuotaExceeded
from memosd_client.v1 import memos_pb2
from memosd_client.v1.memos_pb2 import ClusterConfigResponse
from node_rig import NODES, ThreeNodes, node_env
from prometheus_client.parser import text_string_to_metric_families

from memosd.cluster.directory import Directory
from memosd.cluster.placement import place
from memosd.cluster.view import node_tag
from memosd.kernel import ids

_env = node_env


@pytest.fixture(scope="module")
def nodes(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory, run: str, three_nodes: ThreeNodes
          ) -> Iterator[dict[str, DaemonProcess]]:
    root = tmp_path_factory.mktemp("routing")
    # gamma holds a cube from before it was a member: joining claims it for gamma.
    lone = DaemonProcess(root / "gamma", env={"MEMOSD_SECURITY__AUTH": "false"}).start()
    try:
        with Client(lone.address, timeout=30, retry=NO_RETRY) as c:
            c.alloc_cube(f"pre-cluster-{run}")
    finally:
        assert lone.stop() == 0, lone.log()
    with three_nodes(etcd_cluster, root, run) as procs:
        yield procs


def _client(proc: DaemonProcess) -> Client:
    return Client(proc.address, timeout=30, retry=NO_RETRY)


def _alloc_on(via: Client, node: str, label: str) -> Any:
    """A new cube that placement puts on ``node`` (rendezvous over 3 nodes: 1 in 3 of them; 30 tries)."""
    for i in range(30):
        cube = via.alloc_cube(f"{label}-{i}")
        if cube.owner_node == node:
            return cube
    raise AssertionError(f"no cube landed on {node} in 30 tries")


def test_cubes_spread_over_the_members_and_serve_through_any_node(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> None:
    directory = Directory(etcd_cluster.client())
    members = [f"{n}-{run}" for n in NODES]
    a, b, c = (nodes[n] for n in NODES)
    owners: dict[str, str] = {}
    with _client(a) as via_a, _client(b) as via_b, _client(c) as via_c:
        for i in range(9):
            cube = via_a.alloc_cube(f"spread-{run}-{i}")
            entry = directory.lookup(cube.cube_id)
            assert entry is not None and entry.name == cube.name and entry.epoch == 1
            assert entry.owner == place(cube.cube_id, members), "not placed by the documented rule"
            assert cube.owner_node == entry.owner, "AllocCube's answer names the node it was placed on"
            owners[cube.cube_id] = entry.owner
            for via in (via_a, via_b, via_c):  # by id and by name, through every node
                assert via.stat_cube(cube.cube_id).name == cube.name
                assert via.stat_cube(cube.name).cube_id == cube.cube_id
        assert len(set(owners.values())) >= 2, f"9 cubes all on one node: {owners}"

        # A cube owned by gamma, used entirely through alpha and beta: mount, write, commit, search, read.
        # (9 cubes miss gamma 2.6% of the time: then one more that lands there)
        cube_id = next((cid for cid, owner in owners.items() if owner == f"gamma-{run}"), None) or \
            _alloc_on(via_a, f"gamma-{run}", f"spread-{run}-more").cube_id
        mount = via_a.mount(cube_id, writable=True)
        item_ids = via_b.write(mount.mount_id, ["the heron stands in the shallow river", "a kettle on the stove"])
        via_a.commit(mount.mount_id, "two items")
        hits = via_b.search(mount.mount_id, "heron river", k=1)
        assert [h.item.item_id for h in hits] == [item_ids[0]]
        assert [i.text for i in via_a.read(mount.mount_id, [item_ids[1]])] == ["a kettle on the stove"]
        assert via_c.stat_cube(cube_id).head_revision == 1
        # The owner served it all: the other two hold no such cube.
        assert cube_id in {x.cube_id for x in via_c.list_cubes(local=True)}
        assert cube_id not in {x.cube_id for x in via_a.list_cubes(local=True)}
        # ListCubes without `local` lists the cluster's cubes through any node, each with its owner node and
        # the owner's own stats (gamma's HEAD 1 and item count, through alpha), in one id order, paged.
        for via in (via_a, via_b, via_c):
            listed = {x.cube_id: x for x in via.list_cubes(page_size=2)}  # pages of 2: merged across owners
            assert set(owners) <= set(listed)
            assert all(listed[cid].owner_node == owners[cid] and not listed[cid].unavailable for cid in owners)
            assert (listed[cube_id].head_revision, listed[cube_id].item_count) == (1, 2)
            ordered = [x.cube_id for x in via.list_cubes(page_size=3)]
            assert ordered == sorted(ordered) and len(ordered) == len(set(ordered)) == len(listed)
        assert via_a.stat_cube(cube_id).owner_node == f"gamma-{run}"

        # FreeCube through a non-owner: gone locally on the owner, and from the directory.
        via_b.free_cube(cube_id)
        assert directory.lookup(cube_id) is None

        # gamma's cube from before it joined was claimed for it, and is served through alpha.
        pre = directory.lookup_name(f"pre-cluster-{run}")
        assert pre is not None
        entry = directory.lookup(pre)
        assert entry is not None and entry.owner == f"gamma-{run}"
        assert via_a.stat_cube(f"pre-cluster-{run}").cube_id == pre
        assert "event=cluster_cube_claimed" in c.full_log()
        stats = via_c.stats().cluster
        assert list(stats.not_served) == [] and list(stats.missing) == []
        assert via_a.stats().cluster.forwarded_calls > 0  # the calls above on cubes alpha does not own


def test_names_are_unique_across_nodes(nodes: dict[str, DaemonProcess], run: str) -> None:
    a, b, c = (nodes[n] for n in NODES)
    with _client(a) as via_a, _client(b) as via_b, _client(c) as via_c:
        for i in range(3):  # wherever each lands, a second AllocCube of the name through any node is refused
            name = f"unique-{run}-{i}"
            via_a.alloc_cube(name)
            for via in (via_a, via_b, via_c):
                with pytest.raises(CubeNameTaken, match="in use"):
                    via.alloc_cube(name)


def test_without_etcd_quorum_creation_is_refused_and_existing_cubes_work(
        nodes: dict[str, DaemonProcess], etcd: EtcdCluster, run: str) -> None:
    a, b = nodes["alpha"], nodes["beta"]
    with _client(a) as via_a, _client(b) as via_b:
        cubes = [via_a.alloc_cube(f"quorum-{run}-{i}") for i in range(4)]
        etcd.members[0].kill()
        etcd.members[1].kill()
        with pytest.raises(ClusterUnavailable, match=r"the cluster directory is unavailable \(etcd has no quorum\): "
                           "cube creation and removal are refused until it is back; calls on existing cubes "
                           "still work"):
            via_b.alloc_cube(f"quorum-{run}-new")
        with pytest.raises(ClusterUnavailable):
            via_a.free_cube(cubes[0].cube_id)
        # The cluster config: a change is refused, and every node keeps applying (and showing) the one it has.
        with pytest.raises(ClusterUnavailable, match=r"the cluster config is unavailable"):
            via_a.set_cluster_config("quotas.max_mounts_per_principal", "5")
        assert via_b.cluster_config().settings["quotas.max_mounts_per_principal"] == "1024"
        for cube in cubes:  # on every owner, through both nodes: mount, write, commit, search
            mount = via_b.mount(cube.name, writable=True)
            via_a.write(mount.mount_id, ["written while etcd had no quorum"])
            via_b.commit(mount.mount_id, "no quorum")
            assert via_a.search(mount.mount_id, "quorum", k=1)
            assert via_a.stat_cube(cube.cube_id).head_revision == 1
        etcd.restore()
        via_a.free_cube(cubes[0].cube_id)  # removal works again once etcd is back


def test_a_killed_owner_makes_its_cubes_unavailable_naming_it(
        nodes: dict[str, DaemonProcess], etcd: EtcdCluster, run: str) -> None:
    a, c = nodes["alpha"], nodes["gamma"]
    directory = Directory(etcd.client())
    with _client(a) as via_a:
        cubes = [via_a.alloc_cube(f"crash-{run}-{i}") for i in range(9)]
        owner = {cube.cube_id: directory.lookup(cube.cube_id).owner for cube in cubes}  # type: ignore[union-attr]
        on_gamma = [cid for cid, o in owner.items() if o == f"gamma-{run}"] or \
            [_alloc_on(via_a, f"gamma-{run}", f"crash-{run}-more").cube_id]  # 9 miss gamma 2.6% of the time
        elsewhere = [cid for cid, o in owner.items() if o != f"gamma-{run}"]
        assert on_gamma and elsewhere, owner
        mount = via_a.mount(on_gamma[0], writable=True)
        c.kill()
        started = time.monotonic()
        for _ in range(2):  # at once (refused connection), and once its lease is gone (not a live member)
            with pytest.raises(CubeUnavailable, match=f"cluster node 'gamma-{run}' at {c.address}") as refused:
                via_a.stat_cube(on_gamma[0])
            assert refused.value.metadata["owner"] == f"gamma-{run}"
            assert refused.value.metadata["address"] == c.address
            with pytest.raises(CubeUnavailable, match=f"gamma-{run}"):
                via_a.write(mount.mount_id, ["to a dead node"])
            for cid in elsewhere:
                assert via_a.stat_cube(cid).cube_id == cid
            assert time.monotonic() - started < 10, "CUBE_UNAVAILABLE took long to come"
            time.sleep(3)  # past the 2 s lease
        with pytest.raises(CubeUnavailable, match="not a live cluster member"):
            via_a.stat_cube(on_gamma[0])
        # ListCubes through alpha still lists gamma's cubes, from the directory, marked unavailable; the
        # others come with their owners' stats.
        listed = {x.cube_id: x for x in via_a.list_cubes()}
        for cid in on_gamma:
            assert listed[cid].unavailable and listed[cid].owner_node == f"gamma-{run}", listed.get(cid)
            assert listed[cid].name.startswith(f"crash-{run}-")
        for cid in elsewhere:
            assert not listed[cid].unavailable and listed[cid].owner_node == owner[cid]
        c.start()  # back under its name (a new port): its cubes serve again, through alpha too
        deadline = time.monotonic() + 10
        while True:
            try:
                assert via_a.stat_cube(on_gamma[0]).cube_id == on_gamma[0]
                break
            except CubeUnavailable:
                assert time.monotonic() < deadline, "gamma's cubes stayed unavailable after its restart"
                time.sleep(0.2)


def test_the_node_tag_routes_mounts() -> None:
    tagged = ids.new_id(ids.MOUNT_PREFIX, node_tag("alpha"))
    assert ids.MOUNT_ID_RE.fullmatch(tagged) and ids.tag_of(tagged, ids.MOUNT_PREFIX) == node_tag("alpha")
    assert ids.tag_of("mnt_short", ids.MOUNT_PREFIX) == b""


def test_streams_are_forwarded_and_a_forwarded_call_is_never_forwarded_again(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str, tmp_path: Path) -> None:
    directory = Directory(etcd_cluster.client())
    a, b = nodes["alpha"], nodes["beta"]
    with _client(a) as via_a, _client(b) as via_b:
        cubes = [via_a.alloc_cube(f"stream-{run}-{i}") for i in range(6)]
        cube = next(c for c in cubes if directory.lookup(c.cube_id).owner != f"alpha-{run}")  # type: ignore[union-attr]
        owner = directory.lookup(cube.cube_id).owner  # type: ignore[union-attr]
        mount = via_a.mount(cube.name, writable=True)
        via_a.write(mount.mount_id, ["exported through another node"])
        via_a.commit(mount.mount_id, "one")
        # ImportAdapter is a client stream routed by its header's mount: the owner finds the mount and
        # answers for its (absent) model; alpha, which lacks the mount, answers MOUNT_NOT_FOUND itself.
        with pytest.raises(ModelUnavailable):
            via_a.import_adapter(mount.mount_id, (b"{}", b"not safetensors"))
        with pytest.raises(MountNotFound):
            via_a.import_adapter(ids.new_id(ids.MOUNT_PREFIX), (b"{}", b"not safetensors"))
        # ExportCube is a server stream: through alpha it comes from the owner, chunk by chunk.
        archive = via_a.export_cube(cube.name, tmp_path / "cube.memosd")
        assert archive.revisions == 1
        imported = via_b.import_cube(tmp_path / "cube.memosd", f"copy-{run}").cube  # a client stream, run on beta
        entry = directory.lookup(imported.cube_id)
        assert entry is not None and entry.owner == f"beta-{run}" and imported.cube_id != cube.cube_id

        # A call that says it was forwarded already is served where it lands or refused, never sent on.
        other = nodes[owner.rsplit("-", 1)[0]]
        channel = grpc.insecure_channel(a.address)
        try:
            stat: Any = channel.unary_unary("/memos.v1.MemOS/StatCube", request_serializer=None,
                                       response_deserializer=None)
            request = memos_pb2.StatCubeRequest(cube=cube.cube_id).SerializeToString()
            with pytest.raises(grpc.RpcError) as refused:
                stat(request, metadata=(("memosd-forwarded-by", "elsewhere"),), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "is not forwarded twice" in (refused.value.details() or "")
            assert f"cluster node {owner!r} at {other.address}" in (refused.value.details() or "")
        finally:
            channel.close()


def _wait_revision(via: Client, revision: int) -> ClusterConfigResponse:
    deadline = time.monotonic() + 10
    while True:
        seen = via.cluster_config()
        if seen.revision >= revision:
            return seen
        assert time.monotonic() < deadline, f"the config change did not reach this node: {seen}"
        time.sleep(0.1)


def test_the_cluster_config_is_shared_and_a_setting_reaches_every_node(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> None:
    a, b, c = (nodes[n] for n in NODES)
    key = "quotas.max_mounts_per_principal"
    with _client(a) as via_a, _client(b) as via_b, _client(c) as via_c:
        seen = [via.cluster_config() for via in (via_a, via_b, via_c)]
        assert len({(x.revision, tuple(sorted(x.fixed.items()))) for x in seen}) == 1, seen
        fixed = seen[0].fixed
        assert (fixed["security.auth"], fixed["cluster.lease_seconds"], fixed["security.tls"]) == ("false", "2", "false")
        assert fixed["cluster.placement"] == "rendezvous-sha256-v1" and int(fixed["embedder.dim"]) > 0
        assert seen[0].created_by in {f"{n}-{run}" for n in NODES}
        assert seen[0].settings[key] == "1024"
        # What can and cannot be set.
        with pytest.raises(InvalidArgument, match="fixed when the cluster is made"):
            via_a.set_cluster_config("security.auth", "true")
        with pytest.raises(InvalidArgument, match="unknown cluster setting"):
            via_a.set_cluster_config("quotas.nope", "1")
        with pytest.raises(InvalidArgument, match="expected an integer >= 0"):
            via_a.set_cluster_config(key, "-3")

        # A cube of beta's takes two mounts under the default; set the quota to 1 through alpha: beta applies
        # it when its watch brings the change, and refuses the second mount (the first too if other tests'
        # mounts are still open there).
        directory = Directory(etcd_cluster.client())
        cube = _alloc_on(via_a, f"beta-{run}", f"quota-{run}")
        entry = directory.lookup(cube.cube_id)
        assert entry is not None and entry.owner == f"beta-{run}"
        for m in [via_a.mount(cube.cube_id) for _ in range(2)]:
            via_a.unmount(m.mount_id)
        changed = via_a.set_cluster_config(key, "1")
        assert changed.settings[key] == "1" and changed.updated_by == f"alpha-{run}"
        assert changed.revision > seen[0].revision
        try:
            for via in (via_b, via_c):
                assert _wait_revision(via, changed.revision).settings[key] == "1"
            opened = []
            with pytest.raises(QuotaExceeded, match=r"the limit is 1 \(quotas.max_mounts_per_principal\)"):
                for _ in range(2):
                    opened.append(via_c.mount(cube.cube_id))  # through gamma, served (and counted) by beta
            for m in opened:
                via_c.unmount(m.mount_id)
        finally:
            back = via_b.set_cluster_config(key, "1024")
            for via in (via_a, via_b, via_c):
                _wait_revision(via, back.revision)
        via_c.mount(cube.cube_id)  # the default again


def test_a_node_whose_must_agree_setting_differs_is_refused(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str, tmp_path: Path) -> None:
    env = {**_env(etcd_cluster.endpoints, f"delta-{run}"), "MEMOSD_CLUSTER__LEASE_SECONDS": "3"}
    delta = DaemonProcess(tmp_path / "delta", env=env)
    with pytest.raises(RuntimeError, match="memosd exited with 1"):
        delta.start()
    log = delta.full_log()
    assert "memosd: cluster config: cluster.lease_seconds is 3 on this node but 2 in the cluster (memosd/config" \
        in log, log
    assert "event=serving" not in log
    with _client(nodes["alpha"]) as via_a:
        assert f"delta-{run}" not in via_a.stats().cluster.members


def _scrape(proc: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    address = json.loads((proc.data_dir / "daemon.json").read_text())["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_node_exports_its_cluster_metrics(nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster,
                                               run: str) -> None:
    """/metrics on a cluster node has its cluster section: joined, etcd reachable, members, cubes per owner
    (as the directory has them), and a counter of the calls it forwarded that moves with a forwarded call."""
    directory = Directory(etcd_cluster.client())
    a, b, _ = (nodes[n] for n in NODES)
    with _client(a) as via_a, _client(b) as via_b:
        cube = via_a.alloc_cube(f"metered-{run}")
        via = via_b if cube.owner_node == f"alpha-{run}" else via_a  # a node that does not own it
        proc = b if via is via_b else a
        before = _scrape(proc)
        via.stat_cube(cube.cube_id)
        after = _scrape(proc)
    forwarded = "memosd_cluster_forwarded_calls_total", ()
    assert after[forwarded] - before[forwarded] >= 1
    assert ("memosd_cluster_moves_total", (("outcome", "out"),)) in after
    owners = [e.owner for e in directory.list()]
    expected = {f"{n}-{run}": float(owners.count(f"{n}-{run}")) for n in NODES}
    deadline = time.monotonic() + 15
    while True:  # the member list is reread every half lease, the directory view follows etcd's watch, and
        # etcd_ok comes back at the node's next good call to etcd (another test here may have just ended
        # an etcd outage)
        seen = {name: after.get(("memosd_cluster_cubes", (("node", name),)), 0.0) for name in expected}
        state = (after["memosd_cluster_joined", ()], after["memosd_cluster_etcd_ok", ()],
                 after["memosd_cluster_members", ()] >= 3)  # others' members may be live too
        if state == (1.0, 1.0, True) and seen == expected:
            break
        assert time.monotonic() < deadline, (state, seen, expected)
        time.sleep(0.5)
        after = _scrape(proc)
