"""The systemd notify protocol (sd_notify(3)) without python-systemd.

systemd passes ``NOTIFY_SOCKET``: a filesystem path, or an abstract-namespace
name when it starts with "@". Each message is one datagram of newline-separated
``KEY=value`` assignments. With ``Type=notify`` the unit is "started" only once
we send ``READY=1``; with ``WatchdogSec=`` it restarts us if ``WATCHDOG=1``
pings stop arriving. Outside systemd (NOTIFY_SOCKET unset) everything here is a
no-op, so the daemon calls it unconditionally.

NOTIFY_SOCKET is deliberately left in the environment after reading it. The
daemon spawns no child processes that could inherit it, and with
``NotifyAccess=main`` systemd would ignore messages from children anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace: leading NUL, no file
    if value.startswith("/"):
        return value
    if value:
        # e.g. "vsock:..." (systemd in VMs): not something this daemon needs.
        log.warning("unsupported NOTIFY_SOCKET %r; systemd notifications are off", value)
    return None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds from ``WATCHDOG_USEC``, or None when no watchdog applies to us.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for; any other
    process (a child that inherited the environment) must not ping.
    """
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None
    return value / 1_000_000 if value > 0 else None


class SystemdNotifier:
    """Sends state changes to systemd. Never raises: a failed send is logged and ignored.

    Typical use in the daemon::

        notifier = SystemdNotifier()
        ...                                   # open the store, load models, start gRPC
        notifier.ready(f"listening on {addr}")
        notifier.start_watchdog(healthy=kernel.is_healthy)
        ...                                   # on SIGTERM:
        notifier.stopping()
        notifier.stop_watchdog()
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._address = _address(self._env.get("NOTIFY_SOCKET", ""))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram. Returns whether it was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            # A fresh socket per message: messages are rare, and no lock is needed
            # between the main thread and the watchdog thread.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
        except OSError as e:
            log.warning("systemd notify failed (%s): %s", assignments[0], e)
            return False
        return True

    def ready(self, status: str = "") -> None:
        """Startup finished: the service is up. MAINPID tells systemd which process is the daemon."""
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(_status_line(status))
        self.notify(*lines)

    def stopping(self, status: str = "") -> None:
        """Shutdown began: systemd will not treat the exit as a crash or send more start jobs."""
        self.notify("STOPPING=1", *([_status_line(status)] if status else []))

    def status(self, text: str) -> None:
        """A one-line status shown by ``systemctl status``."""
        self.notify(_status_line(text))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time to start or stop (e.g. while a model loads), from now."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        """One keep-alive ping."""
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when there is no watchdog for us."""
        return watchdog_interval(self._env) if self.enabled else None

    def start_watchdog(self, healthy: Callable[[], bool]) -> threading.Thread | None:
        """Ping at half the watchdog timeout, from a daemon thread, whenever healthy() is true.

        An unhealthy (or raising) check skips the ping, so if the daemon stays wedged
        systemd kills and restarts it; a recovery in time resumes the pings. Returns the
        thread, or None when there is no watchdog. Calling it again returns the same thread.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return None
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watchdog_loop, args=(healthy, interval / 2), name="sd-watchdog", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop_watchdog(self, timeout: float = 5.0) -> None:
        """Stop the pinging thread and wait for it. Safe to call when none runs."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _watchdog_loop(self, healthy: Callable[[], bool], period: float) -> None:
        while True:
            try:
                ok = healthy()
            except Exception:
                log.exception("watchdog health check raised; skipping ping")
                ok = False
            if ok:
                self.watchdog()
            else:
                log.warning("daemon unhealthy; withholding watchdog ping")
            if self._stop.wait(period):
                return


def _status_line(text: str) -> str:
    # A newline would end the assignment and start a bogus one.
    return "STATUS=" + " ".join(text.splitlines())
