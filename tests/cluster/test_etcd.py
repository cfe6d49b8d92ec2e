"""memosd.cluster.etcd against a real 3-member etcd cluster (tests/cluster/etcd_rig.py)."""

from __future__ import annotations

import socket
import time

import pytest
from etcd_rig import EtcdCluster, _free_ports

from memosd.cluster.etcd import (
    Compare,
    Delete,
    DeleteResult,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Get,
    LeaseNotFound,
    Put,
    PutResult,
    RangeResult,
    WatchEvent,
    prefix_end,
)


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"  # every key
    assert prefix_end("") == b"\0"


def test_put_get_range_prefix_delete(client: EtcdClient, prefix: str) -> None:
    rev = client.put(prefix + "a", "1")
    kv = client.get(prefix + "a")
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        (prefix + "a").encode(), b"1", rev, rev, 1, 0)
    rev2 = client.put(prefix + "a", b"\x00\xffbinary")
    kv = client.get(prefix + "a")
    assert kv is not None and kv.value == b"\x00\xffbinary" and kv.version == 2
    assert kv.create_revision == rev and kv.mod_revision == rev2 > rev
    assert client.get(prefix + "missing") is None

    for name in ("b", "c", "d"):
        client.put(prefix + name, name)
    client.put(prefix[:-1] + "0", "outside")  # sorts just after the prefix: not in it
    found = client.range(prefix, prefix=True)
    assert [k.key for k in found.kvs] == [(prefix + n).encode() for n in "abcd"]
    assert found.count == 4 and not found.more and found.revision >= rev2
    page = client.range(prefix, prefix=True, limit=2)
    assert len(page.kvs) == 2 and page.count == 4 and page.more
    assert [k.key for k in client.range(prefix + "b", range_end=prefix + "d").kvs] == [
        (prefix + "b").encode(), (prefix + "c").encode()]
    assert client.get(prefix + "c", serializable=True) is not None

    assert client.delete(prefix + "a") == 1
    assert client.delete(prefix + "a") == 0
    assert client.delete(prefix, prefix=True) == 3
    assert client.range(prefix, prefix=True).kvs == []
    assert client.get(prefix[:-1] + "0") is not None


def test_txn_success_and_failure(client: EtcdClient, prefix: str) -> None:
    key = prefix + "k"
    absent = Compare.create_revision(key, "==", 0)
    first = client.txn([absent], [Put(key, "v1"), Get(key)], [Get(key)])
    assert first.succeeded
    assert isinstance(first.responses[0], PutResult) and first.responses[0].revision == first.revision
    assert isinstance(first.responses[1], RangeResult) and first.responses[1].kvs[0].value == b"v1"

    # The same "create if absent" now fails and runs the failure branch, which reads what is there.
    second = client.txn([absent], [Put(key, "v2")], [Get(key)])
    assert not second.succeeded
    held = second.responses[0]
    assert isinstance(held, RangeResult) and held.kvs[0].value == b"v1"
    kv = client.get(key)
    assert kv is not None and kv.value == b"v1"

    # A CAS on mod_revision: only the writer that read the current revision wins.
    assert client.txn([Compare.mod_revision(key, "==", kv.mod_revision)], [Put(key, "v2")]).succeeded
    assert not client.txn([Compare.mod_revision(key, "==", kv.mod_revision)], [Put(key, "v3")]).succeeded
    assert client.txn([Compare.value(key, "==", "v2"), Compare.version(key, "==", 2)],
                      [Put(key, "v3"), Delete(prefix + "none")]).succeeded
    assert not client.txn([Compare.value(key, "!=", "v3")], [Put(key, "v4")]).succeeded
    assert client.txn([Compare.version(key, ">", 2)], [Delete(key)]).responses == [
        DeleteResult(1, client.range(prefix).revision)]
    assert client.get(key) is None

    with pytest.raises(TypeError):
        Compare(key, "value", "==", 3).to_json()


def test_leases_expire_are_kept_alive_and_revoked(client: EtcdClient, prefix: str) -> None:
    short = client.grant(2)  # etcd's shortest lease with these timeouts
    kept = client.grant(2)
    revoked = client.grant(30)
    assert short.ttl == 2 and short.id != kept.id
    client.put(prefix + "short", "x", lease=short.id)
    client.put(prefix + "kept", "x", lease=kept.id)
    client.put(prefix + "revoked", "x", lease=revoked.id)
    kv = client.get(prefix + "short")
    assert kv is not None and kv.lease == short.id

    client.revoke(revoked.id)
    assert client.get(prefix + "revoked") is None
    client.revoke(revoked.id)  # already gone: no error

    deadline = time.monotonic() + 6
    while client.get(prefix + "short") is not None:
        assert time.monotonic() < deadline, "a 2 s lease's key outlived 6 s"
        assert client.keepalive(kept.id) == 2
        time.sleep(0.4)
    assert client.get(prefix + "kept") is not None  # kept alive all along
    with pytest.raises(LeaseNotFound):
        client.keepalive(short.id)
    with pytest.raises(EtcdError) as refused:  # a put under a lease that is gone
        client.put(prefix + "late", "x", lease=short.id)
    assert not isinstance(refused.value, EtcdUnavailable)
    client.revoke(kept.id)


def test_watch_sees_puts_and_deletes_and_replays_from_a_revision(client: EtcdClient, prefix: str) -> None:
    with client.watch(prefix, prefix=True) as watch:
        with pytest.raises(TimeoutError):
            watch.next(timeout=0.2)
        rev = client.put(prefix + "a", "1")
        client.put(prefix[:-1] + "0", "outside the prefix")
        client.delete(prefix + "a")
        events: list[WatchEvent] = []
        while len(events) < 2:
            events += watch.next(timeout=5)
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [
        ("PUT", (prefix + "a").encode(), b"1"), ("DELETE", (prefix + "a").encode(), b"")]
    assert events[0].kv.mod_revision == rev
    assert watch.ended.is_set()

    with client.watch(prefix + "a", start_revision=rev) as replay:
        assert [e.type for e in replay.next(timeout=5)] == ["PUT", "DELETE"]


def test_failover_when_a_member_is_killed(etcd: EtcdCluster, prefix: str) -> None:
    client = etcd.client()
    client.put(prefix + "k", "before")
    etcd.members[0].kill()  # the client's first endpoint
    start = time.monotonic()
    client.put(prefix + "k", "after")
    kv = client.get(prefix + "k")
    assert kv is not None and kv.value == b"after"
    assert client.txn([Compare.value(prefix + "k", "==", "after")], [Put(prefix + "k", "txn")]).succeeded
    with client.watch(prefix, prefix=True) as watch:
        client.put(prefix + "w", "1")
        assert watch.next(timeout=5)[0].kv.value == b"1"
    assert time.monotonic() - start < 10
    # A fresh client whose first endpoint is the dead one still answers (a refused connect is quick).
    kv = etcd.client().get(prefix + "k")
    assert kv is not None and kv.value == b"txn"


def test_quorum_lost_is_unavailable_and_recovers(etcd: EtcdCluster, prefix: str) -> None:
    client = etcd.client(timeout=1.0)
    client.put(prefix + "k", "v")
    lease = client.grant(30)
    etcd.members[0].kill()
    etcd.members[1].kill()

    start = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        client.put(prefix + "k", "no quorum")
    with pytest.raises(EtcdUnavailable):
        client.get(prefix + "k")  # a linearizable read needs the leader too
    with pytest.raises(EtcdUnavailable) as txn:
        client.txn([Compare.value(prefix + "k", "==", "v")], [Put(prefix + "k", "w")])
    assert "no endpoint answered" in str(txn.value) or "outcome is unknown" in str(txn.value)
    with pytest.raises(EtcdUnavailable):
        client.grant(5)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"four calls without quorum took {elapsed:.1f} s to fail"
    # The survivor still serves its own copy (stale at worst) to a serializable read.
    kv = client.get(prefix + "k", serializable=True)
    assert kv is not None and kv.value == b"v"

    etcd.members[0].start()
    etcd.members[1].start()
    etcd.wait_healthy(20)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.put(prefix + "k", "back")
            break
        except EtcdUnavailable:
            assert time.monotonic() < deadline, "etcd did not take writes 10 s after its quorum came back"
            time.sleep(0.2)
    kv = client.get(prefix + "k")
    assert kv is not None and kv.value == b"back"
    assert client.keepalive(lease.id) > 0  # the lease survived (its TTL restarts on a new leader)


def test_no_endpoint_answering_is_unavailable() -> None:
    closed = _free_ports(2)
    client = EtcdClient([f"127.0.0.1:{p}" for p in closed], timeout=0.5)
    with pytest.raises(EtcdUnavailable, match="no endpoint answered"):
        client.get("k")
    with pytest.raises(EtcdUnavailable):
        client.watch("k")


def test_bad_endpoints_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EtcdClient([])
    for bad in ("localhost", "https://127.0.0.1:2379", "127.0.0.1:0", "http://h:1/path"):
        with pytest.raises(ValueError, match="etcd endpoint"):
            EtcdClient([bad])
    assert EtcdClient(["http://[::1]:2379", "h:1"]).endpoints == [("::1", 2379), ("h", 1)]


def test_a_watch_ends_when_its_member_goes(etcd: EtcdCluster, prefix: str) -> None:
    watch = etcd.client().watch(prefix, prefix=True)  # a fresh client starts at member 0
    try:
        etcd.members[0].kill()
        with pytest.raises((StopIteration, EtcdUnavailable)):
            watch.next(timeout=10)
        assert watch.ended.wait(5)
    finally:
        watch.close()


def test_a_call_cut_off_after_sending_is_repeated_elsewhere_unless_it_is_a_txn(etcd: EtcdCluster,
                                                                                prefix: str) -> None:
    # An endpoint that accepts connections (the kernel's backlog) and never answers: every call sent to
    # it times out after it was sent.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        endpoints = [f"127.0.0.1:{hole.getsockname()[1]}", *etcd.endpoints]
        client = EtcdClient(endpoints, timeout=0.5)
        client.put(prefix + "k", "v")  # timed out at the hole, then repeated at the next endpoint
        kv = client.get(prefix + "k")
        assert kv is not None and kv.value == b"v"

        fresh = EtcdClient(endpoints, timeout=0.5)  # starts at the hole again
        with pytest.raises(EtcdUnavailable, match="outcome is unknown"):
            fresh.txn([Compare.value(prefix + "k", "==", "v")], [Put(prefix + "k", "w")])
        kv = client.get(prefix + "k")
        assert kv is not None and kv.value == b"v", "the txn was repeated at another endpoint"
    finally:
        hole.close()
