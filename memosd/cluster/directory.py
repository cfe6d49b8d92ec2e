"""The cube directory in etcd: which node owns each cube, at which epoch, and the cluster-wide names.

Keys (under ``root``, ``memosd/`` in a cluster):

  cubes/<cube_id>  JSON {owner, epoch, name, state, principal}: the owner node's name; the epoch, 1 at the
                   claim and +1 at each move; the cube's name ("" for none); its state ("active": served by
                   its owner; the move protocol may add others); the principal that owns the cube (absent in
                   an entry an older memosd wrote), so a ListCubes through another node can show that
                   principal its cube while the owner node is down
  names/<name>     the cube id holding the name: names are unique cluster-wide, as on one node

Every change is one txn, so the two keys never disagree and two nodes never both win:

  claim(cube, owner, name)        the cube key and the name key are both absent (create_revision == 0)
                                  -> both written, epoch 1
  move(cube, from, to, epoch)     a compare-and-swap: the entry read says ``from`` at ``epoch`` and its
                                  mod_revision is unchanged at the txn -> owner ``to`` at epoch + 1.
                                  Anything else (a stale epoch, another owner, a move in between) is
                                  StaleEpoch with the entry as it is: the caller lost, and must not write
  release(cube, owner, epoch)     the same compare -> both keys deleted (FreeCube)

The epoch is the fencing token of the move protocol (issue 18): export, import keeping the id, then this
CAS at epoch + 1, then delete on the old node; a node that finds its epoch stale stops writing the cube.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from memosd.cluster.etcd import Compare, Delete, EtcdClient, Get, KeyValue, Put, RangeResult, prefix_end
from memosd.errors import CubeNameTaken, CubeNotFound
from memosd.kernel.ids import CUBE_ID_RE, CUBE_NAME_RE

ROOT = "memosd/"
STATES = ("active",)
PAGE = 500  # entries per range call when listing: a large directory is read in bounded pieces


class CubeClaimed(Exception):
    """The cube id already has a directory entry (claimed twice, or by two nodes)."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(f"cube {entry.cube_id} is already claimed by {entry.owner!r} at epoch {entry.epoch}")
        self.entry = entry


class FenceFailed(Exception):
    """A move's extra compares (its fence on other keys) did not hold; the entry itself was unchanged."""


class StaleEpoch(Exception):
    """A move or release named an owner or an epoch that is not the entry's current one: it lost."""

    def __init__(self, entry: Entry, owner: str, epoch: int) -> None:
        super().__init__(f"cube {entry.cube_id} is owned by {entry.owner!r} at epoch {entry.epoch}, not by "
                         f"{owner!r} at epoch {epoch}: the directory changed first")
        self.entry = entry


@dataclass(frozen=True)
class Entry:
    cube_id: str
    owner: str
    epoch: int
    name: str = ""
    state: str = "active"
    mod_revision: int = 0  # etcd's revision of the entry's last change (the CAS compares it)
    principal: str = ""  # the cube's owning principal id; "" where unknown

    def record(self) -> bytes:
        doc = {"owner": self.owner, "epoch": self.epoch, "name": self.name, "state": self.state}
        if self.principal:
            doc["principal"] = self.principal
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def from_kv(cube_id: str, kv: KeyValue) -> Entry:
        doc = kv.json()
        return Entry(cube_id, str(doc["owner"]), int(doc["epoch"]), str(doc.get("name", "")),
                     str(doc.get("state", "active")), kv.mod_revision, str(doc.get("principal", "")))


def _check_cube_id(cube_id: str) -> None:
    if not CUBE_ID_RE.fullmatch(cube_id):
        raise ValueError(f"not a cube id: {cube_id!r}")


class Directory:
    def __init__(self, client: EtcdClient, *, root: str = ROOT) -> None:
        self.client = client
        self.cubes = root + "cubes/"
        self.names = root + "names/"

    def _cube_key(self, cube_id: str) -> str:
        return self.cubes + cube_id

    def _name_key(self, name: str) -> str:
        return self.names + name

    # -- reads -----------------------------------------------------------------------------------------

    def lookup(self, cube_id: str) -> Entry | None:
        kv = self.client.get(self._cube_key(cube_id))
        return None if kv is None else Entry.from_kv(cube_id, kv)

    def lookup_name(self, name: str) -> str | None:
        """The cube id holding ``name``, if any."""
        kv = self.client.get(self._name_key(name))
        return None if kv is None else kv.value.decode()

    def list(self, *, page: int = PAGE) -> list[Entry]:
        """Every entry, by cube id (read ``page`` entries at a time, each piece linearizable)."""
        return list(self._entries(page))

    def _entries(self, page: int) -> Iterator[Entry]:
        start, end = self.cubes.encode(), prefix_end(self.cubes)
        while True:
            found = self.client.range(start, range_end=end, limit=page)
            for kv in found.kvs:
                yield Entry.from_kv(kv.key[len(self.cubes):].decode(), kv)
            if not found.more or not found.kvs:
                return
            start = found.kvs[-1].key + b"\0"  # the next key after the last one read

    # -- changes (one txn each) ------------------------------------------------------------------------

    def claim(self, cube_id: str, owner: str, name: str = "", principal: str = "") -> Entry:
        """Enter a new cube, owned by ``owner`` at epoch 1, with its name if it has one. Raises
        CubeNameTaken (the name is held by another cube) or CubeClaimed (the id already has an entry)."""
        _check_cube_id(cube_id)
        if name and not CUBE_NAME_RE.fullmatch(name):
            raise ValueError(f"not a cube name: {name!r}")
        entry = Entry(cube_id, owner, 1, name, principal=principal)
        cube_key = self._cube_key(cube_id)
        compare = [Compare.create_revision(cube_key, "==", 0)]
        success = [Put(cube_key, entry.record())]
        failure = [Get(cube_key)]
        if name:
            compare.append(Compare.create_revision(self._name_key(name), "==", 0))
            success.append(Put(self._name_key(name), cube_id))
            failure.append(Get(self._name_key(name)))
        result = self.client.txn(compare, success, failure)
        if result.succeeded:
            return Entry(cube_id, owner, 1, name, entry.state, result.revision, principal)
        held = [r.kvs[0] if isinstance(r, RangeResult) and r.kvs else None for r in result.responses]
        if held[0] is not None:
            raise CubeClaimed(Entry.from_kv(cube_id, held[0]))
        # As on one node: the refusal says the name is in use, never by which cube.
        raise CubeNameTaken(f"the cube name {name!r} is in use in the cluster (cube names are shared by all "
                            "principals and nodes); pick another name", name=name)

    def move(self, cube_id: str, from_owner: str, to_owner: str, epoch: int,
             fence: Sequence[Compare] = ()) -> Entry:
        """Hand the cube from ``from_owner`` at ``epoch`` to ``to_owner`` at ``epoch + 1`` (the CAS).
        Raises StaleEpoch when the entry is not ``from_owner`` at ``epoch`` by the time of the txn, and
        FenceFailed when one of ``fence``'s compares (other keys: the target's member record) does not hold."""
        if from_owner == to_owner:
            raise ValueError(f"cube {cube_id}: a move from {from_owner!r} to itself")
        current = self._current(cube_id, from_owner, epoch)
        moved = Entry(cube_id, to_owner, epoch + 1, current.name, current.state, principal=current.principal)
        key = self._cube_key(cube_id)
        result = self.client.txn([Compare.mod_revision(key, "==", current.mod_revision), *fence],
                                 [Put(key, moved.record())], [Get(key)])
        if not result.succeeded:
            read = result.responses[0]
            if isinstance(read, RangeResult) and read.kvs and read.kvs[0].mod_revision == current.mod_revision:
                # The entry is as read: a fence compare failed (a member's record was made again).
                raise FenceFailed(f"cube {cube_id}: the move's fence did not hold (a member registered again)")
            raise self._lost(cube_id, read, from_owner, epoch)
        return Entry(cube_id, to_owner, epoch + 1, current.name, current.state, result.revision, current.principal)

    def touch(self, cube_id: str, owner: str, epoch: int) -> Entry:
        """Write the entry again, unchanged, if ``owner`` at ``epoch`` holds it: its mod_revision moves on, so
        a move whose txn was cut off (its outcome unknown) and is applied late can no longer succeed."""
        current = self._current(cube_id, owner, epoch)
        key = self._cube_key(cube_id)
        result = self.client.txn([Compare.mod_revision(key, "==", current.mod_revision)],
                                 [Put(key, current.record())], [Get(key)])
        if not result.succeeded:
            raise self._lost(cube_id, result.responses[0], owner, epoch)
        return replace(current, mod_revision=result.revision)

    def release(self, cube_id: str, owner: str, epoch: int) -> None:
        """Remove the cube and its name (FreeCube), if ``owner`` at ``epoch`` still holds it."""
        current = self._current(cube_id, owner, epoch)
        key = self._cube_key(cube_id)
        success: list[Put | Delete | Get] = [Delete(key)]
        if current.name:
            success.append(Delete(self._name_key(current.name)))
        result = self.client.txn([Compare.mod_revision(key, "==", current.mod_revision)], success, [Get(key)])
        if not result.succeeded:
            raise self._lost(cube_id, result.responses[0], owner, epoch)

    def _current(self, cube_id: str, owner: str, epoch: int) -> Entry:
        current = self.lookup(cube_id)
        if current is None:
            raise CubeNotFound(f"cube {cube_id} is not in the cluster's directory", cube_id=cube_id)
        if current.owner != owner or current.epoch != epoch:
            raise StaleEpoch(current, owner, epoch)
        return current

    def _lost(self, cube_id: str, read: object, owner: str, epoch: int) -> Exception:
        if isinstance(read, RangeResult) and read.kvs:
            return StaleEpoch(Entry.from_kv(cube_id, read.kvs[0]), owner, epoch)
        return CubeNotFound(f"cube {cube_id} left the cluster's directory meanwhile", cube_id=cube_id)


__all__ = ["ROOT", "STATES", "CubeClaimed", "Directory", "Entry", "FenceFailed", "StaleEpoch"]
