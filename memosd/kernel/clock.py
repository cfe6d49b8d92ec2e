"""The kernel's wall clock, in one place so tests can move time (monkeypatch ``clock.now_ns``)."""

from __future__ import annotations

import time


def now_ns() -> int:
    return time.time_ns()
