"""Park: what a server stream's generator yields to wait without holding a thread.

The gate drives a streaming handler's generator one step at a time on the
syscall executor. A step that would block (the next audit record, a job's next
change, a runtime-worker job) yields ``Park(future)`` instead; the gate awaits
the future on the event loop, holding no thread, and asks for the next step
once it is done. The generator then reads the future's result itself.
Cancelling the call cancels the future.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Park:
    future: Future[Any]


def done_future() -> Future[Any]:
    """A future that is already done (nothing to wait for)."""
    future: Future[Any] = Future()
    future.set_result(None)
    return future


def resolve(future: Future[Any]) -> None:
    """Mark a waiter done; one its waiter already cancelled is left as it is."""
    if not future.done():
        with contextlib.suppress(InvalidStateError):  # cancelled between the check and the set
            future.set_result(None)
