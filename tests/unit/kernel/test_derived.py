"""Derived items against Kernel: a version records the items it was derived from (and the job that made it);
Read and ListItems return them; an edit never loses a source; purging a source purges what was derived from
it, staged copies and chains included, and the receipt says which."""

from __future__ import annotations

from pathlib import Path

import pytest

from memosd.errors import InvalidField, ItemNotFound
from memosd.kernel import validate
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput, Message

from .fakes import FakeIndexes
from .rig import commit, open_kernel, rw_mount

CUBE = "derived"


@pytest.fixture
def turns(kernel: Kernel) -> list[str]:
    kernel.alloc_cube(CUBE, "", {})
    mount = rw_mount(kernel, CUBE)
    try:
        return kernel.ingest(mount, [Message("Caroline", "I adopted a dog last week", "s1"),
                                     Message("Melanie", "I love pottery", "s1")]).item_ids
    finally:
        kernel.unmount(mount)


def test_a_derived_item_records_its_sources_and_job_and_reads_back(kernel: Kernel, turns: list[str]) -> None:
    (fact,), _ = commit(kernel, CUBE, [ItemInput("Caroline adopted a dog.", tags=("kind:event",),
                                                 derived_from=(turns[0],), derived_job="job_x")])
    mount = kernel.mount(CUBE, 0, False).record.mount_id
    (view,), _ = kernel.read(mount, [fact])
    assert (view.derived_from, view.derived_job) == ((turns[0],), "job_x")
    (turn,), _ = kernel.read(mount, [turns[0]])
    assert turn.derived_from == ()
    version = kernel.versions(kernel.cube(CUBE).cube_id, [(fact, view.born)])[0]
    assert version is not None and version.derived_from == [turns[0]]


def test_an_edit_keeps_the_sources_it_had_and_adds_new_ones(kernel: Kernel, turns: list[str]) -> None:
    (fact,), _ = commit(kernel, CUBE, [ItemInput("Caroline has a dog.", derived_from=(turns[0],))])
    commit(kernel, CUBE, [ItemInput("Caroline has a dog and loves pottery.", item_id=fact,
                                    derived_from=(turns[1],))])
    commit(kernel, CUBE, [ItemInput("Caroline has a dog named Max.", item_id=fact)])  # a plain edit
    mount = kernel.mount(CUBE, 0, False).record.mount_id
    (view,), _ = kernel.read(mount, [fact])
    assert view.derived_from == (turns[0], turns[1])


@pytest.mark.parametrize(("sources", "error"), [
    (("itm_nope",), InvalidField),  # not an item id at all
    (("itm_aaaaaaaaaaaaaaaaaaaa",), ItemNotFound),  # an id, not in the mount
    (("itm_aaaaaaaaaaaaaaaaaaaa",) * (validate.MAX_DERIVED_FROM + 1), InvalidField),
])
def test_bad_sources_are_refused(kernel: Kernel, turns: list[str], sources: tuple[str, ...],
                                 error: type[Exception]) -> None:
    mount = rw_mount(kernel, CUBE)
    with pytest.raises(error):
        kernel.write(mount, [ItemInput("Caroline has a dog.", derived_from=sources)])


def test_an_item_cannot_derive_from_itself(kernel: Kernel, turns: list[str]) -> None:
    mount = rw_mount(kernel, CUBE)
    with pytest.raises(InvalidField, match="the item itself"):
        kernel.write(mount, [ItemInput("Caroline said so.", item_id=turns[0], derived_from=(turns[0],))])


def test_purging_a_source_purges_what_was_derived_from_it(kernel: Kernel, turns: list[str]) -> None:
    (fact, other, chained, plain), result = commit(kernel, CUBE, [
        ItemInput("Caroline adopted a dog.", derived_from=(turns[0],)),
        ItemInput("Melanie loves pottery.", derived_from=(turns[1],)),
        ItemInput("Caroline has a pet.", derived_from=(turns[1],)),  # made a source below
        ItemInput("an unrelated note"),
    ])
    commit(kernel, CUBE, [ItemInput("Caroline has a pet dog.", item_id=chained, derived_from=(fact,))])
    reader = rw_mount(kernel, CUBE)
    (staged,), _ = kernel.write(reader, [ItemInput("Caroline is a dog owner.", derived_from=(chained,))])
    receipt = kernel.purge(CUBE, [turns[0]])
    assert receipt.item_ids == sorted([turns[0], fact, chained, staged])
    assert receipt.derived_item_ids == sorted([fact, chained, staged])
    assert [reader, staged] in receipt.staged
    mount = kernel.mount(CUBE, 0, False).record.mount_id
    seen, _ = kernel.read(mount, [turns[1], other, plain])
    assert {v.item_id for v in seen} == {turns[1], other, plain}
    # Still gone at the revision that made them, and in the stored receipt.
    assert result.revision is not None
    old = kernel.mount(CUBE, result.revision.number, False).record.mount_id
    with pytest.raises(ItemNotFound):
        kernel.read(old, [fact])
    assert kernel.purges(CUBE)[-1].derived_item_ids == receipt.derived_item_ids


def test_a_source_compacted_away_is_still_purgeable_with_all_that_came_of_it(kernel: Kernel, turns: list[str]
                                                                            ) -> None:
    """Forgetting a turn and compacting it away leaves what was derived from it (and from those): a purge of
    the turn's id must still reach every one of them, through the chain's compacted middle too."""
    (fact,), _ = commit(kernel, CUBE, [ItemInput("Caroline adopted a dog.", derived_from=(turns[0],))])
    (chained,), _ = commit(kernel, CUBE, [ItemInput("Caroline is a dog owner.", derived_from=(fact,))])
    commit(kernel, CUBE, forget=[turns[0], fact])
    commit(kernel, CUBE, ["a later note"])
    kernel.set_retention(CUBE, 1, 0)
    kernel.compact(CUBE)
    assert turns[0] not in kernel.cube(CUBE).catalog.by_item and fact not in kernel.cube(CUBE).catalog.by_item
    receipt = kernel.purge(CUBE, [turns[0]])
    assert receipt.derived_item_ids == [chained]
    mount = kernel.mount(CUBE, 0, False).record.mount_id
    with pytest.raises(ItemNotFound):
        kernel.read(mount, [chained])


def test_a_purge_without_derived_items_lists_none(kernel: Kernel, turns: list[str]) -> None:
    assert kernel.purge(CUBE, [turns[1]]).derived_item_ids == []


def test_the_cascade_survives_a_restart(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path, FakeIndexes())
    kernel.alloc_cube(CUBE, "", {})
    (turn,), _ = commit(kernel, CUBE, [ItemInput("I adopted a dog", speaker="Caroline")])
    (fact,), _ = commit(kernel, CUBE, [ItemInput("Caroline adopted a dog.", derived_from=(turn,))])
    kernel.close()
    again = open_kernel(tmp_path, FakeIndexes())  # the catalog is rebuilt from the stored versions
    try:
        assert again.purge(CUBE, [turn]).derived_item_ids == [fact]
    finally:
        again.close()


def test_an_archive_keeps_the_sources_and_the_cascade(kernel: Kernel, turns: list[str], tmp_path: Path) -> None:
    (fact,), _ = commit(kernel, CUBE, [ItemInput("Caroline adopted a dog.", derived_from=(turns[0],),
                                                 derived_job="job_x")])
    archive = tmp_path / "derived.memcube"
    with archive.open("wb") as out:
        kernel.export_cube(CUBE, out, with_kv=False)
    other = open_kernel(tmp_path / "other", FakeIndexes())
    try:
        other.import_cube(archive, "copy", "", lambda _: False)
        mount = other.mount("copy", 0, False).record.mount_id
        (view,), _ = other.read(mount, [fact])
        assert (view.derived_from, view.derived_job) == ((turns[0],), "job_x")
        assert other.purge("copy", [turns[0]]).derived_item_ids == [fact]
    finally:
        other.close()
