"""Moving a cube between nodes (MoveCube, memosd/cluster/move.py) with three real daemons and the real etcd.

A move under load (acknowledged commits before, during and after all present; reads through every node
agree, Log and Read at old revisions included), a change refused while the cube moves (CUBE_MOVING; a
drain that times out refuses the move, nothing changed), and a SIGKILL of the owner or the target at
each step of the protocol (MEMOSD_TEST_CRASH_AT, test-only) followed by a restart: exactly one owner in
etcd, that owner serves (and takes writes again), every acknowledged commit is there, and the other node
holds no copy. The daemons are shared by the module; beta is the one killed, restarted armed for the
next step each time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster
from memosd_client import NO_RETRY, Client, CubeMoving, MemosError, MountNotFound, MoveRefused
from node_rig import NODES, ThreeNodes, node_env

from memosd.cluster.directory import Directory


def _env(endpoints: list[str], name: str, crash_at: str = "") -> dict[str, str]:
    env = node_env(endpoints, name)
    if crash_at:
        env["MEMOSD_TEST_CRASH_AT"] = crash_at
    return env


@pytest.fixture(scope="module")
def nodes(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory, run: str, three_nodes: ThreeNodes
          ) -> Iterator[dict[str, DaemonProcess]]:
    with three_nodes(etcd_cluster, tmp_path_factory.mktemp("move"), run) as procs:
        yield procs


def _client(proc: DaemonProcess) -> Client:
    return Client(proc.address, timeout=30, retry=NO_RETRY)


def _eventually(check: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def _cube_on(via: Client, owner: str, name: str, directory: Directory) -> str:
    """A new cube placed on ``owner`` (placement decides: allocate until one lands there, ~3 tries)."""
    for i in range(40):
        cube = via.alloc_cube(f"{name}-{i}")
        entry = directory.lookup(cube.cube_id)
        assert entry is not None
        if entry.owner == owner:
            return cube.cube_id
        via.free_cube(cube.cube_id)
    raise AssertionError(f"no cube placed on {owner}")


def _commit(via: Client, cube_id: str, texts: list[str]) -> list[str]:
    mount = via.mount(cube_id, writable=True)
    item_ids = via.write(mount.mount_id, texts)
    via.commit(mount.mount_id, f"{len(texts)} items")
    via.unmount(mount.mount_id)
    return item_ids


def _texts(via: Client, cube_id: str, item_ids: list[str], revision: int = 0) -> list[str]:
    mount = via.mount(cube_id, revision=revision)
    try:
        return [item.text for item in via.read(mount.mount_id, item_ids)]
    finally:
        via.unmount(mount.mount_id)


def _local_ids(proc: DaemonProcess) -> set[str]:
    with _client(proc) as c:
        return {x.cube_id for x in c.list_cubes(local=True)}


def test_a_move_under_load_keeps_every_acknowledged_commit_and_reads_agree(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> None:
    directory = Directory(etcd_cluster.client())
    a, b, c = (nodes[n] for n in NODES)
    with _client(a) as via_a, _client(b) as via_b, _client(c) as via_c:
        cube_id = _cube_on(via_a, f"alpha-{run}", f"load-{run}", directory)
        before = [_commit(via_b, cube_id, [f"note {i}: the tide came in at {i} o'clock", f"filler {i}"])
                  for i in range(3)]
        log_before = [(r.number, r.message) for r in via_c.log(cube_id)]
        at_one = _texts(via_c, cube_id, before[0], revision=1)

        acknowledged: list[str] = []
        refused: list[str] = []
        stop = threading.Event()

        def writer() -> None:  # through gamma, which is neither end of the move
            with _client(c) as w:
                i = 0
                while not stop.is_set():
                    try:
                        acknowledged.extend(_commit(w, cube_id, [f"during the move {i}"]))
                        i += 1
                    except (CubeMoving, MountNotFound, MemosError) as e:
                        refused.append(type(e).__name__)
                        time.sleep(0.02)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            time.sleep(0.3)
            steps: list[str] = []
            last = via_c.move_cube(cube_id, f"beta-{run}", progress=lambda s: steps.append(s.step))
            time.sleep(0.5)  # writes go on against the new owner
        finally:
            stop.set()
            thread.join()
        assert steps == ["draining", "frozen", "exported", "received", "switched", "settled", "done"]
        assert last.epoch == 2 and last.from_node == f"alpha-{run}" and last.to_node == f"beta-{run}"
        entry = directory.lookup(cube_id)
        assert entry is not None and (entry.owner, entry.epoch) == (f"beta-{run}", 2)
        assert acknowledged, f"no write was acknowledged around the move (refused: {refused})"

        head = via_a.stat_cube(cube_id).head_revision
        assert head == 3 + len(acknowledged)  # one commit a write, none lost, none twice
        for via in (via_a, via_b, via_c):  # every node reads the same, at HEAD and at old revisions
            assert via.stat_cube(cube_id).head_revision == head
            assert _texts(via, cube_id, [i for ids in before for i in ids]) == [
                t for i in range(3) for t in (f"note {i}: the tide came in at {i} o'clock", f"filler {i}")]
            assert _texts(via, cube_id, before[0], revision=1) == at_one
            log = [(r.number, r.message) for r in via.log(cube_id)]
            assert log[-len(log_before):] == log_before and len(log) == head
        mount = via_a.mount(cube_id)
        try:
            found = {item.item_id for item in via_a.read(mount.mount_id, acknowledged)}
        finally:
            via_a.unmount(mount.mount_id)
        assert found == set(acknowledged)
        hits = via_a.search(via_a.mount(cube_id).mount_id, "tide came in", k=3)
        assert hits and "tide" in hits[0].item.text
        assert cube_id in _local_ids(b) and cube_id not in _local_ids(a)  # the old copy is gone
        stats_a, stats_b = via_a.stats().cluster, via_b.stats().cluster
        assert stats_a.moves_out >= 1 and stats_b.moves_in >= 1 and not stats_a.moving


def test_changes_are_refused_while_the_cube_moves_and_a_drain_that_times_out_refuses_the_move(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> None:
    directory = Directory(etcd_cluster.client())
    a, _b, c = (nodes[n] for n in NODES)
    with _client(a) as via_a, _client(c) as via_c:
        cube_id = _cube_on(via_a, f"gamma-{run}", f"drain-{run}", directory)
        _commit(via_a, cube_id, ["before the move"])
        held = via_a.mount(cube_id, writable=True)

        # A drain that times out: refused, nothing changed, the cube takes writes again.
        with pytest.raises(MoveRefused, match=r"open read-write mounts after 0\.3 s"):
            via_a.move_cube(cube_id, f"alpha-{run}", drain_seconds=0.3)
        entry = directory.lookup(cube_id)
        assert entry is not None and (entry.owner, entry.epoch) == (f"gamma-{run}", 1)
        via_c.unmount(via_c.mount(cube_id, writable=True).mount_id)

        # A move waiting for the open mount: new read-write mounts are refused, the open one finishes.
        result: list[object] = []
        mover = threading.Thread(target=lambda: result.append(via_c.move_cube(cube_id, f"alpha-{run}",
                                                                              drain_seconds=20)))
        mover.start()
        _eventually(lambda: cube_id in via_c.stats().cluster.moving, "the move started")
        with pytest.raises(CubeMoving, match=f"moving to cluster node 'alpha-{run}'") as refused:
            via_a.mount(cube_id, writable=True)
        assert refused.value.metadata.get("to") == f"alpha-{run}"
        item = via_a.write(held.mount_id, ["written while the move drains"])
        via_a.commit(held.mount_id, "the last commit before the freeze")
        via_a.unmount(held.mount_id)
        mover.join(30)
        assert result and getattr(result[0], "step", "") == "done"
        entry = directory.lookup(cube_id)
        assert entry is not None and (entry.owner, entry.epoch) == (f"alpha-{run}", 2)
        assert _texts(via_c, cube_id, item) == ["written while the move drains"]
        _commit(via_c, cube_id, ["after the move"])  # the new owner takes writes
        assert via_a.stat_cube(cube_id).head_revision == 3


# (step, the killed node's role in that move, the owner afterwards)
CRASHES = [
    ("move:after_freeze", "owner", "owner"),
    ("move:after_export", "owner", "owner"),
    ("move:after_import", "owner", "owner"),
    ("receive:after_import", "target", "owner"),
    ("move:after_switch", "owner", "target"),
    ("settle:before", "target", "target"),
    ("move:after_settle", "owner", "target"),
]


def test_a_kill_at_each_step_leaves_exactly_one_owner_and_every_commit(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> None:
    directory = Directory(etcd_cluster.client())
    a, b, c = (nodes[n] for n in NODES)
    alpha, beta = f"alpha-{run}", f"beta-{run}"

    def restart_beta(crash_at: str) -> None:
        b.kill()
        b.env = _env(etcd_cluster.endpoints, beta, crash_at)
        b.start()

    restart_beta(CRASHES[0][0])
    with _client(a) as via_a, _client(c) as via_c:
        for index, (step, killed, after) in enumerate(CRASHES):
            owner, target = (beta, alpha) if killed == "owner" else (alpha, beta)
            cube_id = _cube_on(via_a, owner, f"crash{index}-{run}", directory)
            items = _commit(via_c, cube_id, [f"{step} one", f"{step} two"]) + _commit(via_c, cube_id, [f"{step} 3"])
            with contextlib.suppress(MemosError):  # the killed node's answer is lost, or the move given up
                via_c.move_cube(cube_id, target)
            _eventually(lambda: b.proc is not None and b.proc.poll() is not None, f"beta killed at {step}")
            assert f"step={step}" in b.full_log()
            restart_beta(CRASHES[index + 1][0] if index + 1 < len(CRASHES) else "")
            _check_one_owner(nodes, directory, via_c, cube_id, items, step,
                             owner if after == "owner" else target, 1 if after == "owner" else 2)


def _check_one_owner(nodes: dict[str, DaemonProcess], directory: Directory, via_c: Client, cube_id: str,
                     items: list[str], step: str, expected: str, epoch: int) -> None:
    a, b, c = (nodes[n] for n in NODES)
    entry = directory.lookup(cube_id)
    assert entry is not None and (entry.owner, entry.epoch) == (expected, epoch), (step, entry)
    holder, other = (b, a) if expected.startswith("beta-") else (a, b)
    _eventually(lambda: cube_id not in _local_ids(other), f"{step}: the other node drops its copy")
    assert cube_id in _local_ids(holder)
    for proc in (a, b, c):
        with _client(proc) as via:
            assert via.stat_cube(cube_id).head_revision == 2, step
            assert _texts(via, cube_id, items) == [f"{step} one", f"{step} two", f"{step} 3"], step

    def writable() -> bool:  # the owner takes changes again: no freeze outlived the crash
        try:
            _commit(via_c, cube_id, [f"{step}: after the restart"])
            return True
        except CubeMoving:
            return False

    _eventually(writable, f"{step}: the owner takes writes again")
    assert via_c.stat_cube(cube_id).head_revision == 3


def test_memosctl_cluster_status_members_and_move(
        nodes: dict[str, DaemonProcess], etcd_cluster: EtcdCluster, run: str) -> None:
    directory = Directory(etcd_cluster.client())
    a, _b, c = (nodes[n] for n in NODES)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS")} | {"MEMOS_TARGET": c.address}
        return subprocess.run([sys.executable, "-m", "memosd_client.cli.main", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    with _client(a) as via_a:
        cube_id = _cube_on(via_a, f"alpha-{run}", f"cli-{run}", directory)
        _commit(via_a, cube_id, ["moved by memosctl"])
    # Stats answers from the node's member list, reread every half lease: a node that joined a moment ago
    # shows within one. The etcd is the session's: another module's members may be live beside ours.
    deadline = time.monotonic() + 10
    while True:
        status = ctl("cluster", "status")
        assert status.returncode == 0, status.stderr
        [listed] = [" ".join(line.split()) for line in status.stdout.splitlines()
                    if line.strip().startswith("members:")]
        if all(f"{n}-{run}" in listed for n in NODES):
            break
        assert time.monotonic() < deadline, listed
        time.sleep(0.5)
    flat = " ".join(status.stdout.split())
    assert f"this node: gamma-{run} at {c.address} (joined)" in flat
    assert "etcd: ok at " in flat
    counts = {line.split()[0]: int(line.split()[1]) for line in status.stdout.splitlines()
              if line.split() and line.split()[0] in {f"{n}-{run}" for n in NODES}}
    owners = [e.owner for e in directory.list()]
    assert counts == {f"{n}-{run}": owners.count(f"{n}-{run}") for n in NODES}
    members = ctl("cluster", "members")
    assert members.returncode == 0, members.stderr
    assert f"alpha-{run}" in members.stdout and a.address in members.stdout and "(this node)" in members.stdout
    moved = ctl("cluster", "move", cube_id, f"beta-{run}")
    assert moved.returncode == 0, moved.stderr
    assert [line.split()[2] for line in moved.stderr.splitlines()] == [
        "draining", "frozen", "exported", "received", "switched", "settled", "done"]
    flat = " ".join(moved.stdout.split())
    assert f"moved: alpha-{run} -> beta-{run}" in flat
    assert f"({cube_id})" in flat and "head revision: 1" in flat  # the cube as moved, not the last step's blank
    refused = ctl("cluster", "move", cube_id, "nowhere")
    assert refused.returncode != 0 and "'nowhere' is not a live cluster member" in refused.stderr
