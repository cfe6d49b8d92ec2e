"""Which items a memory block holds: all of them, a list, a tag, or the cube's working set.

Whatever the selector, the chosen items are rendered in commit order (vkey),
so a block whose selection only gains newer items shares its token prefix
with the previous block, and incremental activation reuses those KV blocks.

The working set is the top N items by usage score (``ItemUsage.score``: hits
decayed by the time since the last use); when fewer than N items were ever
used, the newest unused items fill it, so a fresh cube still gets a block.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from memosd.errors import InvalidField, ItemNotFound
from memosd.kernel import validate
from memosd.kernel.catalog import VersionMeta
from memosd.kernel.usage import ItemUsage

DEFAULT_WORKING_SET = 32
DEFAULT_DRIFT = 0.25
DEFAULT_TRAIN_MIN_ITEMS = 10
HALF_LIFE_SECONDS = 3600.0  # usage an hour old counts half


@dataclass(frozen=True)
class Policy:
    """A cube's scheduler policy (CubeRecord.policy, as SetCubePolicy stored it) with the defaults applied."""

    schedule: str = "manual"  # "manual" | "auto"
    working_set_size: int = DEFAULT_WORKING_SET
    drift_threshold: float = DEFAULT_DRIFT
    train_after_seconds: int = 0  # 0: never trains
    train_min_items: int = DEFAULT_TRAIN_MIN_ITEMS

    @classmethod
    def of(cls, stored: Mapping[str, object]) -> Policy:
        def number(key: str, default: float) -> float:
            value = stored.get(key)
            return float(value) if isinstance(value, int | float) and value else default

        return cls(schedule=str(stored.get("schedule") or "manual"),
                   working_set_size=int(number("working_set_size", DEFAULT_WORKING_SET)),
                   drift_threshold=number("drift_threshold", DEFAULT_DRIFT),
                   train_after_seconds=int(number("train_after_seconds", 0)),
                   train_min_items=int(number("train_min_items", DEFAULT_TRAIN_MIN_ITEMS)))


@dataclass(frozen=True)
class Selector:
    kind: Literal["all", "items", "tag", "working_set"] = "all"
    item_ids: tuple[str, ...] = ()
    tag: str = ""
    size: int = 0  # working_set: N (0 = the cube policy's)

    def label(self, size: int = 0) -> str:
        if self.kind == "tag":
            return f"tag:{self.tag}"
        if self.kind == "working_set":
            return f"working_set:{self.size or size}"
        return self.kind


ALL = Selector()


def check(selector: Selector) -> None:
    if selector.kind == "items" and not selector.item_ids:
        raise InvalidField("selector.items is empty; list the item ids to activate", field="selector.items")
    if selector.kind == "tag" and not selector.tag:
        raise InvalidField("selector.tag is empty; name the tag whose items to activate", field="selector.tag")
    validate.working_set_size(selector.size, "selector.working_set")


def working_set(alive: Iterable[VersionMeta], usage: Mapping[str, ItemUsage], size: int,
                now_ns: int | None = None) -> list[VersionMeta]:
    """The ``size`` items to keep activated: most used first, then the newest; returned in commit order."""
    now = now_ns if now_ns is not None else time.time_ns()
    metas = list(alive)

    def rank(meta: VersionMeta) -> tuple[float, int]:
        used = usage.get(meta.item_id)
        return (used.score(now, HALF_LIFE_SECONDS) if used else 0.0, meta.vkey)

    chosen = sorted(metas, key=rank, reverse=True)[:size]
    return sorted(chosen, key=lambda m: m.vkey)


def select(alive: Iterable[VersionMeta], selector: Selector, usage: Mapping[str, ItemUsage],
           policy_size: int) -> list[VersionMeta]:
    """The metas of the block, in commit order. Raises ItemNotFound for listed items not alive here."""
    metas = sorted(alive, key=lambda m: m.vkey)
    if selector.kind == "items":
        wanted = set(selector.item_ids)
        found = [m for m in metas if m.item_id in wanted]
        missing = sorted(wanted - {m.item_id for m in found})
        if missing:
            raise ItemNotFound(f"items {missing} are not alive at this revision; list items of the mount's "
                               "revision", item_ids=",".join(missing))
        return found
    if selector.kind == "tag":
        return [m for m in metas if selector.tag in m.tags]
    if selector.kind == "working_set":
        return working_set(metas, usage, selector.size or policy_size or DEFAULT_WORKING_SET)
    return metas


def drift(activated: Iterable[str], wanted: Iterable[str]) -> float:
    """How far the activated items are from the wanted ones: 1 - Jaccard similarity (0 = the same)."""
    a, b = set(activated), set(wanted)
    if not a and not b:
        return 0.0
    return 1.0 - len(a & b) / len(a | b)
