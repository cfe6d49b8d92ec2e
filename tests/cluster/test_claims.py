"""Claims and the join rule against the real etcd, without a daemon: DirectoryClaims (the kernel's
DirectoryPort on a cluster node) and ClusterNode.reconcile (docs/ARCHITECTURE.md, Cluster)."""

from __future__ import annotations

import uuid

import pytest
from etcd_rig import EtcdCluster

from memosd.cluster.claims import UNAVAILABLE, DirectoryClaims
from memosd.cluster.directory import Directory
from memosd.cluster.etcd import EtcdClient
from memosd.cluster.node import ClusterNode
from memosd.config import ClusterConfig
from memosd.errors import ClusterUnavailable, CubeNameTaken
from memosd.kernel import ids


def _cube() -> str:
    return ids.new_id(ids.CUBE_PREFIX)


def test_claim_release_and_a_name_held_elsewhere(client: EtcdClient) -> None:
    run = uuid.uuid4().hex[:8]
    directory = Directory(client)
    claims = DirectoryClaims(directory, f"me-{run}")
    cube = _cube()
    assert claims.claim(cube, f"c-{run}")
    entry = directory.lookup(cube)
    assert entry is not None and (entry.owner, entry.epoch, entry.name) == (f"me-{run}", 1, f"c-{run}")
    assert not claims.claim(cube, f"other-{run}")  # the id is claimed: an import then takes a new one
    with pytest.raises(CubeNameTaken, match="in use in the cluster"):
        DirectoryClaims(directory, f"them-{run}").claim(_cube(), f"c-{run}")
    claims.check_changeable(cube)
    claims.release(cube)
    assert directory.lookup(cube) is None and directory.lookup_name(f"c-{run}") is None
    claims.release(cube)  # again: nothing there, nothing raised (a free already done stays done)


def test_without_quorum_claims_and_removals_are_cluster_unavailable(etcd: EtcdCluster) -> None:
    claims = DirectoryClaims(Directory(etcd.client(timeout=0.5)), f"me-{uuid.uuid4().hex[:8]}")
    cube = _cube()
    assert claims.claim(cube, "")
    etcd.members[0].kill()
    etcd.members[1].kill()
    with pytest.raises(ClusterUnavailable) as refused:
        claims.claim(_cube(), "")
    assert refused.value.message.startswith(UNAVAILABLE) and refused.value.code == "UNAVAILABLE"
    with pytest.raises(ClusterUnavailable):
        claims.check_changeable(cube)


def test_the_join_rule(etcd: EtcdCluster, client: EtcdClient) -> None:
    run = uuid.uuid4().hex[:8]
    me, other = f"me-{run}", f"other-{run}"
    directory = Directory(client)
    theirs, missing, name_clash, fresh = _cube(), _cube(), _cube(), _cube()
    directory.claim(theirs, other, f"theirs-{run}")
    directory.claim(missing, me, f"missing-{run}")
    directory.claim(_cube(), other, f"clash-{run}")
    node = ClusterNode(ClusterConfig(etcd=tuple(etcd.endpoints), node_name=me))
    node.view.start()
    try:
        node.reconcile([(fresh, f"fresh-{run}", "prn_local"), (theirs, f"theirs-{run}", ""),
                        (name_clash, f"clash-{run}", "")])
    finally:
        node.view.stop()
    entry = directory.lookup(fresh)
    assert entry is not None and entry.owner == me, "a local cube without an entry is claimed for this node"
    assert entry.principal == "prn_local", "with its owning principal"
    assert node.not_served == tuple(sorted([theirs, name_clash]))
    assert node.missing == (missing,)
    owner = directory.lookup(theirs)
    assert owner is not None and owner.owner == other, "nothing is taken over"
    assert directory.lookup(name_clash) is None
    status = node.status()
    assert status.not_served == node.not_served and status.missing == (missing,)
