"""Principals and grants in etcd: the GovernanceStore of a cluster node (governance/ports.py), so a token
and a right mean the same on every node.

Keys (under ``root``, ``memosd/`` in a cluster; values JSON):

  access/principals/<principal_id>       {name, kind, admin, token_hash, create_ns, created_by, disabled}:
                                         the token's sha256 only, as on one node, never the token
  access/principal-names/<name>          the principal id holding the name (names are unique)
  access/grants/<cube_id>/<principal_id> {rights, granted_by, update_ns, expire_ns}
  access/migrated/<node_name>            {time_ns}: the node's own principals and grants were copied in

Every change is one txn: a new principal only if its id and its name are both absent; a disable only if
the principal is there; a grant's read-modify-write only if the key is unchanged since it was read (its
mod_revision), run again on the newer record otherwise. etcd without quorum (or out of reach) makes every
change CLUSTER_UNAVAILABLE, while reads go on from memory: existing tokens and grants keep working.

Reads never wait on etcd: each node keeps a cache, fed the way view.py feeds the directory (one range
over ``access/``, then a watch from the revision after it; the range again when the watch ends). A
revocation reaches every node through its watch (milliseconds). A watch can also fall silently behind (a
member cut off from its leader streams nothing): every ``check_seconds`` the follower asks etcd for the
keys changed after the revision it has applied, and how many keys there are; anything changed, or a
count that differs (a delete), and (once events in flight had SETTLE_SECONDS to arrive) it reads
everything again. So a node that can reach a majority
member honours a revoked grant for at most ``check_seconds`` (plus a read) past the revoke. Without
quorum the check asks a surviving member (serializable): nothing can be revoked then. A node that
cannot confirm its copy at all for ``trust_seconds`` fails safe: rights that come from a grant are
refused with CLUSTER_UNAVAILABLE until a check succeeds (``unconfirmed``); tokens, owners and admins
keep working on what it knew.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict

from memosd.cluster.etcd import (
    Compare,
    Delete,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Get,
    KeyValue,
    Put,
    RangeResult,
    Watch,
    WatchEvent,
)
from memosd.errors import ClusterUnavailable
from memosd.governance.local import name_taken, principal_not_found
from memosd.governance.ports import GrantChange
from memosd.logfmt import log_event
from memosd.store.records import GrantRecord, PrincipalRecord

log = logging.getLogger("memosd.cluster")

ROOT = "memosd/"
RETRY_SECONDS = 0.5
SETTLE_SECONDS = 0.2  # a check that finds changes waits this long for events in flight before a full read
CHANGE_TRIES = 5  # a grant's read-modify-write lost to a concurrent change this often is refused

UNAVAILABLE = ("the cluster's principals and grants are unavailable (etcd has no quorum): principal and grant "
               "changes are refused until it is back; existing tokens and grants keep working")


def unavailable(error: EtcdError | str) -> ClusterUnavailable:
    return ClusterUnavailable(f"{UNAVAILABLE} ({error})")


def _principal_json(record: PrincipalRecord) -> str:
    doc = asdict(record)
    del doc["principal_id"]  # it is the key
    return json.dumps(doc, sort_keys=True)


def _grant_json(record: GrantRecord) -> str:
    return json.dumps({"rights": sorted(record.rights), "granted_by": record.granted_by,
                       "update_ns": record.update_ns, "expire_ns": record.expire_ns}, sort_keys=True)


class EtcdGovernance:
    def __init__(self, client: EtcdClient, *, root: str = ROOT, check_seconds: float = 1.0,
                 trust_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.prefix = root + "access/"
        self._principal_keys = self.prefix + "principals/"
        self._name_keys = self.prefix + "principal-names/"
        self._grant_keys = self.prefix + "grants/"
        self.check_seconds = check_seconds
        self.trust_seconds = trust_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._principals: dict[str, PrincipalRecord] = {}
        self._grants: dict[tuple[str, str], GrantRecord] = {}
        self._keys: set[str] = set()  # every key under access/ (the check compares their count)
        self._floor = 0  # the revision of the last full read: watch events at or below it are in already
        self._applied = 0  # the last revision the cache reflects
        self._confirmed = -math.inf  # when the cache was last known current (clock)
        self.last_error = ""
        self.reloads = 0  # full reads after the first (a watch ended, or a check found it behind)
        self.on_disabled: Callable[[str], object] | None = None  # a principal was disabled (on any node)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- following etcd --------------------------------------------------------------------------------
    def start(self) -> None:
        """The first full read (raises EtcdError: the start fails), then the follower thread."""
        self._load()
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="cluster-access", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _range(self, *, keys_only: bool = False, min_mod_revision: int = 0) -> RangeResult:
        """Linearizable when a quorum answers; else a surviving member's copy (no change can be made
        without a quorum, so it is as current as anything is)."""
        try:
            return self.client.range(self.prefix, prefix=True, keys_only=keys_only,
                                     min_mod_revision=min_mod_revision)
        except EtcdUnavailable:
            return self.client.range(self.prefix, prefix=True, serializable=True, keys_only=keys_only,
                                     min_mod_revision=min_mod_revision)

    def _load(self) -> int:
        found = self._range()
        principals: dict[str, PrincipalRecord] = {}
        grants: dict[tuple[str, str], GrantRecord] = {}
        for kv in found.kvs:
            self._read_into(kv.key.decode(errors="replace"), kv, principals, grants)
        with self._lock:
            before = {p.principal_id for p in self._principals.values() if not p.disabled}
            self._principals, self._grants = principals, grants
            self._keys = {kv.key.decode(errors="replace") for kv in found.kvs}
            self._floor = self._applied = found.revision
            self._confirmed = self._clock()
        for principal_id in sorted(before & {p.principal_id for p in principals.values() if p.disabled}):
            self._disabled(principal_id)
        return found.revision

    def _read_into(self, key: str, kv: KeyValue, principals: dict[str, PrincipalRecord],
                   grants: dict[tuple[str, str], GrantRecord]) -> None:
        try:
            if key.startswith(self._principal_keys):
                principal_id = key[len(self._principal_keys):]
                principals[principal_id] = PrincipalRecord(principal_id=principal_id, **kv.json())
            elif key.startswith(self._grant_keys):
                cube_id, _, principal_id = key[len(self._grant_keys):].partition("/")
                doc = kv.json()
                grants[(cube_id, principal_id)] = GrantRecord(
                    cube_id, principal_id, [str(r) for r in doc["rights"]], str(doc.get("granted_by", "")),
                    int(doc.get("update_ns", 0)), int(doc.get("expire_ns", 0)))
        except (ValueError, KeyError, TypeError) as e:
            log_event(log, "cluster_record_unreadable", level=logging.WARNING, key=key, error=str(e))

    def _follow(self) -> None:
        revision = self._applied
        while not self._stop.is_set():
            try:
                if not revision:
                    revision = self._load()
                    self.reloads += 1
                started = self._clock()
                revision = self._watch(revision + 1)
                self.last_error = ""
                if self._clock() - started < RETRY_SECONDS:  # a member that ends every watch at once
                    self._stop.wait(RETRY_SECONDS)
            except EtcdError as e:
                if not self.last_error:
                    log_event(log, "cluster_access_unread", level=logging.WARNING, error=str(e))
                self.last_error = str(e)
                revision = 0  # read it all again once etcd answers: events may have been missed
                self._stop.wait(RETRY_SECONDS)

    def _watch(self, start: int) -> int:
        """Apply events from ``start`` until the watch ends (returns the last revision applied) or a check
        finds the cache behind (returns 0: read everything again)."""
        next_check = self._clock() + self.check_seconds
        with self.client.watch(self.prefix, prefix=True, start_revision=start) as watch:
            while not self._stop.is_set():
                try:
                    for event in watch.next(timeout=min(0.25, self.check_seconds)):
                        self._apply(event)
                except TimeoutError:
                    pass
                except StopIteration:
                    return self._applied
                if self._clock() >= next_check:
                    next_check = self._clock() + self.check_seconds
                    if self.check() is False and not self._settled(watch):
                        log_event(log, "cluster_access_behind", level=logging.WARNING, applied=self._applied)
                        return 0
        return self._applied

    def _settled(self, watch: Watch) -> bool:
        """A check that found changes may have raced their events, still on the way: apply what arrives
        within SETTLE_SECONDS, then ask again. False: still behind (or the watch ended): read it all."""
        deadline = self._clock() + SETTLE_SECONDS
        while (left := deadline - self._clock()) > 0:
            try:
                for event in watch.next(timeout=left):
                    self._apply(event)
            except TimeoutError:
                break
            except StopIteration:
                return False
        return self.check() is not False

    def check(self) -> bool | None:
        """Is the cache current? True (and confirmed now), False (a key changed after the applied revision,
        or the count differs), None (etcd cannot say now). Run by the follower; public for tests."""
        with self._lock:
            applied, count = self._applied, len(self._keys)
        try:
            found = self._range(keys_only=True, min_mod_revision=applied + 1)
        except EtcdError as e:
            self.last_error = str(e)
            return None
        if found.kvs or found.count != count:
            return False
        with self._lock:
            self._confirmed = self._clock()
        return True

    def _apply(self, event: WatchEvent) -> None:
        key = event.kv.key.decode(errors="replace")
        disabled = ""
        with self._lock:
            if event.kv.mod_revision <= self._floor:
                return
            self._applied = max(self._applied, event.kv.mod_revision)
            self._set(key, event.kv if event.type == "PUT" else None)
            if key.startswith(self._principal_keys) and event.type == "PUT":
                found = self._principals.get(key[len(self._principal_keys):])
                disabled = found.principal_id if found is not None and found.disabled else ""
        if disabled:
            self._disabled(disabled)

    def _set(self, key: str, kv: KeyValue | None) -> None:
        """One key as it is now (None: deleted); under the lock."""
        if kv is None:
            self._keys.discard(key)
            if key.startswith(self._principal_keys):
                self._principals.pop(key[len(self._principal_keys):], None)
            elif key.startswith(self._grant_keys):
                cube_id, _, principal_id = key[len(self._grant_keys):].partition("/")
                self._grants.pop((cube_id, principal_id), None)
            return
        self._keys.add(key)
        self._read_into(key, kv, self._principals, self._grants)

    def _disabled(self, principal_id: str) -> None:
        if self.on_disabled is None:
            return
        try:
            self.on_disabled(principal_id)
        except Exception as e:  # closing its mounts here is a courtesy: every call checks the token anyway
            log_event(log, "cluster_disable_unapplied", level=logging.WARNING, principal=principal_id,
                      error=repr(e))

    # -- reads (memory only) ---------------------------------------------------------------------------
    def principal(self, principal_id: str) -> PrincipalRecord | None:
        return self._principals.get(principal_id)

    def principals(self) -> list[PrincipalRecord]:
        with self._lock:
            return list(self._principals.values())

    def grant(self, cube_id: str, principal_id: str) -> GrantRecord | None:
        return self._grants.get((cube_id, principal_id))

    def grants(self) -> list[GrantRecord]:
        with self._lock:
            return list(self._grants.values())

    def unconfirmed(self) -> str:
        age = self._clock() - self._confirmed
        if age <= self.trust_seconds:
            return ""
        return (f"this node has not been able to confirm its copy of the cluster's grants for {age:.0f} s "
                f"(etcd: {self.last_error or 'no answer'}); rights that come from a grant are refused here "
                "until it can, since one may have been revoked meanwhile; owners and admins are not affected")

    # -- changes (one txn each) ------------------------------------------------------------------------
    def _noted(self, revision: int, changes: Iterable[tuple[str, str | None]]) -> None:
        """What this node wrote, in its cache before the watch brings it back. Skipped once the watch has
        passed ``revision``: it applied this change already, and maybe a later one to the same key."""
        with self._lock:
            if revision <= self._applied:
                return
            for key, value in changes:
                kv = None if value is None else KeyValue(key.encode(), value.encode(), revision, revision, 1, 0)
                self._set(key, kv)

    def _txn(self, compare: list[Compare], success: list[Put | Delete | Get],
             failure: list[Put | Delete | Get] | None = None) -> tuple[bool, int, list[object]]:
        try:
            result = self.client.txn(compare, success, failure or [])
        except EtcdError as e:  # no quorum, no endpoint, or an outcome unknown (a txn cut off after it was sent)
            raise unavailable(e) from None
        return result.succeeded, result.revision, list(result.responses)

    def add_principal(self, record: PrincipalRecord) -> None:
        if not self._add(record):
            raise name_taken(record.name)

    def _add(self, record: PrincipalRecord) -> bool:
        key, name_key = self._principal_keys + record.principal_id, self._name_keys + record.name
        value = _principal_json(record)
        ok, revision, _ = self._txn([Compare.create_revision(key, "==", 0), Compare.create_revision(name_key, "==", 0)],
                                    [Put(key, value), Put(name_key, record.principal_id)])
        if ok:
            self._noted(revision, [(key, value), (name_key, record.principal_id)])
        return ok

    def update_principal(self, record: PrincipalRecord) -> None:
        key = self._principal_keys + record.principal_id
        value = _principal_json(record)
        ok, revision, _ = self._txn([Compare.version(key, ">", 0)], [Put(key, value)])
        if not ok:
            raise principal_not_found(record.principal_id)
        self._noted(revision, [(key, value)])

    def change_grant(self, cube_id: str, principal_id: str, change: GrantChange) -> GrantRecord | None:
        key = f"{self._grant_keys}{cube_id}/{principal_id}"
        for _ in range(CHANGE_TRIES):
            try:
                kv = self.client.get(key)  # linearizable: a change starts from the newest record
            except EtcdError as e:
                raise unavailable(e) from None
            current: dict[str, PrincipalRecord] = {}
            held: dict[tuple[str, str], GrantRecord] = {}
            if kv is not None:
                self._read_into(key, kv, current, held)
            old = held.get((cube_id, principal_id))
            new = change(old)
            if old is None and new is None:
                return None
            value = None if new is None else _grant_json(new)
            op: Put | Delete = Delete(key) if value is None else Put(key, value)
            ok, revision, _ = self._txn([Compare.mod_revision(key, "==", kv.mod_revision if kv else 0)], [op])
            if ok:
                self._noted(revision, [(key, value)])
                return new
        raise unavailable(f"grant {cube_id}/{principal_id} changed concurrently {CHANGE_TRIES} times; try again")

    def forget_cube(self, cube_id: str) -> None:
        """Best effort, after the cube is gone locally (its release from the directory already needed a
        quorum): a delete that fails is logged; the grants then name a cube id that no node serves."""
        prefix = f"{self._grant_keys}{cube_id}/"
        try:
            self.client.delete(prefix, prefix=True)
        except EtcdError as e:
            log_event(log, "cluster_grants_not_deleted", level=logging.WARNING, cube=cube_id, error=str(e))
        with self._lock:
            for key in [k for k in self._keys if k.startswith(prefix)]:
                self._set(key, None)

    # -- a node that joins with principals and grants of its own ---------------------------------------
    def migrate(self, node: str, principals: Iterable[PrincipalRecord], grants: Iterable[GrantRecord]
                ) -> tuple[int, int]:
        """Copy this node's local principals and grants into etcd, once per node name (``migrated/<node>``
        says it was done), where absent: a principal keeps its id and token hash (its tokens then work on
        every node) unless its name is another principal's in the cluster (not migrated, logged: its tokens
        stop working here); a grant is copied if its key is absent. Once only: the local rows are kept and
        not updated while the node is a member, so copying them at every start would bring back a grant
        revoked meanwhile. Returns (principals, grants) copied."""
        marker = f"{self.prefix}migrated/{node}"
        if marker in self._keys:
            return 0, 0
        moved_principals = moved_grants = 0
        for record in principals:
            if self.principal(record.principal_id) is not None:
                continue
            if self._add(record):
                moved_principals += 1
                log_event(log, "cluster_principal_migrated", principal=record.principal_id, name=record.name)
            else:
                log_event(log, "cluster_principal_not_migrated", level=logging.WARNING,
                          principal=record.principal_id, name=record.name,
                          reason="another principal holds its name in the cluster; its tokens do not work here")
        for grant in grants:
            key = f"{self._grant_keys}{grant.cube_id}/{grant.principal_id}"
            if self.grant(grant.cube_id, grant.principal_id) is not None:
                continue
            value = _grant_json(grant)
            ok, revision, _ = self._txn([Compare.create_revision(key, "==", 0)], [Put(key, value)])
            if ok:
                moved_grants += 1
                self._noted(revision, [(key, value)])
        done = json.dumps({"time_ns": time.time_ns()})
        _, revision, _ = self._txn([], [Put(marker, done)])
        self._noted(revision, [(marker, done)])
        return moved_principals, moved_grants


__all__ = ["UNAVAILABLE", "EtcdGovernance", "unavailable"]
