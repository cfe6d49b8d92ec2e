"""Unit tests of the kernel's revision planning, on a hand-built catalog (no store, no index)."""

from __future__ import annotations

import numpy as np
import pytest

from memosd.errors import CommitConflict
from memosd.kernel import history
from memosd.kernel.catalog import Catalog, VersionMeta
from memosd.store.records import StagedRecord


def catalog_of(*versions: tuple[str, int, int, int]) -> Catalog:
    """(item_id, vkey, born, died) tuples."""
    cat = Catalog()
    for item_id, vkey, born, died in versions:
        cat.add(VersionMeta(vkey, item_id, born, died, frozenset(), 0, vkey))
    return cat


def test_visibility_follows_born_and_died() -> None:
    cat = catalog_of(("a", 1, 1, 3), ("a", 2, 3, 0), ("b", 3, 2, 4))
    assert cat.visible("a", 0) is None
    assert cat.visible("a", 2).vkey == 1  # type: ignore[union-attr]
    assert cat.visible("a", 3).vkey == 2  # type: ignore[union-attr]
    assert cat.item_ids_at(3) == ["a", "b"] and cat.item_ids_at(4) == ["a"]


def test_edits_of_a_version_head_replaced_conflict_but_appends_do_not() -> None:
    cat = catalog_of(("a", 1, 1, 2), ("a", 2, 2, 0), ("b", 3, 1, 0))
    stale_edit = {"a": StagedRecord("a", "edit", 1, "x")}
    with pytest.raises(CommitConflict) as caught:
        history.check_conflicts(cat, 2, stale_edit)
    assert caught.value.metadata["items"] == "a"
    history.check_conflicts(cat, 2, {"a": StagedRecord("a", "edit", 2, "x"), "n": StagedRecord("n", "add", 0, "y")})
    with pytest.raises(CommitConflict):
        history.check_conflicts(catalog_of(("b", 3, 1, 2)), 2, {"b": StagedRecord("b", "forget", 1)})


def test_plan_commit_ends_replaced_versions_and_numbers_new_ones() -> None:
    cat = catalog_of(("a", 1, 1, 0), ("b", 2, 1, 0))
    staging = {"a": StagedRecord("a", "edit", 1, "a2"), "b": StagedRecord("b", "forget", 1),
               "c": StagedRecord("c", "add", 0, "c1")}
    vectors = {"a": np.zeros(2), "c": np.ones(2)}
    plan = history.plan_commit(cat, 1, staging, vectors, next_vkey=3)
    assert (plan.added, plan.changed, plan.forgotten) == (1, 1, 1)
    assert sorted(m.vkey for m in plan.ended) == [1, 2]
    assert [(v.item_id, v.vkey, v.born) for v, _ in plan.born] == [("a", 3, 2), ("c", 4, 2)]


def test_rollback_plan_and_diff_by_content_identity() -> None:
    # a edited at 2, b forgotten at 2, c added at 2.
    cat = catalog_of(("a", 1, 1, 2), ("a", 2, 2, 0), ("b", 3, 1, 2), ("c", 4, 2, 0))
    plan, revive = history.plan_rollback(cat, 2, 1)
    assert (plan.added, plan.changed, plan.forgotten) == (1, 1, 1)
    assert sorted(m.vkey for m in revive) == [1, 3]
    # After the rollback (revision 3), copies of vkeys 1 and 3 carry their content ids.
    for meta in plan.ended:
        meta.died = 3
    cat.add(VersionMeta(5, "a", 3, 0, frozenset(), 0, 1))
    cat.add(VersionMeta(6, "b", 3, 0, frozenset(), 0, 3))
    assert history.diff(cat, 1, 3, "", 10) == ([], False)
    changes, more = history.diff(cat, 2, 3, "", 2)
    assert [(c.kind, c.item_id) for c in changes] == [("changed", "a"), ("added", "b")] and more
