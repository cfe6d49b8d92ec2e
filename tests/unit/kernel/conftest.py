"""The kernel under test: one per test, over a real RocksDB store in tmp_path, with fake embedder and indexes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd.kernel.kernel import Kernel

from .fakes import FakeIndexes
from .rig import Clock, open_kernel


@pytest.fixture
def indexes() -> FakeIndexes:
    """The index factory the kernel was given: tests look at what the kernel put in a cube's index."""
    return FakeIndexes()


@pytest.fixture
def kernel(tmp_path: Path, indexes: FakeIndexes) -> Iterator[Kernel]:
    k = open_kernel(tmp_path, indexes)
    yield k
    k.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Time the test moves: the kernel stamps revisions and compaction reads the time through time.time_ns,
    so a retention window is crossed by advancing this, not by sleeping."""
    fake = Clock(time.time_ns())
    monkeypatch.setattr(time, "time_ns", fake)
    return fake
