"""Records kept in the store, and their JSON encoding.

Records are plain dataclasses so the kernel can use them directly; the
encoding is JSON (compact, human-inspectable with `ldb`). Times are integer
nanoseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

MountMode = Literal["ro", "rw"]
StagedKind = Literal["add", "edit", "forget"]
RevisionKind = Literal["commit", "rollback"]


@dataclass
class CubeRecord:
    cube_id: str
    name: str
    description: str
    labels: dict[str, str]
    create_ns: int
    head: int = 0
    item_count: int = 0
    version_count: int = 0
    next_vkey: int = 1
    owner: str = ""  # principal id; "" for cubes made before governance: only admins reach them
    # The scheduler's view of the cube (SetCubePolicy): schedule "manual" | "auto", working_set_size,
    # drift_threshold. Empty: manual, with the defaults.
    policy: dict[str, Any] = field(default_factory=dict)
    # FreezeCube: read-only; everything that would commit (rw Mount, Write, Forget, Commit, Ingest,
    # Rollback, ImportAdapter, Train) is refused with CUBE_FROZEN until ThawCube. Purge is still allowed.
    frozen: bool = False
    # SetRetention: {"keep_last": N, "keep_seconds": T}; empty: keep every revision (no compaction).
    retention: dict[str, Any] = field(default_factory=dict)
    # Revisions 1 .. compacted_below - 1 are compacted (Compact): reading them is REVISION_COMPACTED.
    compacted_below: int = 0


@dataclass(frozen=True)
class RevisionRecord:
    number: int
    parent: int
    kind: RevisionKind
    author: str
    message: str
    create_ns: int
    added: int
    changed: int
    forgotten: int
    item_count: int
    restored: int = 0
    adapter_changed: bool = False
    adapter_digest: str = ""  # the adapter current at this revision; "" for none
    compacted: bool = False  # the versions only it could see were removed (Compact); its log entry stays
    request_id: str = ""  # the client's request id of the Commit, Ingest or remembering Generate that made it
    # Set on the revision a Generate remembered (options.remember_mount_id): what made the reply.
    generation: GenerationProvenance | None = None

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):  # decoded from JSON: rebuild the nested records
            raw: dict[str, Any] = self.generation
            # A missing or unknown field is a TypeError, as for any record (an archive's import reports it).
            object.__setattr__(self, "generation", GenerationProvenance(  # the record is frozen
                **{**raw, "sources": [GenerationSource(**source) for source in raw.get("sources", [])]}))


@dataclass
class GenerationSource:
    """What one mount's cube contributed to a remembered reply (ids only, never text)."""

    cube_id: str
    revision: int  # the mount's base revision: the revision the memory was read at
    block_item_ids: list[str] = field(default_factory=list)  # the memory block, in block order
    retrieved_item_ids: list[str] = field(default_factory=list)  # retrieved for the last user message


@dataclass
class GenerationProvenance:
    """The generation a remembered exchange came from: the model, the adapter, the memory it used."""

    model_fingerprint: str
    adapter_digest: str = ""  # "" for the base model
    sources: list[GenerationSource] = field(default_factory=list)  # one per mount used, in request order


@dataclass
class VersionRecord:
    """One version of an item: alive from revision `born` until `died` (0 = still alive).

    `origin` is the vkey of the version whose content this one copies (Rollback
    revives old content as new versions); 0 means its own vkey. Diff compares
    content identity by it.

    `speaker` and `session_id` are a conversation turn's (Ingest); "" for
    other items and for rows written before they existed. A turn's previous
    and next turns are not stored: they are derived when read (kernel/
    conversation.py), so no old row is rewritten to link a new turn.

    `state` is the item's lifecycle state at this version ("active",
    "archived" or "expired"; see ARCHITECTURE.md "Lifecycle"): a state change
    is a new version with the same content. `expire_ns` is when a TTL ends
    (0: none); the lifecycle loop then commits the item as "expired".

    ``derived_from`` names the items (conversation turns) this one was derived from (the MemReader, or a
    client's Write of structured memory); ``derived_job`` the Extract job that made it, "" for a Write.
    Purging any of the sources purges this item too (kernel/purge.py). Both empty for other items."""

    item_id: str
    vkey: int
    text: str
    tags: list[str]
    source: str
    event_ns: int
    write_ns: int
    born: int
    died: int = 0
    origin: int = 0
    speaker: str = ""
    session_id: str = ""
    state: str = "active"
    expire_ns: int = 0
    derived_from: list[str] = field(default_factory=list)
    derived_job: str = ""

    @property
    def content_id(self) -> int:
        return self.origin or self.vkey


@dataclass
class MountRecord:
    mount_id: str
    cube_id: str
    base: int
    mode: MountMode
    create_ns: int
    principal: str = ""  # who opened it: only that principal can use the mount


@dataclass
class StagedRecord:
    """A staged change to one item. `base_born` names the version an edit or
    forget was made against (0 for adds): the commit conflict check."""

    item_id: str
    kind: StagedKind
    base_born: int
    text: str = ""
    tags: list[str] = field(default_factory=list)
    source: str = ""
    event_ns: int = 0
    write_ns: int = 0
    speaker: str = ""
    session_id: str = ""
    expire_ns: int = 0  # from the write's ttl_seconds; 0: none
    derived_from: list[str] = field(default_factory=list)  # see VersionRecord
    derived_job: str = ""


@dataclass
class ActivationRecord:
    """A cube's activation for one model: which revision's memory block it encodes and
    where its KV cache lies (``chunk_count`` chunks under ``cache_key`` in kv_chunks).

    ``items`` are the block's (item_id, born) in block order and ``token_ids``
    the block's tokens, so Generate can place the block in a prompt without
    re-rendering or loading it."""

    cube_id: str
    fingerprint: str
    revision: int
    cache_key: str
    chunk_count: int
    persisted_bytes: int
    stored_dtype: str
    items: list[list[Any]]
    token_ids: list[int]
    create_ns: int
    adapter_digest: str = ""  # the cube's adapter the cache was computed under; "" for the base model
    selector: str = "all"  # which items the block holds: all | items | tag:<t> | working_set:<n>


@dataclass
class AdapterRecord:
    """One version of a cube's adapter: current from revision ``born`` until ``died`` (0 = at HEAD).

    ``digest`` is sha256 over the config bytes then the weights bytes; the
    files are in ``adapter_blobs`` under it. ``lineage`` says where it came
    from: {"origin": "imported" | "trained", ...} (see AdapterLineage)."""

    digest: str
    config_bytes: int
    weights_bytes: int
    rank: int
    target_modules: list[str]
    base_model: str
    lineage: dict[str, Any]
    born: int = 0
    died: int = 0
    # The purges (purge ids) that removed items of its lineage: it was trained on text that is gone.
    tainted: list[str] = field(default_factory=list)


@dataclass
class StagedAdapterRecord:
    """A mount's staged adapter change: "put" (``adapter`` holds the fields of an
    AdapterRecord) or "remove". ``base_born`` is the born revision of the adapter
    the mount saw (0 = none): the commit conflict check."""

    kind: Literal["put", "remove"]
    base_born: int
    adapter: dict[str, Any] | None = None

    def version(self) -> AdapterRecord | None:
        return None if self.adapter is None else AdapterRecord(**self.adapter)


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


JobKind = Literal["train", "extract"]


@dataclass
class JobRecord:
    """A background job and its progress; persisted so a restart never loses one. ``kind`` "train": memory
    training (step, loss, the adapter); "extract": the MemReader (``progress`` holds its counts: see
    parametric/extract.py; ``step`` / ``total_steps`` are its prompts). An extract job's ``settings`` never
    hold an endpoint's token."""

    job_id: str
    cube_id: str
    revision: int  # the revision whose items are trained
    settings: dict[str, Any]
    message: str
    author: str
    create_ns: int
    state: JobState = "queued"
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    eta_seconds: float = 0.0
    start_ns: int = 0
    end_ns: int = 0
    error: str = ""
    result_revision: int = 0
    adapter_digest: str = ""
    principal: str = ""  # who started it (its right is checked again at commit); "": memosd itself
    kind: JobKind = "train"
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_JOB_STATES


@dataclass
class PrincipalRecord:
    """A user or an agent. ``token_hash`` is sha256 (hex) of the token's secret part: the token itself is
    never stored."""

    principal_id: str
    name: str
    kind: Literal["user", "agent"]
    admin: bool
    token_hash: str
    create_ns: int
    created_by: str = ""
    disabled: bool = False


@dataclass
class GrantRecord:
    """Rights of one principal on one cube. ``expire_ns`` 0 = no expiry."""

    cube_id: str
    principal_id: str
    rights: list[str]
    granted_by: str
    update_ns: int
    expire_ns: int = 0


@dataclass(frozen=True)
class PurgedVersion:
    item_id: str
    born: int
    vkey: int


@dataclass(frozen=True)
class PurgedActivation:
    """An activation deleted with its KV cache (``cache_key``): its block held a purged item."""

    fingerprint: str
    cache_key: str
    revision: int
    persisted_bytes: int


class TaintedAdapter(NamedTuple):
    """An adapter version whose lineage lists a purged item (stored as [digest, born])."""

    digest: str
    born: int


@dataclass
class PurgeReceipt:
    """What one Purge removed and flagged, returned to the caller and kept in ``purges``.

    Ids and counts only, never text (nor the selector: a source or tag may itself
    name what was purged). ``staged`` is [mount_id, item_id] pairs. The index
    counts are the versions the cube's dense and lexical indexes held before
    they were rebuilt without the items. An empty receipt (no items, purge_id
    "") means the selector matched nothing and nothing was done."""

    purge_id: str
    cube_id: str
    time_ns: int
    item_ids: list[str] = field(default_factory=list)
    versions: list[PurgedVersion] = field(default_factory=list)
    vectors_removed: int = 0
    staged: list[list[str]] = field(default_factory=list)
    dense_entries_removed: int = 0
    lexical_entries_removed: int = 0
    activations: list[PurgedActivation] = field(default_factory=list)
    adapters_tainted: list[TaintedAdapter] = field(default_factory=list)
    # The items among ``item_ids`` that were purged because they were derived (VersionRecord.derived_from)
    # from a selected item, or from another item purged so: the cascade.
    derived_item_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # decode() hands nested records over as dicts and lists.
        self.versions = [PurgedVersion(**v) if isinstance(v, dict) else v for v in self.versions]
        self.activations = [PurgedActivation(**a) if isinstance(a, dict) else a for a in self.activations]
        self.adapters_tainted = [TaintedAdapter(*a) for a in self.adapters_tainted]

    @property
    def versions_removed(self) -> int:
        return len(self.versions)

    @property
    def staged_removed(self) -> int:
        return len(self.staged)

    @property
    def kv_caches_deleted(self) -> list[str]:
        """The cache keys of the deleted activations (the pool may hold copies under them)."""
        return [a.cache_key for a in self.activations]


RequestKind = Literal["write", "ingest", "commit", "import_adapter", "generate"]


@dataclass
class RequestRecord:
    """The first outcome of a call that carried a request id (``request_ids``; see kernel/requests.py).

    ``digest`` is sha256 over the call's kind and inputs: a retry with the same id and digest gets this
    result back and changes nothing; another digest is REQUEST_ID_REUSED. ``revision`` is the revision an
    Ingest or Commit made (0: a Commit with nothing staged), ``item_ids`` the items a Write staged or an
    Ingest committed, ``adapter`` the fields of the AdapterRecord an ImportAdapter staged. Ids only, never
    text."""

    kind: RequestKind
    digest: str
    time_ns: int
    mount_id: str
    revision: int = 0
    item_ids: list[str] = field(default_factory=list)
    adapter: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoredRecord:
    """One audit record as stored (``audit``): its hash and canonical JSON body (governance/audit.py)."""

    seq: int  # from the key
    hash: str
    body: bytes

    def fields(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.body)
        return parsed


HEAT_HALF_LIFE_SECONDS = 600.0


@dataclass
class CubeUsage:
    """A cube's usage counters (``usage``, the ``{cube_id}/#`` row; kept by kernel/usage.py)."""

    searches: int = 0
    reads: int = 0
    generations: int = 0
    item_hits: int = 0
    last_used_ns: int = 0
    items_tracked: int = 0
    # A decayed count of calls (Search, Read, Generate, Activate): +1 per call, halved every half-life.
    # The scheduler ranks cubes by it: frequency and recency together, unlike last_used_ns alone.
    heat: float = 0.0

    def heat_at(self, now_ns: int, half_life_s: float = HEAT_HALF_LIFE_SECONDS) -> float:
        return self.heat * _decay(now_ns - self.last_used_ns, half_life_s)


def _decay(age_ns: int, half_life_s: float) -> float:
    return math.exp(-math.log(2) * max(0, age_ns) / 1e9 / half_life_s)


@dataclass
class ItemUsage:
    """One item's usage (``usage``, the ``{cube_id}/{item_id}`` row, stored as [hits, last_used_ns])."""

    hits: int = 0
    last_used_ns: int = 0

    def score(self, now_ns: int, half_life_s: float) -> float:
        """Frequency and recency blended: each hit counts, halved every ``half_life_s`` since the last use.
        (An approximation of a decayed hit count that needs only the last use time.)"""
        age = max(0.0, (now_ns - self.last_used_ns) / 1e9)
        return self.hits * math.exp(-math.log(2) * age / half_life_s)


R = TypeVar("R")


def encode(record: Any) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":"), ensure_ascii=False).encode()


def decode(cls: type[R], raw: bytes) -> R:
    return cls(**json.loads(raw))


def encode_vector(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def decode_vector(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32)


# Usage rows keep json.dumps' default separators (", ", ": "), not encode()'s compact ones: that is how
# they were always written, and the bytes on disk stay the same.
def encode_cube_usage(usage: CubeUsage) -> bytes:
    return json.dumps(asdict(usage)).encode()


def decode_cube_usage(raw: bytes) -> CubeUsage:
    return CubeUsage(**json.loads(raw))


def encode_item_usage(usage: ItemUsage) -> bytes:
    return json.dumps([usage.hits, usage.last_used_ns]).encode()


def decode_item_usage(raw: bytes) -> ItemUsage:
    hits, last = json.loads(raw)
    return ItemUsage(int(hits), int(last))


def encode_audit(record: StoredRecord) -> bytes:
    """hash (64 hex) "\n" body."""
    return record.hash.encode() + b"\n" + record.body


def decode_audit(seq: int, raw: bytes, *, errors: str = "replace") -> StoredRecord:
    """``errors`` applies to the hash: "replace" lets verify report a mangled one instead of failing."""
    value = bytes(raw)
    return StoredRecord(seq, value[:64].decode(errors=errors), value[65:])
