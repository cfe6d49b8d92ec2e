"""This daemon as a cluster member: what the wiring does with ``[cluster]`` when ``etcd`` is set.

Membership: ``check()`` before anything slow loads (etcd answers and no live member
holds our node name: a start that cannot join fails in a second, like a taken port), ``join()`` once the
gRPC server serves (a member in the list is one that answers), ``leave()`` first thing at shutdown (the
others stop sending calls before we stop taking them). While joined, a daemon thread reads the member
list every half lease, so ``status()`` (the Stats syscall's cluster section) answers from memory
and never waits on etcd: with etcd out of reach Stats still answers, saying since when the list is old.

The directory: ``claims`` is the kernel's DirectoryPort (cluster/claims.py) and ``view`` the watch-fed
cache the router reads (cluster/view.py), started at join. At join the local cubes are reconciled with
the directory (``reconcile``): a local cube without an entry is claimed for this node; one whose entry
names another node is reported (log and Stats: ``not_served``) and not served here, since the router
sends its calls to the owner the directory names; an entry naming this node for a cube it lacks (a
release that failed after a FreeCube) is reported as ``missing``. Nothing is deleted either way: which
copy is right is for an operator (or the move protocol) to say.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memosd.cluster.claims import DirectoryClaims
from memosd.cluster.directory import Directory
from memosd.cluster.etcd import EtcdClient, EtcdError, KeyValue
from memosd.cluster.membership import Member, NodeNameTaken, Registration, members
from memosd.cluster.move import CubeMover
from memosd.cluster.settings import (
    ClusterConfigMismatch,
    ClusterConfigStore,
    ClusterSettings,
    Value,
    mismatches,
)
from memosd.cluster.view import DirectoryView
from memosd.config import ClusterConfig
from memosd.errors import MemosError
from memosd.logfmt import log_event

LocalCubes = Callable[[], Sequence[tuple[str, str, str]]]  # (cube id, name, owning principal) of each local cube

log = logging.getLogger("memosd.cluster")


class ClusterStartError(RuntimeError):
    """The node cannot join: the message says why and what to change."""


@dataclass(frozen=True)
class ClusterStatus:
    """This node in the cluster, as last seen (the Stats syscall's cluster section)."""

    node_name: str
    address: str  # where this node is registered (cluster.advertise, or the bound gRPC address)
    joined: bool  # registered under a live lease now
    members: tuple[str, ...]  # the live members' names, as last read
    members_age_seconds: float  # how old that read is (it is redone every half lease)
    lease_renewals: int  # leases granted again after one lapsed
    last_error: str  # the last failure talking to etcd; "" once a call works again
    not_served: tuple[str, ...] = ()  # local cubes the directory gives to another node (see reconcile)
    missing: tuple[str, ...] = ()  # cubes the directory gives to this node that it does not have
    forwarded_calls: int = 0  # calls sent on to their owner (the router's count, added by the wiring)
    moves_out: int = 0  # moves this node drove as the owner and finished (cluster/move.py)
    moves_failed: int = 0  # ... and gave up (the cube stayed here)
    moves_in: int = 0  # cubes received by a move and kept
    moving: tuple[str, ...] = ()  # cubes being moved out of or into this node now (added by the wiring)
    member_records: tuple[Member, ...] = ()  # the live members as last read, in full
    cubes_per_node: tuple[tuple[str, int], ...] = ()  # (owner node, cubes) from this node's directory view
    etcd_endpoints: tuple[str, ...] = ()


class ClusterNode:
    def __init__(self, config: ClusterConfig, *, timeout: float = 2.0) -> None:
        self.config = config
        # A renewal that tries every endpoint in turn must fit well inside the lease, or one hung member
        # would let the lease lapse: at most a third of it for all of them (but never under half a second).
        per_endpoint = max(0.5, config.lease_seconds / (3 * max(1, len(config.etcd))))
        self.client = EtcdClient(config.etcd, timeout=min(timeout, per_endpoint))
        self.registration: Registration | None = None  # made at join, when the bound address is known
        self._members: tuple[Member, ...] = ()
        self._members_read = time.monotonic()
        self._read_error = ""
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.view = DirectoryView(self.client)
        self.claims = DirectoryClaims(Directory(self.client), config.node_name, self.view)
        self.not_served: tuple[str, ...] = ()
        self.missing: tuple[str, ...] = ()
        self.mover: CubeMover | None = None  # set by the wiring once the kernel exists (cluster/move.py)
        self.config_store = ClusterConfigStore(self.client)
        self.settings: ClusterSettings | None = None  # the cluster config this node applies (agree(), then the watch)
        self.on_settings: list[Callable[[ClusterSettings], None]] = []  # the wiring's appliers (quotas)
        self._fixed: dict[str, Value] = {}
        self._settings_lock = threading.Lock()
        self.view.on_settings = self._settings_seen

    def _where(self) -> str:
        return ", ".join(self.config.etcd)

    def check(self) -> None:
        """Before the slow part of a start: etcd answers and our node name is free, waiting up to one
        lease for it (a node restarted right after a crash finds its own record until its lease ends)."""
        deadline = time.monotonic() + self.config.lease_seconds + 1
        while True:
            try:
                holder = next((m for m in members(self.client) if m.name == self.config.node_name), None)
            except EtcdError as e:
                raise ClusterStartError(f"cannot reach etcd at {self._where()} (cluster.etcd): {e}") from None
            if holder is None:
                return
            if time.monotonic() >= deadline:
                raise ClusterStartError(
                    f"cluster.node_name {self.config.node_name!r} is already a live member at {holder.address}: "
                    "give this node another name, or stop that one (a stopped node's name is free within "
                    f"cluster.lease_seconds = {self.config.lease_seconds} s)")
            time.sleep(0.25)

    def agree(self, ours: ClusterSettings) -> ClusterSettings:
        """Before serving: write the cluster config if there is none yet, else check our must-agree values
        against it (cluster/settings.py). Returns the config to apply. Raises ClusterStartError (one line)."""
        try:
            stored, wrote = self.config_store.join(ours)
        except ClusterConfigMismatch as e:
            raise ClusterStartError(str(e)) from None
        except EtcdError as e:
            raise ClusterStartError(f"cannot read the cluster config at {self._where()} (cluster.etcd): {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ClusterStartError(f"the cluster config in etcd ({self.config_store.key}) cannot be read: {e}; "
                                    "fix or delete it") from None
        log_event(log, "cluster_config_written" if wrote else "cluster_config_read", revision=stored.revision,
                  created_by=stored.created_by)
        self._fixed = dict(ours.fixed)
        self.settings = stored
        return stored

    def _settings_seen(self, kv: KeyValue) -> None:
        """The config key as the directory watch brings it: apply a change to the settings; a change to the
        fixed values (made by hand in etcd) is logged, not applied (this node runs with what it started with)."""
        self._adopt(ClusterSettings.from_kv(kv))

    def set_setting(self, key: str, text: str) -> ClusterSettings:
        """``memosctl cluster config set``: the CAS in etcd, then applied here at once (the others apply it
        when their watch brings it). Raises InvalidField, ClusterUnavailable."""
        new = self.config_store.set(key, text, self.config.node_name)
        self._adopt(new)
        return new

    def _adopt(self, found: ClusterSettings) -> None:
        with self._settings_lock:
            current = self.settings
            if current is not None and found.revision <= current.revision:
                return  # a replay of what we have (the watch restarted, a full read)
            self.settings = found
        differ = mismatches(self._fixed, found.fixed)
        if differ:
            log_event(log, "cluster_config_fixed_changed", level=logging.WARNING,
                      settings=",".join(m.key for m in differ),
                      hint="the cluster's must-agree settings were changed in etcd; this node keeps its own "
                           "until it restarts (and then refuses to start if they still differ)")
        if current is None or dict(found.settings) != dict(current.settings):
            log_event(log, "cluster_config_applied", revision=found.revision, updated_by=found.updated_by)
            for apply in self.on_settings:
                apply(found)

    def join(self, bound: str, local_cubes: LocalCubes = lambda: ()) -> None:
        """Register at cluster.advertise, or at ``bound`` (the gRPC server's address) when that is empty;
        then follow the directory and reconcile the local cubes with it."""
        self.registration = Registration(self.client, self.config.node_name, self.config.advertise or bound,
                                         lease_seconds=self.config.lease_seconds)
        # wait: a node restarted at once after a crash finds its own record until its lease ends.
        try:
            self.registration.join(wait=self.config.lease_seconds + 1)
        except NodeNameTaken as e:
            raise ClusterStartError(f"cluster.node_name: {e}") from None
        except EtcdError as e:
            raise ClusterStartError(f"cannot join the cluster at {self._where()} (cluster.etcd): {e}") from None
        try:
            self.view.start()
            # The marks of moves a crash cut short first: a copy they drop is no longer local.
            dropped = self.mover.recover() if self.mover is not None else set()
            self.reconcile([c for c in local_cubes() if c[0] not in dropped])
        except EtcdError as e:
            raise ClusterStartError(f"cannot read the cluster directory at {self._where()} (cluster.etcd): {e}"
                                    ) from None
        self._read_members()
        self._stop.clear()
        self._reader = threading.Thread(target=self._follow_members, name="cluster-members", daemon=True)
        self._reader.start()

    def reconcile(self, local: Sequence[tuple[str, str, str]]) -> None:
        """The rule at join (see the module docstring): claim what is ours and unclaimed, report the rest."""
        node = self.config.node_name
        mine = {cube_id for cube_id, _, _ in local}
        not_served = []
        for cube_id, name, principal in local:
            entry = self.view.lookup(cube_id)
            if entry is None:
                try:
                    if self.claims.claim(cube_id, name, principal):
                        log_event(log, "cluster_cube_claimed", cube=cube_id, name=name)
                        continue
                except MemosError as e:  # the name is another cube's in the cluster (or etcd failed)
                    log_event(log, "cluster_cube_not_served", level=logging.WARNING, cube=cube_id, name=name,
                              reason=e.message)
                    not_served.append(cube_id)
                    continue
                entry = self.view.lookup(cube_id)
            if entry is not None and entry.owner != node:
                log_event(log, "cluster_cube_not_served", level=logging.WARNING, cube=cube_id, name=name,
                          reason=f"the directory gives it to node {entry.owner!r} at epoch {entry.epoch}")
                not_served.append(cube_id)
        missing = sorted(e.cube_id for e in self.view.entries() if e.owner == node and e.cube_id not in mine)
        for cube_id in missing:
            log_event(log, "cluster_cube_missing", level=logging.WARNING, cube=cube_id,
                      reason="the directory gives it to this node, which has no such cube")
        self.not_served, self.missing = tuple(sorted(not_served)), tuple(missing)

    def _read_members(self) -> None:
        try:
            self._members = tuple(members(self.client))
        except EtcdError as e:
            if not self._read_error:
                log_event(log, "cluster_members_unread", level=logging.WARNING, error=str(e))
            self._read_error = str(e)
            return
        self._members_read = time.monotonic()
        self._read_error = ""

    def _follow_members(self) -> None:
        while not self._stop.wait(self.config.lease_seconds / 2):
            self._read_members()
            if self.mover is not None:
                try:
                    self.mover.tick()
                except Exception as e:  # never let the member reader die (Stats reads what it keeps)
                    log_event(log, "move_tick_failed", level=logging.WARNING, error=f"{type(e).__name__}: {e}")

    def status(self) -> ClusterStatus:
        reg = self.registration
        member = reg.member if reg is not None else None
        return ClusterStatus(
            node_name=self.config.node_name, address=member.address if member is not None else "",
            joined=member is not None, members=tuple(m.name for m in self._members),
            members_age_seconds=round(time.monotonic() - self._members_read, 3),
            lease_renewals=reg.renewals if reg is not None else 0,
            last_error=(reg.last_error if reg is not None else "") or self._read_error,
            not_served=self.not_served, missing=self.missing,
            moves_out=self.mover.moves_out if self.mover is not None else 0,
            moves_failed=self.mover.moves_failed if self.mover is not None else 0,
            moves_in=self.mover.moves_in if self.mover is not None else 0,
            member_records=self._members, cubes_per_node=self._cube_counts(), etcd_endpoints=tuple(self.config.etcd))

    def _cube_counts(self) -> tuple[tuple[str, int], ...]:
        counts: dict[str, int] = {}
        for entry in self.view.entries():
            counts[entry.owner] = counts.get(entry.owner, 0) + 1
        return tuple(sorted(counts.items()))

    def leave(self) -> None:
        self._stop.set()
        self.view.stop()
        if self._reader is not None:
            self._reader.join(timeout=self.config.lease_seconds)
            self._reader = None
        if self.registration is not None:
            self.registration.leave()


__all__ = ["ClusterNode", "ClusterStartError", "ClusterStatus"]
