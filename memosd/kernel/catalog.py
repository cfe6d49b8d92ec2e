"""The in-memory catalog of one cube: every item version's visibility and filter keys.

It is rebuilt from the store at start and updated after each durable commit.
Search consults it to decide which index hits a mount may see, without
touching RocksDB; texts stay in the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class VersionMeta:
    vkey: int
    item_id: str
    born: int
    died: int  # 0 while alive at HEAD
    tags: frozenset[str]
    event_ns: int
    content_id: int  # equal for versions with the same content (see VersionRecord.origin)

    def alive_at(self, revision: int) -> bool:
        return self.born <= revision and (self.died == 0 or self.died > revision)


class Catalog:
    def __init__(self) -> None:
        self.by_item: dict[str, list[VersionMeta]] = {}
        self.by_vkey: dict[int, VersionMeta] = {}
        self.by_tag: dict[str, set[int]] = {}

    def add(self, meta: VersionMeta) -> None:
        versions = self.by_item.setdefault(meta.item_id, [])
        versions.append(meta)
        versions.sort(key=lambda v: v.born)
        self.by_vkey[meta.vkey] = meta
        for tag in meta.tags:
            self.by_tag.setdefault(tag, set()).add(meta.vkey)

    def remove_item(self, item_id: str) -> list[VersionMeta]:
        """Forget every version of the item (Purge), as if it had never been committed."""
        versions = self.by_item.pop(item_id, [])
        for meta in versions:
            del self.by_vkey[meta.vkey]
            for tag in meta.tags:
                keys = self.by_tag[tag]
                keys.discard(meta.vkey)
                if not keys:
                    del self.by_tag[tag]
        return versions

    def visible(self, item_id: str, revision: int) -> VersionMeta | None:
        for meta in reversed(self.by_item.get(item_id, ())):
            if meta.alive_at(revision):
                return meta
        return None

    def alive_at(self, revision: int) -> Iterator[VersionMeta]:
        for versions in self.by_item.values():
            for meta in reversed(versions):
                if meta.alive_at(revision):
                    yield meta
                    break

    def item_ids_at(self, revision: int) -> list[str]:
        return sorted(meta.item_id for meta in self.alive_at(revision))

    def vkeys_with_tags(self, all_of: Iterable[str], any_of: Iterable[str]) -> set[int] | None:
        """Versions carrying all of `all_of` and one of `any_of`; None when neither narrows."""
        result: set[int] | None = None
        for tag in all_of:
            keys = self.by_tag.get(tag, set())
            result = set(keys) if result is None else result & keys
        any_list = list(any_of)
        if any_list:
            union: set[int] = set()
            for tag in any_list:
                union |= self.by_tag.get(tag, set())
            result = union if result is None else result & union
        return result

    def __len__(self) -> int:
        return len(self.by_vkey)
