"""Activation selectors and the MemScheduler, in process over the tiny random Llama.

Usage is recorded straight into the rig's UsageTracker (what Search, Read and
Generate do through gRPC); the scheduler's passes are driven with ``tick``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import pytest
from activation_rig import Rig, commit_items, open_rig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_llama import save_tiny_llama

from memosd.activation import select
from memosd.activation.scheduler import Scheduler
from memosd.errors import ContextExceeded, CubeEmpty, InvalidField, ItemNotFound
from memosd.kernel.catalog import VersionMeta
from memosd.kernel.usage import ItemUsage, UsageTracker
from memosd.runtime.worker import PRIORITY_BACKGROUND, PRIORITY_DEFAULT, PRIORITY_INTERACTIVE

CONTEXT = 512
T = TypeVar("T")
FACTS = [f"fact {i}: the harbour of town {i} freezes in month {i % 12}" for i in range(12)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=CONTEXT)


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


@pytest.fixture(scope="module")
def adapter_files(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    from test_parametric import make_adapter

    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter"), seed=4)


def usage_of(rig: Rig) -> UsageTracker:
    tracker = rig.activator.usage
    assert tracker is not None
    return tracker


def use(rig: Rig, cube: str, item_ids: list[str], times: int = 1) -> None:
    cube_id = rig.kernel.cube(cube).cube_id
    for _ in range(times):
        usage_of(rig).record("search", [cube_id], [(cube_id, i) for i in item_ids])


def ids_of(rig: Rig, cube: str) -> list[str]:
    state = rig.kernel.cube(cube)
    return [m.item_id for m in sorted(state.catalog.alive_at(state.head), key=lambda m: m.vkey)]


# --- selectors -----------------------------------------------------------------------------------------


def test_the_working_set_is_the_most_used_then_the_newest_in_commit_order() -> None:
    metas = [VersionMeta(v, f"i{v}", 1, 0, frozenset(), 0, v) for v in range(1, 7)]
    now = time.time_ns()
    usage = {"i2": ItemUsage(5, now), "i5": ItemUsage(1, now), "i1": ItemUsage(9, now - 10 * 3600 * 10**9)}
    # Scores: i2 5, i5 1, i1 9 hits ten half-lives ago ~0.009; never used: 0, the newest first.
    assert [m.item_id for m in select.working_set(metas, usage, 2, now)] == ["i2", "i5"]
    assert [m.item_id for m in select.working_set(metas, usage, 3, now)] == ["i1", "i2", "i5"]
    assert [m.item_id for m in select.working_set(metas, usage, 4, now)] == ["i1", "i2", "i5", "i6"]
    assert select.drift(["a", "b"], ["a", "b"]) == 0 and select.drift(["a", "b"], ["b", "c"]) == pytest.approx(2 / 3)


def test_selectors_pick_items_tags_and_the_working_set(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS[:6])
    ids = ids_of(rig, "c")
    picked = rig.activator.activate(mount, selector=select.Selector("items", item_ids=(ids[4], ids[1])))
    assert [i for i, _ in picked.record.items] == [ids[1], ids[4]] and picked.record.selector == "items"
    use(rig, "c", [ids[3]], times=3)
    use(rig, "c", [ids[0]])
    hot = rig.activator.activate(mount, selector=select.Selector("working_set", size=2))
    assert [i for i, _ in hot.record.items] == [ids[0], ids[3]] and hot.record.selector == "working_set:2"
    with pytest.raises(ItemNotFound):
        rig.activator.activate(mount, selector=select.Selector("items", item_ids=("itm_aaaaaaaaaaaaaaaaaaaa",)))
    with pytest.raises(CubeEmpty, match="tag:none"):
        rig.activator.activate(mount, selector=select.Selector("tag", tag="none"))
    with pytest.raises(InvalidField):
        rig.activator.activate(mount, selector=select.Selector("items"))


def test_a_cube_too_large_to_encode_whole_activates_through_its_working_set(rig: Rig) -> None:
    rig.kernel.alloc_cube("big", "", {})
    mount = commit_items(rig, "big", [f"{f} and more words to fill the context {j}" for j in range(4) for f in FACTS])
    with pytest.raises(ContextExceeded):
        rig.activator.activate(mount)
    out = rig.activator.activate(mount, selector=select.Selector("working_set", size=4))
    assert len(out.record.items) == 4 and len(out.record.token_ids) < CONTEXT


# --- the scheduler ---------------------------------------------------------------------------------------


def test_auto_activation_converges_and_reuses_the_prefix(rig: Rig) -> None:
    rig.kernel.alloc_cube("auto", "", {})
    commit_items(rig, "auto", FACTS[:6])
    rig.kernel.alloc_cube("manual", "", {})
    commit_items(rig, "manual", FACTS[:3])
    rig.kernel.set_policy("auto", {"schedule": "auto", "working_set_size": 4, "drift_threshold": 0.2})
    scheduler = Scheduler(rig.kernel, rig.activator, rig.host, usage_of(rig))
    ids = ids_of(rig, "auto")
    use(rig, "auto", ids[:4], times=2)

    first = scheduler.tick()
    assert [(d.cube_id, d.action) for d in first] == [(rig.kernel.cube("auto").cube_id, "activate")]
    assert first[0].reason == "never activated" and first[0].tokens_computed > 0
    assert [d.action for d in scheduler.tick()] == ["skip"]  # converged: nothing to do
    fingerprint = rig.loaded.fingerprint
    record = rig.kernel.store.get_activation(rig.kernel.cube("auto").cube_id, fingerprint)
    assert record is not None and [i for i, _ in record.items] == ids[:4]
    assert rig.kernel.store.get_activation(rig.kernel.cube("manual").cube_id, fingerprint) is None

    # New items become hot: the working set keeps its two first items and gains the new ones.
    commit_items(rig, "auto", FACTS[6:8])
    fresh = ids_of(rig, "auto")[6:]
    use(rig, "auto", ids[:2] + fresh, times=5)
    moved = scheduler.tick()
    assert [d.action for d in moved] == ["activate"] and "drift" in moved[0].reason
    assert moved[0].tokens_reused > 0  # the block still starts with the first two items: their KV is reused
    record = rig.kernel.store.get_activation(rig.kernel.cube("auto").cube_id, fingerprint)
    assert record is not None and [i for i, _ in record.items] == ids[:2] + fresh
    assert [d.action for d in scheduler.tick()] == ["skip"]
    _, decisions = scheduler.status()
    assert [d.action for d in decisions] == ["activate", "skip", "activate", "skip"]


def test_background_activation_yields_to_interactive_work_between_chunks(tmp_path: Path, tiny_dir: Path) -> None:
    rig = open_rig(tmp_path, str(tiny_dir), background_chunk=8)  # many small steps
    try:
        rig.kernel.alloc_cube("long", "", {})
        commit_items(rig, "long", FACTS[:10])
        cube = rig.kernel.cube("long")
        worker = rig.host.worker
        done = threading.Event()
        held, release = threading.Event(), threading.Event()
        submit = worker.submit

        # The test orders the two jobs itself: the third background chunk holds the worker until the
        # interactive job is queued, so the contest happens however fast or slow the machine is.
        def gated_submit(fn: Callable[[], T], *, priority: int = PRIORITY_DEFAULT) -> Future[T]:
            if priority != PRIORITY_BACKGROUND or held.is_set() or worker.started[PRIORITY_BACKGROUND] < 2:
                return submit(fn, priority=priority)

            def gate() -> T:
                held.set()
                assert release.wait(60), "the test never released the background chunk"
                return fn()
            return submit(gate, priority=priority)

        worker.submit = gated_submit  # type: ignore[method-assign]

        def background() -> None:
            rig.activator.activate_cube(cube, cube.head, background=True)
            done.set()

        thread = threading.Thread(target=background)
        thread.start()
        assert held.wait(120), "the background activation never got going"
        before = worker.started[PRIORITY_BACKGROUND]
        assert before == 3  # the held chunk is running; the next is not queued until it ends
        # What the interactive job sees, read on the worker, where no background chunk can run meanwhile.
        interactive = submit(lambda: (worker.started[PRIORITY_BACKGROUND], done.is_set()),
                             priority=PRIORITY_INTERACTIVE)
        release.set()
        seen, finished = interactive.result(60)
        assert not finished, "the background activation ended before the interactive job: no contest"
        # Queued behind the running chunk only: no background chunk started between it and the interactive job.
        assert seen - before == 0
        thread.join(60)
        assert not thread.is_alive() and done.is_set()
        assert worker.started[PRIORITY_BACKGROUND] > 10  # it really ran in many steps
    finally:
        rig.close()


# --- budgets under random operations ----------------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["activate", "working_set", "evict", "use", "tick", "commit"]),
                         st.integers(0, 3)), min_size=1, max_size=25)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_the_kv_and_adapter_pools_never_exceed_their_budgets(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter_files: tuple[bytes, bytes],
    ops: list[tuple[str, int]],
) -> None:
    from test_parametric import import_and_commit

    from memosd.errors import PoolTooSmall

    rig = open_rig(tmp_path_factory.mktemp("budget"), str(tiny_dir), pool_bytes=1, max_adapters=1)
    try:
        per_token = rig.loaded.kv_bytes_per_token or 1
        rig.host.pool._budget = per_token * 160
        names = [f"c{i}" for i in range(4)]
        for i, name in enumerate(names):
            rig.kernel.alloc_cube(name, "", {})
            commit_items(rig, name, FACTS[i: i + 2 + i])
            if i % 2 == 0:  # half the cubes carry an adapter: activating them loads it (one entry per cube)
                import_and_commit(rig, name, adapter_files)
            rig.kernel.set_policy(name, {"schedule": "auto", "working_set_size": 2})
        scheduler = Scheduler(rig.kernel, rig.activator, rig.host, usage_of(rig), max_per_tick=4)
        scheduler.start()  # installs the heat ranks in both pools; its own loop is stopped at once
        scheduler.close()
        for op, k in ops:
            name = names[k]
            mount = rig.kernel.mount(name, 0, False).record.mount_id
            try:
                if op == "activate":
                    rig.activator.activate(mount)
                elif op == "working_set":
                    rig.activator.activate(mount, selector=select.Selector("working_set", size=2))
                elif op == "evict":
                    rig.activator.evict(name, delete_persisted=k % 2 == 0)
                elif op == "use":
                    use(rig, name, ids_of(rig, name)[:1])
                elif op == "tick":
                    scheduler.tick()
                else:
                    commit_items(rig, name, [f"another fact {k}"])
            except (PoolTooSmall, ContextExceeded):
                pass  # refused before any work: the budget holds by refusing
            stats = rig.host.pool.stats()
            assert stats.bytes_used <= stats.budget_bytes
            assert stats.bytes_used == sum(c.nbytes for _, c in rig.host.pool.entries())
            assert len(rig.host.adapters) <= rig.host.adapters.max_resident
    finally:
        rig.close()


def test_stable_cubes_are_promoted_to_parametric_memory_once(rig: Rig) -> None:
    rig.kernel.alloc_cube("stable", "", {})
    commit_items(rig, "stable", FACTS[:3])
    scheduler = Scheduler(rig.kernel, rig.activator, rig.host, usage_of(rig), jobs=rig.jobs)
    assert [d for d in scheduler.tick() if d.action == "train"] == []  # off by default
    # Not stable for long enough yet: an hour is beyond any slowness of the machine running this.
    rig.kernel.set_policy("stable", {"train_after_seconds": 3600, "train_min_items": 3})
    assert [d for d in scheduler.tick() if d.action == "train"] == []
    rig.kernel.set_policy("stable", {"train_after_seconds": 1, "train_min_items": 3})
    time.sleep(1.1)  # at least the 1 s asked for has passed since the commit, however slow the machine
    trained = [d for d in scheduler.tick() if d.action == "train"]
    assert len(trained) == 1 and "3 items unchanged" in trained[0].reason
    job = rig.jobs.list_jobs(rig.kernel.cube("stable").cube_id)[0]
    final = list(rig.jobs.watch(job.job_id, threading.Event()))[-1]
    assert final.state == "succeeded", final.error
    cube = rig.kernel.cube("stable")
    adapter = cube.adapter_at(cube.head)
    assert adapter is not None and adapter.lineage["source_revision"] == 1
    assert all(m.record.principal != "memosd" for m in rig.kernel.mounts.values())  # its mount was closed
    assert [d for d in scheduler.tick() if d.action == "train"] == []  # the adapter holds these items already


def test_room_is_made_only_from_colder_cubes_and_only_when_enough(rig: Rig) -> None:

    mounts = {}
    for name in ("cold", "hot", "target"):
        rig.kernel.alloc_cube(name, "", {})
        mounts[name] = commit_items(rig, name, FACTS[:2])
    cold, hot = rig.activator.activate(mounts["cold"]), rig.activator.activate(mounts["hot"])
    rig.host.pool._budget = cold.pool_bytes + hot.pool_bytes
    tracker = usage_of(rig)
    for name, calls in (("hot", 10), ("target", 5), ("cold", 1)):
        for _ in range(calls):
            tracker.record("search", [rig.kernel.cube(name).cube_id])
    scheduler = Scheduler(rig.kernel, rig.activator, rig.host, tracker)
    per_token = rig.loaded.kv_bytes_per_token or 1
    target = rig.kernel.cube("target")
    needs_both = [0] * ((cold.pool_bytes + hot.pool_bytes) // per_token)
    assert not scheduler._make_room(target, rig.loaded, needs_both, 2)
    assert cold.record.cache_key in rig.host.pool and hot.record.cache_key in rig.host.pool  # nothing evicted
    needs_one = [0] * (cold.pool_bytes // per_token)
    assert scheduler._make_room(target, rig.loaded, needs_one, 2)
    assert cold.record.cache_key not in rig.host.pool and hot.record.cache_key in rig.host.pool


def test_a_cancelled_training_is_not_restarted_until_the_items_change(rig: Rig) -> None:
    rig.kernel.alloc_cube("stable", "", {})
    commit_items(rig, "stable", FACTS[:3])
    rig.kernel.set_policy("stable", {"train_after_seconds": 1, "train_min_items": 3})
    scheduler = Scheduler(rig.kernel, rig.activator, rig.host, usage_of(rig), jobs=rig.jobs)
    mount = rig.kernel.mount("stable", 0, False).record.mount_id
    job = rig.jobs.train(mount, {"max_steps": 10_000, "epochs": 100_000, "early_stop_loss": 0.0}, "long", "test")
    rig.jobs.cancel(job.job_id)
    assert list(rig.jobs.watch(job.job_id, threading.Event()))[-1].state == "cancelled"
    time.sleep(1.1)
    assert [d for d in scheduler.tick() if d.action == "train"] == []  # the cancel stands for these items
    commit_items(rig, "stable", ["fact 99: a new item"])
    time.sleep(1.1)
    assert len([d for d in scheduler.tick() if d.action == "train"]) == 1  # new items: tried again


def test_the_cubes_own_last_cache_counts_as_room(rig: Rig) -> None:

    mounts = {}
    for name in ("own", "hot"):
        rig.kernel.alloc_cube(name, "", {})
        mounts[name] = commit_items(rig, name, FACTS[:2])
    own, hot = rig.activator.activate(mounts["own"]), rig.activator.activate(mounts["hot"])
    rig.host.pool._budget = own.pool_bytes + hot.pool_bytes
    tracker = usage_of(rig)
    for _ in range(10):
        tracker.record("search", [rig.kernel.cube("hot").cube_id])
    scheduler = Scheduler(rig.kernel, rig.activator, rig.host, tracker)
    per_token = rig.loaded.kv_bytes_per_token or 1
    tokens = [0] * (own.pool_bytes // per_token)
    cube = rig.kernel.cube("own")
    assert not scheduler._make_room(cube, rig.loaded, tokens, 2)  # the only other cache is hotter
    assert scheduler._make_room(cube, rig.loaded, tokens, 2, replaces=own.record.cache_key)
    assert own.record.cache_key in rig.host.pool and hot.record.cache_key in rig.host.pool  # nothing evicted
