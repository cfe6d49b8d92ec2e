"""A real daemon with ``[cluster] etcd`` set joins the real etcd as a member, and leaves at SIGTERM.

One daemon is started (it costs a start of a few seconds); the refused starts fail before anything slow
loads (read from the log: no embedder line, no ``serving``), like a taken port (tests/e2e/test_second_daemon.py).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess
from etcd_rig import EtcdCluster, _free_ports
from memosd_client import NO_RETRY, Client, ClusterUnavailable

from memosd import __version__
from memosd.cluster.etcd import EtcdClient
from memosd.cluster.membership import Registration, members

SLOW_PART = ("loaded from", "event=serving")


def _cluster_env(endpoints: list[str], name: str) -> dict[str, str]:
    return {"MEMOSD_CLUSTER__ETCD": ",".join(endpoints), "MEMOSD_CLUSTER__NODE_NAME": name,
            "MEMOSD_CLUSTER__LEASE_SECONDS": "2"}


def _refused(daemon: DaemonProcess) -> str:
    with pytest.raises(RuntimeError, match="memosd exited with 1"):
        daemon.start()
    log: str = daemon.full_log()
    for line in SLOW_PART:
        assert line not in log, f"the refused start went past the cluster check ({line!r}):\n{log}"
    return log


def test_a_daemon_joins_as_a_member_and_leaves_at_sigterm(empty_access: EtcdCluster, client: EtcdClient,
                                                           tmp_path: Path) -> None:
    etcd = empty_access  # the cluster's first daemon with auth on: it makes the admin (first.token)
    name = f"node-{uuid.uuid4().hex[:8]}"
    first = DaemonProcess(tmp_path / "first", env=_cluster_env(etcd.endpoints, name)).start()
    try:
        live = {m.name: m for m in members(client)}
        assert name in live, f"the daemon is not a member:\n{first.log()}"
        # No cluster.advertise: the address its gRPC server is bound to (port 0 picked a free one).
        assert live[name].address == first.address and not first.address.endswith(":0")
        assert live[name].version == __version__
        assert "event=cluster_checked" in first.full_log() and "event=cluster_joined" in first.full_log()
        with Client(first.address, token=first.token, timeout=30) as admin:
            stats = admin.stats()
        assert stats.HasField("cluster")
        assert (stats.cluster.node_name, stats.cluster.address, stats.cluster.joined) == (name, first.address, True)
        assert name in stats.cluster.members and stats.cluster.last_error == ""
        assert 0 <= stats.cluster.members_age_seconds < 5 and stats.cluster.lease_renewals == 0

        # A second daemon under the same node name is refused within one lease, before it loads anything.
        log = _refused(DaemonProcess(tmp_path / "second", env=_cluster_env(etcd.endpoints, name)))
        assert f"memosd: cluster.node_name {name!r} is already a live member at {first.address}" in log
        assert first.proc is not None and first.proc.poll() is None, "the first daemon is untouched"

        # etcd loses its quorum: the daemon keeps serving its own cubes (creating one is refused: it needs
        # the directory), and Stats answers from memory, saying what failed; once etcd is back the node is
        # still a member and the error clears.
        with Client(first.address, token=first.token, timeout=30) as admin:
            before = admin.alloc_cube(f"before-outage-{name}")
        etcd.members[0].kill()
        etcd.members[1].kill()
        with Client(first.address, token=first.token, timeout=30, retry=NO_RETRY) as admin:
            with pytest.raises(ClusterUnavailable, match="cube creation and removal are refused"):
                admin.alloc_cube(f"during-outage-{name}")
            mount = admin.mount(before.name, writable=True)
            admin.write(mount.mount_id, ["written during the outage"])
            assert admin.commit(mount.mount_id, "outage").revision.number == 1
            deadline = time.monotonic() + 15
            while True:
                start = time.monotonic()
                cluster = admin.stats().cluster
                assert time.monotonic() - start < 2, "Stats waited on etcd"
                if cluster.last_error:
                    break
                assert time.monotonic() < deadline, "no etcd error in Stats 15 s into the outage"
                time.sleep(0.3)
            etcd.restore()
            deadline = time.monotonic() + 15
            while admin.stats().cluster.last_error:
                assert time.monotonic() < deadline, "the etcd error stayed 15 s after etcd came back"
                time.sleep(0.3)
        assert name in {m.name for m in members(client)}
    finally:
        assert first.stop() == 0, first.log()
    # Left at once (the lease revoked), not after its TTL.
    assert name not in {m.name for m in members(client)}
    assert "event=cluster_left" in first.full_log()


def test_a_daemon_whose_node_name_is_taken_while_its_lease_lapsed_stops(etcd: EtcdCluster, client: EtcdClient,
                                                                        tmp_path: Path) -> None:
    """Another member holding our name means the directory and forwarded calls now mean that member: the
    daemon must stop (exit 1, saying why) rather than go on serving cubes it owned."""
    name = f"node-{uuid.uuid4().hex[:8]}"
    etcd.forget_cluster_config()  # this test's settings, not the last module's
    daemon = DaemonProcess(tmp_path / "node", env=_cluster_env(etcd.endpoints, name)).start()
    taker = Registration(client, name, "127.0.0.1:9", lease_seconds=2)
    try:
        [ours] = [m for m in members(client) if m.name == name]
        client.revoke(ours.lease)  # as if etcd had been out of reach for a TTL
        taker.join()  # another node takes the free name before ours renews
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 1, daemon.log()
        assert f"memosd: cluster.node_name {name!r} was taken by another member" in daemon.full_log()
        assert [m.address for m in members(client) if m.name == name] == ["127.0.0.1:9"]  # the taker's, kept
    finally:
        taker.leave()
        daemon.kill()


def test_a_single_node_has_no_cluster_section(daemon: DaemonProcess) -> None:
    with Client(daemon.address, token=daemon.token, timeout=30) as admin:
        assert not admin.stats().HasField("cluster")


def test_a_daemon_that_cannot_reach_etcd_fails_at_once(tmp_path: Path) -> None:
    closed = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    log = _refused(DaemonProcess(tmp_path / "alone", env=_cluster_env(closed, "lonely")))
    assert f"memosd: cannot reach etcd at {', '.join(closed)} (cluster.etcd)" in log
