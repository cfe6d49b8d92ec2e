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
    speaker: str = ""  # a conversation turn's (see kernel/conversation.py); "" for other items
    session_id: str = ""
    state: str = "active"  # lifecycle: active | archived | expired (VersionRecord.state)
    expire_ns: int = 0  # the TTL's end; 0: none
    derived_from: tuple[str, ...] = ()  # the items this version was derived from (VersionRecord)

    def alive_at(self, revision: int) -> bool:
        return self.born <= revision and (self.died == 0 or self.died > revision)

    def expired(self, now_ns: int) -> bool:
        """Expired: committed so, or past its TTL (the lifecycle loop has not committed it yet)."""
        return self.state == "expired" or 0 < self.expire_ns <= now_ns

    def hidden(self, now_ns: int, include_archived: bool = False) -> bool:
        """Left out of Search and memory blocks: expired, or archived unless asked for."""
        return self.expired(now_ns) or (self.state == "archived" and not include_archived)

    def same_as(self, other: VersionMeta) -> bool:
        """The same content and lifecycle (Diff and Rollback compare versions by this)."""
        return (self.content_id, self.state, self.expire_ns) == (other.content_id, other.state, other.expire_ns)


_TTL = "ttl"


class Catalog:
    def __init__(self) -> None:
        self.by_item: dict[str, list[VersionMeta]] = {}
        self.by_vkey: dict[int, VersionMeta] = {}
        self.by_tag: dict[str, set[int]] = {}
        # Like by_tag, for the conversation filters.
        self.by_speaker: dict[str, set[int]] = {}
        self.by_session: dict[str, set[int]] = {}
        # Versions with a TTL, under the one key _TTL: the lifecycle loop looks at these only.
        self._with_ttl: dict[str, set[int]] = {}
        # Source item id -> the versions derived from it (VersionRecord.derived_from): the purge cascade.
        self.by_derived_source: dict[str, set[int]] = {}

    def _postings(self, meta: VersionMeta) -> Iterator[tuple[dict[str, set[int]], str]]:
        for tag in meta.tags:
            yield self.by_tag, tag
        if meta.speaker:
            yield self.by_speaker, meta.speaker
        if meta.session_id:
            yield self.by_session, meta.session_id
        if meta.expire_ns:
            yield self._with_ttl, _TTL
        for source_id in meta.derived_from:
            yield self.by_derived_source, source_id

    def add(self, meta: VersionMeta) -> None:
        versions = self.by_item.setdefault(meta.item_id, [])
        versions.append(meta)
        versions.sort(key=lambda v: v.born)
        self.by_vkey[meta.vkey] = meta
        for postings, value in self._postings(meta):
            postings.setdefault(value, set()).add(meta.vkey)

    def remove_item(self, item_id: str) -> list[VersionMeta]:
        """Forget every version of the item (Purge), as if it had never been committed."""
        versions = self.by_item.pop(item_id, [])
        for meta in versions:
            del self.by_vkey[meta.vkey]
            for postings, value in self._postings(meta):
                keys = postings[value]
                keys.discard(meta.vkey)
                if not keys:
                    del postings[value]
        return versions

    def remove_versions(self, metas: Iterable[VersionMeta]) -> None:
        """Drop versions no kept revision can see (compaction); an item left with none is dropped."""
        for meta in metas:
            versions = self.by_item.get(meta.item_id, [])
            versions[:] = [v for v in versions if v.vkey != meta.vkey]
            if not versions:
                self.by_item.pop(meta.item_id, None)
            self.by_vkey.pop(meta.vkey, None)
            for postings, value in self._postings(meta):
                keys = postings.get(value)
                if keys is not None:
                    keys.discard(meta.vkey)
                    if not keys:
                        del postings[value]

    def visible(self, item_id: str, revision: int) -> VersionMeta | None:
        for meta in reversed(self.by_item.get(item_id, ())):
            if meta.alive_at(revision):
                return meta
        return None

    def alive_at(self, revision: int) -> Iterator[VersionMeta]:
        # Readers (Read, Search, Activate) do not hold the cube's lock while a commit
        # adds versions: iterate over copies (list() of a dict or list is atomic under the GIL).
        for versions in list(self.by_item.values()):
            for meta in versions[::-1]:
                if meta.alive_at(revision):
                    yield meta
                    break

    def alive_with_ttl(self, revision: int) -> Iterator[VersionMeta]:
        """The versions alive at ``revision`` that carry a TTL (expired ones included)."""
        for vkey in sorted(self._with_ttl.get(_TTL, ())):
            meta = self.by_vkey.get(vkey)  # a purge may have removed it since the copy
            if meta is not None and meta.alive_at(revision):
                yield meta

    def derived_from_any(self, item_ids: Iterable[str]) -> set[str]:
        """The items a version of which was derived from one of ``item_ids``."""
        return {self.by_vkey[vkey].item_id for source_id in item_ids
                for vkey in self.by_derived_source.get(source_id, ())}

    def item_ids_at(self, revision: int) -> list[str]:
        return sorted(meta.item_id for meta in self.alive_at(revision))

    def vkeys_with_tags(self, all_of: Iterable[str], any_of: Iterable[str], speakers: Iterable[str] = (),
                        session_ids: Iterable[str] = ()) -> set[int] | None:
        """Versions carrying all of `all_of` and one of `any_of`, said by one of `speakers`, in one of
        `session_ids`; None when nothing narrows."""
        result: set[int] | None = None
        for tag in all_of:
            keys = self.by_tag.get(tag, set())
            result = set(keys) if result is None else result & keys
        for postings, wanted in ((self.by_tag, list(any_of)), (self.by_speaker, list(speakers)),
                                 (self.by_session, list(session_ids))):
            if wanted:
                union: set[int] = set()
                for value in wanted:
                    union |= postings.get(value, set())
                result = union if result is None else result & union
        return result

    def __len__(self) -> int:
        return len(self.by_vkey)
