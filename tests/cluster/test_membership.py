"""memosd.cluster.membership against the real 3-member etcd (tests/cluster/etcd_rig.py).

Each test uses node names of its own (``unique``) and looks only at those: the tests share one etcd.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from etcd_rig import EtcdCluster

from memosd import __version__
from memosd.cluster.etcd import EtcdClient, EtcdError, Lease
from memosd.cluster.membership import MEMBERS_PREFIX, Member, NodeNameTaken, Registration, members

LEASE = 2  # seconds: the shortest etcd grants, so the expiry tests are short


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def registrations() -> Iterator[list[Registration]]:
    made: list[Registration] = []
    yield made
    for reg in made:
        reg.leave()


def _names(client: EtcdClient, unique: str) -> dict[str, Member]:
    return {m.name: m for m in members(client) if m.name.endswith(unique)}


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def _replaced(reg: Registration, held: Member) -> bool:
    return reg.member is not held


def test_members_join_are_listed_and_leave(client: EtcdClient, unique: str,
                                           registrations: list[Registration]) -> None:
    a = Registration(client, f"a-{unique}", "127.0.0.1:7001", lease_seconds=LEASE)
    b = Registration(client, f"b-{unique}", "127.0.0.1:7002", lease_seconds=LEASE)
    registrations += [a, b]
    before = time.time()
    joined = a.join()
    b.join()
    live = _names(client, unique)
    assert sorted(live) == [f"a-{unique}", f"b-{unique}"]
    assert live[f"a-{unique}"] == joined
    assert (joined.address, joined.version) == ("127.0.0.1:7001", __version__)
    assert before - 1 <= joined.started <= time.time() and joined.lease > 0
    kv = client.get(MEMBERS_PREFIX + f"a-{unique}")
    assert kv is not None and kv.lease == joined.lease and set(kv.json()) == {"name", "address", "started", "version"}

    # Kept alive past several TTLs by the daemon thread.
    time.sleep(1.5 * LEASE)
    assert sorted(_names(client, unique)) == [f"a-{unique}", f"b-{unique}"]

    a.leave()  # revoked: gone at once, not after the TTL
    assert sorted(_names(client, unique)) == [f"b-{unique}"]
    a.leave()  # twice is harmless


def test_a_live_name_cannot_be_taken(client: EtcdClient, unique: str, registrations: list[Registration]) -> None:
    first = Registration(client, f"n-{unique}", "127.0.0.1:7001", lease_seconds=LEASE)
    registrations.append(first)
    first.join()
    second = Registration(client, f"n-{unique}", "127.0.0.1:7999", lease_seconds=LEASE)
    start = time.monotonic()
    with pytest.raises(NodeNameTaken, match=r"registered by a live member at 127\.0\.0\.1:7001"):
        second.join(wait=0.5)
    assert time.monotonic() - start >= 0.5
    live = _names(client, unique)
    assert live[f"n-{unique}"].address == "127.0.0.1:7001"
    assert len(client.range(MEMBERS_PREFIX + f"n-{unique}").kvs) == 1


def test_bad_names_and_leases_are_refused(client: EtcdClient) -> None:
    for bad in ("", "Upper", "-lead", "a/b", "x" * 64):
        with pytest.raises(ValueError, match="node name"):
            Registration(client, bad, "127.0.0.1:1")
    with pytest.raises(ValueError, match="shortest lease"):
        Registration(client, "ok", "127.0.0.1:1", lease_seconds=1)


CHILD = textwrap.dedent("""
    import sys, time
    from memosd.cluster.etcd import EtcdClient, EtcdError, Lease
    from memosd.cluster.membership import Registration
    endpoints, name = sys.argv[1].split(","), sys.argv[2]
    Registration(EtcdClient(endpoints), name, "127.0.0.1:7100", lease_seconds=2).join()
    print("joined", flush=True)
    time.sleep(60)
""")


def test_a_killed_node_disappears_within_its_ttl_and_its_name_is_free_again(
        etcd: EtcdCluster, client: EtcdClient, unique: str, registrations: list[Registration]) -> None:
    name = f"k-{unique}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", CHILD, ",".join(etcd.endpoints), name],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"joined"
        time.sleep(1.5 * LEASE)  # alive: its thread renews the lease
        assert name in _names(client, unique)
        child.send_signal(signal.SIGKILL)  # a crash: no leave(), no revoke
        child.wait(timeout=10)
        killed = time.monotonic()
        # The same name joins as soon as the dead node's lease ends (join waits for it).
        again = Registration(client, name, "127.0.0.1:7200", lease_seconds=LEASE)
        registrations.append(again)
        again.join(wait=LEASE + 3)
        gone_after = time.monotonic() - killed
    finally:
        child.kill()
        child.wait()
    assert gone_after <= LEASE + 2, f"a killed node's record outlived its {LEASE} s lease: {gone_after:.1f} s"
    assert _names(client, unique)[name].address == "127.0.0.1:7200"


def test_a_lost_lease_is_renewed_while_the_name_is_free(client: EtcdClient, unique: str,
                                                         registrations: list[Registration]) -> None:
    reg = Registration(client, f"r-{unique}", "127.0.0.1:7001", lease_seconds=LEASE)
    registrations.append(reg)
    first = reg.join()
    client.revoke(first.lease)  # as if etcd had been out of reach for a TTL: the record went with it
    assert f"r-{unique}" not in _names(client, unique)
    _wait(lambda: f"r-{unique}" in _names(client, unique), 3 * LEASE, "the node registered again")
    renewed = _names(client, unique)[f"r-{unique}"]
    assert renewed.lease != first.lease and renewed.started == first.started and reg.renewals == 1
    assert not reg.lost.is_set()


def test_a_rejoin_that_etcd_refuses_is_retried_and_the_keepalive_thread_lives_on(
        client: EtcdClient, unique: str, registrations: list[Registration], monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal other than "unavailable" while rejoining (here the lease grant) must not end the thread:
    the node would drop out of the cluster while Stats still said joined."""
    reg = Registration(client, f"g-{unique}", "127.0.0.1:7003", lease_seconds=LEASE)
    registrations.append(reg)
    first = reg.join()
    real_grant, refused = client.grant, []

    def grant_refused_once(ttl: int) -> Lease:
        if not refused:
            refused.append(ttl)
            raise EtcdError("etcdserver: too many requests", code=8)
        return real_grant(ttl)

    monkeypatch.setattr(client, "grant", grant_refused_once)
    client.revoke(first.lease)  # the record goes with the lease; the first rejoin is refused
    _wait(lambda: f"g-{unique}" in _names(client, unique), 4 * LEASE, "the node registered again")
    assert refused and reg._thread is not None and reg._thread.is_alive() and not reg.lost.is_set()
    assert reg.member is not None and reg.member.lease != first.lease


def test_a_rejoin_that_finishes_after_leave_leaves_no_ghost_member(
        client: EtcdClient, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """leave() waits for the keepalive thread only so long: a rejoin that etcd answers after that must not
    register the node again as a member nobody runs."""
    reg = Registration(client, f"h-{unique}", "127.0.0.1:7004", lease_seconds=LEASE)
    first = reg.join()
    real_grant, entered, gate = client.grant, threading.Event(), threading.Event()

    def slow_grant(ttl: int) -> Lease:
        entered.set()
        assert gate.wait(30)
        return real_grant(ttl)

    monkeypatch.setattr(client, "grant", slow_grant)
    client.revoke(first.lease)  # the next pass finds the lease gone and rejoins: its grant hangs
    assert entered.wait(3 * LEASE), "the keepalive tried to rejoin"
    thread = reg._thread
    assert thread is not None
    reg.leave()  # gives up waiting for the thread after one lease
    gate.set()
    thread.join(10)
    assert not thread.is_alive() and reg.member is None
    assert f"h-{unique}" not in _names(client, unique)


def test_a_deleted_or_overwritten_record_is_restored(client: EtcdClient, unique: str,
                                                      registrations: list[Registration]) -> None:
    reg = Registration(client, f"d-{unique}", "127.0.0.1:7001", lease_seconds=LEASE)
    registrations.append(reg)
    first = reg.join()
    key = MEMBERS_PREFIX + f"d-{unique}"

    # Deleted by hand while the lease lives on: the keepalive sees the record gone and writes it again.
    client.delete(key)
    _wait(lambda: client.get(key) is not None, 3 * LEASE, "the deleted record was written again")
    again = reg.member
    assert again is not None and again.lease != first.lease and reg.renewals == 1
    assert client.keepalive(again.lease) > 0

    # The same record under a lease we did not keep (a write of ours whose answer was lost): adopted, so
    # the node renews that lease and the record outlives its TTL.
    stray = client.grant(LEASE)
    client.put(key, again.record(), lease=stray.id)
    _wait(lambda: reg.member is not None and reg.member.lease == stray.id, 3 * LEASE, "the record was adopted")
    time.sleep(1.5 * LEASE)
    kv = client.get(key)
    assert kv is not None and kv.lease == stray.id and not reg.lost.is_set()
    assert _names(client, unique)[f"d-{unique}"].started == first.started


def test_a_name_taken_while_ours_lapsed_is_lost_not_stolen(client: EtcdClient, unique: str,
                                                           registrations: list[Registration]) -> None:
    reg = Registration(client, f"t-{unique}", "127.0.0.1:7001", lease_seconds=LEASE)
    other = Registration(client, f"t-{unique}", "127.0.0.1:7002", lease_seconds=LEASE)
    registrations += [reg, other]
    reg.join()
    for _ in range(5):  # another node takes the free name before our keepalive notices (it may win a race)
        current = reg.member
        assert current is not None
        client.revoke(current.lease)
        try:
            other.join()
            break
        except NodeNameTaken:
            _wait(functools.partial(_replaced, reg, current), 3 * LEASE, "the node registered again")
    else:
        pytest.fail("the other node never got the lapsed name")
    assert reg.lost.wait(3 * LEASE)
    assert "was taken" in reg.last_error
    assert _names(client, unique)[f"t-{unique}"].address == "127.0.0.1:7002"
