"""MoveCube's directory switch when etcd cuts the CAS off (its outcome unknown): the owner reads the entry
until etcd answers and makes the outcome final (cluster/move.py, CubeMover._switch). Against a scripted
directory: the real etcd cannot be made to lose a txn's answer on cue (tests/cluster covers the rest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from memosd.cluster.directory import Entry, StaleEpoch
from memosd.cluster.etcd import Compare, EtcdClient, EtcdUnavailable
from memosd.cluster.marks import MoveMarks
from memosd.cluster.move import CubeMover
from memosd.errors import MoveRefused


class ScriptedDirectory:
    """move() is cut off; lookup() answers from ``reads`` in turn (an exception is raised); touch() is
    recorded and raises ``touch_error`` once if set."""

    def __init__(self, reads: Sequence[Entry | Exception], touch_error: Exception | None = None) -> None:
        self.reads = list(reads)
        self.touched: list[tuple[str, str, int]] = []
        self.touch_error = touch_error

    def move(self, cube_id: str, from_owner: str, to_owner: str, epoch: int, fence: Sequence[Compare] = ()) -> Entry:
        raise EtcdUnavailable("etcd did not answer the txn after it was sent: its outcome is unknown")

    def lookup(self, cube_id: str) -> Entry | None:
        read = self.reads.pop(0)
        if isinstance(read, Exception):
            raise read
        return read

    def touch(self, cube_id: str, owner: str, epoch: int) -> Entry:
        self.touched.append((cube_id, owner, epoch))
        if self.touch_error is not None:
            error, self.touch_error = self.touch_error, None
            raise error
        return Entry(cube_id, owner, epoch)


def _mover(directory: ScriptedDirectory, tmp_path: Path) -> CubeMover:
    mover = CubeMover(cast(Any, None), EtcdClient(["127.0.0.1:9"]), cast(Any, None), "alpha",
                      MoveMarks(tmp_path / "moves"), tmp_path, lambda _: None)
    mover.directory = cast(Any, directory)
    return mover


CUBE = "cub_aaaaaaaaaaaaaaaaaaaaaaaa"


def test_a_cut_off_switch_that_was_applied_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memosd.cluster.move.RESOLVE_SECONDS", 0.0)
    unreachable = EtcdUnavailable("no endpoint answered")
    directory = ScriptedDirectory([unreachable, unreachable, Entry(CUBE, "beta", 4)])
    assert _mover(directory, tmp_path)._switch(CUBE, "beta", 3, 10, 11) == Entry(CUBE, "beta", 4)
    assert directory.touched == []


def test_a_cut_off_switch_that_was_not_applied_is_voided_then_given_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memosd.cluster.move.RESOLVE_SECONDS", 0.0)
    directory = ScriptedDirectory([Entry(CUBE, "alpha", 3)])
    with pytest.raises(MoveRefused, match="did not apply the directory switch"):
        _mover(directory, tmp_path)._switch(CUBE, "beta", 3, 10, 11)
    assert directory.touched == [(CUBE, "alpha", 3)]  # a late CAS now fails its compare


def test_a_late_switch_landing_between_the_read_and_the_touch_is_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memosd.cluster.move.RESOLVE_SECONDS", 0.0)
    late = Entry(CUBE, "beta", 4)
    directory = ScriptedDirectory([Entry(CUBE, "alpha", 3), late],
                                  touch_error=StaleEpoch(late, "alpha", 3))
    assert _mover(directory, tmp_path)._switch(CUBE, "beta", 3, 10, 11) == late
