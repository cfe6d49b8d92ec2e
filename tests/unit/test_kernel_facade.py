"""The facade's reads and guarded write, which layers outside kernel/ use instead of its tables and locks.

A kernel over a real RocksDB store and real indexes, with a deterministic embedder.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from activation_rig import HashEmbedder

from memosd.config import LimitsConfig
from memosd.errors import CubeNotFound
from memosd.index.cube_index import CubeIndex
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput
from memosd.store.records import ActivationRecord
from memosd.store.rocks import Batch, Store


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(Store(tmp_path / "store"), HashEmbedder(), CubeIndex.open, tmp_path / "index", LimitsConfig(),
               sync_commits=False)
    k.open()
    yield k
    k.close()


def commit(kernel: Kernel, cube: str, items: Sequence[ItemInput]) -> list[str]:
    mount_id = kernel.mount(cube, 0, True).record.mount_id
    item_ids, _ = kernel.write(mount_id, items)
    kernel.commit(mount_id, "", "test")
    kernel.unmount(mount_id)
    return item_ids


def activation_batch(kernel: Kernel, cube_id: str, items: list[list[object]]) -> tuple[Batch, ActivationRecord]:
    record = ActivationRecord(cube_id, "model-1", 1, "k" * 64, 1, 4, "float16", items, [1, 2], 0)
    batch = kernel.store.batch()
    batch.put_activation(record, [b"kv!!"])
    return batch, record


def test_visible_items_are_alive_at_the_revision_and_neither_archived_nor_expired(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    kept, archived, brief = commit(kernel, "c", [ItemInput("kept"), ItemInput("archived"),
                                                 ItemInput("brief", ttl_seconds=60)])
    kernel.set_item_state("c", [archived], "archived", "", "test")  # revision 2
    (later,) = commit(kernel, "c", [ItemInput("later")])  # revision 3
    now = time.time_ns()

    def visible(revision: int, at: int) -> set[str]:
        return {m.item_id for m in kernel.visible_items(cube_id, revision, at)}

    assert visible(1, now) == {kept, archived, brief}
    assert visible(2, now) == {kept, brief}
    assert visible(3, now) == {kept, brief, later}
    assert visible(3, now + 120 * 10**9) == {kept, later}  # the TTL has passed by then


def test_visible_items_of_a_freed_cube_are_refused(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    commit(kernel, "c", [ItemInput("one")])
    kernel.free_cube("c")
    with pytest.raises(CubeNotFound):
        kernel.visible_items(cube_id, 1, time.time_ns())


def test_write_unless_gone_writes_the_batch_and_runs_then(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    (item,) = commit(kernel, "c", [ItemInput("one")])
    batch, record = activation_batch(kernel, cube_id, [[item, 1]])
    ran: list[str] = []

    outcome = kernel.write_unless_gone(kernel.cube("c"), batch, [item], then=lambda: ran.append("then"))

    assert outcome == "written" and ran == ["then"]
    assert kernel.store.get_activation(cube_id, "model-1") == record


def test_write_unless_gone_drops_a_batch_naming_a_purged_item(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    purged, kept = commit(kernel, "c", [ItemInput("secret"), ItemInput("public")])
    batch, _ = activation_batch(kernel, cube_id, [[purged, 1], [kept, 1]])
    kernel.purge("c", [purged])  # meanwhile, as while an activation computed
    ran: list[str] = []

    outcome = kernel.write_unless_gone(kernel.cube("c"), batch, [purged, kept], then=lambda: ran.append("then"))

    assert outcome == "purged" and ran == []
    assert kernel.store.get_activation(cube_id, "model-1") is None


def test_write_unless_gone_drops_the_batch_of_a_freed_cube(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    (item,) = commit(kernel, "c", [ItemInput("one")])
    cube = kernel.cube("c")
    batch, _ = activation_batch(kernel, cube_id, [[item, 1]])
    kernel.free_cube("c")

    assert kernel.write_unless_gone(cube, batch, [item]) == "freed"
    assert kernel.store.get_activation(cube_id, "model-1") is None


def test_cube_lookups_follow_alloc_commit_and_free(kernel: Kernel) -> None:
    first = kernel.alloc_cube("first", "", {}).record.cube_id
    second = kernel.alloc_cube("second", "", {}, owner="alice").record.cube_id
    commit(kernel, "second", [ItemInput("one")])

    assert sorted(kernel.cube_ids()) == sorted([first, second])
    assert kernel.has_cube(second) and kernel.head(second) == 1 and kernel.head(first) == 0
    record = kernel.cube_record(second)
    assert record is not None and record.owner == "alice" and record.head == 1
    assert sorted(r.name for r in kernel.cube_records()) == ["first", "second"]

    kernel.free_cube("second")

    assert kernel.cube_ids() == [first] and not kernel.has_cube(second)
    assert kernel.head(second) == 0 and kernel.cube_record(second) is None
    assert [c.cube_id for c in kernel.open_cubes()] == [first]


def test_mounts_of_filters_by_cube_and_principal(kernel: Kernel) -> None:
    a = kernel.alloc_cube("a", "", {}).record.cube_id
    b = kernel.alloc_cube("b", "", {}).record.cube_id
    alice_a = kernel.mount("a", 0, True, "alice").record.mount_id
    bob_a = kernel.mount("a", 0, False, "bob").record.mount_id
    alice_b = kernel.mount("b", 0, False, "alice").record.mount_id

    def ids(cube_id: str = "", principal: str = "") -> set[str]:
        return {m.record.mount_id for m in kernel.mounts_of(cube_id, principal=principal)}

    assert ids(a) == {alice_a, bob_a} and ids(b) == {alice_b}
    assert ids(principal="alice") == {alice_a, alice_b}
    assert ids(a, "alice") == {alice_a} and ids() == {alice_a, bob_a, alice_b}
    assert kernel.mount_count() == 3
    kernel.unmount(bob_a)
    assert ids(a) == {alice_a} and kernel.mount_count() == 2
