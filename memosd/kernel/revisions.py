"""Revisions: Commit, Ingest, Rollback and a trained adapter's commit (item states: kernel/item_states.py).

Each makes one new revision at HEAD under the cube's lock: the plan
(kernel/history.py, kernel/conversation.py, kernel/adapters.py) is built
first, then one batch holds every row it changes, and only once that batch is
written are the catalog, the cube record and the indexes updated. A crash at
any point leaves the old or the new revision; the indexes catch up at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import numpy as np

from memosd.config import LimitsConfig
from memosd.errors import InternalError, InvalidField, RevisionNotFound
from memosd.kernel import adapters, clock, history, validate
from memosd.kernel.checks import check_readable, check_thawed
from memosd.kernel.conversation import plan_ingest
from memosd.kernel.memory_text import memory_text
from memosd.kernel.ports import EmbedderPort
from memosd.kernel.quotas import Quotas
from memosd.kernel.requests import Claim, RequestIdentity, RequestIds, RequestRef
from memosd.kernel.staging import Staging, drop_staged_files
from memosd.kernel.state import CubeState, MountState, meta_of
from memosd.kernel.table import Tables
from memosd.kernel.types import CommitResult, IngestResult, Message
from memosd.logfmt import log_event
from memosd.store.records import AdapterRecord, GenerationProvenance, RevisionRecord, VersionRecord
from memosd.store.rocks import Batch, Store

log = logging.getLogger("memosd.kernel")

class Revisions:
    def __init__(self, tables: Tables, staging: Staging, store: Store, embedder: EmbedderPort,
                 limits: LimitsConfig, quotas: Quotas, requests: RequestIds, *, sync: bool) -> None:
        self._tables = tables
        self._staging = staging  # for its writable-mount check
        self._store = store
        self._embedder = embedder
        self._limits = limits
        self._quotas = quotas
        self._requests = requests
        self._sync = sync

    # -- Commit ---------------------------------------------------------
    def commit(self, mount_id: str, message: str, author: str, request: RequestRef | None = None) -> CommitResult:
        """Commit the mount's staging as a new revision; with a request id, a retry gets the first result."""
        mount, cube = self._staging.writable(mount_id)
        with self._requests.claim(cube.cube_id, request, "commit", mount_id, message, author) as claim:
            if claim.done is not None:
                return self._commit_replay(cube, mount, claim.done.revision)
            return self._commit(cube, mount, message, author, claim)

    def _commit_replay(self, cube: CubeState, mount: MountState, number: int) -> CommitResult:
        revision = self._store.get_revision(cube.cube_id, number) if number else None
        if number and revision is None:
            raise InternalError(f"revision {number} of a recorded request is missing from the store")
        return CommitResult(revision, self._tables.mount_info(mount), number or cube.head)

    def _commit(self, cube: CubeState, mount: MountState, message: str, author: str, claim: Claim) -> CommitResult:
        mount_id = mount.mount_id
        with cube.lock, mount.lock:
            self._tables.check_mount_open(mount)
            check_thawed(cube, "Commit")
            head = cube.head
            adapter_plan = adapters.plan_staged(cube, head, mount.staged_adapter)
            if not mount.staging and adapter_plan is None:
                mount.record.base = head
                batch = self._store.batch()
                batch.put_mount(mount.record)
                claim.record(batch, mount_id)  # made no revision: a retry makes none either
                if mount.staged_adapter is not None:  # a staged change that changes nothing
                    drop_staged_files(batch, mount, self._tables.cubes.get(mount.record.cube_id))
                    batch.delete_staged_adapter(mount_id)
                self._store.write(batch, sync=False)
                mount.staged_adapter = None
                return CommitResult(None, self._tables.mount_info(mount), head)
            history.check_conflicts(cube.catalog, head, mount.staging)
            plan = history.plan_commit(cube.catalog, head, mount.staging, mount.vectors, cube.record.next_vkey)
            revision = self.make_revision(cube, plan, "commit", author, message, adapter_plan=adapter_plan,
                                           request_id=claim.request_id)
            # Staging, the mount's new base and the request id go in the same batch as the revision.
            self.write_revision(cube, plan, revision, mount, adapter_plan,
                                 also=lambda batch: claim.record(batch, mount_id, revision=revision.number))
            self._quotas.unstaged(mount.record.principal, mount.staged_total())
            mount.staging.clear()
            mount.vectors.clear()
            mount.staged_adapter = None
            log_event(log, "commit", cube=cube.cube_id, revision=revision.number, added=plan.added,
                      changed=plan.changed, forgotten=plan.forgotten, mount=mount_id)
            return CommitResult(revision, self._tables.mount_info(mount), revision.number)

    # -- Ingest ---------------------------------------------------------
    def ingest(self, mount_id: str, messages: Sequence[Message], *, tags: Sequence[str] = (), source: str = "",
               message: str = "", author: str = "", request: RequestRef | None = None,
               generation: GenerationProvenance | None = None, claim_as: RequestIdentity | None = None
               ) -> IngestResult:
        """Commit a conversation, one item per message, as one new revision (see kernel/conversation.py).

        Appends never conflict, so this commits directly rather than through the mount's staging, which
        it leaves as it was; the mount moves to the new revision, as after a Commit. With a request id, a
        retry (even one sent while this call still runs) gets this call's result and commits nothing.
        ``generation`` is the provenance a remembering Generate records on the revision; ``claim_as`` what
        the request id stands for when this Ingest is part of a larger call (that Generate's request, whose
        retry produces another reply text and other times)."""
        mount, cube = self._staging.writable(mount_id)
        validate.messages(messages, self._limits)
        validate.tags(tags, "tags")
        validate.source(source, "source")
        identity = claim_as or RequestIdentity("ingest", (mount_id, list(messages), list(tags), source, message,
                                                          author))
        with self._requests.claim(cube.cube_id, request, identity.kind, *identity.inputs) as claim:
            if claim.done is not None:
                revision = self._store.get_revision(cube.cube_id, claim.done.revision)
                if revision is None:
                    raise InternalError(f"revision {claim.done.revision} of a recorded request is missing")
                return IngestResult(list(claim.done.item_ids), revision, self._tables.mount_info(mount))
            # A message without a time is said now (its event time becomes the commit's, a moment later): its
            # "yesterday" is resolved against now (kernel/timeref.py).
            said = clock.now_ns()
            vectors = self._embedder.embed([memory_text(m.text, m.speaker, m.time_ns or said)  # slow: outside every lock
                                            for m in messages])
            with cube.lock, mount.lock:
                self._tables.check_mount_open(mount)
                check_thawed(cube, "Ingest")
                item_ids, plan = plan_ingest(messages, vectors, revision=cube.head + 1,
                                             next_vkey=cube.record.next_vkey, now=clock.now_ns(), tags=tags,
                                             source=source)
                revision = self.make_revision(cube, plan, "commit", author,
                                               message or f"ingest {len(messages)} messages",
                                               request_id=claim.request_id, generation=generation)
                self.write_revision(cube, plan, revision, mount, keep_staging=True,
                                     also=lambda batch: claim.record(batch, mount_id, revision=revision.number,
                                                                     item_ids=item_ids))
                log_event(log, "ingest", cube=cube.cube_id, revision=revision.number, added=plan.added,
                          sessions=len({m.session_id for m in messages}), mount=mount_id)
                return IngestResult(item_ids, revision, self._tables.mount_info(mount))

    # -- one revision ---------------------------------------------------
    @staticmethod
    def make_revision(cube: CubeState, plan: history.Plan, kind: str, author: str, message: str,
                       restored: int = 0, adapter_plan: adapters.AdapterPlan | None = None,
                       request_id: str = "", generation: GenerationProvenance | None = None) -> RevisionRecord:
        """The record of the revision after HEAD that ``plan`` makes (not written yet)."""
        head = cube.head
        items = cube.record.item_count + plan.added - plan.forgotten
        current = cube.adapter_at(head)
        digest = adapter_plan.digest_after if adapter_plan is not None else (current.digest if current else "")
        return RevisionRecord(head + 1, head, kind, author or "anonymous", message, clock.now_ns(),  # type: ignore[arg-type]
                              plan.added, plan.changed, plan.forgotten, items, restored,
                              adapter_changed=adapter_plan is not None, adapter_digest=digest,
                              request_id=request_id, generation=generation)

    def write_revision(self, cube: CubeState, plan: history.Plan, revision: RevisionRecord,
                        mount: MountState | None = None, adapter_plan: adapters.AdapterPlan | None = None,
                        adapter_files: tuple[bytes, bytes] | None = None, keep_staging: bool = False,
                        also: Callable[[Batch], None] | None = None) -> None:
        """One synced batch: new versions and vectors, ended versions, the revision, the cube record,
        for a commit the mount's cleared staging (kept by an ingest) and new base, and what ``also`` adds
        (the call's request id)."""
        record = replace(cube.record, head=revision.number, item_count=revision.item_count,
                         version_count=cube.record.version_count + len(plan.born),
                         next_vkey=cube.record.next_vkey + len(plan.born))
        batch = self._store.batch()
        ended: list[VersionRecord] = []
        stored = self._store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in plan.ended])
        for old in stored:
            assert old is not None
            old.died = revision.number
            ended.append(old)
            batch.put_version(cube.cube_id, old)
        for version, vector in plan.born:
            batch.put_version(cube.cube_id, version)
            batch.put_vector(cube.cube_id, version.vkey, vector)
        if adapter_plan is not None:
            if adapter_plan.ended is not None:
                batch.put_adapter(cube.cube_id, replace(adapter_plan.ended, died=revision.number))
            if adapter_plan.born is not None:
                batch.put_adapter(cube.cube_id, adapter_plan.born)
                if adapter_files is not None:
                    batch.put_adapter_files(cube.cube_id, adapter_plan.born.digest, *adapter_files)
        batch.put_revision(cube.cube_id, revision)
        batch.put_cube(record)
        mount_record = None
        if mount is not None:
            mount_record = replace(mount.record, base=revision.number)
            if not keep_staging:
                batch.clear_staging(mount.mount_id)
            batch.put_mount(mount_record)
        if also is not None:
            also(batch)
        self._store.write(batch, sync=self._sync)
        # Durable from here on: now update memory.
        cube.record = record
        if mount is not None and mount_record is not None:
            mount.record = mount_record
        for meta in plan.ended:
            meta.died = revision.number
        for version, _ in plan.born:
            cube.catalog.add(meta_of(version))
        if adapter_plan is not None:
            if adapter_plan.ended is not None:
                adapter_plan.ended.died = revision.number
            if adapter_plan.born is not None:
                cube.adapters.append(adapter_plan.born)
        if plan.born:
            keys = np.array([v.vkey for v, _ in plan.born], dtype=np.uint64)
            cube.index.add(keys, np.stack([vec for _, vec in plan.born]),
                           [memory_text(v.text, v.speaker, v.event_ns) for v, _ in plan.born])
            cube.index_dirty = True

    # -- Rollback -------------------------------------------------------
    def rollback(self, ref: str, target: int, message: str, author: str) -> RevisionRecord:
        cube = self._tables.cube(ref)
        with cube.lock:
            check_thawed(cube, "Rollback")
            head = cube.head
            if target > head:
                raise RevisionNotFound(f"cube {cube.record.name!r} has no revision {target}; HEAD is {head}",
                                       cube=cube.cube_id, revision=target, head=head)
            if target == head:
                raise InvalidField(f"to_revision {target} is HEAD already; roll back to an older revision "
                                   f"(0 to {head - 1})", field="to_revision")
            check_readable(cube, target, "roll back to")
            plan, revive = history.plan_rollback(cube.catalog, head, target)
            sources = self._store.get_versions(cube.cube_id, [(m.item_id, m.born) for m in revive])
            vectors = self._store.get_vectors(cube.cube_id, [m.vkey for m in revive])
            next_vkey = cube.record.next_vkey
            now = clock.now_ns()
            for source, vector in zip(sources, vectors, strict=True):
                assert source is not None and vector is not None
                copy = replace(source, vkey=next_vkey, born=head + 1, died=0, write_ns=now,
                               origin=source.content_id)
                next_vkey += 1
                plan.born.append((copy, vector))
            adapter_plan = adapters.plan_to(cube.adapter_at(head), cube.adapter_at(target), head + 1)
            revision = self.make_revision(cube, plan, "rollback", author,
                                           message or f"rollback to revision {target}", restored=target,
                                           adapter_plan=adapter_plan)
            self.write_revision(cube, plan, revision, adapter_plan=adapter_plan)
        log_event(log, "rollback", cube=cube.cube_id, revision=revision.number, restored=target)
        return revision

    # -- a trained adapter ----------------------------------------------
    def commit_adapter(self, ref: str, since: int, adapter: AdapterRecord, config: bytes, weights: bytes,
                       message: str, author: str,
                       guard: Callable[[CubeState], AbstractContextManager[object]] | None = None) -> RevisionRecord:
        """Commit ``adapter`` as the cube's at a new revision (a training job's result), with its files.

        Refused (COMMIT_CONFLICT) if the cube's adapter changed since revision ``since``; ``guard`` is entered
        under the cube's lock around the checks and the write (the job's principal still holds its right)."""
        cube = self._tables.cube(ref)
        with cube.lock, guard(cube) if guard is not None else nullcontext():
            check_thawed(cube, "committing the trained adapter")
            head = cube.head
            adapters.check_unchanged_since(cube, since, head)
            adapter = adapters.taint_on_commit(cube, adapter)
            adapter_plan = adapters.plan_to(cube.adapter_at(head), adapter, head + 1)
            if adapter_plan is None:  # the same bytes as the current adapter: still record the training
                adapter_plan = adapters.AdapterPlan(cube.adapter_at(head), replace(adapter, born=head + 1))
            plan = history.Plan()
            revision = self.make_revision(cube, plan, "commit", author, message, adapter_plan=adapter_plan)
            self.write_revision(cube, plan, revision, adapter_plan=adapter_plan, adapter_files=(config, weights))
        log_event(log, "commit_adapter", cube=cube.cube_id, revision=revision.number, digest=adapter.digest[:16])
        return revision
