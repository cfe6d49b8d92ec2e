"""A test-only hook: SIGKILL this process at a named step of a cluster move.

``MEMOSD_TEST_CRASH_AT=move:after_import`` (say) makes the daemon kill itself, with no cleanup, when it
reaches that step, so that tests can show every crash point of a move ends with one owner and nothing
lost (tests/cluster/test_move.py; the steps are listed in docs/ARCHITECTURE.md, Cluster). Never set it
outside tests: it exists to lose the process at the worst moment.
"""

from __future__ import annotations

import logging
import os
import signal

from memosd.logfmt import log_event

ENV = "MEMOSD_TEST_CRASH_AT"
log = logging.getLogger("memosd.cluster")


def crash_point(step: str) -> None:
    if os.environ.get(ENV) == step:
        log_event(log, "test_crash", level=logging.WARNING, step=step, hint=f"{ENV} is set: killing this process")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "crash_point"]
