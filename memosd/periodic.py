"""A background loop: call a function every few seconds on a daemon thread, until closed.

The scheduler, the lifecycle loop and the usage flusher all run this way. A
pass that raises is logged and the loop goes on: one bad cube must not stop
the daemon's housekeeping.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from memosd.errors import DiskFull
from memosd.logfmt import log_event


class Periodic:
    def __init__(self, fn: Callable[[], object], interval: float, name: str, log: logging.Logger,
                 stop: threading.Event | None = None) -> None:
        self.fn = fn
        self.interval = interval
        self.name = name
        self.log = log
        self.stop = stop or threading.Event()  # shared with the owner when it must see the stop too
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.fn()
            except DiskFull as error:  # expected while the disk is full: no traceback every pass
                log_event(self.log, f"{self.name}_skipped", level=logging.WARNING, reason=error.reason)
            except Exception as error:  # the loop must outlive one bad pass
                log_event(self.log, f"{self.name}_error", level=logging.ERROR,
                          error=f"{type(error).__name__}: {error}", exc_info=error)

    def close(self) -> None:
        """Stop after the pass in progress (if any) and wait for it."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join()
