"""RuntimeWorker: one thread, priority then FIFO order, cancellation, exceptions, shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from functools import partial

import pytest

from memosd.runtime.worker import RuntimeWorker, WorkerClosedError


@pytest.fixture
def worker() -> Iterator[RuntimeWorker]:
    w = RuntimeWorker()
    yield w
    w.shutdown(wait=True, cancel_pending=True)


def _block(worker: RuntimeWorker) -> tuple[threading.Event, Future[None]]:
    """Occupy the worker until the returned event is set."""
    gate = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        assert gate.wait(10)

    fut = worker.submit(hold)
    assert started.wait(10)
    return gate, fut


def test_result_and_exception(worker: RuntimeWorker) -> None:
    assert worker.submit(lambda: 6 * 7).result(10) == 42

    def boom() -> int:
        raise ValueError("bad input")

    fut = worker.submit(boom)
    with pytest.raises(ValueError, match="bad input"):
        fut.result(10)
    # The worker survives its work's exceptions.
    assert worker.submit(lambda: "still here").result(10) == "still here"


def test_all_work_runs_on_one_thread_not_the_callers(worker: RuntimeWorker) -> None:
    seen: set[int] = set()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(20):
                worker.submit(lambda: seen.add(threading.get_ident())).result(10)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(seen) == 1
    assert threading.get_ident() not in seen
    assert worker.submit(worker.on_worker_thread).result(10)
    assert not worker.on_worker_thread()


def test_priority_then_fifo(worker: RuntimeWorker) -> None:
    gate, blocker = _block(worker)
    order: list[str] = []
    jobs = [("a", 5), ("b", 0), ("c", 5), ("d", -1), ("e", 0), ("f", -1)]
    futures = [worker.submit(partial(order.append, name), priority=p) for name, p in jobs]
    assert worker.running
    assert worker.queue_depth == len(jobs)
    gate.set()
    for f in [blocker, *futures]:
        f.result(10)
    assert order == ["d", "f", "b", "e", "a", "c"]
    assert worker.queue_depth == 0


def test_cancelled_before_start_is_skipped(worker: RuntimeWorker) -> None:
    gate, blocker = _block(worker)
    ran: list[str] = []
    keep = worker.submit(lambda: ran.append("keep"))
    drop = worker.submit(lambda: ran.append("drop"))
    assert worker.queue_depth == 2
    assert drop.cancel()
    assert worker.queue_depth == 1
    gate.set()
    keep.result(10)
    blocker.result(10)
    assert ran == ["keep"]
    assert drop.cancelled()
    with pytest.raises(CancelledError):
        drop.result(0)


def test_running_work_cannot_be_cancelled(worker: RuntimeWorker) -> None:
    gate, blocker = _block(worker)
    assert not blocker.cancel()
    gate.set()
    assert blocker.result(10) is None


def test_running_and_depth_idle(worker: RuntimeWorker) -> None:
    worker.submit(lambda: None).result(10)
    assert worker.queue_depth == 0
    # `running` is cleared just after the future resolves; give it a moment.
    deadline = time.monotonic() + 5
    while worker.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.running
    assert worker.alive


def test_shutdown_drains_queue_then_refuses(worker: RuntimeWorker) -> None:
    gate, _ = _block(worker)
    ran: list[int] = []
    futures = [worker.submit(partial(ran.append, i)) for i in range(3)]
    gate.set()
    worker.shutdown(wait=True)
    assert ran == [0, 1, 2]
    assert all(f.done() and not f.cancelled() for f in futures)
    assert not worker.alive
    with pytest.raises(WorkerClosedError):
        worker.submit(lambda: None)
    worker.shutdown()  # idempotent


def test_shutdown_cancel_pending(worker: RuntimeWorker) -> None:
    gate, blocker = _block(worker)
    pending = [worker.submit(lambda: None) for _ in range(3)]
    worker.shutdown(wait=False, cancel_pending=True)
    assert all(f.cancelled() for f in pending)
    gate.set()
    blocker.result(10)  # what was running finishes
    worker.shutdown(wait=True)
    assert not worker.alive


def test_call_runs_inline_on_the_worker_thread(worker: RuntimeWorker) -> None:
    # A nested call from the worker thread would deadlock if it were queued.
    assert worker.call(lambda: worker.call(lambda: 1) + 1) == 2


def test_call_timeout_cancels_work_not_started(worker: RuntimeWorker) -> None:
    gate, blocker = _block(worker)
    ran: list[int] = []
    with pytest.raises(TimeoutError):
        worker.call(lambda: ran.append(1), timeout=0.05)
    gate.set()
    blocker.result(10)
    worker.submit(lambda: None).result(10)
    assert ran == []
