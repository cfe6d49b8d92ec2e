"""cluster/grants.py against the real 3-member etcd: two nodes' caches of the principals and grants.

Each test has a root of its own in the shared etcd; "nodes" here are two EtcdGovernance on it (the
daemon-level tests are test_grants.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from etcd_rig import EtcdCluster

from memosd.cluster.etcd import EtcdClient
from memosd.cluster.grants import UNAVAILABLE, EtcdGovernance
from memosd.errors import ClusterUnavailable, PrincipalNameTaken, PrincipalNotFound
from memosd.governance.principals import ADMIN_TOKEN_FILE, Principals
from memosd.kernel import ids
from memosd.store.records import GrantRecord, PrincipalRecord


def _principal(name: str) -> PrincipalRecord:
    return PrincipalRecord(ids.new_id(ids.PRINCIPAL_PREFIX), name, "user", False, "ab" * 32, time.time_ns(), "")


def _grant(cube_id: str, principal_id: str, *rights: str) -> Callable[[GrantRecord | None], GrantRecord]:
    def add(held: GrantRecord | None) -> GrantRecord:
        have = set(held.rights) if held else set()
        return GrantRecord(cube_id, principal_id, sorted(have | set(rights)), "p_owner", time.time_ns())
    return add


def _until(what: Callable[[], bool], seconds: float = 5.0) -> float:
    started = time.monotonic()
    while not what():
        assert time.monotonic() - started < seconds, "not within the bound"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def pair(etcd: EtcdCluster, prefix: str) -> Iterator[tuple[EtcdGovernance, EtcdGovernance]]:
    nodes = [EtcdGovernance(etcd.client(timeout=0.5), root=prefix, check_seconds=0.2, trust_seconds=1.0)
             for _ in range(2)]
    for node in nodes:
        node.start()
    yield nodes[0], nodes[1]
    for node in nodes:
        node.stop()


CUBE = "cube_" + "0" * 24


def test_a_principal_and_a_grant_made_on_one_node_reach_the_other(
        pair: tuple[EtcdGovernance, EtcdGovernance]) -> None:
    a, b = pair
    alice = _principal("alice")
    a.add_principal(alice)
    assert a.principal(alice.principal_id) == alice  # at once on the node that made it
    _until(lambda: b.principal(alice.principal_id) == alice, 2)
    with pytest.raises(PrincipalNameTaken):  # names are unique across nodes
        b.add_principal(_principal("alice"))

    a.change_grant(CUBE, alice.principal_id, _grant(CUBE, alice.principal_id, "read"))
    _until(lambda: (g := b.grant(CUBE, alice.principal_id)) is not None and g.rights == ["read"], 2)
    # A revoke on b (the change deletes the grant) reaches a: the bound is the watch's latency.
    b.change_grant(CUBE, alice.principal_id, lambda held: None)
    assert b.grant(CUBE, alice.principal_id) is None
    took = _until(lambda: a.grant(CUBE, alice.principal_id) is None, 2)
    assert took < 1.0

    disabled: list[str] = []
    b.on_disabled = disabled.append
    a.update_principal(PrincipalRecord(**{**alice.__dict__, "disabled": True}))
    _until(lambda: disabled == [alice.principal_id], 2)
    assert b.principal(alice.principal_id).disabled  # type: ignore[union-attr]
    with pytest.raises(PrincipalNotFound):
        a.update_principal(_principal("nobody"))


def test_concurrent_changes_to_one_grant_both_land_and_one_name_has_one_winner(
        pair: tuple[EtcdGovernance, EtcdGovernance]) -> None:
    a, b = pair
    pid = ids.new_id(ids.PRINCIPAL_PREFIX)
    barrier = threading.Barrier(2)
    won: list[str] = []

    def add(node: EtcdGovernance, right: str) -> None:
        barrier.wait()
        node.change_grant(CUBE, pid, _grant(CUBE, pid, right))
        barrier.wait()
        try:
            node.add_principal(_principal("contended"))
            won.append(right)
        except PrincipalNameTaken:
            pass

    threads = [threading.Thread(target=add, args=(node, right)) for node, right in ((a, "read"), (b, "write"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A read-modify-write that lost the compare ran again on the newer record: neither right was lost.
    _until(lambda: all((g := n.grant(CUBE, pid)) is not None and g.rights == ["read", "write"] for n in (a, b)), 2)
    assert len(won) == 1


def test_a_watch_that_falls_silently_behind_is_caught_by_the_check(
        pair: tuple[EtcdGovernance, EtcdGovernance]) -> None:
    a, b = pair
    pid = ids.new_id(ids.PRINCIPAL_PREFIX)
    a.change_grant(CUBE, pid, _grant(CUBE, pid, "read"))
    _until(lambda: b.grant(CUBE, pid) is not None, 2)
    b._apply = lambda event: None  # type: ignore[method-assign]  # b's watch now delivers nothing
    a.change_grant(CUBE, pid, lambda held: None)  # a delete: only the key count shows it
    took = _until(lambda: b.grant(CUBE, pid) is None, 3)
    assert b.reloads >= 1 and took < 1.5, (b.reloads, took)  # check_seconds 0.2, and one read


def test_a_node_that_cannot_confirm_its_copy_fails_safe_after_trust_seconds(
        pair: tuple[EtcdGovernance, EtcdGovernance]) -> None:
    _, b = pair
    assert b.unconfirmed() == ""
    reachable = b.client
    b.client = EtcdClient(["127.0.0.1:9"], timeout=0.2)  # its checks reach no etcd now
    took = _until(lambda: b.unconfirmed() != "", 3)
    assert 0.8 < took < 2.5, took
    assert "rights that come from a grant are refused here" in b.unconfirmed()
    b.client = reachable
    _until(lambda: b.unconfirmed() == "", 2)


def test_without_quorum_changes_are_refused_and_reads_go_on(
        pair: tuple[EtcdGovernance, EtcdGovernance], etcd: EtcdCluster) -> None:
    a, b = pair
    alice = _principal("quorum-alice")
    a.add_principal(alice)
    a.change_grant(CUBE, alice.principal_id, _grant(CUBE, alice.principal_id, "read"))
    _until(lambda: b.grant(CUBE, alice.principal_id) is not None, 2)
    etcd.members[0].kill()
    etcd.members[1].kill()
    with pytest.raises(ClusterUnavailable, match=UNAVAILABLE.replace("(", r"\(").replace(")", r"\)")):
        b.add_principal(_principal("quorum-bob"))
    with pytest.raises(ClusterUnavailable, match="principal and grant changes are refused"):
        b.change_grant(CUBE, alice.principal_id, lambda held: None)
    # Reads answer from memory, and the survivor's copy (serializable) keeps confirming it: nothing can
    # be revoked without a quorum, so the grant stays trusted past trust_seconds.
    time.sleep(1.5)
    assert b.principal(alice.principal_id) == alice and b.grant(CUBE, alice.principal_id) is not None
    assert b.unconfirmed() == "", b.unconfirmed()


def test_a_joining_nodes_own_principals_are_copied_once_unless_the_name_is_taken(
        pair: tuple[EtcdGovernance, EtcdGovernance]) -> None:
    a, b = pair
    a.add_principal(_principal("admin"))  # the cluster's admin
    own_admin, carol = _principal("admin"), _principal("carol")
    grant = GrantRecord(CUBE, carol.principal_id, ["read"], own_admin.principal_id, time.time_ns())
    assert b.migrate("node-b", [own_admin, carol], [grant]) == (1, 1)
    assert b.principal(carol.principal_id) == carol and b.principal(own_admin.principal_id) is None
    _until(lambda: a.principal(carol.principal_id) == carol and a.grant(CUBE, carol.principal_id) is not None, 2)
    # Revoked in the cluster: the node's next start (its local rows unchanged) does not bring it back.
    a.change_grant(CUBE, carol.principal_id, lambda held: None)
    _until(lambda: b.grant(CUBE, carol.principal_id) is None, 2)
    assert b.migrate("node-b", [own_admin, carol], [grant]) == (0, 0)
    assert b.grant(CUBE, carol.principal_id) is None


def test_the_first_node_to_start_makes_the_admin_and_the_others_find_it(
        pair: tuple[EtcdGovernance, EtcdGovernance], tmp_path: Path) -> None:
    a, b = pair
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    path = Principals(a).bootstrap_admin(first)
    assert path is not None
    token = path.read_text().strip()
    _until(lambda: len(b.principals()) == 1, 2)
    on_b = Principals(b)
    assert on_b.bootstrap_admin(second) is None and not (second / ADMIN_TOKEN_FILE).exists()
    assert on_b.authenticate(token).admin  # the first node's admin token, checked on the other
