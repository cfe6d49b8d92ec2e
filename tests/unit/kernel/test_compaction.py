"""Compaction: a retention policy deletes the versions no kept revision can see and closes older revisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from memosd.errors import CubeFrozen, RevisionCompacted
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput

from .fakes import FakeIndexes
from .rig import Clock, commit, head, items_at, open_kernel, record


def build(kernel: Kernel) -> dict[str, str]:
    """Cube "c": 1 adds a, b, c; 2 edits a; 3 forgets b; 4 edits c. Ids by name.

    With oldest kept revision 3, a's first version (died at 2) and b (died at 3) are seen by no kept
    revision; c's first version (died at 4) is still seen by 3."""
    kernel.alloc_cube("c", "", {})
    (a, b, c), _ = commit(kernel, "c", ["a one", "b one", "c one"])
    commit(kernel, "c", [ItemInput("a two", item_id=a)])
    commit(kernel, "c", forget=[b])
    commit(kernel, "c", [ItemInput("c four", item_id=c)])
    return {"a": a, "b": b, "c": c}


def stored(kernel: Kernel, cube: str) -> set[tuple[str, int]]:
    """(item id, born) of every version in the store."""
    return {(v.item_id, v.born) for v in kernel.store.iter_versions(record(kernel, cube).cube_id)}


def compacted_flags(kernel: Kernel, cube: str) -> dict[int, bool]:
    return {r.number: r.compacted for r in kernel.log(cube, 0, "")[0].entries}


def test_keep_last_deletes_versions_no_kept_revision_sees(kernel: Kernel, indexes: FakeIndexes) -> None:
    ids = build(kernel)
    a, b, c = ids["a"], ids["b"], ids["c"]
    kept = {rev: items_at(kernel, "c", rev) for rev in (3, 4)}
    vkeys = {(v.item_id, v.born): v.vkey for v in kernel.store.iter_versions(record(kernel, "c").cube_id)}
    kernel.set_retention("c", 2, 0)

    result = kernel.compact("c")

    assert (result.oldest_revision, result.revisions_compacted, result.versions_removed) == (3, 2, 2)
    assert stored(kernel, "c") == {(a, 2), (c, 1), (c, 4)}  # (a, 1) and (b, 1) are gone
    assert record(kernel, "c").version_count == 3 and record(kernel, "c").compacted_below == 3
    vectors = kernel.store.get_vectors(record(kernel, "c").cube_id, [vkeys[(a, 1)], vkeys[(b, 1)], vkeys[(c, 1)]])
    assert [v is None for v in vectors] == [True, True, False]
    index = indexes.of(record(kernel, "c").cube_id)
    assert index.removed == {vkeys[(a, 1)], vkeys[(b, 1)]}
    assert {rev: items_at(kernel, "c", rev) for rev in (3, 4)} == kept  # the kept revisions read as before


def test_compaction_marks_the_older_revisions_compacted_and_keeps_their_log_entries(kernel: Kernel) -> None:
    build(kernel)
    kernel.set_retention("c", 2, 0)
    kernel.compact("c")
    assert compacted_flags(kernel, "c") == {4: False, 3: False, 2: True, 1: True}
    assert [r.added for r in kernel.log("c", 0, "")[0].entries] == [0, 0, 0, 3]  # counts as recorded


def test_reads_mounts_and_diffs_of_compacted_revisions_are_revision_compacted(kernel: Kernel) -> None:
    build(kernel)
    kernel.set_retention("c", 2, 0)
    kernel.compact("c")

    for revision in (1, 2):
        for writable in (False, True):
            with pytest.raises(RevisionCompacted) as caught:
                kernel.mount("c", revision, writable)
            assert (caught.value.code, caught.value.reason) == ("OUT_OF_RANGE", "REVISION_COMPACTED")
            assert caught.value.metadata["oldest"] == "3" and caught.value.metadata["head"] == "4"
        with pytest.raises(RevisionCompacted):
            kernel.diff("c", revision, 4, 0, "")
    with pytest.raises(RevisionCompacted):
        kernel.diff("c", 0, 2, 0, "")  # revision 0 stays readable, 2 does not
    assert kernel.diff("c", 3, 4, 0, "")[0].entries[0].kind == "changed"
    assert len(kernel.diff("c", 0, 3, 0, "")[0].entries) == 2


def test_compacting_again_with_nothing_new_to_drop_changes_nothing(kernel: Kernel) -> None:
    build(kernel)
    kernel.set_retention("c", 2, 0)
    kernel.compact("c")
    again = kernel.compact("c")
    assert (again.oldest_revision, again.revisions_compacted, again.versions_removed) == (3, 0, 0)


def test_a_later_compaction_drops_only_what_became_unreachable_since(kernel: Kernel) -> None:
    ids = build(kernel)
    kernel.set_retention("c", 2, 0)
    kernel.compact("c")
    commit(kernel, "c", ["e five"])  # HEAD 5: keep_last 2 now keeps 4 and 5

    later = kernel.compact("c")

    # Revision 3 is newly compacted (1 and 2 were already); c's first version (died at 4) goes.
    assert (later.oldest_revision, later.revisions_compacted, later.versions_removed) == (4, 1, 1)
    assert compacted_flags(kernel, "c") == {5: False, 4: False, 3: True, 2: True, 1: True}
    assert (ids["c"], 1) not in stored(kernel, "c")


def test_without_a_retention_policy_compaction_keeps_everything(kernel: Kernel) -> None:
    ids = build(kernel)
    result = kernel.compact("c")
    assert (result.oldest_revision, result.revisions_compacted, result.versions_removed) == (1, 0, 0)
    assert items_at(kernel, "c", 1) == {ids["a"]: "a one", ids["b"]: "b one", ids["c"]: "c one"}


def test_an_open_mount_keeps_its_revision(kernel: Kernel) -> None:
    ids = build(kernel)
    pinned = kernel.mount("c", 2, False).record.mount_id
    kernel.set_retention("c", 1, 0)

    assert kernel.compact("c").oldest_revision == 2
    assert {v.item_id for v in kernel.read(pinned, [ids["a"], ids["b"]])[0]} == {ids["a"], ids["b"]}

    kernel.unmount(pinned)
    assert kernel.compact("c").oldest_revision == 4


def test_keep_seconds_keeps_the_revisions_younger_than_the_window(kernel: Kernel, clock: Clock) -> None:
    kernel.alloc_cube("c", "", {})
    for i in range(4):  # revisions at t, t+100 s, t+200 s, t+300 s
        if i:
            clock.advance(100)
        commit(kernel, "c", [f"item {i}"])
    kernel.set_retention("c", 0, 150)

    assert kernel.compact("c").oldest_revision == 3  # now t+300 s: 3 and 4 are under 150 s old
    clock.advance(100)  # now t+400 s: only 4 is, and HEAD is kept whatever its age
    assert kernel.compact("c").oldest_revision == 4
    clock.advance(10_000)
    assert kernel.compact("c").oldest_revision == 4
    with pytest.raises(RevisionCompacted):
        kernel.mount("c", 3, False)


@pytest.mark.parametrize(("keep_last", "keep_seconds", "oldest"), [
    (3, 150, 2),  # keep_last keeps 2-4, keep_seconds 3-4
    (1, 250, 2),  # keep_last keeps 4, keep_seconds 2-4 (revision 2 is 200 s old)
    (2, 50, 3),  # keep_last keeps 3-4, keep_seconds only 4
])
def test_a_revision_either_rule_keeps_is_kept(kernel: Kernel, clock: Clock, keep_last: int, keep_seconds: float,
                                              oldest: int) -> None:
    kernel.alloc_cube("c", "", {})
    for i in range(4):  # revisions at t, t+100 s, t+200 s, t+300 s; now is t+300 s
        if i:
            clock.advance(100)
        commit(kernel, "c", [f"item {i}"])
    kernel.set_retention("c", keep_last, keep_seconds)
    assert kernel.compact("c").oldest_revision == oldest


def test_compaction_is_refused_on_a_frozen_cube(kernel: Kernel) -> None:
    build(kernel)
    kernel.set_retention("c", 1, 0)
    kernel.set_frozen("c", True)
    with pytest.raises(CubeFrozen):
        kernel.compact("c")
    assert record(kernel, "c").compacted_below == 0
    assert head(kernel, "c") == 4 and items_at(kernel, "c", 1)


def test_compaction_survives_a_reopen(tmp_path: Path) -> None:
    indexes = FakeIndexes()
    kernel = open_kernel(tmp_path, indexes)
    try:
        ids = build(kernel)
        kernel.set_retention("c", 2, 0)
        kernel.compact("c")
        kept = items_at(kernel, "c", 3)
    finally:
        kernel.close()
    again = open_kernel(tmp_path, indexes)
    try:
        with pytest.raises(RevisionCompacted):
            again.mount("c", 2, False)
        assert items_at(again, "c", 3) == kept
        assert stored(again, "c") == {(ids["a"], 2), (ids["c"], 1), (ids["c"], 4)}
        # The reopened (empty) index was caught up from the store: the kept versions only.
        assert len(indexes.of(record(again, "c").cube_id).vectors) == 3
    finally:
        again.close()
