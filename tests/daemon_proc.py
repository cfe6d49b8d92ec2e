"""Start and stop a real memosd in a subprocess, on port 0, with its own data dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from memos import Client

STARTUP_SECONDS = 120.0

Scope = Literal["session", "package", "module", "class", "function"]
# A daemon's environment, or how to build it from the fixture request (when it needs other fixtures).
EnvSource = Mapping[str, str] | Callable[[pytest.FixtureRequest], Mapping[str, str]]


@dataclass
class DaemonProcess:
    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    log_path: Path | None = None

    def start(self) -> DaemonProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "daemon.json").unlink(missing_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOSD_")}
        # No model unless a test asks for one: most daemons here test plaintext memory, and
        # loading a model in the background would only take CPU from them.
        env["MEMOSD_RUNTIME__MODEL"] = "none"
        # The transformers engine unless a test names another: it starts in a second, and vLLM's start
        # (~30 s, ~3 GB) is paid once by the daemon the vLLM engine's own tests share
        # (tests/e2e/test_vllm_engine.py), which runs on the default engine.
        env["MEMOSD_RUNTIME__ENGINE"] = "transformers"
        # No MEMOSD_METRICS__LISTEN: with --listen on port 0 the metrics port is picked free too (config),
        # so many test daemons run at once beside one the developer runs on the default ports.
        env.update(self.env)
        args = [sys.executable, "-m", "memosd", "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0",
                "--log-level", "debug", *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + STARTUP_SECONDS
        info = self.data_dir / "daemon.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memosd exited with {self.proc.returncode}:\n{self.log()}")
            if info.exists():
                try:
                    data = json.loads(info.read_text())
                except ValueError:
                    data = {}
                if data.get("pid") == self.proc.pid:
                    self.address = data["address"]
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"memosd did not start in {STARTUP_SECONDS}s:\n{self.log()}")

    @property
    def token(self) -> str:
        """The bootstrap admin's token, which the daemon wrote at its first start."""
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        """Call metadata carrying the admin token, for raw stubs."""
        return (("authorization", f"Bearer {self.token}"),)

    def log(self) -> str:
        """The log's tail, for failure messages."""
        return self.full_log()[-20000:]

    def full_log(self) -> str:
        """The whole log, for assertions on what it says: a line early on may be far from the tail."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # the test fails on the timeout; a daemon left behind would slow every test after it
            raise

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def daemon_fixture(prefix: str, env: EnvSource | None = None, *, scope: Scope = "module") -> Any:
    """A fixture serving one daemon (per module by default: starting one costs seconds) in a fresh data dir
    named after ``prefix``; at teardown it must exit 0 on SIGTERM. Assign it to the fixture's name:
    ``daemon = daemon_fixture("gov")``."""

    @pytest.fixture(scope=scope)
    def fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
        extra = env(request) if callable(env) else env or {}
        proc = DaemonProcess(tmp_path_factory.mktemp(prefix) / "data", env=dict(extra)).start()
        yield proc
        code = proc.stop()
        assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.log()}"

    return fixture


def client_fixture(daemon: str = "daemon", *, timeout: float = 60, scope: Scope = "function") -> Any:
    """A fixture: a Client of the bootstrap admin of the daemon that the fixture named ``daemon`` serves."""

    @pytest.fixture(scope=scope)
    def fixture(request: pytest.FixtureRequest) -> Iterator[Client]:
        proc: DaemonProcess = request.getfixturevalue(daemon)
        with Client(proc.address, token=proc.token, timeout=timeout) as c:
            yield c

    return fixture
