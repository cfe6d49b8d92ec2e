"""Revisions, mounts, staging, conflicts, diff and rollback, through the real daemon."""

from __future__ import annotations

import pytest
from memos import Client, CommitConflict, ItemNotFound, MountReadOnly, RevisionNotFound
from memos.v1 import types_pb2 as t


def texts(items: list[t.Item]) -> list[str]:
    return sorted(i.text for i in items)


def test_commit_makes_numbered_revisions_and_old_reads_are_exact(client: Client, cube_name: str) -> None:
    cube = client.alloc_cube(cube_name)
    assert cube.head_revision == 0
    with client.mount(cube_name, writable=True) as m:
        [a] = m.write(["alpha"])
        assert m.commit("one").revision.number == 1
        [b] = m.write(["beta"])
        m.write([{"item_id": a, "text": "alpha v2"}])
        assert m.commit("two").revision.number == 2
        m.forget([b])
        rev3 = m.commit("three").revision
        assert (rev3.number, rev3.added, rev3.changed, rev3.forgotten, rev3.item_count) == (3, 0, 0, 1, 1)

    for revision, expected in ((1, ["alpha"]), (2, ["alpha v2", "beta"]), (3, ["alpha v2"])):
        with client.mount(cube_name, revision=revision) as ro:
            assert texts(list(ro.iter_items())) == expected
            assert ro.base_revision == revision
    log = list(client.log(cube_name))
    assert [r.number for r in log] == [3, 2, 1]
    assert [r.message for r in log] == ["three", "two", "one"]
    assert client.stat_cube(cube_name).item_count == 1


def test_staged_changes_are_private_until_commit(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as writer, client.mount(cube_name) as reader:
        [item_id] = writer.write(["draft"])
        assert [i.text for i in writer.read([item_id])] == ["draft"]
        assert writer.read([item_id])[0].staged
        with pytest.raises(ItemNotFound):
            reader.read([item_id])
        writer.commit()
        # The reader stays at its base revision (0) until it remounts.
        with pytest.raises(ItemNotFound):
            reader.read([item_id])
    with client.mount(cube_name) as fresh:
        assert fresh.read([item_id])[0].born_revision == 1


def test_log_paginates(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        for n in range(7):
            m.write([f"fact {n}"])
            m.commit(f"c{n}")
    assert [r.number for r in client.log(cube_name, page_size=3)] == [7, 6, 5, 4, 3, 2, 1]


def test_conflict_is_aborted_and_staging_kept(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        [item] = m.write(["the sky is green"])
        m.commit()
    with client.mount(cube_name, writable=True) as one, client.mount(cube_name, writable=True) as two:
        one.write([{"item_id": item, "text": "the sky is blue"}])
        two.write([{"item_id": item, "text": "the sky is grey"}])
        two.write(["an unrelated append"])
        one.commit("fix colour")
        with pytest.raises(CommitConflict) as caught:
            two.commit("conflicting fix")
        assert caught.value.code.name == "ABORTED"
        assert item in caught.value.message
        # Nothing was lost: the staging area is intact and still readable.
        assert sorted(i.text for i in two.iter_items()) == ["an unrelated append", "the sky is grey"]
        assert client.stat_cube(cube_name).head_revision == 2
        staged = {i.item_id: i.text for i in two.iter_items() if i.staged}
    with client.mount(cube_name) as head:
        assert texts(list(head.iter_items())) == ["the sky is blue"]
    # Resolving: re-apply the kept changes on a mount at the new HEAD.
    with client.mount(cube_name, writable=True) as again:
        again.write([{"item_id": i, "text": x} if i == item else x for i, x in staged.items()])
        assert again.commit("re-applied").revision.number == 3
        assert texts(list(again.iter_items())) == ["an unrelated append", "the sky is grey"]


def test_appends_from_two_mounts_never_conflict(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as one, client.mount(cube_name, writable=True) as two:
        one.write(["from one"])
        two.write(["from two"])
        assert one.commit().revision.number == 1
        assert two.commit().revision.number == 2
        assert two.base_revision == 2
    with client.mount(cube_name) as head:
        assert texts(list(head.iter_items())) == ["from one", "from two"]


def test_forget_conflicts_with_concurrent_edit(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        [item] = m.write(["x"])
        m.commit()
    with client.mount(cube_name, writable=True) as one, client.mount(cube_name, writable=True) as two:
        one.forget([item])
        two.write([{"item_id": item, "text": "x2"}])
        two.commit()
        with pytest.raises(CommitConflict):
            one.commit()


def test_diff_lists_added_changed_forgotten(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        keep, edit, drop = m.write(["keep", "edit me", "drop me"])
        m.commit()
        m.write([{"item_id": edit, "text": "edited"}])
        m.forget([drop])
        [new] = m.write(["new"])
        m.commit()
    changes = {c.item_id: c for c in client.diff(cube_name, 1, 2)}
    assert set(changes) == {edit, drop, new}
    assert changes[new].kind == t.CHANGE_KIND_ADDED and changes[new].after.text == "new"
    assert changes[edit].kind == t.CHANGE_KIND_CHANGED
    assert (changes[edit].before.text, changes[edit].after.text) == ("edit me", "edited")
    assert changes[drop].kind == t.CHANGE_KIND_FORGOTTEN and not changes[drop].HasField("after")
    assert keep not in changes
    # From the empty cube, everything alive at 2 is "added"; paging returns every change once.
    paged = list(client.diff(cube_name, 0, 2, page_size=1))
    assert sorted(c.after.text for c in paged) == ["edited", "keep", "new"]


def test_rollback_restores_old_content_as_a_new_revision(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        a, b = m.write(["a", "b"])
        m.commit()  # 1
        m.write([{"item_id": a, "text": "a2"}])
        m.forget([b])
        m.write(["c"])
        m.commit()  # 2
    revision = client.rollback(cube_name, 1, "undo")
    assert (revision.number, revision.kind, revision.restored_revision) == (3, t.REVISION_KIND_ROLLBACK, 1)
    assert (revision.added, revision.changed, revision.forgotten) == (1, 1, 1)
    with client.mount(cube_name) as head:
        items = {i.item_id: i.text for i in head.iter_items()}
    assert items == {a: "a", b: "b"}
    assert list(client.diff(cube_name, 1, 3)) == []
    assert [c.kind for c in client.diff(cube_name, 2, 3)].count(t.CHANGE_KIND_FORGOTTEN) == 1
    # History is kept: revision 2 still reads as it was.
    with client.mount(cube_name, revision=2) as old:
        assert texts(list(old.iter_items())) == ["a2", "c"]
    # Rolling back to the empty cube forgets everything.
    client.rollback(cube_name, 0)
    with client.mount(cube_name) as head:
        assert list(head.iter_items()) == []


def test_rollback_and_mount_refuse_future_revisions(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with pytest.raises(RevisionNotFound):
        client.rollback(cube_name, 5)
    with pytest.raises(RevisionNotFound):
        client.mount(cube_name, revision=1)


def test_read_only_mount_refuses_writes_and_forgets(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        [item] = m.write(["x"])
        m.commit()
    with client.mount(cube_name) as ro:
        with pytest.raises(MountReadOnly) as caught:
            ro.write(["y"])
        assert caught.value.code.name == "FAILED_PRECONDITION"
        with pytest.raises(MountReadOnly):
            ro.forget([item])
        with pytest.raises(MountReadOnly):
            ro.commit()
    with client.mount(cube_name) as head:
        assert texts(list(head.iter_items())) == ["x"]
