"""Principals and grants in etcd, through three real daemons with auth on and the real 3-member etcd.

gamma was a single node first (an admin and a principal of its own), then the cluster's first member:
it copies both into etcd. alpha and beta start after it and find them: they make no admin of their
own. A token made through any node works through every node, and a call through one node to a cube on
another is checked by the owner against the same principals and grants. The daemons are shared by the
module; the tests run in a random order and each leaves etcd whole.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster
from memosd_client import (
    NO_RETRY,
    Client,
    ClusterUnavailable,
    CubeNotFound,
    MountNotFound,
    PermissionDenied,
    Unauthenticated,
)

from memosd.cluster.directory import Directory
from memosd.cluster.grants import UNAVAILABLE

NODES = ("alpha", "beta", "gamma")


def _env(endpoints: list[str], name: str) -> dict[str, str]:
    return {"MEMOSD_CLUSTER__ETCD": ",".join(endpoints), "MEMOSD_CLUSTER__NODE_NAME": name,
            "MEMOSD_CLUSTER__LEASE_SECONDS": "2", "MEMOSD_HTTP__LISTEN": "127.0.0.1:0"}  # the HTTP surface too


class Rig:
    def __init__(self, procs: dict[str, DaemonProcess], run: str, admin_token: str, carol_token: str) -> None:
        self.procs, self.run, self.admin_token, self.carol_token = procs, run, admin_token, carol_token

    def client(self, node: str, token: str) -> Client:
        return Client(self.procs[node].address, token=token, timeout=30, retry=NO_RETRY)

    def cube_on(self, node: str, directory: Directory, label: str) -> str:
        """A new cube (owned by the admin) that placement puts on ``node``."""
        with self.client("alpha", self.admin_token) as admin:
            for i in range(30):
                cube = admin.alloc_cube(f"{label}-{self.run}-{i}")
                entry = directory.lookup(cube.cube_id)
                if entry is not None and entry.owner == f"{node}-{self.run}":
                    return cube.cube_id
        raise AssertionError(f"no cube landed on {node} in 30 tries")


@pytest.fixture(scope="module")
def rig(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    etcd_cluster.restore()
    etcd_cluster.client().delete("memosd/access/", prefix=True)  # this module's principals only
    run = uuid.uuid4().hex[:6]
    root = tmp_path_factory.mktemp("grants")
    lone = DaemonProcess(root / "gamma").start()
    try:
        with Client(lone.address, token=lone.token, timeout=30, retry=NO_RETRY) as c:
            _, carol_token = c.create_principal(f"carol-{run}")
    finally:
        assert lone.stop() == 0, lone.log()
    etcd_cluster.forget_cluster_config()  # this module's settings, not the last module's
    procs = {n: DaemonProcess(root / n, env=_env(etcd_cluster.endpoints, f"{n}-{run}")) for n in NODES}
    procs["gamma"].start()
    errors: list[BaseException] = []

    def start(proc: DaemonProcess) -> None:
        try:
            proc.start()
        except BaseException as e:  # reported below, with the others stopped
            errors.append(e)

    threads = [threading.Thread(target=start, args=(procs[n],)) for n in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield Rig(procs, run, procs["gamma"].token, carol_token)
    finally:
        for proc in procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                assert proc.stop() == 0, proc.log()


def _within(seconds: float, call: Callable[[], object], refused: type[Exception]) -> float:
    """How long until ``call`` raises ``refused`` (it must within ``seconds``)."""
    started = time.monotonic()
    while True:
        try:
            call()
        except refused:
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"still not {refused.__name__} after {seconds} s"
        time.sleep(0.02)


def _known_within(seconds: float, via: Client) -> str:
    started = time.monotonic()
    while True:
        try:
            return via.whoami().principal_id
        except Unauthenticated:
            assert time.monotonic() - started < seconds, f"the new principal unknown after {seconds} s"
            time.sleep(0.01)


def test_the_first_member_brings_its_admin_and_principals_and_the_others_make_none(rig: Rig) -> None:
    for node in ("alpha", "beta"):
        assert not (rig.procs[node].data_dir / "admin.token").exists(), f"{node} made an admin of its own"
    assert "event=cluster_principal_migrated" in rig.procs["gamma"].full_log()
    for node in NODES:  # gamma's tokens from before it was a member work through every node
        with rig.client(node, rig.admin_token) as admin, rig.client(node, rig.carol_token) as carol:
            assert admin.whoami().admin and admin.whoami().name == "admin"
            assert carol.whoami().name == f"carol-{rig.run}"
            assert len([p for p in admin.list_principals() if p.name == "admin"]) == 1


def test_a_principal_and_a_grant_made_through_one_node_are_honoured_on_the_others(
        rig: Rig, etcd_cluster: EtcdCluster) -> None:
    directory = Directory(etcd_cluster.client())
    cube_id = rig.cube_on("gamma", directory, "granted")
    with rig.client("alpha", rig.admin_token) as admin:
        dave, token = admin.create_principal(f"dave-{rig.run}")
    with rig.client("beta", token) as via_beta, rig.client("gamma", token) as via_gamma:
        # Made on alpha, known on beta and gamma once their watches bring it (milliseconds; < 1 s asserted).
        for via in (via_beta, via_gamma):
            assert _known_within(1.0, via) == dave.principal_id
        with pytest.raises(CubeNotFound):  # gamma (the owner) checks: no right yet
            via_beta.stat_cube(cube_id)
        assert [c.cube_id for c in via_beta.list_cubes()] == []  # the cluster's cubes, none of them dave's
        with pytest.raises(PermissionDenied):  # the cluster config: daemon admins only
            via_beta.cluster_config()
        with rig.client("alpha", rig.admin_token) as admin:
            admin.grant(cube_id, dave.principal_id, ["read", "write"])
            assert cube_id in {c.cube_id for c in admin.list_cubes()}  # an admin sees every cube, via any node
        # ListCubes through beta asks gamma with dave's token: gamma lists the one cube dave may see now.
        assert [(c.cube_id, c.owner_node) for c in via_beta.list_cubes()] == [(cube_id, f"gamma-{rig.run}")]
        # Through beta, to the cube on gamma, with the token made on alpha.
        mount = via_beta.mount(cube_id, writable=True)
        [item] = via_beta.write(mount.mount_id, ["a grant made through alpha"])
        via_beta.commit(mount.mount_id, "dave's")
        assert [i.text for i in via_gamma.read(mount.mount_id, [item])] == ["a grant made through alpha"]
        kv = etcd_cluster.client().get(f"memosd/access/grants/{cube_id}/{dave.principal_id}")
        assert kv is not None and kv.json()["rights"] == ["read", "write"]

        # A revoke through alpha: dave's next call through beta is refused (its mount was closed too).
        with rig.client("alpha", rig.admin_token) as admin:
            assert admin.revoke(cube_id, dave.principal_id).mounts_closed == 1
        with pytest.raises(MountNotFound):
            via_beta.read(mount.mount_id, [item])
        with pytest.raises(CubeNotFound):
            via_beta.stat_cube(cube_id)

        # A disable through alpha reaches beta and gamma through their watches: the token stops working
        # there within the watch's latency, and dave's mounts on gamma are closed by gamma itself.
        with rig.client("alpha", rig.admin_token) as admin:
            admin.grant(cube_id, dave.principal_id, ["read"])
        via_beta.mount(cube_id)
        with rig.client("alpha", rig.admin_token) as admin:
            assert admin.stat_cube(cube_id).mount_count == 1
            assert admin.disable_principal(dave.principal_id).mounts_closed == 0  # alpha holds none of them
        took = _within(2, via_beta.whoami, Unauthenticated)
        assert took < 1.0, took
        with pytest.raises(Unauthenticated):
            via_gamma.stat_cube(cube_id)
    with rig.client("alpha", rig.admin_token) as admin:  # gamma closed dave's mount when its watch saw him go
        deadline = time.monotonic() + 2
        while admin.stat_cube(cube_id).mount_count:
            assert time.monotonic() < deadline, "the disabled principal's mount stayed open on the owner"
            time.sleep(0.05)


def test_without_etcd_quorum_changes_are_refused_and_tokens_and_grants_keep_working(
        rig: Rig, etcd: EtcdCluster) -> None:
    cube_id = rig.cube_on("gamma", Directory(etcd.client()), "quorum")
    with rig.client("alpha", rig.admin_token) as admin:
        erin, token = admin.create_principal(f"erin-{rig.run}")
        admin.grant(cube_id, erin.principal_id, ["read"])
    etcd.members[0].kill()
    etcd.members[1].kill()
    try:
        with rig.client("alpha", rig.admin_token) as admin:
            with pytest.raises(ClusterUnavailable, match=UNAVAILABLE.replace("(", r"\(").replace(")", r"\)")):
                admin.create_principal(f"frank-{rig.run}")
            with pytest.raises(ClusterUnavailable, match="principal and grant changes are refused"):
                admin.grant(cube_id, erin.principal_id, ["write"])
            with pytest.raises(ClusterUnavailable, match="principal and grant changes are refused"):
                admin.revoke(cube_id, erin.principal_id)
            with pytest.raises(ClusterUnavailable, match="principal and grant changes are refused"):
                admin.disable_principal(erin.principal_id)
        time.sleep(2.5)  # past the lease (trust_seconds): a surviving member still confirms the copy
        with rig.client("beta", token) as via_beta, rig.client("beta", rig.carol_token) as carol:
            assert via_beta.stat_cube(cube_id).cube_id == cube_id  # the grant, checked on gamma
            mount = via_beta.mount(cube_id)
            assert via_beta.read(mount.mount_id, []) == []
            assert carol.whoami().name == f"carol-{rig.run}"
    finally:
        etcd.restore()
    with rig.client("beta", rig.admin_token) as admin:  # changes work again once etcd is back
        admin.grant(cube_id, erin.principal_id, ["write"])


def test_the_shared_root_holds_no_token(rig: Rig, etcd_cluster: EtcdCluster) -> None:
    secrets = {rig.admin_token.rsplit(".", 1)[1], rig.carol_token.rsplit(".", 1)[1]}
    values = b"".join(kv.value for kv in etcd_cluster.client().range("memosd/access/", prefix=True).kvs)
    assert values and not any(s.encode() in values for s in secrets)


def test_a_moved_cubes_grants_hold_on_its_new_owner(rig: Rig, etcd_cluster: EtcdCluster) -> None:
    """Grants are etcd's, under the cube id, which a move keeps: deleting the old copy must not take them."""
    directory = Directory(etcd_cluster.client())
    cube_id = rig.cube_on("gamma", directory, "moved")
    with rig.client("alpha", rig.admin_token) as admin:
        gina, token = admin.create_principal(f"gina-{rig.run}")
        admin.grant(cube_id, gina.principal_id, ["read"])
        with admin.mount(cube_id, writable=True) as m:
            [item] = m.write(["written before the move"])
            m.commit("before")
        assert admin.move_cube(cube_id, f"beta-{rig.run}").step == "done"
    entry = directory.lookup(cube_id)
    assert entry is not None and entry.owner == f"beta-{rig.run}"
    assert etcd_cluster.client().get(f"memosd/access/grants/{cube_id}/{gina.principal_id}") is not None
    with rig.client("alpha", token) as via_alpha:  # checked by beta, the new owner
        mount = via_alpha.mount(cube_id)
        assert [i.text for i in via_alpha.read(mount.mount_id, [item])] == ["written before the move"]


def test_an_owner_sees_its_cube_listed_unavailable_while_its_node_is_down(rig: Rig) -> None:
    """A principal that only owns a cube (no grant) finds it in ListCubes through another node while the
    cube's node is down, marked unavailable: the directory entry names the owning principal. Then the node
    comes back and serves it again."""
    with rig.client("alpha", rig.admin_token) as admin:
        fay, token = admin.create_principal(f"fay-{rig.run}")
    with rig.client("alpha", token) as via_alpha:
        _known_within(1.0, via_alpha)
        cubes = {}
        for i in range(12):  # placement decides where: one on beta is enough
            cube = via_alpha.alloc_cube(f"fays-{rig.run}-{i}")
            cubes[cube.cube_id] = cube.owner_node
            if cube.owner_node == f"beta-{rig.run}":
                break
    [cube_id] = [c for c, node in cubes.items() if node == f"beta-{rig.run}"]
    rig.procs["beta"].kill()
    try:
        with rig.client("gamma", token) as via_gamma:
            deadline = time.monotonic() + 15
            while True:  # beta's lease lapses (2 s), or the ask times out: listed from the directory
                listed = {c.cube_id: c for c in via_gamma.list_cubes()}
                if cube_id in listed and listed[cube_id].unavailable:
                    break
                assert time.monotonic() < deadline, listed.get(cube_id)
                time.sleep(0.2)
            assert set(listed) == set(cubes)  # fay's own cubes, every one, and no one else's
            down = listed[cube_id]
            assert (down.name, down.owner_node) == (f"fays-{rig.run}-{len(cubes) - 1}", f"beta-{rig.run}")
    finally:
        rig.procs["beta"].start()
    with rig.client("beta", token) as via_beta:
        assert via_beta.stat_cube(cube_id).owner_principal_id == fay.principal_id


def _http(proc: DaemonProcess, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    address = json.loads((proc.data_dir / "daemon.json").read_text())["http_address"]
    request = urllib.request.Request(f"http://{address}/v1/{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_http_surface_passes_the_callers_token_to_the_owner(rig: Rig, etcd_cluster: EtcdCluster) -> None:
    """A chat through beta on a cube of gamma's is checked by gamma with the caller's own token: a made-up
    token is 401, no grant is 404 and read alone 403 (the chat needs activate), answered by the owner; the
    models list through beta shows the cube once it is granted. (No model here: the chat itself is
    tests/cluster/test_http_routing.py's.)"""
    cube_id = rig.cube_on("gamma", Directory(etcd_cluster.client()), "http")
    with rig.client("alpha", rig.admin_token) as admin:
        hana, token = admin.create_principal(f"hana-{rig.run}")
        name = admin.stat_cube(cube_id).name
    with rig.client("beta", token) as via_beta:
        _known_within(1.0, via_beta)
    beta = rig.procs["beta"]
    chat = {"model": f"memos:{name}", "messages": [{"role": "user", "content": "hi"}]}
    status, reply = _http(beta, "chat/completions", "not-a-token", chat)
    assert status == 401 and reply["error"]["code"] == "UNAUTHENTICATED", reply
    status, reply = _http(beta, "chat/completions", token, chat)
    assert status == 404 and reply["error"]["code"] == "CUBE_NOT_FOUND", reply  # gamma: not visible to hana
    assert f"memos:{name}" not in [m["id"] for m in _http(beta, "models", token)[1]["data"]]
    with rig.client("alpha", rig.admin_token) as admin:
        admin.grant(cube_id, hana.principal_id, ["read"])
    status, reply = _http(beta, "chat/completions", token, chat)
    assert status == 403 and reply["error"]["code"] == "PERMISSION_DENIED", reply
    assert "activate" in reply["error"]["message"].lower()
    assert f"memos:{name}" in [m["id"] for m in _http(beta, "models", token)[1]["data"]]
    with rig.client("gamma", rig.admin_token) as owner:  # the owner checked and recorded the calls, as hana's
        calls = {(r.method, r.code) for r in owner.audit() if r.principal_id == hana.principal_id}
        assert {("Mount", "NOT_FOUND"), ("Mount", "OK"), ("Generate", "PERMISSION_DENIED")} <= calls, calls
