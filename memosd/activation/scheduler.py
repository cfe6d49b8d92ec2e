"""The MemScheduler: keeps the working set of auto cubes activated, under the KV pool's budget.

Every ``interval`` seconds, ``tick`` looks at each cube whose policy is
``auto`` and decides, with a reason it records:

* **skip** when its activation (for the loaded model) is at HEAD, in the pool,
  and its items are within ``drift_threshold`` of the working set (1 - Jaccard);
* **activate** the working set at HEAD otherwise, in the background: the
  prefill goes to the runtime worker one chunk at a time at background
  priority, so interactive work waits at most one chunk; the previous cache's
  unchanged prefix blocks are reused (blocks are in commit order);
* **defer** when the pool has no room for it even after evicting caches of
  cubes colder than this one (by last use); the pool itself never exceeds its
  budget, since every put evicts least recently used caches first.

Promotion to parametric memory (any cube whose policy sets
``train_after_seconds``; off by default): **train** when no commit has
changed its items for that long, it has ``train_min_items``, no job of it is
queued or running, and its adapter was not already trained on exactly these
items. Training is a normal background job (JobManager), committed with its
lineage by author ``memosd-scheduler``.

The hottest cubes are considered first: heat is a decayed count of the
calls that used the cube (Search, Read, Generate, Activate; halved every
10 minutes), so frequency and recency both count. While the scheduler runs,
the KV pool evicts by the same heat (coldest cube first) instead of plain
LRU, so a cold cube's Activate cannot push out a hot cube's cache; the
adapter pool likewise unloads the coldest cube's adapter first. One tick activates
at most ``max_per_tick`` cubes, so a burst of drift does not monopolise the
worker. ``status`` is what ``memosctl sched status`` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from memosd.activation import select
from memosd.activation.activator import Activator, salt_cube
from memosd.errors import MemosError
from memosd.kernel.kernel import CubeState, Kernel
from memosd.kernel.usage import UsageTracker
from memosd.logfmt import log_event
from memosd.parametric.jobs import JobManager
from memosd.periodic import Periodic
from memosd.runtime.host import ModelHost
from memosd.runtime.kvcache import ComputeCancelled

log = logging.getLogger("memosd.scheduler")


@dataclass(frozen=True)
class Decision:
    time_ns: int
    cube_id: str
    action: str  # "activate" | "skip" | "defer" | "evict" | "train" | "fail"
    reason: str
    tokens_reused: int = 0
    tokens_computed: int = 0


@dataclass
class SchedulerState:
    running: str = ""  # the cube being activated now, "" when idle
    pending: list[str] = field(default_factory=list)  # auto cubes not yet looked at in this tick
    ticks: int = 0
    activations: int = 0


class Scheduler:
    def __init__(self, kernel: Kernel, activator: Activator, host: ModelHost, usage: UsageTracker, *,
                 jobs: JobManager | None = None, interval: float = 2.0, max_per_tick: int = 2,
                 history: int = 100) -> None:
        self.kernel = kernel
        self.jobs = jobs
        self.activator = activator
        self.host = host
        self.usage = usage
        self.interval = interval
        self.max_per_tick = max_per_tick
        self.decisions: deque[Decision] = deque(maxlen=history)
        self.state = SchedulerState()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # also cancels a background activation between chunks
        self._loop = Periodic(self.tick, interval, "scheduler", log, self._stop)

    # -- one pass ------------------------------------------------------------------
    def tick(self) -> list[Decision]:
        """Look at every auto cube once; returns this pass's decisions."""
        loaded = self.host.loaded_now()
        if loaded is None:
            return []
        cubes = [c for c in self.kernel.open_cubes()
                 if select.Policy.of(c.record.policy).schedule == "auto" and c.head > 0]
        now = time.time_ns()
        cubes.sort(key=lambda c: self.usage.heat(c.cube_id, now), reverse=True)
        made: list[Decision] = []
        activated = 0
        with self._lock:
            self.state.pending = [c.cube_id for c in cubes]
            self.state.ticks += 1
        for cube in cubes:
            if self._stop.is_set():
                break
            with self._lock:
                self.state.pending.remove(cube.cube_id)
            decision = self._consider(cube, loaded, budget_left=activated < self.max_per_tick)
            activated += decision.action == "activate"
            if decision.action not in ("skip", "defer") or not self._last_was(decision):
                self._record(decision)
            made.append(decision)
        for cube in self.kernel.open_cubes():
            promoted = self._promote(cube)
            if promoted is not None and (promoted.action != "fail" or not self._last_was(promoted)):
                self._record(promoted)
                made.append(promoted)
        return made

    def _promote(self, cube: CubeState) -> Decision | None:
        """Start memory training for a cube whose items have been stable long enough (policy; off by default)."""
        policy = select.Policy.of(cube.record.policy)
        after = policy.train_after_seconds
        if (not after or self.jobs is None or not self.kernel.has_cube(cube.cube_id) or cube.head == 0
                or cube.record.frozen):
            return None
        now = time.time_ns()
        head = cube.head
        changed_at = next((r.create_ns for r in self.kernel.revisions(cube.cube_id, head)
                           if r.added or r.changed or r.forgotten), 0)
        # Archived and expired items are not trained on (as JobManager.train).
        alive = {(m.item_id, m.born) for m in self.kernel.visible_items(cube.cube_id, head, now)}
        if len(alive) < policy.train_min_items or now - changed_at < after * 10**9:
            return None
        jobs = [j for j in self.jobs.list_jobs(cube.cube_id) if j.kind == "train"]  # an Extract job is no bar
        if any(not j.finished for j in jobs):
            return None
        if any(j.state in ("failed", "cancelled") and j.create_ns >= changed_at for j in jobs):
            return None  # these items were tried: a failure or a cancel stands until they change
        adapter = cube.adapter_at(head)
        if adapter is not None and adapter.lineage.get("origin") == "trained":
            source = int(adapter.lineage.get("source_revision", -1))
            trained_on = {(m.item_id, m.born) for m in self.kernel.visible_items(cube.cube_id, source, now)}
            if trained_on == alive:
                return None  # the adapter already holds exactly these items
        mount = self.kernel.mount(cube.cube_id, head, False, "memosd")
        try:
            job = self.jobs.train(mount.record.mount_id, {}, f"scheduled memory training of revision {head}",
                                  "memosd-scheduler")
        except MemosError as error:
            return Decision(now, cube.cube_id, "fail", f"training not started: {error}")
        finally:
            self.kernel.unmount(mount.record.mount_id)  # the job holds what it needs (revision and items)
        log_event(log, "sched_train", cube=cube.cube_id, revision=head, job=job.job_id)
        return Decision(now, cube.cube_id, "train", f"{len(alive)} items unchanged for {after} s; job {job.job_id}")

    def _consider(self, cube: CubeState, loaded: Any, *, budget_left: bool) -> Decision:
        now = time.time_ns()
        policy = select.Policy.of(cube.record.policy)
        size, threshold = policy.working_set_size, policy.drift_threshold
        head = cube.head
        alive = self.kernel.visible_items(cube.cube_id, head, now)  # as Activator.block_items
        wanted = [m.item_id for m in select.working_set(alive, self.usage.items(cube.cube_id), size, now)]
        record = self.activator.store.get_activation(cube.cube_id, loaded.fingerprint)
        if record is not None:
            moved = select.drift([item_id for item_id, _ in record.items], wanted)
            pooled = record.cache_key in self.host.pool
            if record.revision == head and pooled and moved <= threshold:
                return Decision(now, cube.cube_id, "skip", f"fresh: drift {moved:.2f} <= {threshold:.2f}")
            why = (f"drift {moved:.2f} > {threshold:.2f}" if moved > threshold
                   else f"revision {record.revision} -> {head}" if record.revision != head else "not in the pool")
        else:
            why = "never activated"
        if not budget_left:
            return Decision(now, cube.cube_id, "defer", f"{why}; {self.max_per_tick} activations this tick already")
        room = self._make_room(cube, loaded, record.token_ids if record is not None else None, size,
                               replaces=record.cache_key if record is not None else "")
        if not room:
            return Decision(now, cube.cube_id, "defer", f"{why}; the KV pool has no room (colder caches only "
                                                        "may be evicted)")
        with self._lock:
            self.state.running = cube.cube_id
        try:
            outcome = self.activator.activate_cube(cube, head, self._stop, select.Selector("working_set", size=size),
                                                   background=True)
        except (MemosError, ComputeCancelled) as error:
            return Decision(now, cube.cube_id, "fail", f"{why}; {error}")
        finally:
            with self._lock:
                self.state.running = ""
        with self._lock:
            self.state.activations += 1
        log_event(log, "sched_activate", cube=cube.cube_id, revision=head, reason=why,
                  reused=outcome.tokens_reused, computed=outcome.tokens_computed)
        return Decision(now, cube.cube_id, "activate", why, outcome.tokens_reused, outcome.tokens_computed)

    def _make_room(self, cube: CubeState, loaded: Any, tokens: Any, size: int, *, replaces: str = "") -> bool:
        """Whether the pool can take the cube's cache, evicting caches of colder cubes (by heat) if that
        makes enough room; nothing is evicted when it would not. The cache under ``replaces`` (the cube's
        last) counts as room: the new one takes its place."""
        per_token = loaded.kv_bytes_per_token or 0
        # The last activation's size is the best guess; without one, ~64 tokens an item.
        estimate = per_token * (len(tokens) if tokens is not None else 64 * size)
        pool = self.host.pool
        if estimate > pool.budget_bytes:
            return False
        now = time.time_ns()
        mine = self.usage.heat(cube.cube_id, now)
        replaced = pool.peek(replaces) if replaces else None
        free = pool.budget_bytes - pool.bytes_used + (replaced.nbytes if replaced is not None else 0)
        victims: list[tuple[str, str, int]] = []
        for heat, key, owner_id, nbytes in sorted(self._pooled(now)):
            if free >= estimate:
                break
            if owner_id == cube.cube_id or heat >= mine:
                continue
            victims.append((key, owner_id, nbytes))
            free += nbytes
        if free < estimate:
            return False
        for key, owner_id, _ in victims:
            pool.evict(key)
            self._record(Decision(now, owner_id, "evict", f"room for {cube.cube_id}, which is hotter"))
        return True

    def _pooled(self, now: int) -> list[tuple[float, str, str, int]]:
        """(heat of its cube, key, cube id, bytes) of every pooled cache."""
        return [(self.usage.heat(self._owner(cache.salt), now), key, self._owner(cache.salt), cache.nbytes)
                for key, cache in self.host.pool.entries()]

    def _owner(self, salt: bytes) -> str:
        """The cube a cache's salt belongs to ("" for one freed since)."""
        cube_id = salt_cube(salt)
        return cube_id if self.kernel.has_cube(cube_id) else ""

    def cache_heat(self, cache: Any) -> float:
        """The pool's eviction rank while the scheduler runs: the heat of the cache's cube (coldest first)."""
        return self.usage.heat(self._owner(cache.salt))

    # -- bookkeeping --------------------------------------------------------------------
    def _record(self, decision: Decision) -> None:
        with self._lock:
            self.decisions.append(decision)

    def _last_was(self, decision: Decision) -> bool:
        """Whether the cube's last recorded decision was the same (skips are recorded once, not every tick)."""
        with self._lock:
            for earlier in reversed(self.decisions):
                if earlier.cube_id == decision.cube_id:
                    return (earlier.action, earlier.reason.split(":")[0]) == (decision.action,
                                                                             decision.reason.split(":")[0])
        return False

    def status(self) -> tuple[SchedulerState, list[Decision]]:
        with self._lock:
            return SchedulerState(self.state.running, list(self.state.pending), self.state.ticks,
                                  self.state.activations), list(self.decisions)

    # -- the loop ------------------------------------------------------------------------
    def start(self) -> None:
        # From now on the KV pool evicts the coldest cube's cache first, whoever needs the room.
        self.host.pool.rank = self.cache_heat
        self.host.adapters.rank = lambda key: self.usage.heat(key.partition("/")[0])  # key: "{cube_id}/{digest}"
        self._loop.start()

    def close(self) -> None:
        self._loop.close()
