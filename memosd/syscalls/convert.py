"""Kernel values <-> memos.v1 messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import InvalidField
from memosd.kernel.types import (
    CubeInfo,
    ItemChange,
    ItemInput,
    ItemView,
    Message,
    MountHeader,
    MountInfo,
    SearchFilter,
    SearchHit,
)
from memosd.kernel.usage import CubeUsage, ItemUsage
from memosd.store.records import AdapterRecord, GenerationProvenance, JobRecord, RevisionRecord

_CHANGE_KINDS = {"added": t.CHANGE_KIND_ADDED, "changed": t.CHANGE_KIND_CHANGED,
                 "forgotten": t.CHANGE_KIND_FORGOTTEN}
_REVISION_KINDS = {"commit": t.REVISION_KIND_COMMIT, "rollback": t.REVISION_KIND_ROLLBACK}
SEARCH_MODES: dict[int, str] = {t.SEARCH_MODE_UNSPECIFIED: "hybrid", t.SEARCH_MODE_HYBRID: "hybrid",
                t.SEARCH_MODE_DENSE: "dense", t.SEARCH_MODE_LEXICAL: "lexical"}


def ts(ns: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def nanos(stamp: Timestamp, what: str) -> int:
    """A client's Timestamp in nanoseconds; one outside protobuf's range (years 1-9999, nanos 0-999,999,999)
    is the caller's mistake."""
    try:
        return int(stamp.ToNanoseconds())
    except ValueError:
        raise InvalidField(f"{what} is not a valid Timestamp: seconds must be within years 1 to 9999 and nanos "
                           "within 0 to 999,999,999", field=what) from None


def header(cube_id: str = "", head: int = 0, read_revision: int = 0) -> t.ResponseHeader:
    return t.ResponseHeader(cube_id=cube_id, head_revision=head, read_revision=read_revision)


def cube(info: CubeInfo, usage: CubeUsage | None = None) -> t.Cube:
    r = info.record
    message = t.Cube(cube_id=r.cube_id, name=r.name, description=r.description, labels=r.labels,
                     create_time=ts(r.create_ns), head_revision=r.head, item_count=r.item_count,
                     mount_count=info.mount_count, version_count=r.version_count, owner_principal_id=r.owner,
                     frozen=r.frozen, oldest_revision=max(1, r.compacted_below),
                     retention=t.Retention(keep_last=int(r.retention.get("keep_last", 0)),
                                           keep_seconds=float(r.retention.get("keep_seconds", 0.0))))
    message.policy.CopyFrom(policy(r.policy))
    if usage is not None:
        message.usage.CopyFrom(t.CubeUsage(searches=usage.searches, reads=usage.reads,
                                           generations=usage.generations, item_hits=usage.item_hits,
                                           items_tracked=usage.items_tracked))
        if usage.last_used_ns:
            message.usage.last_used_time.CopyFrom(ts(usage.last_used_ns))
    return message


_SCHEDULES = {"manual": t.SCHEDULE_POLICY_MANUAL, "auto": t.SCHEDULE_POLICY_AUTO_ACTIVATE}


def policy(values: dict[str, Any]) -> t.CubePolicy:
    """A cube's stored policy, with the defaults filled in."""
    from memosd.activation.select import Policy

    p = Policy.of(values)
    return t.CubePolicy(schedule=_SCHEDULES.get(p.schedule, t.SCHEDULE_POLICY_MANUAL),
                        working_set_size=p.working_set_size, drift_threshold=p.drift_threshold,
                        train_after_seconds=p.train_after_seconds, train_min_items=p.train_min_items)


def policy_values(message: t.CubePolicy) -> dict[str, Any]:
    """A SetCubePolicy request's policy, the fields set (the kernel bounds and stores it:
    kernel.validate.policy); raises InvalidField for a schedule that is not a SchedulePolicy."""
    schedule = {v: k for k, v in _SCHEDULES.items()}.get(message.schedule)
    if message.schedule != t.SCHEDULE_POLICY_UNSPECIFIED and schedule is None:
        raise InvalidField(f"policy.schedule {message.schedule} is not a SchedulePolicy", field="policy.schedule")
    values: dict[str, Any] = {"schedule": schedule or "manual"}
    if message.working_set_size:
        values["working_set_size"] = int(message.working_set_size)
    if message.drift_threshold:
        values["drift_threshold"] = float(message.drift_threshold)
    if message.train_after_seconds:
        values["train_after_seconds"] = int(message.train_after_seconds)
    if message.train_min_items:
        values["train_min_items"] = int(message.train_min_items)
    return values


def mount(info: MountInfo) -> t.Mount:
    r = info.record
    mode = t.MOUNT_MODE_READ_WRITE if r.mode == "rw" else t.MOUNT_MODE_READ_ONLY
    return t.Mount(mount_id=r.mount_id, cube_id=r.cube_id, base_revision=r.base, mode=mode,
                   create_time=ts(r.create_ns), staged_adds=info.staged_adds, staged_edits=info.staged_edits,
                   staged_forgets=info.staged_forgets, staged_adapter=info.staged_adapter,
                   principal_id=r.principal)


def mount_header(info: MountInfo) -> t.ResponseHeader:
    return header(info.record.cube_id, info.head, info.record.base)


ITEM_STATES = {"active": t.ITEM_STATE_ACTIVE, "archived": t.ITEM_STATE_ARCHIVED, "expired": t.ITEM_STATE_EXPIRED}
_STATE_NAMES: dict[int, str] = {v: k for k, v in ITEM_STATES.items()}


def item_state(value: int) -> str:
    """SetItemState's state, by name; raises InvalidField for a value that is no ItemState. Which states can
    be set is the kernel's rule (kernel.validate.item_state)."""
    if value not in _STATE_NAMES:
        raise InvalidField(f"state {value} cannot be set; use ITEM_STATE_ARCHIVED or ITEM_STATE_ACTIVE (items "
                           "expire only through their TTL)", field="state")
    return _STATE_NAMES[value]


def item(view: ItemView, usage: ItemUsage | None = None) -> t.Item:
    message = t.Item(item_id=view.item_id, text=view.text, tags=view.tags, source=view.source,
                     event_time=ts(view.event_ns), write_time=ts(view.write_ns), born_revision=view.born,
                     staged=view.staged, speaker=view.speaker, session_id=view.session_id,
                     prev_item_id=view.prev_item_id, next_item_id=view.next_item_id,
                     state=ITEM_STATES.get(view.state, t.ITEM_STATE_ACTIVE),
                     derived_from=view.derived_from, derived_job=view.derived_job)
    if view.expire_ns:
        message.expire_time.CopyFrom(ts(view.expire_ns))
    if usage is not None and usage.hits:
        message.hit_count = usage.hits
        message.last_used_time.CopyFrom(ts(usage.last_used_ns))
    return message


def revision(r: RevisionRecord, readable: Callable[[str], bool] = lambda _cube_id: True) -> t.Revision:
    """``readable`` says which cubes a remembered revision's provenance may name to this reader."""
    out = t.Revision(number=r.number, parent=r.parent, kind=_REVISION_KINDS[r.kind], author=r.author,
                      message=r.message, create_time=ts(r.create_ns), added=r.added, changed=r.changed,
                      forgotten=r.forgotten, item_count=r.item_count, restored_revision=r.restored,
                      adapter_changed=r.adapter_changed, adapter_digest=r.adapter_digest, compacted=r.compacted,
                      request_id=r.request_id)
    if r.generation is not None:
        out.generation.CopyFrom(generation(r.generation, readable))
    return out


def generation(record: GenerationProvenance, readable: Callable[[str], bool]) -> t.GenerationProvenance:
    """A revision's provenance as the reader may see it: sources on cubes it cannot read are only counted
    (their cube and item ids are not the reader's to learn)."""
    shown = [s for s in record.sources if readable(s.cube_id)]
    return t.GenerationProvenance(
        model_fingerprint=record.model_fingerprint, adapter_digest=record.adapter_digest,
        sources=[t.GenerationSource(cube_id=s.cube_id, revision=s.revision, block_item_ids=s.block_item_ids,
                                    retrieved_item_ids=s.retrieved_item_ids) for s in shown],
        hidden_sources=len(record.sources) - len(shown))


def change(c: ItemChange) -> t.ItemChange:
    out = t.ItemChange(kind=_CHANGE_KINDS[c.kind], item_id=c.item_id)
    if c.before is not None:
        out.before.CopyFrom(item(c.before))
    if c.after is not None:
        out.after.CopyFrom(item(c.after))
    return out


def hit(h: SearchHit) -> t.SearchHit:
    return t.SearchHit(item=item(h.item), mount_id=h.mount_id, cube_id=h.cube_id, score=h.score,
                       dense_score=h.dense_score, lexical_score=h.lexical_score, dense_rank=h.dense_rank,
                       lexical_rank=h.lexical_rank, context_before=[item(v) for v in h.context_before],
                       context_after=[item(v) for v in h.context_after])


def search_header(h: MountHeader) -> t.ResponseHeader:
    return header(h.cube_id, h.head, h.read_revision)


def item_inputs(items: list[t.ItemInput]) -> list[ItemInput]:
    return [ItemInput(text=i.text, item_id=i.item_id, tags=tuple(i.tags), source=i.source,
                      event_ns=nanos(i.event_time, f"items[{n}].event_time") if i.HasField("event_time") else 0,
                      speaker=i.speaker, session_id=i.session_id, ttl_seconds=i.ttl_seconds,
                      derived_from=tuple(i.derived_from))
            for n, i in enumerate(items)]


def messages(values: list[t.ConversationMessage]) -> list[Message]:
    return [Message(speaker=m.speaker, text=m.text, session_id=m.session_id,
                    time_ns=nanos(m.time, f"messages[{n}].time") if m.HasField("time") else 0)
            for n, m in enumerate(values)]


def search_filter(req: pb.SearchRequest) -> SearchFilter:
    start = nanos(req.event_time.start, "event_time.start") if req.event_time.HasField("start") else None
    end = nanos(req.event_time.end, "event_time.end") if req.event_time.HasField("end") else None
    if start is not None and end is not None and end <= start:
        raise InvalidField("event_time.end must be after event_time.start", field="event_time")
    return SearchFilter(tuple(req.tags.all_of), tuple(req.tags.any_of), tuple(req.tags.none_of), start, end,
                        speakers=tuple(req.speakers), session_ids=tuple(req.session_ids),
                        include_archived=req.include_archived)


def search_mode(value: int) -> str:
    if value not in SEARCH_MODES:
        raise InvalidField(f"mode {value} is not a SearchMode; use SEARCH_MODE_HYBRID, _DENSE or _LEXICAL",
                           field="mode")
    return SEARCH_MODES[value]


def writable(mode: int) -> bool:
    if mode not in (t.MOUNT_MODE_UNSPECIFIED, t.MOUNT_MODE_READ_ONLY, t.MOUNT_MODE_READ_WRITE):
        raise InvalidField(f"mode {mode} is not a MountMode; use MOUNT_MODE_READ_ONLY or "
                           "MOUNT_MODE_READ_WRITE", field="mode")
    return bool(mode == t.MOUNT_MODE_READ_WRITE)


def adapter(a: AdapterRecord, *, staged: bool = False) -> t.Adapter:
    lineage = dict(a.lineage)
    return t.Adapter(
        digest=a.digest, born_revision=0 if staged else a.born, staged=staged, config_bytes=a.config_bytes,
        weights_bytes=a.weights_bytes, rank=a.rank, target_modules=a.target_modules, base_model=a.base_model,
        lineage=t.AdapterLineage(
            origin=str(lineage.get("origin", "")), source_cube_id=str(lineage.get("source_cube_id", "")),
            source_revision=int(lineage.get("source_revision", 0)),
            source_item_ids=[str(i) for i in lineage.get("source_item_ids", [])],
            job_id=str(lineage.get("job_id", "")),
            settings={str(k): str(v) for k, v in dict(lineage.get("settings", {})).items()},
            model_fingerprint=str(lineage.get("model_fingerprint", "")),
            create_time=ts(int(lineage.get("create_ns", 0)))),
        tainted_by_purges=a.tainted)


def adapter_change(before: AdapterRecord | None, after: AdapterRecord | None) -> t.AdapterChange | None:
    if (before.digest if before else "") == (after.digest if after else ""):
        return None
    kind = "added" if before is None else "forgotten" if after is None else "changed"
    out = t.AdapterChange(kind=_CHANGE_KINDS[kind])
    if before is not None:
        out.before.CopyFrom(adapter(before))
    if after is not None:
        out.after.CopyFrom(adapter(after))
    return out


_JOB_STATES = {"queued": t.JOB_STATE_QUEUED, "running": t.JOB_STATE_RUNNING, "succeeded": t.JOB_STATE_SUCCEEDED,
               "failed": t.JOB_STATE_FAILED, "cancelled": t.JOB_STATE_CANCELLED}
# TrainSettings field -> runtime TrainSettings keyword (0 in the request means "the default").
TRAIN_SETTINGS = {"steps": "max_steps", "rank": "rank", "learning_rate": "lr", "seed": "seed"}


def train_settings(settings: t.TrainSettings) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for field, key in TRAIN_SETTINGS.items():
        value = getattr(settings, field)
        if value:
            out[key] = value
    if settings.rank:
        out["alpha"] = 2 * settings.rank  # keep the scale alpha/rank the defaults use
    if settings.steps:
        # Exactly that many steps: as many epochs as it takes, no early stop.
        out.update(epochs=1_000_000, early_stop_loss=0.0)
    return out


_JOB_KINDS = {"train": t.JOB_KIND_TRAIN, "extract": t.JOB_KIND_EXTRACT}


def extract_progress(p: dict[str, Any]) -> t.ExtractProgress:
    """An Extract job's counts (parametric/extract.progress_of) on the wire."""
    dropped, refused, answers = (dict(p.get(k, {})) for k in ("dropped", "refused", "answers_dropped"))
    return t.ExtractProgress(
        turns_total=p.get("turns_total", 0), turns_read=p.get("turns_read", 0), proposed=p.get("proposed", 0),
        kept=p.get("kept", 0), dropped=sum(dropped.values()), refused=sum(refused.values()),
        answers_dropped=sum(answers.values()), dropped_by_reason=dropped, refused_by_reason=refused,
        answers_dropped_by_reason=answers, added=p.get("added", 0), updated=p.get("updated", 0),
        retired=p.get("retired", 0), duplicates=p.get("duplicates", 0))


def job(j: JobRecord) -> t.Job:
    settings = t.TrainSettings(**{field: j.settings[key] for field, key in TRAIN_SETTINGS.items()
                                  if key in j.settings and j.kind == "train"})
    out = t.Job(job_id=j.job_id, state=_JOB_STATES[j.state], cube_id=j.cube_id, revision=j.revision,
                settings=settings, step=j.step, total_steps=j.total_steps, loss=j.loss, eta_seconds=j.eta_seconds,
                create_time=ts(j.create_ns), error=j.error, result_revision=j.result_revision,
                adapter_digest=j.adapter_digest, kind=_JOB_KINDS[j.kind])
    if j.kind == "extract":
        out.extract.CopyFrom(extract_progress(j.progress))
    if j.start_ns:
        out.start_time.CopyFrom(ts(j.start_ns))
    if j.end_ns:
        out.end_time.CopyFrom(ts(j.end_ns))
    return out
