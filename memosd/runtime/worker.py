"""The runtime worker: the one thread that owns the model.

torch, the model, its tokenizer and every KV cache made from it are touched
only from this thread. A gRPC handler never runs torch itself: it wraps the
work in a callable, ``submit``s it, and waits on the returned future (or calls
``call``). That keeps the server responsive while a long prefill runs, stops
two requests from oversubscribing the CPU with two torch thread pools, and
means the runtime's pools need no locks of their own.

Work runs in priority order (lower number = more urgent), FIFO within one
priority. A future cancelled before its work starts is skipped; an exception
raised by the work is set on its future. Work already running is never
interrupted: long work that should stop early must check a flag of its own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Conventional priorities; any int works.
PRIORITY_INTERACTIVE = -10  # a user waiting on a token stream
PRIORITY_DEFAULT = 0
PRIORITY_BACKGROUND = 10  # activation warm-up, training steps


class WorkerClosedError(RuntimeError):
    """Work was submitted after ``shutdown``."""


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    future: Future[Any] = field(compare=False)


class RuntimeWorker:
    """A single thread that runs submitted callables, most urgent first."""

    def __init__(self, name: str = "memosd-runtime") -> None:
        self._cond = threading.Condition()
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._closed = False
        self._running = False
        self.started: Counter[int] = Counter()  # jobs started, by priority (what ran ahead of what)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], *, priority: int = PRIORITY_DEFAULT) -> Future[T]:
        """Queue ``fn`` to run on the worker thread; its result or exception goes to the future.

        Raises ``WorkerClosedError`` after ``shutdown``. Waiting on the returned
        future from the worker thread itself deadlocks: use ``call`` there.
        """
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise WorkerClosedError("the runtime worker is shut down")
            heapq.heappush(self._heap, _Job(priority, next(self._seq), fn, future))
            self._cond.notify()
        return future

    def call(
        self, fn: Callable[[], T], *, priority: int = PRIORITY_DEFAULT, timeout: float | None = None
    ) -> T:
        """Run ``fn`` on the worker thread and return its result.

        Already on the worker thread, ``fn`` runs inline (queueing it would
        deadlock). ``timeout`` raises ``TimeoutError`` and cancels the work if
        it has not started.
        """
        if self.on_worker_thread():
            return fn()
        future = self.submit(fn, priority=priority)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def on_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def queue_depth(self) -> int:
        """Work waiting to start (not counting work cancelled while waiting)."""
        with self._cond:
            return sum(1 for job in self._heap if not job.future.cancelled())

    @property
    def running(self) -> bool:
        """Whether a piece of work is executing right now."""
        with self._cond:
            return self._running

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Stop taking work. Queued work still runs, unless ``cancel_pending``.

        With ``wait``, returns once the thread has finished. Idempotent.
        """
        with self._cond:
            self._closed = True
            if cancel_pending:
                for job in self._heap:
                    job.future.cancel()
                self._heap.clear()
            self._cond.notify_all()
        if wait and not self.on_worker_thread():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:  # closed and drained
                    return
                job = heapq.heappop(self._heap)
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                self._running = True
                self.started[job.priority] += 1
            self._run(job)
            # Drop the reference before sleeping, so a finished job's tensors can be freed.
            del job
            with self._cond:
                self._running = False

    @staticmethod
    def _run(job: _Job) -> None:
        try:
            result = job.fn()
        except BaseException as e:  # set on the future; the worker lives on
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
