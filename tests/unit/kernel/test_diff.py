"""Diff: what was added, changed and forgotten between two revisions, by item, in pages."""

from __future__ import annotations

import pytest

from memosd.errors import InvalidField, InvalidPageToken, RevisionNotFound
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemChange, ItemInput

from .rig import commit


@pytest.fixture
def two(kernel: Kernel) -> dict[str, str]:
    """Cube "c": revision 1 adds a, b, c; revision 2 edits a, forgets b, adds d. Ids by name."""
    kernel.alloc_cube("c", "", {})
    (a, b, c), _ = commit(kernel, "c", ["a one", "b one", "c one"])
    (d, _), _ = commit(kernel, "c", ["d two", ItemInput("a two", item_id=a)], forget=[b])
    return {"a": a, "b": b, "c": c, "d": d}


def summary(changes: list[ItemChange]) -> dict[str, tuple[str, str | None, str | None]]:
    """Item id -> (kind, text before, text after)."""
    return {ch.item_id: (ch.kind, ch.before.text if ch.before else None, ch.after.text if ch.after else None)
            for ch in changes}


def test_diff_reports_added_changed_and_forgotten_items(kernel: Kernel, two: dict[str, str]) -> None:
    page, older, newer = kernel.diff("c", 1, 2, 0, "")
    assert (older, newer) == (1, 2) and page.next_token == ""
    assert summary(page.entries) == {two["a"]: ("changed", "a one", "a two"),
                                     two["b"]: ("forgotten", "b one", None),
                                     two["d"]: ("added", None, "d two")}  # c did not change
    changed = next(ch for ch in page.entries if ch.kind == "changed")
    assert changed.before is not None and changed.after is not None
    assert (changed.before.born, changed.after.born) == (1, 2)


def test_diff_from_the_empty_cube_lists_every_item_at_the_newer_revision_as_added(kernel: Kernel,
                                                                                  two: dict[str, str]) -> None:
    page, _, newer = kernel.diff("c", 0, 0, 0, "")  # to_revision 0: HEAD
    assert newer == 2
    assert summary(page.entries) == {two["a"]: ("added", None, "a two"), two["c"]: ("added", None, "c one"),
                                     two["d"]: ("added", None, "d two")}


def test_a_revision_diffed_with_itself_has_no_changes(kernel: Kernel, two: dict[str, str]) -> None:
    assert kernel.diff("c", 2, 2, 0, "")[0].entries == []
    assert kernel.diff("c", 1, 1, 0, "")[0].entries == []


def test_diff_pages_cover_every_change_once_in_item_id_order(kernel: Kernel) -> None:
    kernel.alloc_cube("p", "", {})
    added, _ = commit(kernel, "p", [f"item {i}" for i in range(7)])
    pages: list[list[str]] = []
    token = ""
    while True:
        page, _, _ = kernel.diff("p", 0, 1, 3, token)
        pages.append([ch.item_id for ch in page.entries])
        token = page.next_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == sorted(added)


def test_a_diff_page_token_is_only_valid_for_the_same_revisions(kernel: Kernel) -> None:
    kernel.alloc_cube("p", "", {})
    commit(kernel, "p", [f"item {i}" for i in range(3)])
    commit(kernel, "p", ["one more"])
    token = kernel.diff("p", 0, 1, 1, "")[0].next_token
    assert token
    with pytest.raises(InvalidPageToken):
        kernel.diff("p", 0, 2, 1, token)


def test_diff_with_older_after_newer_is_invalid_field(kernel: Kernel, two: dict[str, str]) -> None:
    with pytest.raises(InvalidField) as caught:
        kernel.diff("c", 2, 1, 0, "")
    assert (caught.value.code, caught.value.reason) == ("INVALID_ARGUMENT", "INVALID_FIELD")
    assert caught.value.metadata["field"] == "from_revision"


def test_diff_to_a_revision_after_head_is_revision_not_found(kernel: Kernel, two: dict[str, str]) -> None:
    with pytest.raises(RevisionNotFound) as caught:
        kernel.diff("c", 1, 3, 0, "")
    assert caught.value.metadata["revision"] == "3" and caught.value.metadata["head"] == "2"
