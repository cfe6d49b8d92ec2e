"""The NOSPACE alarm in the store, and the audit log's aggregate records (unit tests of one layer each).

A real RocksDB in a temp dir; the full disk is injected by wrapping its
handles so that writes fail exactly as rocksdict reports ENOSPC. The e2e test
(tests/e2e/test_disk_full.py) fills a real file system.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from memos.audit import verify

from memosd.errors import DiskFull
from memosd.governance.audit import AuditEntry, AuditLog
from memosd.store import schema
from memosd.store.rocks import Store
from memosd.store.space import is_no_space
from memosd.syscalls.gate import Gate
from memosd.syscalls.governance import audit_record

# What rocksdict raised on a full tmpfs (tests/e2e/test_disk_full.py fills one), path and all.
ROCKSDB_NO_SPACE = ("IO error: No space left on device: While appending to file: "
                    "/srv/secret-data/store/000004.log: No space left on device")
_WRITES = {"put", "delete", "write", "flush", "flush_wal", "compact_range"}


class Disk:
    def __init__(self) -> None:
        self.full = False
        self.write_attempts = 0


class FullDiskHandle:
    """A RocksDB handle on a disk that may be full: writes then fail as rocksdict reports it."""

    def __init__(self, real: Any, disk: Disk) -> None:
        self._real, self._disk = real, disk

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in _WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self._disk.write_attempts += 1
            if self._disk.full:
                raise Exception(ROCKSDB_NO_SPACE)
            return attr(*args, **kwargs)

        return write


@pytest.fixture
def disk() -> Disk:
    return Disk()


@pytest.fixture
def store(tmp_path: Path, disk: Disk, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    real_db, real_cfs = s._db, dict(s._cfs)
    s._db = FullDiskHandle(real_db, disk)  # type: ignore[assignment]
    s._cfs = {name: FullDiskHandle(cf, disk) for name, cf in real_cfs.items()}  # type: ignore[misc]
    monkeypatch.setattr(s.space, "free_bytes", lambda: 0 if disk.full else 1 << 30)
    yield s
    s._db, s._cfs = real_db, real_cfs
    s.close()


def test_no_space_is_recognised_in_one_place() -> None:
    assert is_no_space(Exception(ROCKSDB_NO_SPACE))
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/index/c1/dense.usearch")
        except OSError as inner:
            raise RuntimeError("saving the index failed") from inner
    except RuntimeError as chained:
        assert is_no_space(chained)
    assert not is_no_space(Exception("IO error: Corruption: bad block"))
    assert not is_no_space(OSError(errno.EACCES, "Permission denied"))


def test_a_full_disk_makes_the_store_read_only_until_a_probe_write_passes(store: Store, disk: Disk) -> None:
    store.put_row(schema.CF_AUDIT, b"a", b"1", sync=False)
    disk.full = True
    with pytest.raises(DiskFull) as raised:
        store.put_row(schema.CF_AUDIT, b"b", b"2", sync=False)
    message = raised.value.message
    assert "disk is full" in message and "free space" in message and "reads still work" in message
    assert "/" not in message and "IO error" not in message  # neither the path nor RocksDB's text
    assert store.space.full

    # Refused at once from now on, without asking RocksDB; reads are served.
    attempts = disk.write_attempts
    with pytest.raises(DiskFull):
        store.write(store.batch(), sync=True)
    with pytest.raises(DiskFull):
        store.put_meta(b"k", b"v")
    assert disk.write_attempts == attempts
    assert [k for k, _ in store.scan_rows(schema.CF_AUDIT)] == [b"a"]

    assert store.recheck_space() is True  # still full: no room, no probe
    disk.full = False
    assert store.recheck_space() is False  # room, and the probe write went through
    store.put_row(schema.CF_AUDIT, b"b", b"2", sync=False)
    assert [k for k, _ in store.scan_rows(schema.CF_AUDIT)] == [b"a", b"b"]


def test_closing_with_the_disk_full_still_closes(tmp_path: Path, disk: Disk) -> None:
    s = Store(tmp_path / "store")
    s.put_row(schema.CF_AUDIT, b"a", b"1", sync=False)
    s._db = FullDiskHandle(s._db, disk)  # type: ignore[assignment]
    disk.full = True
    s.close()  # the flush fails for lack of space; close goes on
    reopened = Store(tmp_path / "store")  # the LOCK was released
    assert [k for k, _ in reopened.scan_rows(schema.CF_AUDIT)] == [b"a"]
    reopened.close()


def test_a_raw_no_space_error_becomes_disk_full_at_the_gate(store: Store) -> None:
    gate = Gate(None, None, AuditLog(store), None)  # type: ignore[arg-type]
    error = gate._disk_full(OSError(errno.ENOSPC, "No space left on device", "/srv/data/index/c1/dense.usearch"))
    assert isinstance(error, DiskFull) and "/" not in error.message
    assert store.space.full


def _records(log: AuditLog) -> list[Any]:
    return [audit_record(stored) for stored in log.read()]


def test_calls_made_while_the_disk_is_full_are_counted_then_written_as_aggregates(
        store: Store, disk: Disk) -> None:
    log = AuditLog(store)
    log.append(AuditEntry("WhoAmI", principal_id="p1"))
    disk.full = True
    for _ in range(5):
        log.append(AuditEntry("Read", principal_id="p1", cube_id="c1", item_ids=["i1"]))  # never raises
    for _ in range(2):
        log.append(AuditEntry("Write", principal_id="p2", cube_id="c1", code="RESOURCE_EXHAUSTED",
                              reason="DISK_FULL"))
    assert log.seq == 1 and log.unaudited_calls == 7 and log.pending_unaudited() == 7

    disk.full = False
    assert store.recheck_space() is False
    log.tick()
    log.append(AuditEntry("WhoAmI", principal_id="p1"))
    records = _records(log)
    assert [(r.method, r.aggregate, r.count) for r in records] == [
        ("WhoAmI", "", 1), ("Read", "disk_full", 5), ("Write", "disk_full", 2), ("WhoAmI", "", 1)]
    assert records[1].principal_id == "p1" and records[1].cube_id == "c1" and not records[1].item_ids
    assert records[2].reason == "DISK_FULL" and records[2].first_time.ToNanoseconds() <= records[2].time.ToNanoseconds()
    assert log.pending_unaudited() == 0
    assert verify(records).ok


def test_unauthenticated_refusals_are_one_record_per_window_and_keep_their_count(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("memosd.governance.audit.time.monotonic", lambda: clock[0])
    log = AuditLog(store, unauthenticated_window=60.0)

    def refuse(method: str, n: int) -> None:
        for _ in range(n):
            log.append(AuditEntry(method, code="UNAUTHENTICATED", reason="UNAUTHENTICATED", denied=True))

    refuse("WhoAmI", 500)
    refuse("Stats", 3)
    log.append(AuditEntry("WhoAmI", principal_id="p1"))  # an authenticated call is recorded as itself
    log.tick()  # the windows are still open
    assert log.seq == 3
    clock[0] += 60.0
    log.tick()  # both windows ended: one aggregate each for the refusals after the first
    refuse("WhoAmI", 10)  # a new window
    log.close()
    records = _records(log)
    assert [(r.method, r.aggregate, r.count) for r in records] == [
        ("WhoAmI", "", 1), ("Stats", "", 1), ("WhoAmI", "", 1),
        ("WhoAmI", "unauthenticated", 499), ("Stats", "unauthenticated", 2),
        ("WhoAmI", "", 1), ("WhoAmI", "unauthenticated", 9)]
    refused = [r for r in records if r.reason == "UNAUTHENTICATED"]
    assert sum(r.count for r in refused) == 513
    assert all(r.outcome == refused[0].outcome for r in refused)
    assert verify(records).ok


def test_a_zero_window_records_every_refusal(store: Store) -> None:
    log = AuditLog(store, unauthenticated_window=0)
    for _ in range(4):
        log.append(AuditEntry("WhoAmI", code="UNAUTHENTICATED", reason="UNAUTHENTICATED", denied=True))
    assert log.seq == 4
