"""Commit: a mount's staged writes and forgets become one revision at HEAD + 1."""

from __future__ import annotations

import pytest

from memosd.errors import MountReadOnly
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput

from .rig import commit, head, items_at, listed, record, rw_mount


@pytest.fixture
def base(kernel: Kernel) -> dict[str, str]:
    """Cube "c" at revision 1 with items a and b; their ids by name."""
    kernel.alloc_cube("c", "", {})
    (a, b), _ = commit(kernel, "c", ["alpha one", "beta one"])
    return {"a": a, "b": b}


def test_staged_writes_and_forgets_become_one_revision_and_head_advances(kernel: Kernel, base: dict[str, str]
                                                                         ) -> None:
    a, b = base["a"], base["b"]
    mount = rw_mount(kernel, "c")
    (c,), _ = kernel.write(mount, [ItemInput("gamma one")])
    kernel.write(mount, [ItemInput("alpha two", item_id=a)])
    kernel.forget(mount, [b])
    assert head(kernel, "c") == 1  # staging commits nothing

    result = kernel.commit(mount, "three changes", "tester")

    assert result.revision is not None and result.revision.number == 2
    assert result.head == 2 and head(kernel, "c") == 2
    assert [r.number for r in kernel.log("c", 0, "")[0].entries] == [2, 1]  # one revision for all three
    assert result.mount.record.base == 2 and result.mount.head == 2
    assert (result.mount.staged_adds, result.mount.staged_edits, result.mount.staged_forgets) == (0, 0, 0)
    # The mount now reads the committed versions, born at 2, not staged copies.
    views, _ = kernel.read(mount, [a, c])
    assert [(v.text, v.born, v.staged) for v in views] == [("alpha two", 2, False), ("gamma one", 2, False)]


def test_committed_items_are_visible_at_the_new_revision_and_not_the_old(kernel: Kernel, base: dict[str, str]
                                                                         ) -> None:
    a, b = base["a"], base["b"]
    (c, edited), _ = commit(kernel, "c", ["gamma one", ItemInput("alpha two", item_id=a)], forget=[b])
    assert edited == a  # an edit keeps the item's id

    assert items_at(kernel, "c", 2) == {a: "alpha two", c: "gamma one"}
    assert items_at(kernel, "c", 1) == {a: "alpha one", b: "beta one"}


def test_staged_changes_are_private_to_their_mount_until_the_commit(kernel: Kernel, base: dict[str, str]) -> None:
    a = base["a"]
    writer = rw_mount(kernel, "c")
    reader = kernel.mount("c", 0, False).record.mount_id  # at HEAD = 1
    (c,), _ = kernel.write(writer, [ItemInput("gamma one")])
    kernel.write(writer, [ItemInput("alpha two", item_id=a)])
    assert listed(kernel, writer) == {a: "alpha two", base["b"]: "beta one", c: "gamma one"}
    assert listed(kernel, reader) == {a: "alpha one", base["b"]: "beta one"}

    kernel.commit(writer, "", "tester")

    assert listed(kernel, reader) == {a: "alpha one", base["b"]: "beta one"}  # a mount keeps its base
    assert items_at(kernel, "c", 2) == listed(kernel, writer)


def test_the_revision_record_has_kind_author_message_and_counts(kernel: Kernel, base: dict[str, str]) -> None:
    a, b = base["a"], base["b"]
    _, result = commit(kernel, "c", ["gamma one", "delta one", ItemInput("alpha two", item_id=a)], forget=[b],
                       message="tidy up", author="ada")

    revision = result.revision
    assert revision is not None
    assert (revision.number, revision.parent, revision.kind) == (2, 1, "commit")
    assert (revision.author, revision.message) == ("ada", "tidy up")
    assert (revision.added, revision.changed, revision.forgotten) == (2, 1, 1)
    assert revision.item_count == 3 and revision.restored == 0 and not revision.compacted
    assert kernel.log("c", 1, "")[0].entries == [revision]  # the stored record is the one returned
    cube = record(kernel, "c")
    assert (cube.head, cube.item_count) == (2, 3)
    assert cube.version_count == 5  # a, b at 1; gamma, delta and alpha's edit at 2


def test_a_commit_without_an_author_is_recorded_as_anonymous(kernel: Kernel, base: dict[str, str]) -> None:
    _, result = commit(kernel, "c", ["gamma one"], author="")
    assert result.revision is not None and result.revision.author == "anonymous"


def test_an_empty_commit_makes_no_revision_and_moves_the_mount_to_head(kernel: Kernel, base: dict[str, str]
                                                                       ) -> None:
    behind = rw_mount(kernel, "c")  # at 1
    (c,), _ = commit(kernel, "c", ["gamma one"])  # HEAD moves to 2 through another mount
    log_before = kernel.log("c", 0, "")[0].entries

    result = kernel.commit(behind, "nothing staged", "tester")

    assert result.revision is None and result.head == 2
    assert result.mount.record.base == 2
    assert kernel.log("c", 0, "")[0].entries == log_before and head(kernel, "c") == 2
    assert c in listed(kernel, behind)  # it reads HEAD now


def test_a_read_only_mount_cannot_commit(kernel: Kernel, base: dict[str, str]) -> None:
    mount = kernel.mount("c", 0, False).record.mount_id
    with pytest.raises(MountReadOnly):
        kernel.commit(mount, "", "tester")
    assert head(kernel, "c") == 1
