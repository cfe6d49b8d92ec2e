"""The Node client (clients/node) against the session daemon: node's test runner, and tsc over its JSDoc types.

Both need node and `npm ci --prefix clients/node` (scripts/setup.sh --dev runs it where npm exists). In CI
(`CI` set) their absence fails the test; on a machine without node it skips, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"
# Well above the suite's ~20 s: the model may still be loading when it starts (Generate waits for it).
TIMEOUT_SECONDS = 300


def node_or_missing() -> str:
    """The node binary; fails in CI, else skips, when node or the client's node_modules are missing."""
    node = shutil.which("node")
    problem = ""
    if node is None:
        problem = "node is not installed"
    elif not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        problem = "clients/node/node_modules is missing: run `npm ci --prefix clients/node` (or scripts/setup.sh --dev)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must run the Node client's tests")
        pytest.skip(problem)
    assert node is not None
    return node


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)


def test_node_client_suite(daemon: DaemonProcess) -> None:
    node = node_or_missing()
    # The client's own fallbacks (token and target variables) must not decide what the suite tests.
    env = {k: v for k, v in os.environ.items() if k not in ("MEMOS_TOKEN", "MEMOS_TOKEN_FILE", "MEMOS_TARGET")}
    env.update(MEMOS_TEST_TARGET=daemon.address, MEMOS_TEST_DATA_DIR=str(daemon.data_dir))
    done = run([node, "--test", "clients/node/test/"], env)
    assert done.returncode == 0, f"node --test failed ({done.returncode}):\n{done.stdout[-15000:]}\n{done.stderr[-5000:]}"
    # The runner's own count: a suite that skipped its daemon tests (no target) would still exit 0.
    assert "# skipped 0" in done.stdout and "# fail 0" in done.stdout, done.stdout[-3000:]


def test_node_client_types() -> None:
    node = node_or_missing()
    tsc = NODE_CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    done = run([node, str(tsc), "-p", str(NODE_CLIENT)], dict(os.environ))
    assert done.returncode == 0, f"tsc --checkJs found errors:\n{done.stdout}\n{done.stderr}"
