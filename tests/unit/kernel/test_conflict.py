"""Conflicts: a commit whose edits or forgets target a version HEAD no longer has is refused, staging kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from memosd.errors import CommitConflict
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput

from .fakes import FakeIndexes
from .rig import commit, head, items_at, listed, open_kernel, rw_mount


@pytest.fixture
def base(kernel: Kernel) -> dict[str, str]:
    """Cube "c" at revision 1 with items x and y; their ids by name."""
    kernel.alloc_cube("c", "", {})
    (x, y), _ = commit(kernel, "c", ["x one", "y one"])
    return {"x": x, "y": y}


def stage(kernel: Kernel, mount: str, change: str, item_id: str) -> None:
    """Stage an "edit" (new text) or a "forget" of the item."""
    if change == "edit":
        kernel.write(mount, [ItemInput(f"{item_id} edited in {mount}", item_id=item_id)])
    else:
        kernel.forget(mount, [item_id])


def test_the_second_edit_of_an_item_from_the_same_base_conflicts(kernel: Kernel, base: dict[str, str]) -> None:
    x = base["x"]
    first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
    kernel.write(first, [ItemInput("x by first", item_id=x)])
    kernel.write(second, [ItemInput("x by second", item_id=x)])
    kernel.commit(first, "", "first")

    with pytest.raises(CommitConflict) as caught:
        kernel.commit(second, "", "second")

    assert (caught.value.code, caught.value.reason) == ("ABORTED", "COMMIT_CONFLICT")
    assert caught.value.metadata["items"] == x and caught.value.metadata["head"] == "2"
    assert head(kernel, "c") == 2  # nothing committed
    assert items_at(kernel, "c", 2)[x] == "x by first"


def test_a_conflicting_commit_keeps_its_staging(kernel: Kernel, base: dict[str, str]) -> None:
    x, y = base["x"], base["y"]
    first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
    kernel.write(first, [ItemInput("x by first", item_id=x)])
    (z,), _ = kernel.write(second, [ItemInput("z by second")])
    kernel.write(second, [ItemInput("x by second", item_id=x)])
    kernel.forget(second, [y])
    kernel.commit(first, "", "first")

    with pytest.raises(CommitConflict):
        kernel.commit(second, "", "second")

    # The whole staging is kept, its append (which alone never conflicts) too, and the mount stays at its base.
    info = kernel.mount_info(kernel.mount_state(second))
    assert (info.staged_adds, info.staged_edits, info.staged_forgets) == (1, 1, 1)
    assert info.record.base == 1
    views, _ = kernel.read(second, [x, z])
    assert [(v.text, v.staged) for v in views] == [("x by second", True), ("z by second", True)]
    assert listed(kernel, second) == {x: "x by second", z: "z by second"}  # y forgotten in the staging
    # None of it reached the cube.
    assert items_at(kernel, "c", 2) == {x: "x by first", y: "y one"}


def test_the_kept_staging_is_still_there_after_a_restart_and_still_conflicts(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path, FakeIndexes())
    try:
        kernel.alloc_cube("c", "", {})
        (x,), _ = commit(kernel, "c", ["x one"])
        first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
        kernel.write(first, [ItemInput("x by first", item_id=x)])
        kernel.write(second, [ItemInput("x by second", item_id=x)])
        kernel.commit(first, "", "first")
        with pytest.raises(CommitConflict):
            kernel.commit(second, "", "second")
    finally:
        kernel.close()
    again = open_kernel(tmp_path, FakeIndexes())
    try:
        assert listed(again, second) == {x: "x by second"}
        with pytest.raises(CommitConflict):
            again.commit(second, "", "second")
        assert head(again, "c") == 2
    finally:
        again.close()


@pytest.mark.parametrize(("winner", "loser"), [("forget", "forget"), ("edit", "forget"), ("forget", "edit")])
def test_a_change_to_an_item_another_commit_changed_or_forgot_conflicts(kernel: Kernel, base: dict[str, str],
                                                                        winner: str, loser: str) -> None:
    x = base["x"]
    first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
    stage(kernel, first, winner, x)
    stage(kernel, second, loser, x)
    kernel.commit(first, "", "first")
    after_first = items_at(kernel, "c", 2)

    with pytest.raises(CommitConflict) as caught:
        kernel.commit(second, "", "second")

    assert caught.value.metadata["items"] == x
    assert head(kernel, "c") == 2 and items_at(kernel, "c", 2) == after_first
    info = kernel.mount_info(kernel.mount_state(second))
    assert (info.staged_edits, info.staged_forgets) == ((1, 0) if loser == "edit" else (0, 1))


def test_edits_of_different_items_from_the_same_base_both_commit(kernel: Kernel, base: dict[str, str]) -> None:
    x, y = base["x"], base["y"]
    first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
    kernel.write(first, [ItemInput("x by first", item_id=x)])
    kernel.write(second, [ItemInput("y by second", item_id=y)])

    one = kernel.commit(first, "", "first")
    two = kernel.commit(second, "", "second")

    assert one.revision is not None and two.revision is not None
    assert (one.revision.number, two.revision.number) == (2, 3)
    assert items_at(kernel, "c", 3) == {x: "x by first", y: "y by second"}
    assert items_at(kernel, "c", 2) == {x: "x by first", y: "y one"}


def test_appends_from_the_same_base_never_conflict(kernel: Kernel, base: dict[str, str]) -> None:
    first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
    (p,), _ = kernel.write(first, [ItemInput("p")])
    (q,), _ = kernel.write(second, [ItemInput("q")])
    kernel.commit(first, "", "first")
    kernel.commit(second, "", "second")
    assert set(items_at(kernel, "c", 3)) == {base["x"], base["y"], p, q}


def test_after_a_conflict_a_new_mount_can_redo_the_change_at_head(kernel: Kernel, base: dict[str, str]) -> None:
    x = base["x"]
    first, second = rw_mount(kernel, "c"), rw_mount(kernel, "c")
    kernel.write(first, [ItemInput("x by first", item_id=x)])
    kernel.write(second, [ItemInput("x by second", item_id=x)])
    kernel.commit(first, "", "first")
    with pytest.raises(CommitConflict):
        kernel.commit(second, "", "second")

    _, result = commit(kernel, "c", [ItemInput("x by second, again", item_id=x)])

    assert result.revision is not None and result.revision.changed == 1
    assert items_at(kernel, "c", 3)[x] == "x by second, again"
