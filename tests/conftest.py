"""Shared fixtures: one real daemon for the session, reached only through the client."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon_proc import DaemonProcess
from memos import Client

_names = itertools.count()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path_factory.mktemp("memosd") / "data").start()
    yield proc
    code = proc.stop()
    assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.log()}"


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.address, timeout=60) as c:
        yield c


@pytest.fixture
def cube_name(request: pytest.FixtureRequest) -> str:
    """A fresh, unique cube name per test."""
    return f"t{next(_names)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")
