"""Planning adapter changes: a cube's adapter is versioned like an item, one per revision at most.

A cube keeps every version of its adapter (``AdapterRecord``, born at one
revision, dead from a later one). A revision changes the adapter when a commit
had one staged (an import, or a removal), when a rollback restores another
one, or when a training job commits its result. These functions decide what
changes; the kernel writes it in the revision's batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memosd.errors import CommitConflict
from memosd.kernel.state import CubeState
from memosd.store.records import AdapterRecord, StagedAdapterRecord


@dataclass(frozen=True)
class AdapterPlan:
    """The adapter version that stops being current, and the one that becomes current."""

    ended: AdapterRecord | None
    born: AdapterRecord | None

    @property
    def digest_after(self) -> str:
        return self.born.digest if self.born is not None else ""


def _same(a: AdapterRecord | None, b: AdapterRecord | None) -> bool:
    return (a.digest if a else "") == (b.digest if b else "")


def plan_staged(cube: CubeState, head: int, staged: StagedAdapterRecord | None) -> AdapterPlan | None:
    """The change a mount's staged adapter makes at revision head + 1; None when it changes nothing.

    Like an edit of an item: HEAD's adapter must still be the one the mount saw,
    or it is a conflict (the staging area is kept).
    """
    if staged is None:
        return None
    current = cube.adapter_at(head)
    if (current.born if current else 0) != staged.base_born:
        raise CommitConflict(
            f"HEAD (revision {head}) changed the cube's adapter since this mount staged its adapter change. "
            "Nothing was committed and the staging area is kept: mount again, re-apply the change, and commit",
            head=head, item="adapter")
    wanted = staged.version()
    return plan_to(current, wanted, head + 1)


def plan_to(current: AdapterRecord | None, wanted: AdapterRecord | None, revision: int) -> AdapterPlan | None:
    """Make ``wanted`` (a new or an old version's content) current at ``revision``; None if it already is."""
    if _same(current, wanted):
        return None
    born = None if wanted is None else replace(wanted, born=revision, died=0)
    return AdapterPlan(current, born)


def check_unchanged_since(cube: CubeState, since: int, head: int) -> None:
    """A job that trained from revision ``since`` may commit only if the adapter did not change since."""
    if not _same(cube.adapter_at(since), cube.adapter_at(head)):
        raise CommitConflict(
            f"the cube's adapter changed between revision {since} (where training started) and HEAD "
            f"(revision {head}); the trained adapter was not committed. Train again from HEAD",
            head=head, item="adapter")


def taint_on_commit(cube: CubeState, adapter: AdapterRecord) -> AdapterRecord:
    """An adapter trained on items purged since (its job ran meanwhile) is committed tainted (see
    kernel/purge.py)."""
    purges = {cube.purged[i] for i in adapter.lineage.get("source_item_ids", ()) if i in cube.purged}
    return replace(adapter, tainted=sorted({*adapter.tainted, *purges})) if purges else adapter
