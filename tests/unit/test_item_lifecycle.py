"""Lifecycle in process: memory blocks leave archived and expired items out; one pass of the lifecycle
loop expires, audits and purges (with a fake audit sink); compaction leaves the indexes holding only
what is kept, and survives a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from activation_rig import Rig, open_rig

import memosd.activation.activator as activator_module
import memosd.kernel.clock as kernel_clock
from memosd.activation import select
from memosd.errors import RevisionCompacted
from memosd.governance.audit import AuditEntry
from memosd.kernel.types import ItemInput
from memosd.services.lifecycle import LifecycleLoop
from memosd.store.records import PurgeReceipt


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, "none")
    yield r
    r.close()


def _commit(rig: Rig, cube: str, items: list[ItemInput]) -> list[str]:
    mount = rig.kernel.mount(cube, 0, True).record.mount_id
    ids, _ = rig.kernel.write(mount, items)
    rig.kernel.commit(mount, "add", "test")
    rig.kernel.unmount(mount)
    return ids


class _ActivatorTime:
    """The time module as the activator sees it, with ``time_ns`` under the test's control: whether an item's TTL
    has passed is then the test's to say, not the machine's speed."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def time_ns(self) -> int:
        return self.now_ns

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def test_memory_blocks_leave_archived_and_expired_items_out(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _ActivatorTime(kernel_clock.now_ns())  # before the write: the TTL cannot have passed
    monkeypatch.setattr(activator_module, "time", clock)
    rig.kernel.alloc_cube("blocks", "", {})
    kept, archived, brief = _commit(rig, "blocks", [ItemInput("kept"), ItemInput("archived"),
                                                     ItemInput("brief", ttl_seconds=1)])
    rig.kernel.set_item_state("blocks", [archived], "archived", "", "test")
    cube = rig.kernel.cube("blocks")
    refs, texts, _ = rig.activator.block_items(cube, cube.head, select.ALL)
    assert [i for i, _ in refs] == [kept, brief] and texts == ["kept", "brief"]
    clock.now_ns = kernel_clock.now_ns() + 1_050_000_000  # past the TTL, before the loop has committed it
    refs, _, _ = rig.activator.block_items(cube, cube.head, select.ALL)
    assert [i for i, _ in refs] == [kept]  # already left out


def test_set_item_state_changes_nothing_for_items_already_in_that_state(rig: Rig) -> None:
    rig.kernel.alloc_cube("noop", "", {})
    (item,) = _commit(rig, "noop", [ItemInput("x")])
    assert rig.kernel.set_item_state("noop", [item], "active", "", "test") is None
    assert rig.kernel.cube("noop").head == 1


class _Audit:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    def append(self, entry: AuditEntry) -> None:
        self.entries.append(entry)


def test_one_loop_pass_expires_then_purges_after_the_grace_and_audits_both(rig: Rig,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [kernel_clock.now_ns()]
    monkeypatch.setattr(kernel_clock, "now_ns", lambda: clock[0])  # the loop's time moves only when told
    rig.kernel.alloc_cube("ttl", "", {})
    (brief, lasting) = _commit(rig, "ttl", [ItemInput("brief", ttl_seconds=1), ItemInput("lasting")])
    audit = _Audit()
    erased: list[list[str]] = []

    def erase(cube: str, item_ids: list[str]) -> PurgeReceipt:
        erased.append(item_ids)
        return rig.kernel.purge(cube, item_ids)

    loop = LifecycleLoop(rig.kernel, audit, erase, interval=60, grace_seconds=0.5)
    loop.tick()
    assert rig.kernel.cube("ttl").head == 1 and not audit.entries  # nothing due yet
    clock[0] += 1_050_000_000  # past the TTL
    loop.tick()  # expired, but the grace has not passed yet
    cube = rig.kernel.cube("ttl")
    assert cube.head == 2 and cube.catalog.visible(brief, 2).state == "expired"  # type: ignore[union-attr]
    assert [(e.method, e.principal_id, e.revision, e.item_ids) for e in audit.entries] == [
        ("Lifecycle.Expire", "", 2, [brief])]
    assert not erased
    clock[0] += 500_000_000  # past the grace
    loop.tick()
    assert erased == [[brief]] and rig.kernel.cube("ttl").catalog.visible(brief, 1) is None
    assert [e.method for e in audit.entries] == ["Lifecycle.Expire", "Lifecycle.Purge"]
    assert audit.entries[1].item_ids == [brief] and audit.entries[1].artifacts[0].startswith("purge:")
    assert rig.kernel.cube("ttl").catalog.visible(lasting, 2) is not None


def test_the_loop_does_not_commit_expiry_to_a_frozen_cube(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.kernel.alloc_cube("cold", "", {})
    _commit(rig, "cold", [ItemInput("brief", ttl_seconds=1)])
    rig.kernel.set_frozen("cold", True)
    later = kernel_clock.now_ns() + 1_050_000_000
    monkeypatch.setattr(kernel_clock, "now_ns", lambda: later)  # past the TTL, without waiting for it
    audit = _Audit()
    LifecycleLoop(rig.kernel, audit, lambda c, i: rig.kernel.purge(c, i), interval=60, grace_seconds=0).tick()
    assert rig.kernel.cube("cold").head == 1 and not audit.entries


def test_compaction_leaves_the_indexes_holding_only_kept_versions_and_survives_a_restart(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, "none")
    rig.kernel.alloc_cube("annals", "", {})
    (item,) = _commit(rig, "annals", [ItemInput("alpha one")])
    for text in ("alpha two", "alpha three"):
        _commit(rig, "annals", [ItemInput(text, item_id=item)])
    cube = rig.kernel.cube("annals")
    old = [m.vkey for m in cube.catalog.by_item[item] if m.died]
    (live,) = [m.vkey for m in cube.catalog.by_item[item] if not m.died]
    rig.kernel.set_retention("annals", 1, 0.0)
    result = rig.kernel.compact("annals")
    assert (result.revisions_compacted, result.versions_removed, result.oldest_revision) == (2, 2, 3)
    cube = rig.kernel.cube("annals")
    assert len(cube.index.dense_missing(np.array(old, dtype=np.uint64))) == len(old)  # gone from USearch
    assert not len(cube.index.dense_missing(np.array([live], dtype=np.uint64)))
    assert [k for k, _ in cube.index.lexical_search("alpha", 10)] == [live]  # and from tantivy
    rig.close()

    reopened = open_rig(tmp_path, "none")
    try:
        cube = reopened.kernel.cube("annals")
        assert [m.vkey for m in cube.catalog.by_item[item]] == [live] and cube.record.compacted_below == 3
        with pytest.raises(RevisionCompacted):
            reopened.kernel.mount("annals", 2, False)
        assert [r.compacted for r in reopened.kernel.store.iter_revisions(cube.cube_id, newest=3)] == [
            False, True, True]
    finally:
        reopened.close()


def test_the_catalog_lists_the_live_versions_with_a_ttl() -> None:
    from memosd.kernel.catalog import Catalog, VersionMeta

    catalog = Catalog()
    catalog.add(VersionMeta(1, "a", 1, 2, frozenset(), 0, 1, expire_ns=5))  # replaced at 2 by a TTL-less one
    catalog.add(VersionMeta(2, "a", 2, 0, frozenset(), 0, 1))
    catalog.add(VersionMeta(3, "b", 1, 0, frozenset(), 0, 2, expire_ns=9))
    catalog.add(VersionMeta(4, "c", 1, 0, frozenset(), 0, 3))
    assert [m.vkey for m in catalog.alive_with_ttl(1)] == [1, 3]
    assert [m.vkey for m in catalog.alive_with_ttl(2)] == [3]
    catalog.remove_item("b")
    assert list(catalog.alive_with_ttl(2)) == []
