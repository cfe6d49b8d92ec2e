"""memosd.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd.sdnotify import SystemdNotifier, watchdog_interval


class FakeSystemd:
    """Receives notify datagrams the way systemd does."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(2.0)
        self.address = address

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> int:
        """How many datagrams are queued right now, draining them."""
        self.sock.setblocking(False)
        n = 0
        try:
            while True:
                self.sock.recv(4096)
                n += 1
        except BlockingIOError:
            return n
        finally:
            self.sock.settimeout(2.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fs_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"@memosd-test-{uuid.uuid4().hex}")
    yield fake
    fake.close()


def test_ready_status_mainpid(fs_systemd: FakeSystemd) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": fs_systemd.address})
    assert n.enabled
    n.ready("listening on 127.0.0.1:50051")
    msg = fs_systemd.recv()
    assert msg == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "listening on 127.0.0.1:50051"}


def test_stopping_status_watchdog(fs_systemd: FakeSystemd) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": fs_systemd.address})
    n.status("two\nlines")
    assert fs_systemd.recv() == {"STATUS": "two lines"}  # a newline must not start a new assignment
    n.stopping()
    assert fs_systemd.recv() == {"STOPPING": "1"}
    n.watchdog()
    assert fs_systemd.recv() == {"WATCHDOG": "1"}
    n.extend_timeout(2.5)
    assert fs_systemd.recv() == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_abstract_namespace_socket(abstract_systemd: FakeSystemd) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": abstract_systemd.address})
    n.ready()
    assert abstract_systemd.recv() == {"READY": "1", "MAINPID": str(os.getpid())}
    n.stopping("draining")
    assert abstract_systemd.recv() == {"STOPPING": "1", "STATUS": "draining"}


def test_noop_without_socket() -> None:
    n = SystemdNotifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False
    n.ready("x")
    n.stopping()
    n.watchdog()
    assert n.watchdog_interval() is None
    assert n.start_watchdog(lambda: True) is None
    n.stop_watchdog()


def test_send_failure_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    assert n.notify("READY=1") is False
    n.ready()
    assert "systemd notify failed" in caplog.text


def test_unsupported_socket_is_off(caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_uses_os_environ_by_default(fs_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", fs_systemd.address)
    SystemdNotifier().ready()
    assert fs_systemd.recv()["READY"] == "1"
    assert os.environ["NOTIFY_SOCKET"] == fs_systemd.address  # kept, on purpose


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


class HealthCheck:
    """A health check the test flips, which counts the watchdog's calls so the test can wait on them."""

    def __init__(self) -> None:
        self.healthy = True
        self.unhealthy_calls = 0
        self.changed = threading.Condition()

    def __call__(self) -> bool:
        with self.changed:
            if not self.healthy:
                self.unhealthy_calls += 1
                self.changed.notify_all()
            return self.healthy

    def wait_unhealthy_calls(self, n: int) -> None:
        """Wait until the watchdog has seen `n` more unhealthy checks (the deadline only bounds a hang)."""
        with self.changed:
            target = self.unhealthy_calls + n
            assert self.changed.wait_for(lambda: self.unhealthy_calls >= target, timeout=60)


def test_watchdog_pings_while_healthy(fs_systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": fs_systemd.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    n = SystemdNotifier(env)
    assert n.watchdog_interval() == 0.2
    check = HealthCheck()
    thread = n.start_watchdog(check)
    assert thread is not None and thread.daemon and thread.is_alive()
    assert n.start_watchdog(check) is thread  # one pinger only
    # Pings every 0.1 s: the first comes at once, several more follow.
    for _ in range(3):
        assert fs_systemd.recv() == {"WATCHDOG": "1"}

    # Unhealthy: pings stop (so systemd would restart us) ... The loop pings right after a healthy check,
    # so once it has made an unhealthy one, every ping of an earlier check is already in the socket.
    with check.changed:
        check.healthy = False
    check.wait_unhealthy_calls(1)
    fs_systemd.pending()
    check.wait_unhealthy_calls(3)
    assert fs_systemd.pending() == 0
    # ... and resume on recovery.
    with check.changed:
        check.healthy = True
    assert fs_systemd.recv() == {"WATCHDOG": "1"}

    n.stop_watchdog()
    assert not thread.is_alive()  # joined: nothing pings any more


def test_watchdog_survives_raising_health_check(fs_systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": fs_systemd.address, "WATCHDOG_USEC": "100000"}
    n = SystemdNotifier(env)
    calls = 0

    def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("check broke")
        return True

    thread = n.start_watchdog(flaky)
    assert thread is not None
    try:
        assert fs_systemd.recv() == {"WATCHDOG": "1"}  # the second check passes and pings
        assert calls >= 2
    finally:
        n.stop_watchdog()
    assert not thread.is_alive()


def test_watchdog_not_for_other_pid(fs_systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": fs_systemd.address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(env).start_watchdog(lambda: True) is None
