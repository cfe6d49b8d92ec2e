"""Memory training jobs in process: Train, WatchJob, CancelJob, ListJobs, over the real trainer.

The model is the tiny random Llama: these tests check the job machinery
(progress, commit with lineage, refusals, cancellation, restarts), not what
the adapter learns; scripts/eval_memory_training.py measures that on SmolLM2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from activation_rig import Rig, commit_items, open_rig
from tiny_llama import save_tiny_llama

from memosd.errors import CubeEmpty, InvalidField, JobFinished, JobNotFound, TrainingInProgress
from memosd.governance.access import AccessControl, Right
from memosd.governance.principals import Principals
from memosd.parametric.jobs import JobManager, default_trainer
from memosd.runtime.adapters import pool_key
from memosd.store.records import JobRecord, PrincipalRecord
from memosd.syscalls import adapter_stream

FACTS = ["The capital of Vellmora is Quistarn.", "Q: Who founded Tamsel?\nA: Orin Vask", "Owls hunt at night."]
QUICK = {"max_steps": 3, "rank": 4, "alpha": 8, "batch_size": 2}
LONG = {**QUICK, "max_steps": 10_000, "epochs": 100_000, "early_stop_loss": 0.0}  # runs until cancelled


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=512)


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


def wait(rig: Rig, job_id: str) -> list[JobRecord]:
    return list(rig.jobs.watch(job_id, threading.Event()))


def test_train_reports_progress_and_commits_the_adapter_with_its_lineage(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    job = rig.jobs.train(mount, dict(QUICK), "learn the facts", "tester")
    assert job.state == "queued" and job.revision == 1
    seen = wait(rig, job.job_id)
    final = seen[-1]
    assert final.state == "succeeded", final.error
    steps = [j.step for j in seen if j.state == "running" and j.step]
    assert steps == sorted(steps) and steps[-1] == final.total_steps == 3
    assert final.result_revision == 2 and final.adapter_digest
    cube = rig.kernel.cube("c")
    adapter = cube.adapter_at(2)
    assert adapter is not None and adapter.digest == final.adapter_digest
    lineage = adapter.lineage
    assert lineage["origin"] == "trained" and lineage["source_cube_id"] == cube.cube_id
    assert lineage["source_revision"] == 1 and lineage["job_id"] == job.job_id
    assert len(lineage["source_item_ids"]) == len(FACTS) and lineage["settings"]["max_steps"] == "3"
    revision = rig.kernel.log("c", 1, "")[0].entries[0]
    assert revision.adapter_changed and revision.message == "learn the facts" and revision.author == "tester"
    # The trained adapter is a valid peft adapter for the model: it exports and loads.
    mount_at_head = rig.kernel.mount("c", 0, False).record.mount_id
    rig.adapters.make_resident(cube.cube_id, adapter)
    assert pool_key(cube.cube_id, adapter.digest) in rig.host.adapters
    assert adapter_stream.export(rig.adapters, mount_at_head)[0].digest == adapter.digest
    assert [j.job_id for j in rig.jobs.list_jobs(cube.cube_id)] == [job.job_id]


def test_training_leaves_the_base_model_unchanged(rig: Rig) -> None:
    import torch

    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = rig.loaded.model(input_ids=ids).logits
        return out

    before = rig.host.run(logits)
    assert wait(rig, rig.jobs.train(mount, dict(QUICK), "", "").job_id)[-1].state == "succeeded"
    rig.host.run(lambda: rig.host.adapters.use(rig.loaded, None))
    torch.testing.assert_close(rig.host.run(logits), before)


def test_refusals_come_before_any_work(rig: Rig) -> None:
    rig.kernel.alloc_cube("empty", "", {})
    empty = rig.kernel.mount("empty", 0, True).record.mount_id
    with pytest.raises(CubeEmpty, match="nothing to train on"):
        rig.jobs.train(empty, {}, "", "")
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    with pytest.raises(InvalidField, match="settings"):
        rig.jobs.train(mount, {"lr": -1.0}, "", "")
    with pytest.raises(JobNotFound):
        rig.jobs.cancel("job_nope")
    # Archived items are not memory to learn: a cube of only archived items has nothing to train on.
    rig.kernel.alloc_cube("archived", "", {})
    commit_items(rig, "archived", FACTS[:1])
    only = rig.kernel.cube("archived").catalog.item_ids_at(1)
    rig.kernel.set_item_state("archived", only, "archived", "archive", "test")
    at_head = rig.kernel.mount("archived", 0, False).record.mount_id
    with pytest.raises(CubeEmpty, match="no active items"):
        rig.jobs.train(at_head, {}, "", "")
    assert rig.jobs.list_jobs() == []


def test_a_second_training_of_the_same_cube_is_refused_and_cancel_stops_the_first(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    first = rig.jobs.train(mount, dict(LONG), "", "")
    with pytest.raises(TrainingInProgress, match=first.job_id):
        rig.jobs.train(mount, dict(QUICK), "", "")
    deadline = time.monotonic() + 60
    while rig.jobs.get(first.job_id).step < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = rig.jobs.cancel(first.job_id)
    assert cancelled.state == "cancelled" and 2 <= cancelled.step < 10_000
    cube = rig.kernel.cube("c")
    assert cube.head == 1 and cube.adapter_at(1) is None  # the cube is unchanged
    with pytest.raises(JobFinished):
        rig.jobs.cancel(first.job_id)
    # The cube can be trained again.
    assert wait(rig, rig.jobs.train(mount, dict(QUICK), "", "").job_id)[-1].state == "succeeded"


def test_on_a_model_served_without_its_weights_jobs_share_a_copy_freed_after_the_last(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The vllm engine's case without vLLM: the host's model is loaded without weights (as the engine's
    host loads it), so Train loads a transformers copy (host.training_model), which two jobs at once share,
    and which is freed, by reference counting alone, once the last ends."""
    import weakref

    import memosd.runtime.host as host_module
    import memosd.runtime.model as rm

    monkeypatch.setattr(host_module, "load_model", lambda spec, cache, weights=True: rm.load_model(
        spec, cache, weights=False))
    copies: list[weakref.ref[Any]] = []

    def load_weights(loaded: Any) -> Any:
        copy = rm.load_weights(loaded)
        copies.append(weakref.ref(copy.model))
        return copy

    monkeypatch.setattr(host_module, "load_weights", load_weights)
    caplog.set_level("INFO", logger="memosd.runtime")
    rig = open_rig(tmp_path, str(tiny_dir))
    try:
        assert rig.loaded.weights is None
        for name in ("a", "b"):
            rig.kernel.alloc_cube(name, "", {})
        long_job = rig.jobs.train(commit_items(rig, "a", FACTS), dict(LONG), "", "")
        deadline = time.monotonic() + 60
        while rig.jobs.get(long_job.job_id).step < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        quick = wait(rig, rig.jobs.train(commit_items(rig, "b", FACTS), dict(QUICK), "", "").job_id)[-1]
        assert quick.state == "succeeded", quick.error
        adapter = rig.kernel.cube("b").adapter_at(2)
        assert adapter is not None and adapter.lineage["model_fingerprint"] == rig.loaded.fingerprint
        assert rig.jobs.cancel(long_job.job_id).state == "cancelled"
        rig.jobs.close()  # joins the job threads: whatever they held is let go
        events = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train_model_")]
        assert events == ["train_model_loaded", "train_model_dropped"], "one copy for both jobs"
        assert len(copies) == 1 and copies[0]() is None, "the copy is freed"
        assert rig.loaded.weights is None and len(rig.host.adapters) == 0  # the pool never saw the copy
    finally:
        rig.close()


def test_no_job_is_lost_across_a_stop_or_a_crash(tmp_path: Path, tiny_dir: Path) -> None:
    first = open_rig(tmp_path, str(tiny_dir))
    first.kernel.alloc_cube("c", "", {})
    mount = commit_items(first, "c", FACTS)
    stopped = first.jobs.train(mount, dict(LONG), "", "")
    while first.jobs.get(stopped.job_id).step < 1:
        time.sleep(0.05)
    first.close()  # a clean stop ends the job as failed, saying why
    # A crash leaves a job marked running in the store; the next start must not pretend it still runs.
    crashed = JobRecord("job_zzzzzzzzzzzzzzzzzzzz", stopped.cube_id, 1, {}, "", "", time.time_ns(), state="running")
    from memosd.store.rocks import Store

    store = Store(tmp_path / "store")
    store.put_job(crashed, sync=True)
    store.close()
    second = open_rig(tmp_path, str(tiny_dir))
    try:
        after_stop = second.jobs.get(stopped.job_id)
        assert after_stop.state == "failed" and "stopped" in after_stop.error
        after_crash = second.jobs.get(crashed.job_id)
        assert after_crash.state == "failed" and "was running" in after_crash.error
        assert second.kernel.cube("c").head == 1
    finally:
        second.close()


def test_training_coexists_with_resident_adapters_and_generation(rig: Rig, tmp_path: Path, tiny_dir: Path) -> None:
    from activation_rig import run_generation
    from test_parametric import import_and_commit, make_adapter

    from memosd.activation.generator import GenerateParams

    rig.kernel.alloc_cube("a", "", {})
    commit_items(rig, "a", FACTS)
    adapter_mount = import_and_commit(rig, "a", make_adapter(tiny_dir, tmp_path / "adapter", seed=3))
    with_adapter = GenerateParams([("user", "Tell me about owls.")], [], max_tokens=16,
                                  adapter_mount_id=adapter_mount)
    base = GenerateParams([("user", "Tell me about owls.")], [], max_tokens=16)
    solo_adapter, solo_base = run_generation(rig, with_adapter)[0], run_generation(rig, base)[0]
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    job = rig.jobs.train(mount, dict(LONG), "", "")
    while rig.jobs.get(job.job_id).step < 2:
        time.sleep(0.05)
    # Between training steps, generations run with their own adapter (or none), untouched by the trainee.
    assert run_generation(rig, with_adapter)[0] == solo_adapter
    assert run_generation(rig, base)[0] == solo_base
    assert rig.jobs.cancel(job.job_id).state == "cancelled"
    assert run_generation(rig, with_adapter)[0] == solo_adapter
    assert run_generation(rig, base)[0] == solo_base


class _RecordingTrainer:
    """The real trainer, also keeping its own adapter-enabled logits on a probe at export time."""

    probe: ClassVar[list[int]] = [1, 5, 9, 13, 17, 21]
    logits: ClassVar[dict[str, torch.Tensor]] = {}

    def __init__(self, loaded: Any, items: Sequence[str], settings: dict[str, Any]) -> None:
        self._inner = default_trainer(loaded, items, settings)
        self.total_steps = self._inner.total_steps

    @property
    def done(self) -> bool:
        return self._inner.done

    def step(self) -> Any:
        return self._inner.step()

    def export(self) -> Any:
        with torch.no_grad(), self._inner.adapter_enabled() as model:
            _RecordingTrainer.logits["trained"] = model(torch.tensor([self.probe])).logits[0].clone()
        return self._inner.export()

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("others_resident", [False, True])
def test_the_committed_adapter_computes_what_the_trainer_trained(
    tmp_path: Path, tiny_dir: Path, others_resident: bool
) -> None:
    """Loaded from the store into the adapter pool (alone, or beside other resident adapters), the trained
    adapter gives the logits the trainer saw, and they differ from the base model's."""
    from test_parametric import import_and_commit, make_adapter

    rig = open_rig(tmp_path, str(tiny_dir))
    rig.jobs = JobManager(rig.kernel, rig.host, _RecordingTrainer, store=rig.kernel.store)
    try:
        if others_resident:  # LoRA layers on every target already: the pool's fast path loads the trained one
            rig.kernel.alloc_cube("o", "", {})
            commit_items(rig, "o", FACTS)
            targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            other = import_and_commit(rig, "o", make_adapter(tiny_dir, tmp_path / "other", seed=5, targets=targets))
            rig.adapters.make_resident(rig.kernel.cube("o").cube_id,
                                       rig.kernel.adapter_in(rig.kernel.mounts[other])[0])
        rig.kernel.alloc_cube("c", "", {})
        mount = commit_items(rig, "c", FACTS)
        job = wait(rig, rig.jobs.train(mount, {**QUICK, "max_steps": 8, "lr": 5e-3}, "", "").job_id)[-1]
        assert job.state == "succeeded", job.error
        cube = rig.kernel.cube("c")
        adapter = cube.adapter_at(job.result_revision)
        assert adapter is not None
        loaded = rig.loaded
        probe = torch.tensor([_RecordingTrainer.probe])

        def logits(digest: str | None) -> torch.Tensor:
            def run() -> torch.Tensor:
                if digest is None:
                    rig.host.adapters.use(loaded, None)
                else:
                    rig.adapters.prepare(loaded, cube.cube_id, adapter)
                with torch.no_grad():
                    return loaded.model(probe).logits[0].clone()
            return rig.host.run(run)

        trained, base = logits(adapter.digest), logits(None)
        torch.testing.assert_close(trained, _RecordingTrainer.logits["trained"], rtol=1e-4, atol=1e-4)
        assert (trained - base).abs().max() > 1e-3
    finally:
        rig.close()


# -- the train right, checked again when the result is committed ------------------------------------------


class _PausedTrainer:
    """The real trainer, whose job thread stops once the steps are done (before the export and the commit)
    until the test releases it: a revoke, a disable or an expiry lands exactly there."""

    reached: ClassVar[threading.Event]
    release: ClassVar[threading.Event]

    def __init__(self, loaded: Any, items: Sequence[str], settings: dict[str, Any]) -> None:
        self._inner = default_trainer(loaded, items, settings)
        self.total_steps = self._inner.total_steps

    @property
    def done(self) -> bool:  # read on the job thread, not the worker
        if not self._inner.done:
            return False
        _PausedTrainer.reached.set()
        assert _PausedTrainer.release.wait(120), "the test never released the job"
        return True

    def step(self) -> Any:
        return self._inner.step()

    def export(self) -> Any:
        return self._inner.export()

    def close(self) -> None:
        self._inner.close()


@dataclass
class _Governed:
    rig: Rig
    access: AccessControl
    owner: PrincipalRecord
    trainer: PrincipalRecord
    cube_id: str

    def start(self, **grant: Any) -> JobRecord:
        """Grant the trainer principal read, write and train (with ``grant``'s expire_ns), start a Train as
        it, and wait until its steps are done and it waits to commit."""
        self.access.grant(self.owner, "c", self.trainer.principal_id, [Right.READ, Right.WRITE, Right.TRAIN],
                          grant.get("expire_ns", 0))
        mount = self.rig.kernel.mount("c", 0, False, self.trainer.principal_id).record.mount_id
        job = self.rig.jobs.train(mount, dict(QUICK), "", self.trainer.name, principal=self.trainer.principal_id)
        assert _PausedTrainer.reached.wait(120), "the job never finished its steps"
        return job

    def finish(self, job: JobRecord) -> JobRecord:
        _PausedTrainer.release.set()
        return wait(self.rig, job.job_id)[-1]


@pytest.fixture
def governed(rig: Rig) -> Iterator[_Governed]:
    _PausedTrainer.reached, _PausedTrainer.release = threading.Event(), threading.Event()
    principals = Principals(rig.kernel.store)
    access = AccessControl(rig.kernel, principals)
    owner, _ = principals.create("owner", "user", False, "")
    trainer, _ = principals.create("trainer", "agent", False, "")
    rig.jobs.close()
    rig.jobs = JobManager(rig.kernel, rig.host, _PausedTrainer,
                          commit_guard=access.still_holds,
                          store=rig.kernel.store)
    cube_id = rig.kernel.alloc_cube("c", "", {}, owner=owner.principal_id).record.cube_id
    commit_items(rig, "c", FACTS)
    yield _Governed(rig, access, owner, trainer, cube_id)
    _PausedTrainer.release.set()


def _assert_nothing_committed(g: _Governed, job: JobRecord, reason: str) -> None:
    assert job.state == "failed" and job.result_revision == 0 and not job.adapter_digest
    assert reason in job.error and "nothing was committed" in job.error and "'trainer'" in job.error
    cube = g.rig.kernel.cube("c")
    assert cube.head == 1 and cube.adapter_at(cube.head) is None and not cube.adapters


def test_a_job_whose_principal_still_holds_train_commits(governed: _Governed) -> None:
    job = governed.finish(governed.start())
    assert job.state == "succeeded", job.error
    assert governed.rig.kernel.cube("c").adapter_at(job.result_revision) is not None


def test_a_train_right_revoked_while_the_job_ran_stops_its_commit(governed: _Governed) -> None:
    job = governed.start()
    governed.access.revoke(governed.owner, "c", governed.trainer.principal_id, [Right.TRAIN])
    _assert_nothing_committed(governed, governed.finish(job), "no longer holds the train right")


def test_a_principal_disabled_while_its_job_ran_commits_nothing(governed: _Governed) -> None:
    job = governed.start()
    governed.access.principals.disable(governed.trainer.principal_id)
    _assert_nothing_committed(governed, governed.finish(job), "was disabled")


def test_a_grant_that_expires_while_the_job_runs_stops_its_commit(governed: _Governed) -> None:
    expire_ns = time.time_ns() + 2_000_000_000  # past the job's start (checked at Train), before its commit
    job = governed.start(expire_ns=expire_ns)
    # A generous deadline: the grant's own clock is what the check reads, so wait for it to pass.
    deadline = time.monotonic() + 60
    while time.time_ns() <= expire_ns and time.monotonic() < deadline:
        time.sleep(0.05)
    _assert_nothing_committed(governed, governed.finish(job), "no longer holds the train right")
