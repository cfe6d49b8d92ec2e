"""Moving a cube to another node (MoveCube), driven by its owner; and the target's side of it.

The owner (this node, the directory's owner at epoch e) runs, in a thread of its own so that a caller who
goes away cannot cut a move in half:

  1 draining   new read-write mounts are refused (CUBE_MOVING); the open ones may still write and commit
               until they close, for up to ``drain_seconds``; still open then, the move is refused
  2 frozen     no change at all is taken (commits, rollbacks, item states, purge, settings, FreeCube:
               CUBE_MOVING), checked under the cube's lock: every acknowledged commit is in what follows
  - out mark   (cluster/marks.py) written: a restart after a crash knows this copy was being moved
  3 exported   the archive (with the KV caches) in a spool file
  4 received   the target holds it under the same id, with an "in" mark, *not served*: the directory
               still names the owner, so every call on the cube (routed by it) reaches the owner
  5 switched   the directory CAS: (owner, e) -> (target, e + 1), fenced on the target's member record
               being the one read before step 4 (a target that restarted since, and so dropped its
               received copy, makes the CAS fail). From here the target owns the cube
  6 settled    the target, told so, checks the directory itself, clears its mark and takes changes
  7 done       the old copy is deleted here (its read-only mounts close with it)

Any failure before 5 gives the move up: the target is told to settle (it drops its copy, having checked
the directory does not name it), the mark goes and the cube takes changes again. A CAS whose outcome is
unknown (etcd cut off after the txn was sent) is resolved before anything else: the entry is read until
etcd answers; if it still names this node at e it is written again unchanged (``Directory.touch``), so a
late-applied CAS can no longer succeed, and the move is given up; if it names the target the move goes on.
The cube stays frozen meanwhile: never two owners, at the price of a cube unavailable while etcd is.
Crash points are handled at the next start (``ClusterNode.reconcile``, by the marks).
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from memosd.cluster.crash import crash_point
from memosd.cluster.directory import Directory, Entry, FenceFailed, StaleEpoch
from memosd.cluster.etcd import Compare, EtcdClient, EtcdError
from memosd.cluster.marks import MoveMark, MoveMarks
from memosd.cluster.membership import member_key
from memosd.cluster.view import DirectoryView
from memosd.errors import ClusterUnavailable, CubeNotFound, InvalidField, MemosError, MoveRefused
from memosd.kernel.kernel import CubeState, Kernel
from memosd.kernel.portable import ImportResult
from memosd.kernel.types import CubeInfo
from memosd.logfmt import log_event

log = logging.getLogger("memosd.cluster")

DEFAULT_DRAIN_SECONDS = 10.0
MAX_DRAIN_SECONDS = 300.0
RESOLVE_SECONDS = 0.5  # between reads of the entry while a CAS's outcome is unknown
EXPORT_PREFIX = "move-"


class MovePeer(Protocol):
    """The calls the owner makes on the target (syscalls/move_peer.py: ReceiveCube, SettleCube over gRPC)."""

    def receive(self, address: str, cube_id: str, from_node: str, epoch: int, owner_revision: int,
                archive: Path) -> int:
        """Send the archive; returns the HEAD revision the target received."""

    def settle(self, address: str, cube_id: str) -> bool:
        """The target keeps (True) or drops the cube, by the directory."""


@dataclass(frozen=True)
class MoveStep:
    step: str
    from_node: str
    to_node: str
    epoch: int
    elapsed_seconds: float
    archive_bytes: int = 0
    cube: CubeInfo | None = None


class _Aborted(Exception):
    """The move is given up before the switch (the cause is chained)."""


class CubeMover:
    def __init__(self, kernel: Kernel, client: EtcdClient, view: DirectoryView, node: str, marks: MoveMarks,
                 spool: Path, drop: Callable[[str], None], *, spool_prefix: str = EXPORT_PREFIX) -> None:
        self.kernel = kernel
        self.client = client
        self.directory = Directory(client)
        self.view = view
        self.node = node
        self.marks = marks
        self.spool = spool
        self.spool_prefix = spool_prefix  # the wiring's: spool files it deletes at start if a crash left them
        self.drop = drop  # delete this node's copy only (services/cubes.py CubeRemoval.free, local)
        self.moves_out = 0
        self.moves_failed = 0
        self.moves_in = 0
        self._lock = threading.Lock()
        self._receiving: set[str] = set()  # cube ids a ReceiveCube is importing now

    # -- the owner's side -------------------------------------------------------------------------------
    def move(self, ref: str, to_node: str, drain_seconds: float, peer: MovePeer) -> Iterator[MoveStep]:
        """Start the move in its own thread and yield its steps as they are done; its error, if any, is
        raised here after the steps before it."""
        if not 0 <= drain_seconds <= MAX_DRAIN_SECONDS or drain_seconds != drain_seconds:
            raise InvalidField(f"drain_seconds is {drain_seconds:g}; use 0 (the default, "
                               f"{DEFAULT_DRAIN_SECONDS:g} s) to {MAX_DRAIN_SECONDS:g}", field="drain_seconds")
        steps: queue.Queue[MoveStep | BaseException | None] = queue.Queue()

        def run() -> None:
            try:
                self._move(ref, to_node, drain_seconds, peer, steps.put)
                steps.put(None)
            except BaseException as error:  # handed to the caller, who raises it
                steps.put(error)

        threading.Thread(target=run, name=f"move-{ref}", daemon=True).start()
        while True:
            item = steps.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _lookup(self, cube_id: str) -> Entry | None:
        try:
            return self.directory.lookup(cube_id)
        except EtcdError as e:
            raise ClusterUnavailable(f"the cluster directory cannot be read ({e}): the move is refused until "
                                     "etcd answers") from None

    def _move(self, ref: str, to_node: str, drain_seconds: float, peer: MovePeer,
              emit: Callable[[MoveStep], None]) -> None:
        started = time.monotonic()
        cube = self.kernel.cube(ref)
        cube_id = cube.cube_id
        if to_node == self.node:
            raise MoveRefused(f"cube {cube.record.name!r} is on node {to_node!r} already", cube=cube_id)
        target = self.view.owner(to_node)
        if not target.live:
            raise MoveRefused(f"node {to_node!r} is not a live cluster member", to=to_node)
        entry = self._lookup(cube_id)
        if entry is None or entry.owner != self.node:
            raise MoveRefused(f"the directory does not give cube {cube_id} to this node ({self.node!r}) but "
                              f"{entry.owner if entry else 'to no node'!r}: only its owner moves it", cube=cube_id)
        epoch = entry.epoch
        drain = min(drain_seconds or DEFAULT_DRAIN_SECONDS, MAX_DRAIN_SECONDS)

        def step(name: str, at: int = epoch, size: int = 0, info: CubeInfo | None = None) -> None:
            emit(MoveStep(name, self.node, to_node, at, round(time.monotonic() - started, 3), size, info))

        self.kernel.begin_move(cube_id, to_node)
        log_event(log, "move_started", cube=cube_id, to=to_node, epoch=epoch)
        switched: Entry | None = None
        try:
            step("draining")
            deadline = time.monotonic() + drain
            while self.kernel.read_write_mounts(cube_id) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.kernel.freeze_move(cube):
                raise MoveRefused(f"cube {cube.record.name!r} still has {self.kernel.read_write_mounts(cube_id)} "
                                  f"open read-write mounts after {drain:g} s (drain_seconds): unmount them and "
                                  "move it again; nothing changed", cube=cube_id)
            step("frozen")
            crash_point("move:after_freeze")
            self.marks.put(MoveMark(cube_id, "out", to_node, epoch))
            self.spool.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.spool, prefix=self.spool_prefix) as out:
                info, summary = self.kernel.export_cube(cube_id, out, with_kv=True)
                out.flush()
                step("exported", size=summary.size_bytes, info=info)
                crash_point("move:after_export")
                member, own = self.client.get(member_key(to_node)), self.client.get(member_key(self.node))
                if member is None or own is None:
                    raise MoveRefused(f"node {to_node if member is None else self.node!r} is not a live member "
                                      "now: the move is given up", to=to_node)
                head = peer.receive(target.address, cube_id, self.node, epoch, own.create_revision, Path(out.name))
            if head != info.record.head:
                raise MoveRefused(f"node {to_node!r} received HEAD {head}, not {info.record.head}", cube=cube_id)
            step("received", size=summary.size_bytes, info=info)
            crash_point("move:after_import")
            switched = self._switch(cube_id, to_node, epoch, member.create_revision, own.create_revision)
        except BaseException as error:
            self._give_up(cube, to_node, target.address, peer, error)
            raise
        self.view.noted(switched)
        step("switched", switched.epoch)
        crash_point("move:after_switch")
        try:
            peer.settle(target.address, cube_id)
        except Exception as error:  # the target settles itself once its view names it (ClusterNode's tick)
            log_event(log, "move_settle_failed", level=logging.WARNING, cube=cube_id, to=to_node, error=str(error))
        step("settled", switched.epoch)
        crash_point("move:after_settle")
        self.drop(cube_id)
        self.marks.remove(cube_id)
        self.moves_out += 1
        log_event(log, "move_done", cube=cube_id, to=to_node, epoch=switched.epoch,
                  seconds=round(time.monotonic() - started, 3))
        step("done", switched.epoch)

    def _switch(self, cube_id: str, to_node: str, epoch: int, target_revision: int, own_revision: int) -> Entry:
        """The CAS, fenced on both member records; an unknown outcome is resolved (module doc)."""
        fence = [Compare.create_revision(member_key(to_node), "==", target_revision),
                 Compare.create_revision(member_key(self.node), "==", own_revision)]
        try:
            return self.directory.move(cube_id, self.node, to_node, epoch, fence)
        except (StaleEpoch, FenceFailed, CubeNotFound) as e:
            raise MoveRefused(f"the directory switch was refused: {e}", cube=cube_id) from None
        except EtcdError as e:
            log_event(log, "move_switch_unknown", level=logging.WARNING, cube=cube_id, error=str(e))
        while True:  # the txn may or may not have been applied: find out, and make it final
            try:
                entry = self.directory.lookup(cube_id)
                if entry is not None and entry.owner == to_node and entry.epoch == epoch + 1:
                    return entry
                if entry is not None and entry.owner == self.node and entry.epoch == epoch:
                    self.directory.touch(cube_id, self.node, epoch)
                    raise MoveRefused(f"etcd did not apply the directory switch of cube {cube_id} (cut off); "
                                      "the cube stays here", cube=cube_id)
                raise MoveRefused(f"cube {cube_id}'s directory entry changed during the move: {entry}", cube=cube_id)
            except StaleEpoch:
                continue  # the late CAS landed between the read and the touch: read again
            except EtcdError:
                time.sleep(RESOLVE_SECONDS)

    def _give_up(self, cube: CubeState, to_node: str, address: str, peer: MovePeer, error: BaseException) -> None:
        try:
            peer.settle(address, cube.cube_id)  # it checks the directory (this node's) and drops its copy
        except Exception as e:  # down: it drops the copy at its restart (its mark), or at the next attempt
            log_event(log, "move_target_not_told", level=logging.DEBUG, cube=cube.cube_id, error=str(e))
        self.marks.remove(cube.cube_id)
        self.kernel.end_move(cube)
        self.moves_failed += 1
        reason = error.message if isinstance(error, MemosError) else f"{type(error).__name__}: {error}"
        log_event(log, "move_given_up", level=logging.WARNING, cube=cube.cube_id, to=to_node, reason=reason)

    # -- the target's side ------------------------------------------------------------------------------
    def receive(self, cube_id: str, from_node: str, epoch: int, owner_revision: int,
                load: Callable[[], ImportResult]) -> ImportResult:
        """ReceiveCube: ``load`` imports the archive (kernel.import_cube, moved_from), after these checks."""
        with self._lock:
            if cube_id in self._receiving:
                raise MoveRefused(f"cube {cube_id} is being received already", cube=cube_id)
            self._receiving.add(cube_id)
        try:
            return self._receive(cube_id, from_node, epoch, owner_revision, load)
        finally:
            with self._lock:
                self._receiving.discard(cube_id)

    def _receive(self, cube_id: str, from_node: str, epoch: int, owner_revision: int,
                 load: Callable[[], ImportResult]) -> ImportResult:
        entry = self._lookup(cube_id)
        if entry is None or entry.owner != from_node or entry.epoch != epoch:
            raise MoveRefused(f"the directory gives cube {cube_id} to {entry.owner if entry else 'no node'!r} at "
                              f"epoch {entry.epoch if entry else 0}, not to {from_node!r} at {epoch}", cube=cube_id)
        if self.kernel.has_cube(cube_id):
            mark = self.marks.get(cube_id)
            if mark is None or mark.role != "in":
                raise MoveRefused(f"this node ({self.node!r}) already holds a copy of cube {cube_id} that is not "
                                  "an unfinished move's: an operator must remove it first", cube=cube_id)
            self.drop(cube_id)  # an earlier attempt's copy, never switched to (the entry names the owner)
        self.marks.put(MoveMark(cube_id, "in", from_node, epoch, owner_revision))
        try:
            result = load()
        except BaseException:
            self.marks.remove(cube_id)
            raise
        crash_point("receive:after_import")
        return result

    def settle(self, cube_id: str) -> bool:
        """SettleCube: keep the received cube if the directory names this node, else drop it."""
        crash_point("settle:before")
        entry = self._lookup(cube_id)
        if entry is not None and entry.owner == self.node:
            if self.kernel.has_cube(cube_id):
                cube = self.kernel.cube(cube_id)
                if cube.move_direction == "from":
                    self.kernel.end_move(cube)
                    self.moves_in += 1
                    log_event(log, "move_received", cube=cube_id, epoch=entry.epoch)
            self.view.noted(entry)
            mark = self.marks.get(cube_id)
            if mark is not None and mark.role == "in":  # never an "out" mark: a move of it from here, now
                self.marks.remove(cube_id)
            return True
        mark = self.marks.get(cube_id)
        if mark is not None and mark.role == "in":
            if self.kernel.has_cube(cube_id):
                self.drop(cube_id)
            self.marks.remove(cube_id)
            log_event(log, "move_received_dropped", cube=cube_id,
                      reason=f"the directory names {entry.owner if entry else 'no node'!r}")
        return False

    def tick(self) -> None:
        """Every half lease (ClusterNode's member reader): settle each received cube the directory now gives
        to this node (the owner's SettleCube may never come: it died after the switch), and drop each whose
        sender's member record changed (the switch is fenced on it, so it can no longer happen)."""
        for mark in self.marks.all():
            with self._lock:
                if mark.role != "in" or mark.cube_id in self._receiving:
                    continue
            entry = self.view.entry(mark.cube_id)
            try:
                if entry is None or entry.owner != self.node:
                    sender = self.client.get(member_key(mark.peer))
                    if sender is not None and sender.create_revision == mark.owner_revision:
                        continue  # the move may still switch to this node: wait for its owner
                self.settle(mark.cube_id)
            except (MemosError, EtcdError) as e:
                log_event(log, "move_settle_failed", level=logging.DEBUG, cube=mark.cube_id, error=str(e))

    def recover(self) -> set[str]:
        """At join, before the join rule: resolve every mark a crash left (cluster/marks.py) by the directory;
        returns the cube ids whose copy was dropped here. etcd errors propagate (the join fails)."""
        dropped: set[str] = set()
        for mark in self.marks.all():
            entry = self.directory.lookup(mark.cube_id)
            if entry is not None and entry.owner == self.node:
                self.marks.remove(mark.cube_id)  # in: the cube is ours now; out: the switch never happened
                continue
            # in: never switched to this node; out: the switch happened (the entry names another node)
            if self.kernel.has_cube(mark.cube_id) and (mark.role == "in" or entry is not None):
                self.drop(mark.cube_id)
                dropped.add(mark.cube_id)
                log_event(log, "move_recovered", cube=mark.cube_id, role=mark.role,
                          owner=entry.owner if entry else "", action="dropped the local copy")
            self.marks.remove(mark.cube_id)
        return dropped


__all__ = ["DEFAULT_DRAIN_SECONDS", "MAX_DRAIN_SECONDS", "CubeMover", "MovePeer", "MoveStep"]
