"""Search through the kernel over the fake indexes: a mount finds what its revision and staging hold, only that."""

from __future__ import annotations

import pytest

from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput

from .rig import commit, found, rw_mount, search


@pytest.fixture
def history(kernel: Kernel) -> dict[str, str]:
    """Cube "c": 1 adds the aardvark and the badger; 2 edits the aardvark and forgets the badger."""
    kernel.alloc_cube("c", "", {})
    (aardvark, badger), _ = commit(kernel, "c", ["the aardvark digs burrows", "the badger sleeps all day"])
    commit(kernel, "c", [ItemInput("the aardvark eats termites", item_id=aardvark)], forget=[badger])
    return {"aardvark": aardvark, "badger": badger}


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_a_mount_finds_the_versions_of_its_revision(kernel: Kernel, history: dict[str, str], mode: str) -> None:
    aardvark, badger = history["aardvark"], history["badger"]
    old = kernel.mount("c", 1, False).record.mount_id
    new = kernel.mount("c", 2, False).record.mount_id

    assert found(kernel, old, "the badger sleeps all day", mode)[0] == badger
    assert badger not in found(kernel, new, "the badger sleeps all day", mode)
    assert found(kernel, new, "the aardvark eats termites", mode) == [aardvark]  # one hit: the badger is gone
    hits, _ = kernel.read(new, [aardvark])
    assert hits[0].text == "the aardvark eats termites"


def test_a_search_returns_the_version_its_revision_sees(kernel: Kernel, history: dict[str, str]) -> None:
    old = kernel.mount("c", 1, False).record.mount_id
    assert [(h.item.item_id, h.item.text) for h in search(kernel, old, "aardvark", "lexical")] == [
        (history["aardvark"], "the aardvark digs burrows")]


def test_staged_items_are_found_only_in_their_own_mount(kernel: Kernel, history: dict[str, str]) -> None:
    writer = rw_mount(kernel, "c")
    other = kernel.mount("c", 0, False).record.mount_id
    (capybara,), _ = kernel.write(writer, [ItemInput("the capybara swims")])
    kernel.forget(writer, [history["aardvark"]])

    assert found(kernel, writer, "the capybara swims", "dense")[0] == capybara
    assert found(kernel, writer, "capybara", "lexical") == [capybara]
    assert found(kernel, writer, "aardvark", "lexical") == []  # forgotten in its staging
    assert found(kernel, other, "capybara", "lexical") == []
    assert found(kernel, other, "aardvark", "lexical") == [history["aardvark"]]

    kernel.commit(writer, "", "tester")
    fresh = kernel.mount("c", 0, False).record.mount_id
    assert found(kernel, fresh, "capybara", "lexical") == [capybara]
    assert found(kernel, other, "capybara", "lexical") == []  # still at revision 2
