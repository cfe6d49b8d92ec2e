"""Rollback(R): a new revision whose content equals R's; the history before it stays as it was."""

from __future__ import annotations

import pytest

from memosd.errors import CommitConflict, InvalidField, RevisionCompacted, RevisionNotFound
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput

from .rig import commit, head, items_at, listed, rw_mount


@pytest.fixture
def three(kernel: Kernel) -> dict[str, str]:
    """Cube "c": 1 adds a, b; 2 edits a, adds c; 3 forgets b, edits c. Ids by name."""
    kernel.alloc_cube("c", "", {})
    (a, b), _ = commit(kernel, "c", ["a one", "b one"])
    (c, _), _ = commit(kernel, "c", ["c two", ItemInput("a two", item_id=a)])
    commit(kernel, "c", [ItemInput("c three", item_id=c)], forget=[b])
    return {"a": a, "b": b, "c": c}


def test_rollback_makes_a_new_revision_with_the_target_content(kernel: Kernel, three: dict[str, str]) -> None:
    before = {rev: items_at(kernel, "c", rev) for rev in (1, 2, 3)}

    revision = kernel.rollback("c", 1, "", "ada")

    assert (revision.number, revision.parent, revision.kind, revision.restored) == (4, 3, "rollback", 1)
    assert (revision.author, revision.message) == ("ada", "rollback to revision 1")
    # a changes back, b is revived, c (born after 1) is forgotten.
    assert (revision.added, revision.changed, revision.forgotten, revision.item_count) == (1, 1, 1, 2)
    assert head(kernel, "c") == 4
    assert items_at(kernel, "c", 4) == before[1]
    assert {rev: items_at(kernel, "c", rev) for rev in (1, 2, 3)} == before  # history untouched
    assert kernel.diff("c", 1, 4, 0, "")[0].entries == []  # the revived versions copy the target's content
    assert kernel.log("c", 1, "")[0].entries == [revision]


def test_rollback_to_a_middle_revision(kernel: Kernel, three: dict[str, str]) -> None:
    revision = kernel.rollback("c", 2, "back to two", "ada")
    assert revision.message == "back to two"
    assert items_at(kernel, "c", 4) == items_at(kernel, "c", 2)
    assert items_at(kernel, "c", 4) == {three["a"]: "a two", three["b"]: "b one", three["c"]: "c two"}


def test_rollback_to_revision_zero_empties_the_cube(kernel: Kernel, three: dict[str, str]) -> None:
    revision = kernel.rollback("c", 0, "", "ada")
    assert revision.item_count == 0 and revision.forgotten == 2
    assert items_at(kernel, "c", 4) == {}


def test_a_mount_that_edited_an_item_the_rollback_changed_conflicts(kernel: Kernel, three: dict[str, str]) -> None:
    mount = rw_mount(kernel, "c")
    kernel.write(mount, [ItemInput("a edited at three", item_id=three["a"])])
    kernel.rollback("c", 1, "", "ada")
    with pytest.raises(CommitConflict):
        kernel.commit(mount, "", "tester")
    assert listed(kernel, mount)[three["a"]] == "a edited at three"


def test_rollback_to_head_or_past_it_is_refused(kernel: Kernel, three: dict[str, str]) -> None:
    with pytest.raises(InvalidField) as at_head:
        kernel.rollback("c", 3, "", "ada")
    assert at_head.value.metadata["field"] == "to_revision"
    with pytest.raises(RevisionNotFound):
        kernel.rollback("c", 4, "", "ada")
    assert head(kernel, "c") == 3


def test_rollback_to_a_compacted_revision_is_revision_compacted(kernel: Kernel, three: dict[str, str]) -> None:
    kernel.set_retention("c", 1, 0)
    assert kernel.compact("c").oldest_revision == 3

    for target in (1, 2):
        with pytest.raises(RevisionCompacted) as caught:
            kernel.rollback("c", target, "", "ada")
        assert (caught.value.code, caught.value.reason) == ("OUT_OF_RANGE", "REVISION_COMPACTED")
        assert caught.value.metadata["revision"] == str(target) and caught.value.metadata["oldest"] == "3"
    assert head(kernel, "c") == 3
    # Revision 0, the empty cube, always stays.
    assert kernel.rollback("c", 0, "", "ada").number == 4
