"""The cluster tests' fixtures: one real 3-member etcd cluster for the whole session (tests/cluster/etcd_rig.py).

It is started only when a test asks for it (placement's tests are pure and do not), and it fails, never
skips, when etcd is not installed: a cluster test that silently does not run would pass for nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_rig import MISSING, EtcdCluster, etcd_binary
from node_rig import ThreeNodes, start_three_nodes

from memosd.cluster.etcd import EtcdClient


@pytest.fixture(scope="module")
def run() -> str:
    """A tag of the module's own, in its node and cube names (the session's etcd is shared by every module)."""
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = etcd_binary()
    if binary is None:
        pytest.fail(MISSING, pytrace=False)
    cluster = EtcdCluster(Path(tmp_path_factory.mktemp("etcd")), binary)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The session's cluster, with every member up and a leader before the test and after it (a test that
    kills members restarts them here, even when it failed halfway)."""
    etcd_cluster.restore()
    yield etcd_cluster
    etcd_cluster.restore()


@pytest.fixture
def client(etcd: EtcdCluster) -> EtcdClient:
    return etcd.client()


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own: the tests share one etcd and must not see each other's keys."""
    return f"test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def empty_access(etcd: EtcdCluster) -> EtcdCluster:
    """No principals or grants in the shared etcd (memosd/access/): a daemon started now is the cluster's
    first, so it makes the admin and writes admin.token (later daemons with auth on find that admin)."""
    etcd.client().delete("memosd/access/", prefix=True)
    etcd.forget_cluster_config()
    return etcd



@pytest.fixture(scope="session")
def three_nodes() -> ThreeNodes:
    """The three-daemon rig test_routing.py, test_move.py and test_http_routing.py share (tests/cluster/node_rig.py;
    each module starts its own, once, and shares it among its tests)."""
    return start_three_nodes
