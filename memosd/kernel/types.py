"""Values the kernel returns to the syscall layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from memosd.store.records import CubeRecord, MountRecord, RevisionRecord


@dataclass(frozen=True)
class ItemView:
    item_id: str
    text: str
    tags: tuple[str, ...]
    source: str
    event_ns: int
    write_ns: int
    born: int  # 0 while staged
    staged: bool = False
    speaker: str = ""
    session_id: str = ""
    # The neighbouring turns of its session as the reading mount sees it (kernel/conversation.py).
    prev_item_id: str = ""
    next_item_id: str = ""
    state: str = "active"  # lifecycle: active | archived | expired
    expire_ns: int = 0  # the TTL's end; 0: none
    derived_from: tuple[str, ...] = ()  # the items it was derived from (VersionRecord.derived_from)
    derived_job: str = ""  # the Extract job that made it; "" for a Write


@dataclass(frozen=True)
class ItemInput:
    text: str
    item_id: str = ""
    tags: tuple[str, ...] = ()
    source: str = ""
    event_ns: int = 0  # 0: use the write time
    speaker: str = ""
    session_id: str = ""
    ttl_seconds: int = 0  # 0: no TTL; else the item expires this long after the write
    # Structured memory: the items (turns) of the mount it was derived from; a purge of any of them purges
    # this one. An edit keeps the sources its earlier versions had and adds these.
    derived_from: tuple[str, ...] = ()
    derived_job: str = ""  # set by the Extract job only (kernel callers); a Write leaves it ""


@dataclass(frozen=True)
class Message:
    """One message of a conversation given to Ingest."""

    speaker: str
    text: str
    session_id: str
    time_ns: int = 0  # 0: the ingest time


@dataclass(frozen=True)
class IngestResult:
    item_ids: list[str]  # in request order
    revision: RevisionRecord
    mount: MountInfo


@dataclass(frozen=True)
class CubeInfo:
    record: CubeRecord
    mount_count: int


@dataclass(frozen=True)
class MountInfo:
    record: MountRecord
    head: int
    staged_adds: int
    staged_edits: int
    staged_forgets: int
    staged_adapter: bool = False


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    entries: list[T]
    next_token: str = ""


@dataclass(frozen=True)
class ItemChange:
    kind: str  # "added" | "changed" | "forgotten"
    item_id: str
    before: ItemView | None
    after: ItemView | None


@dataclass(frozen=True)
class CommitResult:
    revision: RevisionRecord | None  # None: nothing was staged
    mount: MountInfo
    head: int


@dataclass(frozen=True)
class FreeResult:
    revisions: int
    versions: int
    mounts: int


@dataclass(frozen=True)
class SearchFilter:
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    start_ns: int | None = None
    end_ns: int | None = None
    speakers: tuple[str, ...] = ()  # any of; empty: any speaker
    session_ids: tuple[str, ...] = ()  # any of; empty: any session
    include_archived: bool = False  # archived items are left out unless asked for; expired ones always

    def matches(self, tags: frozenset[str] | set[str], event_ns: int, speaker: str = "",
                session_id: str = "") -> bool:
        if self.speakers and speaker not in self.speakers:
            return False
        if self.session_ids and session_id not in self.session_ids:
            return False
        if any(t not in tags for t in self.all_of):
            return False
        if self.any_of and not any(t in tags for t in self.any_of):
            return False
        if any(t in tags for t in self.none_of):
            return False
        if self.start_ns is not None and event_ns < self.start_ns:
            return False
        return self.end_ns is None or event_ns < self.end_ns


@dataclass(frozen=True)
class SearchHit:
    item: ItemView
    mount_id: str
    cube_id: str
    score: float
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int
    # The turns around the hit in its session (Search's context_turns), oldest first.
    context_before: tuple[ItemView, ...] = ()
    context_after: tuple[ItemView, ...] = ()


@dataclass(frozen=True)
class MountHeader:
    cube_id: str
    head: int
    read_revision: int


@dataclass(frozen=True)
class SearchResult:
    hits: list[SearchHit]
    headers: list[MountHeader]
    took_us: int
    embed_us: int
