"""Cluster membership: each node registers ``memosd/members/<name>`` under a lease it keeps alive.

The record is JSON ``{name, address, started, version}``: ``address`` is the host:port other nodes and
clients reach the node's gRPC server at, ``started`` the unix time it joined. The key is written under a
lease of ``lease_seconds`` (``[cluster] lease_seconds``), renewed by a daemon thread every third of it, so
a node that stops (crash, SIGKILL, a cut network) disappears from ``members()`` within one TTL of its last
renewal, with no one to clean up after it; ``leave()`` revokes the lease and the record goes at once.

Names are unique among live members: joining creates the key only if it is absent (one txn,
create_revision == 0). A node restarting within its old lease's TTL finds its own stale record; ``join``
waits (up to ``wait`` seconds) for it to expire rather than take it over, since an identical name could as
well be a second node misconfigured with the same node_name.

If the lease is lost while the node runs (etcd unreachable or without quorum for longer than the TTL,
so the keepalives did not get through), the keepalive thread registers again under a new lease as soon
as etcd answers, unless another node took the name meanwhile (then ``lost`` is set and it stops). Each
renewal reads the record back too: a live lease is not a listing if the key was deleted or overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass

from memosd import __version__
from memosd.cluster.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Get,
    KeyValue,
    LeaseNotFound,
    Put,
    RangeResult,
)
from memosd.config import NODE_NAME_RE
from memosd.logfmt import log_event

MEMBERS_PREFIX = "memosd/members/"
MIN_LEASE_SECONDS = 2  # etcd's own minimum with its default timing (1.5 election timeouts, rounded up)

log = logging.getLogger("memosd.cluster")


class NodeNameTaken(Exception):
    """Another live member holds this node name."""


@dataclass(frozen=True)
class Member:
    name: str
    address: str
    started: float  # unix seconds: when the node joined
    version: str  # the memosd version it runs
    lease: int = 0  # etcd's lease id (not in the record: etcd keeps it with the key)

    def record(self) -> bytes:
        doc = asdict(self)
        del doc["lease"]
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def from_kv(kv: KeyValue) -> Member:
        doc = kv.json()
        return Member(str(doc["name"]), str(doc["address"]), float(doc["started"]), str(doc["version"]), kv.lease)


def member_key(name: str) -> str:
    return MEMBERS_PREFIX + name


def members(client: EtcdClient) -> list[Member]:
    """The live members, by name. A record that does not parse is logged and left out (it cannot be a
    node this version can talk to)."""
    out = []
    for kv in client.range(MEMBERS_PREFIX, prefix=True).kvs:
        try:
            out.append(Member.from_kv(kv))
        except (ValueError, KeyError, TypeError) as e:
            log_event(log, "cluster_member_unreadable", level=logging.WARNING, key=kv.key.decode(errors="replace"),
                      error=str(e))
    return out


class Registration:
    """One node's membership: ``join()``, kept alive on a daemon thread, ``leave()``."""

    def __init__(self, client: EtcdClient, name: str, address: str, *, lease_seconds: int = 5,
                 version: str = __version__) -> None:
        if not NODE_NAME_RE.fullmatch(name):
            raise ValueError(f"node name {name!r}: expected 1-63 of a-z 0-9 . _ -, starting with a letter or digit")
        if lease_seconds < MIN_LEASE_SECONDS:
            raise ValueError(f"lease_seconds = {lease_seconds}: etcd's shortest lease is {MIN_LEASE_SECONDS} s")
        self.client = client
        self.name = name
        self.address = address
        self.lease_seconds = lease_seconds
        self.version = version
        self.key = member_key(name)
        self.member: Member | None = None  # what is registered now
        self.lost = threading.Event()  # the name was taken by another node while ours had lapsed
        self.renewals = 0  # leases granted again after one was lost (Stats will show it)
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- joining and leaving ---------------------------------------------------------------------------

    def join(self, wait: float = 0.0) -> Member:
        """Register, waiting up to ``wait`` seconds for a record of the same name to expire. Raises
        NodeNameTaken if it is still there, EtcdUnavailable if etcd does not answer."""
        deadline = time.monotonic() + wait
        started = time.time()
        while True:
            holder = self._register(started)
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise NodeNameTaken(
                    f"node name {self.name!r} is registered by a live member at {holder.address} (started "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(holder.started))}): choose another "
                    f"[cluster] node_name, or wait for its lease ({self.lease_seconds} s) to end")
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive, name=f"cluster-member-{self.name}", daemon=True)
        self._thread.start()
        assert self.member is not None
        log_event(log, "cluster_joined", name=self.name, address=self.address, lease=self.member.lease)
        return self.member

    def _register(self, started: float) -> Member | None:
        """Create our record under a new lease if the name is free: None on success, else its holder."""
        lease = self.client.grant(self.lease_seconds)
        member = Member(self.name, self.address, started, self.version, lease.id)
        try:
            result = self.client.txn([Compare.create_revision(self.key, "==", 0)],
                                     [Put(self.key, member.record(), lease=lease.id)], [Get(self.key)])
        except EtcdUnavailable:
            # The txn may have applied: ending its lease takes the record with it (and if etcd does not
            # answer that either, the lease, never renewed, ends within its TTL).
            with contextlib.suppress(EtcdError):
                self.client.revoke(lease.id)
            raise
        if result.succeeded:
            self.member = member
            return None
        self.client.revoke(lease.id)  # not ours to keep: it would only expire later
        found = result.responses[0]
        kvs = found.kvs if isinstance(found, RangeResult) else []
        if not kvs:  # gone between the compare and the read: try again at once
            return self._register(started)
        return Member.from_kv(kvs[0])

    def leave(self) -> None:
        """Stop renewing and revoke the lease: the record is gone at once. If etcd does not answer, the
        record goes anyway within one TTL."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_seconds)
            self._thread = None
        member, self.member = self.member, None
        if member is not None:
            try:
                self.client.revoke(member.lease)
            except EtcdError as e:
                log_event(log, "cluster_leave_unconfirmed", level=logging.WARNING, name=self.name, error=str(e))
                return
            log_event(log, "cluster_left", name=self.name)

    # -- the keepalive thread --------------------------------------------------------------------------

    def _keepalive(self) -> None:
        interval = self.lease_seconds / 3
        while not self._stop.wait(interval):
            member = self.member
            if member is None:
                return
            try:
                if not self._renew(member):
                    return
            except Exception as e:  # a rejoin refused, a garbled record: never end the thread
                # This thread is the node's membership: if it died, the node would drop out of the cluster
                # while Stats still said joined. Whatever failed is retried at the next pass.
                self.last_error = f"{type(e).__name__}: {e}"
                log_event(log, "cluster_keepalive_failed", level=logging.ERROR, name=self.name,
                          error=self.last_error, exc_info=e)

    def _renew(self, member: Member) -> bool:
        """One pass: renew the lease and check the record; False when the name is lost (the thread ends)."""
        try:
            self.client.keepalive(member.lease)
            # The lease alone is not the record: a key deleted or overwritten (by hand, or by a write
            # of ours whose answer was lost) leaves a live lease and no listing.
            kv = self.client.get(self.key)
            self.last_error = ""
            if kv is None or kv.lease != member.lease:
                log_event(log, "cluster_record_lost", level=logging.WARNING, name=self.name,
                          lease=member.lease, found=0 if kv is None else kv.lease)
                return self._rejoin(member)
        except LeaseNotFound:
            # Our record went with the lease (etcd was out of reach for a TTL, or someone revoked it).
            log_event(log, "cluster_lease_lost", level=logging.WARNING, name=self.name, lease=member.lease)
            return self._rejoin(member)
        except EtcdError as e:  # unavailable (or refusing): keep trying, the TTL decides
            self.last_error = str(e)
            log_event(log, "cluster_keepalive_failed", level=logging.WARNING, name=self.name, error=str(e))
        return True

    def _rejoin(self, old: Member) -> bool:
        if self._stop.is_set():
            return False
        try:
            holder = self._register(old.started)
        except EtcdUnavailable as e:
            self.last_error = str(e)
            return True  # the old lease id stays: the next pass finds it gone again and retries
        if self._stop.is_set() and holder is None:
            # leave() ran while we registered (a slow etcd outlasts its wait for this thread): the record just
            # made must not outlive it as a ghost member for a TTL. leave set _stop before reading member, so
            # either it revoked this lease or we do here.
            made, self.member = self.member, None
            if made is not None:
                with contextlib.suppress(EtcdError):
                    self.client.revoke(made.lease)
            return False
        if holder is not None and (holder.address, holder.started) == (self.address, old.started):
            self.member = holder  # our own record, from an attempt whose answer was lost: keep its lease
            self._drop(old)
            return True
        if holder is not None:
            self.last_error = f"node name {self.name!r} was taken by a member at {holder.address} while ours lapsed"
            log_event(log, "cluster_name_lost", level=logging.ERROR, name=self.name, holder=holder.address)
            self.member = None
            self.lost.set()
            return False
        self.renewals += 1
        assert self.member is not None
        self._drop(old)
        log_event(log, "cluster_rejoined", name=self.name, lease=self.member.lease)
        return True

    def _drop(self, old: Member) -> None:
        """End a lease we no longer use (it would end unrenewed within its TTL anyway)."""
        with contextlib.suppress(EtcdError):
            self.client.revoke(old.lease)


__all__ = ["MEMBERS_PREFIX", "Member", "NodeNameTaken", "Registration", "member_key", "members"]
