"""The NOSPACE alarm: a full disk makes the daemon read-only until space returns.

Like etcd's NOSPACE alarm: the first write that fails with "no space left on
device" (from RocksDB, an index save or a file write; ``is_no_space`` is the
one place that recognises it) raises the alarm. From then on the store refuses
every write at once with ``DiskFull``, without touching RocksDB, while reads
are served as usual. A watcher (``Store.recheck_space``, every
``store.disk_check_seconds``) lowers the alarm once the file system has room
and RocksDB takes a small probe write again: RocksDB stops writing after an
ENOSPC and resumes by itself (its SstFileManager polls every 5 s) once at
least one write buffer (64 MiB) is free.

The error callers see names neither the path nor RocksDB's text.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from memosd.errors import DiskFull
from memosd.logfmt import log_event

log = logging.getLogger("memosd.store")

# RocksDB's wording of ENOSPC (IOStatus::NoSpace), e.g. "IO error: No space left on device: While appending
# to file: ...", and the OS's strerror of ENOSPC and EDQUOT (a quota is a full disk for this daemon too).
_NO_SPACE_TEXTS = ("no space left on device", "disk quota exceeded")
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(error: BaseException) -> bool:
    """Whether an exception (or one it was raised from) says the disk or the quota is full."""
    seen: BaseException | None = error
    for _ in range(8):  # a short cause chain; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, DiskFull):
            return True
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(seen).lower() for text in _NO_SPACE_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on path's file system (0 if it cannot be asked)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


class DiskSpace:
    """Whether the data directory's disk is full (the alarm), and who to tell when that changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._full_since = 0.0  # time.time() the alarm was raised; 0.0: not full
        self.alarms = 0  # times the alarm was raised since start
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def full(self) -> bool:
        return self._full_since > 0.0

    def free_bytes(self) -> int:
        return free_bytes(self.path)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call listener(full) each time the alarm is raised or lowered."""
        self._listeners.append(listener)

    def error(self) -> DiskFull:
        free = self.free_bytes()
        return DiskFull(f"the data directory's disk is full ({free} bytes free); free space or grow the volume. "
                        "Writes resume on their own once there is room; reads still work", free_bytes=free)

    def refuse_if_full(self) -> None:
        if self.full:
            raise self.error()

    def trip(self, cause: BaseException) -> DiskFull:
        """Raise the alarm (once) after a write failed for lack of space; returns the error to raise."""
        with self._lock:
            raised = not self.full
            if raised:
                self._full_since = time.time()
                self.alarms += 1
        if raised:
            log_event(log, "disk_full", level=logging.ERROR, path=self.path, free_bytes=self.free_bytes(),
                      error=type(cause).__name__, hint="read-only until space is freed: writes are refused "
                      "with DISK_FULL, reads are served")
            self._notify(True)
        return self.error()

    def clear(self) -> None:
        """Lower the alarm: a probe write went through."""
        with self._lock:
            since, self._full_since = self._full_since, 0.0
        if since:
            log_event(log, "disk_space_recovered", path=self.path, free_bytes=self.free_bytes(),
                      full_seconds=round(time.time() - since, 1))
            self._notify(False)

    def _notify(self, full: bool) -> None:
        for listener in self._listeners:
            try:
                listener(full)
            except Exception as error:  # a listener must not keep the alarm from being raised or lowered
                log_event(log, "disk_listener_failed", level=logging.ERROR, error=repr(error))
