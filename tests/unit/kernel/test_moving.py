"""A cube that moves between cluster nodes (the kernel's side of cluster/move.py): what is refused in each
phase, and a received cube (moved_from) that keeps its id, name and owner and takes no change until the
move ends. The protocol itself runs against real daemons and etcd in tests/cluster/test_move.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from memosd.errors import CubeMoving, MoveRefused
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput

from .fakes import FakeIndexes
from .rig import commit, head, open_kernel, rw_mount


def test_draining_refuses_new_read_write_mounts_only_and_the_freeze_waits_for_open_ones(kernel: Kernel) -> None:
    kernel.alloc_cube("notes", "", {})
    held_item = commit(kernel, "notes", ["one"])[0][0]
    held = rw_mount(kernel, "notes")
    cube = kernel.begin_move("notes", "beta")
    with pytest.raises(CubeMoving, match="moving to cluster node 'beta': a read-write mount is refused") as refused:
        rw_mount(kernel, "notes")
    assert refused.value.metadata == {"cube": cube.cube_id, "to": "beta"}
    with pytest.raises(CubeMoving, match="another move"):
        kernel.begin_move("notes", "gamma")
    kernel.write(held, [ItemInput("written while draining")])  # the open mount still writes and commits
    kernel.commit(held, "drained", "tester")
    kernel.mount("notes", 0, False)  # reads go on
    assert not kernel.freeze_move(cube)  # an open read-write mount: not frozen, nothing changed
    kernel.write(held, [ItemInput("still open")])
    kernel.unmount(held)
    assert kernel.freeze_move(cube)
    for refused_call in (lambda: kernel.rollback("notes", 1, "back", "t"),
                         lambda: kernel.set_item_state("notes", [held_item], "archived", "", "t"),
                         lambda: kernel.purge("notes", ["itm_x"]),
                         lambda: kernel.set_frozen("notes", True),
                         lambda: kernel.free_cube("notes"),
                         lambda: kernel.compact("notes")):
        with pytest.raises(CubeMoving):
            refused_call()
    assert head(kernel, "notes") == 2 and kernel.moving() == [cube.cube_id]
    kernel.end_move(cube)  # given up: it takes changes again
    commit(kernel, "notes", ["after"])
    assert head(kernel, "notes") == 3 and kernel.moving() == []


def test_a_received_cube_keeps_its_id_name_and_owner_and_takes_no_change_until_settled(
        kernel: Kernel, tmp_path: Path) -> None:
    source = kernel.alloc_cube("moved", "", {}, owner="principal_a")
    commit(kernel, "moved", ["kept across the move"])
    archive = tmp_path / "moved.cube"
    with archive.open("wb") as out:
        kernel.export_cube("moved", out, with_kv=False)
    target = open_kernel(tmp_path / "target", FakeIndexes())
    try:
        result = target.import_cube(archive, "", "", lambda _: False, moved_from="alpha",
                                    cube_id=source.record.cube_id)
        record = result.cube.record
        assert (record.cube_id, record.name, record.owner, record.head) == (
            source.record.cube_id, "moved", "principal_a", 1)
        with pytest.raises(CubeMoving, match="arriving from cluster node 'alpha'"):
            rw_mount(target, "moved")
        with pytest.raises(MoveRefused, match="already holds cube"):  # a second copy of the same id
            target.import_cube(archive, "", "", lambda _: False, moved_from="alpha", cube_id=source.record.cube_id)
        target.end_move(target.cube("moved"))
        commit(target, "moved", ["the new owner's"])
        assert head(target, "moved") == 2
    finally:
        target.close()
