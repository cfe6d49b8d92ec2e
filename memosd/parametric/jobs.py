"""Train, WatchJob, CancelJob, ListJobs: memory training as background jobs.

A job trains a LoRA adapter from a cube's items at one revision, on its own
thread, which hands each optimizer step to the runtime worker at background
priority (so chats and activations keep their turn between steps). When the
steps are done the adapter is exported and committed to the cube as a new
revision, with its lineage. A job that fails or is cancelled leaves the cube
unchanged. Jobs are persisted at every state change and step; a job that was
queued or running when the daemon stopped is marked failed at the next start,
so none is ever lost silently.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, NoReturn, Protocol

from memosd.errors import (
    CubeEmpty,
    ExtractionInProgress,
    InvalidField,
    JobFinished,
    JobNotFound,
    MemosError,
    TrainingInProgress,
)
from memosd.governance.access import Right
from memosd.kernel import ids, validate
from memosd.kernel.kernel import CubeState, Kernel, check_thawed
from memosd.kernel.memory_text import memory_text
from memosd.logfmt import log_event
from memosd.parametric import extract
from memosd.park import Park, done_future, resolve
from memosd.reader.pipeline import Extractor, Turn, chunks, read_turns
from memosd.reader.types import Counts
from memosd.runtime.adapters import adapter_digest
from memosd.runtime.host import ModelHost
from memosd.runtime.malloc import return_freed_memory
from memosd.runtime.model import LoadedModel
from memosd.runtime.worker import PRIORITY_BACKGROUND
from memosd.store.records import AdapterRecord, JobRecord
from memosd.store.rocks import Store

log = logging.getLogger("memosd.jobs")

MAX_JOBS = 100


class Trainer(Protocol):
    """What a job needs from a trainer (``memosd.runtime.lora_train.LoraTrainer``)."""

    total_steps: int

    @property
    def done(self) -> bool: ...

    def step(self) -> Any: ...  # -> StepResult with .step and .loss

    def export(self) -> Any: ...  # -> AdapterExport with .state_dict and .config

    def close(self) -> None: ...


TrainerFactory = Callable[[LoadedModel, Sequence[str], dict[str, Any]], Trainer]
# (principal id, cube) -> held around the commit of a job's result: refuses (PermissionDenied) unless the
# principal still holds the train right, and keeps it so meanwhile (AccessControl.still_holds).
CommitGuard = Callable[[str, Right, CubeState], AbstractContextManager[object]]


def check_settings(settings: dict[str, Any]) -> None:
    """Refuse bad settings now, not in the background. Raises InvalidField."""
    from memosd.runtime.lora_train import TrainSettings

    try:
        TrainSettings(**settings)
    except (TypeError, ValueError) as error:
        raise InvalidField(f"bad training settings: {error}", field="settings") from None


def default_trainer(loaded: LoadedModel, items: Sequence[str], settings: dict[str, Any]) -> Trainer:
    from memosd.runtime.lora_train import LoraTrainer, TrainSettings

    return LoraTrainer(loaded, items, TrainSettings(**settings))


class JobManager:
    def __init__(self, kernel: Kernel, host: ModelHost, trainer: TrainerFactory = default_trainer,
                 commit_guard: CommitGuard | None = None, *, store: Store,
                 extract_endpoints: Sequence[str] = ()) -> None:
        self.kernel = kernel
        self._store = store  # the jobs column family is this layer's own
        self.host = host
        self._make_trainer = trainer
        self._commit_guard = commit_guard  # None: no rights to check (in-process tests without governance)
        self._extract_endpoints = tuple(extract_endpoints)  # [reader] endpoints: the URLs Extract may call
        self._cond = threading.Condition()
        self._jobs: dict[str, JobRecord] = {}
        self._watchers: dict[str, list[Future[Any]]] = {}  # job id -> waiters for its next change
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = False
        for job in store.iter_jobs():
            if not job.finished:
                job = replace(job, state="failed", end_ns=time.time_ns(),
                              error=f"memosd stopped while the job was {job.state}; nothing was committed. "
                                    "Start the training again")
                store.put_job(job, sync=True)
                log_event(log, "job_failed_at_restart", job=job.job_id, cube=job.cube_id)
                if job.kind == "extract" and job.settings.get("commit_mount"):  # mounts outlive a restart
                    extract.close_commit_mount(kernel, str(job.settings["commit_mount"]))
            self._jobs[job.job_id] = job

    def _check_servable_rank(self, settings: dict[str, Any]) -> None:
        """Refuse a rank the engine could not serve: the adapter would train for minutes, then every
        Generate with it would fail (vLLM's LoRA slots are sized for ``runtime.max_lora_rank``)."""
        from memosd.runtime.lora_train import TrainSettings

        limit = self.host.config.max_lora_rank
        rank = TrainSettings(**settings).rank
        if self.host.engine_kind == "vllm" and rank > limit:
            raise InvalidField(f"settings.rank is {rank}; the engine serves adapters up to runtime.max_lora_rank "
                               f"= {limit}. Train with rank <= {limit}, or raise runtime.max_lora_rank and restart "
                               "memosd", field="settings.rank")

    # -- syscalls ---------------------------------------------------------------
    def train(self, mount_id: str, settings: dict[str, Any], message: str, author: str,
              principal: str = "") -> JobRecord:
        """Start a job training the mount's cube at its revision; ``principal`` (who asked) must still hold
        the train right when the result is committed ("": memosd itself, the scheduler)."""
        mount = self.kernel.mount_state(mount_id)
        cube = self.kernel.cube_of(mount)
        check_thawed(cube, "Train (its result would be committed)")
        revision = mount.record.base
        steps = int(settings.get("max_steps", 0))
        validate.train_steps(steps)
        check_settings(settings)
        self._check_servable_rank(settings)
        # Archived and expired items are not memory to learn.
        metas = sorted(self.kernel.visible_items(cube.cube_id, revision, time.time_ns()), key=lambda m: m.vkey)
        if not metas:
            raise CubeEmpty(f"cube {cube.record.name!r} has no active items at revision {revision}: there is nothing "
                            "to train on. Write and commit items (or restore archived ones) first",
                            cube=cube.cube_id, revision=revision)
        self.host.model()  # refuse now, not in the background, when there is no model
        with self._cond:
            busy = [j for j in self._jobs.values() if j.cube_id == cube.cube_id and not j.finished
                    and j.kind == "train"]
            if busy:
                raise TrainingInProgress(
                    f"cube {cube.record.name!r} already has training job {busy[0].job_id} ({busy[0].state}); "
                    "wait for it (WatchJob) or cancel it (CancelJob) first", job=busy[0].job_id)
            job = JobRecord(ids.new_id(ids.JOB_PREFIX, self.kernel.node_tag), cube.cube_id, revision, settings, message, author,
                            time.time_ns(), principal=principal)
            self._save(job)
            self._cancel[job.job_id] = threading.Event()
            self._prune()
        thread = threading.Thread(target=self._run, args=(job.job_id, [(m.item_id, m.born) for m in metas]),
                                  name=f"train-{job.job_id}", daemon=True)
        self._threads[job.job_id] = thread
        thread.start()
        log_event(log, "train", job=job.job_id, cube=cube.cube_id, revision=revision, items=len(metas))
        return job

    def extract(self, mount_id: str, url: str, token: str, model: str, max_tokens: int, message: str,
                author: str, principal: str = "", *, reread: bool = False) -> JobRecord:
        """Start a MemReader job over the read-write mount's turns at its base revision (parametric/
        extract.py); its result is committed at HEAD. ``token`` stays in memory: it is not in the record.
        Incremental unless ``reread``: only the turns born after the revision the cube's last successful
        extraction read (``read_through``) are read."""
        self.kernel.writable_mount(mount_id)  # MOUNT_READ_ONLY / CUBE_FROZEN now, not in the background
        mount = self.kernel.mount_state(mount_id)
        cube = self.kernel.cube_of(mount)
        revision = mount.record.base
        budget = validate.extractor(url, token, model, max_tokens, self._extract_endpoints)
        since = 0 if reread else min(self.read_through(cube.cube_id), revision)
        turns = extract.turns_at(self.kernel, cube.cube_id, revision, since)
        if not turns and since:
            raise CubeEmpty(f"cube {cube.record.name!r} has no conversation turns new since revision {since}, which "
                            "its last extraction read: there is nothing new to read. Ingest more, or ask to reread "
                            "every turn", cube=cube.cube_id, revision=revision)
        if not turns:
            raise CubeEmpty(f"cube {cube.record.name!r} has no conversation turns at revision {revision}: there is "
                            "nothing to read. Ingest a conversation first", cube=cube.cube_id, revision=revision)
        validate.extract_turns(len(turns), cube.record.name, revision)  # TOO_MANY_ITEMS now, at the syscall
        if not url:
            self.host.model()  # refuse now, not in the background, when there is no model
        commit_mount = extract.open_commit_mount(self.kernel, cube.cube_id, principal)  # not under _cond
        started = False
        try:
            with self._cond:
                busy = [j for j in self._jobs.values() if j.cube_id == cube.cube_id and not j.finished
                        and j.kind == "extract"]
                if busy:
                    raise ExtractionInProgress(
                        f"cube {cube.record.name!r} already has extraction job {busy[0].job_id} ({busy[0].state}); "
                        "wait for it (WatchJob) or cancel it (CancelJob) first", job=busy[0].job_id)
                settings = {"extractor": "endpoint" if url else "model", "url": url, "model": model,
                            "max_tokens": budget, "commit_mount": commit_mount, "since": since}
                job = JobRecord(ids.new_id(ids.JOB_PREFIX), cube.cube_id, revision, settings, message, author,
                                time.time_ns(), principal=principal, kind="extract",
                                progress=extract.progress_of(Counts(), len(turns)))
                self._save(job)
                self._cancel[job.job_id] = threading.Event()
                self._prune()
            thread = threading.Thread(target=self._run_extract, args=(job.job_id, turns, token, commit_mount),
                                      name=f"extract-{job.job_id}", daemon=True)
            self._threads[job.job_id] = thread
            thread.start()
            started = True
        finally:
            # Refused, or the record or the thread could not be made: the mount is in no job to close it (it is
            # persisted, and would pin its revision against compaction for good).
            if not started:
                extract.close_commit_mount(self.kernel, commit_mount)
        log_event(log, "extract", job=job.job_id, cube=cube.cube_id, revision=revision, turns=len(turns),
                  extractor=settings["extractor"])
        return job

    def read_through(self, cube_id: str) -> int:
        """The revision the cube's last successful extraction read (0: none is on record). The mark is the job
        records themselves (persisted, the last ``MAX_JOBS`` kept): once pruned, the next run reads every
        turn again, which costs model time but stores nothing twice (reconcile finds the duplicates)."""
        with self._cond:
            return max((j.revision for j in self._jobs.values()
                        if j.cube_id == cube_id and j.kind == "extract" and j.state == "succeeded"), default=0)

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            self.not_found(job_id)
        return job

    @staticmethod
    def not_found(job_id: str) -> NoReturn:
        """The refusal for an unknown job id, and for a job of a cube the caller cannot see."""
        raise JobNotFound(f"no job {job_id!r}; ListJobs shows the last {MAX_JOBS}", job=job_id)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.finished:
            raise JobFinished(f"job {job_id} already ended ({job.state}); there is nothing to cancel",
                              job=job_id, state=job.state)
        self._cancel[job_id].set()
        log_event(log, "cancel_job", job=job_id)
        # The job thread ends it at its next step boundary; wait a little so the answer shows the outcome.
        deadline = time.monotonic() + 30
        with self._cond:
            while not self._jobs[job_id].finished and time.monotonic() < deadline:
                self._cond.wait(0.5)
            return self._jobs[job_id]

    def list_jobs(self, cube_id: str = "") -> list[JobRecord]:
        with self._cond:
            jobs = [j for j in self._jobs.values() if not cube_id or j.cube_id == cube_id]
        return sorted(jobs, key=lambda j: j.job_id, reverse=True)

    def watch(self, job_id: str, stop: threading.Event, *, park: bool = False) -> Iterator[JobRecord | Park]:
        """The job now, then again at every change, until it ends (or ``stop`` is set: the caller left).

        With ``park`` it waits for a change by yielding ``Park`` (the gate awaits it holding no thread)."""
        last = self.get(job_id)
        yield last
        while not last.finished and not stop.is_set():
            with self._cond:
                if park:
                    changed = self._changed(job_id, last)
                else:
                    self._cond.wait_for(lambda seen=last: self._jobs[job_id] is not seen or stop.is_set(),  # type: ignore[misc]
                                        timeout=1.0)
            if park:
                yield Park(changed)
            with self._cond:
                current = self._jobs[job_id]
            if current is not last:
                last = current
                yield last

    def _changed(self, job_id: str, seen: JobRecord) -> Future[Any]:
        """A future done when the job's record is no longer ``seen`` (called with the condition held)."""
        if self._jobs[job_id] is not seen:
            return done_future()
        waiters = [w for w in self._watchers.get(job_id, []) if not w.done()]
        waiter: Future[Any] = Future()
        self._watchers[job_id] = [*waiters, waiter]
        return waiter

    def close(self, timeout: float = 30.0) -> None:
        """Stop every job at its next step (they end failed: the daemon is stopping) and wait for them."""
        with self._cond:
            self._stopping = True
        for event in self._cancel.values():
            event.set()
        for thread in list(self._threads.values()):
            thread.join(timeout)

    # -- the job thread -----------------------------------------------------------
    def _run(self, job_id: str, refs: list[tuple[str, int]]) -> None:
        cancel = self._cancel[job_id]
        job = self._update(job_id, state="running", start_ns=time.time_ns())
        try:
            config, weights, fingerprint = self._train(job, refs, cancel)
            job = self.get(job_id)
            record = self._adapter_record(job, fingerprint, refs, config, weights)
            revision = self.kernel.commit_adapter(job.cube_id, job.revision, record, config, weights,
                                                  job.message or f"memory training ({job_id})",
                                                  job.author or "memosd-train", guard=self._guard(job))
            self._update(job_id, state="succeeded", end_ns=time.time_ns(), eta_seconds=0.0,
                         result_revision=revision.number, adapter_digest=record.digest)
            log_event(log, "job_succeeded", job=job_id, cube=job.cube_id, revision=revision.number,
                      steps=job.step, loss=round(job.loss, 4))
        except _Stopped:
            state, why = ("failed", "memosd stopped while the job ran; start it again") if self._stopping else (
                "cancelled", "")
            self._update(job_id, state=state, end_ns=time.time_ns(), error=why, eta_seconds=0.0)
            log_event(log, f"job_{state}", job=job_id)
        except Exception as error:  # reported on the job; the daemon goes on
            why = _job_error(error, job_id)
            self._update(job_id, state="failed", end_ns=time.time_ns(), error=why, eta_seconds=0.0)
            log_event(log, "job_failed", level=logging.WARNING, job=job_id, error=why, detail=str(error),
                      exc_info=None if isinstance(error, MemosError) else error)
        finally:
            # Training freed hundreds of MB into malloc's arenas, where they would stay (runtime/malloc.py).
            # Nothing of the job is held by now: _train's frame is gone, and with it any error's traceback.
            return_freed_memory()

    def _run_extract(self, job_id: str, turns: list[Turn], token: str, commit_mount: str) -> None:
        cancel = self._cancel[job_id]
        try:  # everything inside: the finally closes the job's commit mount whatever fails
            job = self._update(job_id, state="running", start_ns=time.time_ns())
            self._update(job_id, total_steps=len(chunks(turns)))

            def progress(counts: Counts) -> None:
                self._update(job_id, step=counts.prompts, progress=extract.progress_of(counts, len(turns)))
                if cancel.is_set():
                    raise _Stopped()

            if cancel.is_set():
                raise _Stopped()
            settings = job.settings
            if settings["url"]:  # a cancel stops the wait for the endpoint, and a model's decode between steps
                kept, counts = read_turns(turns, extract.EndpointExtractor(
                    settings["url"], token, settings["model"], settings["max_tokens"], stop=cancel), progress)
            elif self.host.engine is not None:  # vllm: the serving engine decodes it, constrained by vLLM
                reader: Extractor = extract.ModelExtractor(self.host, self.host.model(), settings["max_tokens"], cancel,
                                                           engine=self.host.engine)
                kept, counts = read_turns(turns, reader, progress)
            else:  # transformers: the serving model's weights, on the worker in short steps
                with self.host.training_model() as loaded:
                    reader = extract.ModelExtractor(self.host, loaded, settings["max_tokens"], cancel)
                    kept, counts = read_turns(turns, reader, progress)
            job = self.get(job_id)
            self._check_still_holds(job, Right.WRITE)  # an expired grant closes no mount: check it now
            done = extract.commit_result(self.kernel, job.cube_id, commit_mount, kept, job_id=job_id,
                                         message=job.message or f"memory extraction ({job_id})",
                                         author=job.author or "memosd-extract")
            plan = done.plan
            self._update(job_id, state="succeeded", end_ns=time.time_ns(), result_revision=done.revision,
                         progress={**extract.progress_of(counts, len(turns)), "added": len(plan.adds),
                                   "updated": len(plan.updates), "retired": len(plan.retires),
                                   "duplicates": plan.outcomes["duplicate"], "sources_gone": done.sources_gone})
            log_event(log, "job_succeeded", job=job_id, cube=job.cube_id, revision=done.revision,
                      kept=counts.kept, proposed=counts.proposed, added=len(plan.adds), updated=len(plan.updates),
                      retired=len(plan.retires))
        except (_Stopped, extract.Cancelled):
            state, why = ("failed", "memosd stopped while the job ran; start it again") if self._stopping else (
                "cancelled", "")
            self._update(job_id, state=state, end_ns=time.time_ns(), error=why)
            log_event(log, f"job_{state}", job=job_id)
        except Exception as error:  # reported on the job; the daemon goes on
            why = _job_error(error, job_id)
            self._update(job_id, state="failed", end_ns=time.time_ns(), error=why)
            log_event(log, "job_failed", level=logging.WARNING, job=job_id, error=why, detail=str(error),
                      exc_info=None if isinstance(error, (MemosError, extract.EndpointError)) else error)
        finally:
            extract.close_commit_mount(self.kernel, commit_mount)

    def _train(self, job: JobRecord, refs: list[tuple[str, int]], cancel: threading.Event
               ) -> tuple[bytes, bytes, str]:
        """The adapter's files (config, weights) and the fingerprint of the model it was trained on. On the
        vllm engine a transformers copy is loaded for it (host.training_model), freed as this returns."""
        with self.host.training_model() as loaded:
            config, weights = self._fit(job, refs, cancel, loaded)
            return config, weights, loaded.fingerprint

    def _fit(self, job: JobRecord, refs: list[tuple[str, int]], cancel: threading.Event, loaded: LoadedModel
             ) -> tuple[bytes, bytes]:
        """Train the adapter on ``loaded`` step by step on the worker; its files (config, weights)."""
        job_id = job.job_id
        versions = self.kernel.versions(job.cube_id, refs)
        texts = [memory_text(v.text, v.speaker, v.event_ns) for v in versions if v is not None]
        trainer = self.host.run(lambda: self._make_trainer(loaded, texts, job.settings), priority=PRIORITY_BACKGROUND)
        try:
            self._update(job_id, total_steps=trainer.total_steps)
            started = time.monotonic()
            while not trainer.done:
                if cancel.is_set():
                    raise _Stopped()
                result = self.host.run(lambda: self._step(trainer, loaded), priority=PRIORITY_BACKGROUND)
                elapsed = time.monotonic() - started
                eta = elapsed / result.step * (trainer.total_steps - result.step)
                self._update(job_id, step=result.step, loss=float(result.loss), eta_seconds=eta)
            from memosd.runtime.lora_train import serialize  # imported when used, as the trainer is

            exported = self.host.run(trainer.export, priority=PRIORITY_BACKGROUND)
            return self.host.run(lambda: serialize(exported, loaded), priority=PRIORITY_BACKGROUND)
        finally:
            self.host.run(lambda: self._close(trainer, loaded))

    def _guard(self, job: JobRecord, right: Right = Right.TRAIN
               ) -> Callable[[CubeState], AbstractContextManager[object]] | None:
        """What the commit of the job's result is held under: its principal's right, checked again."""
        guard, principal = self._commit_guard, job.principal
        if guard is None or not principal:
            return None
        return lambda cube: guard(principal, right, cube)

    def _check_still_holds(self, job: JobRecord, right: Right) -> None:
        """Refuse (PermissionDenied) unless the job's principal still holds ``right`` on its cube. A check, not
        a hold: Extract commits through the kernel's own commit, which takes the cube's lock, and that lock
        is taken before the access locks, never after them (what holding the guard around it would do)."""
        guard = self._guard(job, right)
        if guard is not None:
            with guard(self.kernel.cube(job.cube_id)):
                pass

    def _step(self, trainer: Trainer, loaded: LoadedModel) -> Any:
        try:
            return trainer.step()
        finally:
            self._invalidate(loaded)  # the trainer switched the model's adapter state

    def _close(self, trainer: Trainer, loaded: LoadedModel) -> None:
        try:
            trainer.close()
        finally:
            self._invalidate(loaded)

    def _invalidate(self, loaded: LoadedModel) -> None:
        """Tell the adapter pool the serving model's LoRA layers changed; a training copy (vllm) is no
        model of the pool's."""
        if loaded is self.host.loaded_now():
            self.host.adapters.invalidate(loaded)

    def _adapter_record(self, job: JobRecord, fingerprint: str, refs: list[tuple[str, int]], config: bytes,
                        weights: bytes) -> AdapterRecord:
        cfg = json.loads(config)
        return AdapterRecord(
            digest=adapter_digest(config, weights), config_bytes=len(config), weights_bytes=len(weights),
            rank=int(cfg.get("r", 0)), target_modules=sorted(cfg.get("target_modules") or []),
            base_model=str(cfg.get("base_model_name_or_path") or ""),
            lineage={"origin": "trained", "source_cube_id": job.cube_id, "source_revision": job.revision,
                     "source_item_ids": [item_id for item_id, _ in refs], "job_id": job.job_id,
                     "settings": {k: str(v) for k, v in job.settings.items()},
                     "model_fingerprint": fingerprint, "create_ns": time.time_ns()})

    # -- state ----------------------------------------------------------------------
    def _update(self, job_id: str, **changes: Any) -> JobRecord:
        with self._cond:
            job = replace(self._jobs[job_id], **changes)
            self._save(job)
            return job

    def _save(self, job: JobRecord) -> None:
        """Persist and publish (called with the condition held). State changes are synced, steps not."""
        self._store.put_job(job, sync=job.finished)
        self._jobs[job.job_id] = job
        self._cond.notify_all()
        for waiter in self._watchers.pop(job.job_id, []):
            resolve(waiter)

    def _prune(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.job_id)
        for job in finished[: max(0, len(self._jobs) - MAX_JOBS)]:
            self._store.delete_job(job.job_id)
            del self._jobs[job.job_id]
            self._cancel.pop(job.job_id, None)
            self._threads.pop(job.job_id, None)


def _job_error(error: Exception, job_id: str) -> str:
    """What a failed job says to whoever may watch it: a refusal's own message, an endpoint's answer; for
    anything else only its kind (its text may hold paths or internals: the log has it, with the trace)."""
    if isinstance(error, MemosError):
        return error.message
    if isinstance(error, extract.EndpointError):
        return str(error)
    return f"internal error ({type(error).__name__}); the daemon's log has the details of job {job_id}"


class _Stopped(Exception):
    """The job was cancelled, or the daemon is stopping."""
