"""memosd.cluster.directory against the real 3-member etcd: each test has a directory root of its own."""

from __future__ import annotations

import threading

import pytest

from memosd.cluster.directory import CubeClaimed, Directory, Entry, FenceFailed, StaleEpoch
from memosd.cluster.etcd import Compare, EtcdClient, Put
from memosd.errors import CubeNameTaken, CubeNotFound
from memosd.kernel.ids import CUBE_PREFIX, new_id


@pytest.fixture
def directory(client: EtcdClient, prefix: str) -> Directory:
    return Directory(client, root=prefix)


def _cube() -> str:
    return new_id(CUBE_PREFIX)


def test_claim_lookup_and_the_keys_it_writes(directory: Directory, client: EtcdClient, prefix: str) -> None:
    cube = _cube()
    entry = directory.claim(cube, "node-a", "notes")
    assert (entry.cube_id, entry.owner, entry.epoch, entry.name, entry.state) == (cube, "node-a", 1, "notes", "active")
    assert directory.lookup(cube) == entry
    assert directory.lookup_name("notes") == cube
    kv = client.get(prefix + "cubes/" + cube)
    assert kv is not None and kv.json() == {"owner": "node-a", "epoch": 1, "name": "notes", "state": "active"}
    assert directory.lookup(_cube()) is None and directory.lookup_name("other") is None

    unnamed = directory.claim(_cube(), "node-b")
    assert unnamed.name == "" and directory.lookup(unnamed.cube_id) == unnamed

    owned = directory.claim(_cube(), "node-a", "owned", principal="prn_abc")
    assert directory.lookup(owned.cube_id) == owned and owned.principal == "prn_abc"
    kv = client.get(prefix + "cubes/" + owned.cube_id)
    assert kv is not None and kv.json()["principal"] == "prn_abc"
    directory.release(owned.cube_id, "node-a", 1)
    assert [e.cube_id for e in directory.list()] == sorted([cube, unnamed.cube_id])


def test_names_are_unique_and_a_refused_claim_writes_nothing(directory: Directory) -> None:
    first = directory.claim(_cube(), "node-a", "shared")
    second = _cube()
    with pytest.raises(CubeNameTaken, match="'shared' is in use") as taken:
        directory.claim(second, "node-b", "shared")
    assert first.cube_id not in str(taken.value)  # as on one node: never which cube holds it
    assert directory.lookup(second) is None  # one txn: the cube key was not written either
    assert directory.lookup_name("shared") == first.cube_id

    with pytest.raises(CubeClaimed, match="already claimed by 'node-a' at epoch 1") as claimed:
        directory.claim(first.cube_id, "node-b", "another")
    assert claimed.value.entry == first
    assert directory.lookup_name("another") is None
    for bad_id, bad_name in (("cube_X", ""), ("notacube", ""), (_cube(), "bad name"), (_cube(), "-x")):
        with pytest.raises(ValueError):
            directory.claim(bad_id, "node-a", bad_name)


def test_concurrent_claims_of_one_name_have_one_winner(directory: Directory) -> None:
    barrier = threading.Barrier(6)
    won: list[str] = []
    refused: list[str] = []

    def claim(node: str) -> None:
        cube = _cube()
        barrier.wait()
        try:
            directory.claim(cube, node, "contended")
            won.append(cube)
        except CubeNameTaken:
            refused.append(cube)

    threads = [threading.Thread(target=claim, args=(f"node-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert directory.lookup_name("contended") == won[0]
    assert [e.cube_id for e in directory.list()] == won


def test_move_is_a_cas_on_the_epoch(directory: Directory) -> None:
    cube = _cube()
    directory.claim(cube, "node-a", "moving", principal="prn_abc")
    moved = directory.move(cube, "node-a", "node-b", 1)
    assert (moved.owner, moved.epoch, moved.name, moved.principal) == ("node-b", 2, "moving", "prn_abc")
    assert directory.lookup(cube) == moved
    assert directory.lookup_name("moving") == cube

    with pytest.raises(StaleEpoch, match="owned by 'node-b' at epoch 2, not by 'node-a' at epoch 1") as stale:
        directory.move(cube, "node-a", "node-c", 1)  # the old owner, at the old epoch
    assert stale.value.entry == moved
    with pytest.raises(StaleEpoch):
        directory.move(cube, "node-b", "node-c", 1)  # the right owner at a wrong epoch
    with pytest.raises(StaleEpoch):
        directory.move(cube, "node-c", "node-a", 2)  # the right epoch, not the owner
    assert directory.lookup(cube) == moved  # nothing changed

    again = directory.move(cube, "node-b", "node-c", 2)
    assert (again.owner, again.epoch) == ("node-c", 3)
    with pytest.raises(CubeNotFound):
        directory.move(_cube(), "node-a", "node-b", 1)
    with pytest.raises(ValueError, match="to itself"):
        directory.move(cube, "node-c", "node-c", 3)


def test_concurrent_moves_at_one_epoch_have_one_winner(directory: Directory) -> None:
    cube = _cube()
    directory.claim(cube, "node-a")
    barrier = threading.Barrier(6)
    won: list[Entry] = []
    lost: list[str] = []

    def move(to: str) -> None:
        barrier.wait()
        try:
            won.append(directory.move(cube, "node-a", to, 1))
        except StaleEpoch:
            lost.append(to)

    threads = [threading.Thread(target=move, args=(f"node-{i}",)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5, (won, lost)
    current = directory.lookup(cube)
    assert current is not None and current.epoch == 2 and current.owner == won[0].owner


def test_release_frees_the_cube_and_its_name(directory: Directory) -> None:
    cube = _cube()
    directory.claim(cube, "node-a", "freed")
    directory.move(cube, "node-a", "node-b", 1)
    with pytest.raises(StaleEpoch):
        directory.release(cube, "node-a", 1)  # the old owner cannot free it
    assert directory.lookup(cube) is not None
    directory.release(cube, "node-b", 2)
    assert directory.lookup(cube) is None and directory.lookup_name("freed") is None
    with pytest.raises(CubeNotFound):
        directory.release(cube, "node-b", 2)
    assert directory.claim(_cube(), "node-c", "freed").epoch == 1  # the name is free again


def test_list_reads_in_pages(directory: Directory) -> None:
    cubes = sorted(directory.claim(_cube(), f"node-{i % 3}").cube_id for i in range(23))
    assert [e.cube_id for e in directory.list(page=5)] == cubes
    assert [e.cube_id for e in directory.list(page=23)] == cubes
    assert {e.owner for e in directory.list(page=7)} == {"node-0", "node-1", "node-2"}


def test_a_fenced_move_fails_when_a_fence_key_changed_and_touch_voids_an_older_cas(
        directory: Directory, client: EtcdClient, prefix: str) -> None:
    """MoveCube's switch (cluster/move.py): fenced on the members' records, and made final by touch."""
    cube = directory.claim(_cube(), "node-a", "fenced")
    member = prefix + "members/node-b"
    client.put(member, "{}")
    revision = client.get(member).create_revision  # type: ignore[union-attr]
    client.delete(member)
    client.put(member, "{}")  # node-b registered again: a new record
    with pytest.raises(FenceFailed):
        directory.move(cube.cube_id, "node-a", "node-b", 1, [Compare.create_revision(member, "==", revision)])
    assert directory.lookup(cube.cube_id) == cube  # nothing changed

    # A CAS read before a touch (a txn whose outcome was unknown, applied late) can no longer succeed.
    touched = directory.touch(cube.cube_id, "node-a", 1)
    assert (touched.owner, touched.epoch) == ("node-a", 1) and touched.mod_revision > cube.mod_revision
    key = prefix + "cubes/" + cube.cube_id
    late = client.txn([Compare.mod_revision(key, "==", cube.mod_revision)],
                      [Put(key, Entry(cube.cube_id, "node-b", 2, "fenced").record())], [])
    assert not late.succeeded
    fresh = client.get(member).create_revision  # type: ignore[union-attr]
    moved = directory.move(cube.cube_id, "node-a", "node-b", 1, [Compare.create_revision(member, "==", fresh)])
    assert (moved.owner, moved.epoch) == ("node-b", 2)
    with pytest.raises(StaleEpoch):
        directory.touch(cube.cube_id, "node-a", 1)
