"""Every commit path writes with sync: a SIGKILL cannot show a missing fsync, so a spy on the store's write does.

The kernel runs as the daemon runs it (``store.sync_commits`` at its default);
the spy records, for every batch written, the column families it touched and
its sync flag. A batch that changes history (a revision, item versions, an
adapter version, a purge receipt) must be synced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from activation_rig import Rig, commit_items, open_rig
from tiny_llama import save_tiny_llama

import memosd.kernel.clock as kernel_clock
from memosd.config import StoreConfig
from memosd.kernel.types import ItemInput, Message
from memosd.services.lifecycle import LifecycleLoop
from memosd.store import schema
from memosd.store.rocks import Batch, Store

HISTORY = frozenset({schema.CF_REVISIONS, schema.CF_ITEMS, schema.CF_ADAPTERS, schema.CF_PURGES})


@dataclass(frozen=True)
class Written:
    sync: bool
    families: frozenset[str]


class WriteSpy:
    """Records every Store.write: its sync flag and the column families its batch touched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[Written] = []
        real_put, real_delete, real_write = Batch._put, Batch._delete, Store.write

        def put(batch: Batch, cf: str, key: bytes, value: bytes) -> None:
            batch.__dict__.setdefault("spied_families", set()).add(cf)
            real_put(batch, cf, key, value)

        def delete(batch: Batch, cf: str, key: bytes) -> None:
            batch.__dict__.setdefault("spied_families", set()).add(cf)
            real_delete(batch, cf, key)

        def write(store: Store, batch: Batch, *, sync: bool) -> None:
            self.writes.append(Written(sync, frozenset(batch.__dict__.get("spied_families", ()))))
            real_write(store, batch, sync=sync)

        monkeypatch.setattr(Batch, "_put", put)
        monkeypatch.setattr(Batch, "_delete", delete)
        monkeypatch.setattr(Store, "write", write)

    def history_writes(self, action: Callable[[], Any]) -> list[Written]:
        """The batches ``action`` wrote that change history (at least one, or the test would prove nothing)."""
        start = len(self.writes)
        action()
        written = [w for w in self.writes[start:] if w.families & HISTORY]
        assert written, "the action wrote no history: the test drives the wrong path"
        return written


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> WriteSpy:
    return WriteSpy(monkeypatch)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    assert StoreConfig().sync_commits, "the daemon's default must be to sync commits"
    r = open_rig(tmp_path, "none", sync_commits=StoreConfig().sync_commits)
    yield r
    r.close()


def test_commit_ingest_rollback_set_item_state_and_purge_write_synced(rig: Rig, spy: WriteSpy) -> None:
    k = rig.kernel
    k.alloc_cube("c", "", {})
    mount = k.mount("c", 0, True).record.mount_id
    ids, _ = k.write(mount, [ItemInput("owls hunt at night"), ItemInput("the river is green")])
    paths: dict[str, Callable[[], Any]] = {
        "Commit": lambda: k.commit(mount, "add", "test"),
        "Ingest": lambda: k.ingest(mount, [Message("ann", "hello", "s1"), Message("bob", "hi", "s1")]),
        "Rollback": lambda: k.rollback("c", 1, "", "test"),
        "SetItemState": lambda: k.set_item_state("c", ids[:1], "archived", "", "test"),
        "Purge": lambda: k.purge("c", ids[1:]),
    }
    for name, action in paths.items():
        written = spy.history_writes(action)
        assert all(w.sync for w in written), (name, written)


def test_the_lifecycle_loop_writes_its_expiry_and_its_purge_synced(rig: Rig, spy: WriteSpy,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [kernel_clock.now_ns()]
    monkeypatch.setattr(kernel_clock, "now_ns", lambda: clock[0])  # time passes when the test says so
    rig.kernel.alloc_cube("ttl", "", {})
    mount = rig.kernel.mount("ttl", 0, True).record.mount_id
    (brief,) = rig.kernel.write(mount, [ItemInput("brief", ttl_seconds=1)])[0]
    rig.kernel.commit(mount, "add", "test")
    loop = LifecycleLoop(rig.kernel, None, lambda cube, items: rig.kernel.purge(cube, items), interval=60,
                         grace_seconds=5)
    clock[0] += 2_000_000_000  # past the TTL, within the grace: the loop commits the expiry
    expiry = spy.history_writes(loop.tick)
    assert rig.kernel.cube("ttl").head == 2 and all(w.sync for w in expiry), expiry
    clock[0] += 10_000_000_000  # past the grace: the loop purges
    purge = spy.history_writes(loop.tick)
    assert rig.kernel.cube("ttl").catalog.visible(brief, 1) is None and all(w.sync for w in purge), purge


def test_a_training_job_commits_its_adapter_synced(tmp_path: Path, spy: WriteSpy) -> None:
    tiny = save_tiny_llama(tmp_path / "tiny-llama", context=512)
    rig = open_rig(tmp_path / "data", str(tiny), sync_commits=StoreConfig().sync_commits)
    try:
        rig.kernel.alloc_cube("c", "", {})
        mount = commit_items(rig, "c", ["The capital of Vellmora is Quistarn.", "Owls hunt at night."])

        def train() -> None:
            job = rig.jobs.train(mount, {"max_steps": 2, "rank": 4, "alpha": 8, "batch_size": 2}, "", "")
            final = list(rig.jobs.watch(job.job_id, threading.Event()))[-1]
            assert final.state == "succeeded", final.error

        written = spy.history_writes(train)
        assert any(schema.CF_ADAPTERS in w.families for w in written) and all(w.sync for w in written), written
    finally:
        rig.close()
