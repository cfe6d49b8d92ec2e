"""A second daemon on a taken port fails at once, before it loads anything, naming the address and the flag.

The ports are probed right after the data dir is locked: loading the embedder, the store and the model
takes seconds to minutes, and a newcomer starting a second memosd beside the first must not wait that
long for an error. "Before it loads anything" is read from the log (no embedder or store line, no
`ports_free`), not from a wall clock.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess

# Lines a start writes once it is past the port check: the check itself, the embedder, the store.
PAST_THE_CHECK = ("event=ports_free", "loaded from", "event=serving")


def _addresses(daemon: DaemonProcess) -> tuple[str, str]:
    info = json.loads((daemon.data_dir / "daemon.json").read_text())
    return info["address"], info["metrics_address"]


def _failed_start(daemon: DaemonProcess) -> str:
    with pytest.raises(RuntimeError, match="memosd exited with 1"):
        daemon.start()
    assert daemon.proc is not None and daemon.proc.returncode == 1
    log = daemon.full_log()
    for line in PAST_THE_CHECK:
        assert line not in log, f"the start went past the port check ({line!r}):\n{log}"
    return log


def test_second_daemon_on_a_taken_grpc_or_metrics_port_fails_before_loading(tmp_path: Path) -> None:
    first = DaemonProcess(tmp_path / "first").start()
    try:
        grpc_address, metrics_address = _addresses(first)
        assert metrics_address and not metrics_address.endswith(":0")

        # The gRPC port: the message names the address and the flag, key and variable that change it.
        log = _failed_start(DaemonProcess(tmp_path / "second", extra_args=["--listen", grpc_address]))
        assert f"memosd: cannot listen on {grpc_address}: the address is already in use" in log
        assert "--listen HOST:PORT (config server.listen, env MEMOSD_LISTEN; port 0 picks a free one)" in log

        # The metrics port (gRPC on port 0): the same, for metrics.listen.
        log = _failed_start(DaemonProcess(tmp_path / "third", env={"MEMOSD_METRICS__LISTEN": metrics_address}))
        assert f"memosd: cannot serve metrics on {metrics_address}: the address is already in use" in log
        assert "set metrics.listen to a free" in log and "MEMOSD_METRICS__LISTEN" in log
        assert first.proc is not None and first.proc.poll() is None, "the first daemon is untouched"
    finally:
        assert first.stop() == 0, first.log()


def test_metrics_port_follows_grpc_port_zero(tmp_path: Path) -> None:
    # No MEMOSD_METRICS__LISTEN: with --listen 127.0.0.1:0 the metrics port is picked free too, so two
    # such daemons run side by side (the default 9464 would be taken by the first).
    # tests/daemon_proc.py sets no metrics address; it relies on this too.
    daemons = [DaemonProcess(tmp_path / name) for name in ("a", "b")]
    try:
        for daemon in daemons:
            daemon.start()
        metrics = [_addresses(daemon)[1] for daemon in daemons]
        assert all(m.startswith("127.0.0.1:") and not m.endswith(":9464") for m in metrics), metrics
        assert metrics[0] != metrics[1]

        # memosctl finds each by its data dir (no --target: both are on port 0), and names a refused token.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMOS_", "MEMOSD_"))}
        memosctl = [sys.executable, "-m", "memos.cli.main"]
        a, b = daemons
        found = subprocess.run([*memosctl, "--data-dir", str(b.data_dir), "whoami", "-o", "json"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert found.returncode == 0 and json.loads(found.stdout)["name"] == "admin", found.stderr
        wrong = subprocess.run([*memosctl, "--data-dir", str(b.data_dir), "--token-file", str(a.data_dir / "admin.token"),
                                "whoami"], env=env, capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 3
        assert f"the token from {a.data_dir / 'admin.token'} was refused by {b.address}" in wrong.stderr
    finally:
        for daemon in daemons:
            if daemon.proc is not None:
                assert daemon.stop() == 0, daemon.log()


def test_a_taken_http_port_fails_before_loading(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        log = _failed_start(DaemonProcess(tmp_path / "http", env={"MEMOSD_HTTP__LISTEN": address}))
    assert f"memosd: cannot serve the OpenAI-compatible API on {address}: the address is already in use" in log
    assert "set http.listen to a free" in log and "MEMOSD_HTTP__LISTEN" in log
