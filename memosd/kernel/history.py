"""Revisions: planning a commit or a rollback, and diffing two revisions.

Planning is pure: it reads the catalog and returns what the new revision
changes. The kernel then writes the plan as one synced WriteBatch and only
afterwards applies it to the catalog and the indexes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memosd.errors import CommitConflict
from memosd.kernel.catalog import Catalog, VersionMeta
from memosd.store.records import StagedRecord, VersionRecord


@dataclass
class Plan:
    """Versions to create (with their vectors) and versions to end, at one new revision."""

    born: list[tuple[VersionRecord, np.ndarray]] = field(default_factory=list)
    ended: list[VersionMeta] = field(default_factory=list)
    added: int = 0
    changed: int = 0
    forgotten: int = 0

    @property
    def empty(self) -> bool:
        return not self.born and not self.ended


def check_conflicts(catalog: Catalog, head: int, staging: dict[str, StagedRecord]) -> None:
    """Edits and forgets must still target the version HEAD has; appends never conflict."""
    conflicts = []
    for staged in staging.values():
        if staged.kind == "add":
            continue
        current = catalog.visible(staged.item_id, head)
        if current is None or current.born != staged.base_born:
            conflicts.append(staged.item_id)
    if conflicts:
        conflicts.sort()
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise CommitConflict(
            f"HEAD (revision {head}) changed {len(conflicts)} item(s) this mount edits or forgets: {shown}. "
            "Nothing was committed and the staging area is kept: read the items at HEAD "
            "(mount again), re-apply your change, and commit",
            items=",".join(conflicts[:100]), head=head,
        )


def plan_commit(
    catalog: Catalog, head: int, staging: dict[str, StagedRecord], vectors: dict[str, np.ndarray],
    next_vkey: int,
) -> Plan:
    plan = Plan()
    revision = head + 1
    # Write order (write_ns is unique per item of a mount, see Kernel.write): version keys, and
    # with them memory blocks, follow the order items were written in.
    for item_id in sorted(staging, key=lambda i: (staging[i].write_ns, i)):
        staged = staging[item_id]
        if staged.kind != "add":
            current = catalog.visible(item_id, head)
            assert current is not None  # check_conflicts ran first
            plan.ended.append(current)
        if staged.kind == "forget":
            plan.forgotten += 1
            continue
        if staged.kind == "add":
            plan.added += 1
        else:
            plan.changed += 1
        version = VersionRecord(item_id, next_vkey, staged.text, list(staged.tags), staged.source,
                                staged.event_ns, staged.write_ns, revision,
                                speaker=staged.speaker, session_id=staged.session_id, expire_ns=staged.expire_ns,
                                derived_from=list(staged.derived_from), derived_job=staged.derived_job)
        next_vkey += 1
        plan.born.append((version, vectors[item_id]))
    return plan


def plan_rollback(catalog: Catalog, head: int, target: int) -> tuple[Plan, list[VersionMeta]]:
    """What makes HEAD's content equal `target`'s. Returns the plan without the
    revived versions' content, and the target versions to revive (copy)."""
    plan = Plan()
    revive: list[VersionMeta] = []
    for item_id in sorted(catalog.by_item):
        at_head = catalog.visible(item_id, head)
        at_target = catalog.visible(item_id, target)
        if at_head is at_target or (at_head and at_target and at_head.same_as(at_target)):
            continue
        if at_head is not None:
            plan.ended.append(at_head)
        if at_target is None:
            plan.forgotten += 1
            continue
        if at_head is None:
            plan.added += 1
        else:
            plan.changed += 1
        revive.append(at_target)
    return plan, revive


@dataclass(frozen=True)
class Change:
    kind: str  # "added" | "changed" | "forgotten"
    item_id: str
    before: VersionMeta | None
    after: VersionMeta | None


def diff(catalog: Catalog, older: int, newer: int, after_id: str, limit: int) -> tuple[list[Change], bool]:
    """Changes from `older` to `newer` for item ids > after_id, at most `limit`; and whether more follow."""
    changes: list[Change] = []
    for item_id in sorted(i for i in catalog.by_item if i > after_id):
        before = catalog.visible(item_id, older)
        after = catalog.visible(item_id, newer)
        if before is after or (before and after and before.same_as(after)):
            continue
        if len(changes) == limit:
            return changes, True
        kind = "added" if before is None else "forgotten" if after is None else "changed"
        changes.append(Change(kind, item_id, before, after))
    return changes, False
