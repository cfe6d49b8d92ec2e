"""SIGTERM while the model is still loading: the daemon stops cleanly without waiting for the load."""

from __future__ import annotations

from pathlib import Path

from daemon_proc import DaemonProcess
from memos import Client


def test_sigterm_during_the_first_model_load_exits_cleanly_without_waiting_for_it(tmp_path: Path) -> None:
    # A fresh model cache: the daemon must dequantize the GGUF, which takes far longer than this test's
    # few calls before the SIGTERM (the test checks that the load was still running when it was sent).
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__CACHE_DIR": str(tmp_path / "cache")}
    daemon = DaemonProcess(tmp_path / "data", env=env).start()
    try:
        with Client(daemon.address, token=daemon.token, timeout=60) as client:
            client.alloc_cube("kept")
            assert client.stats().model.state == "loading"
    finally:
        # 60 s: a loaded 2-core machine; before the fix the daemon waited for the whole load (minutes there).
        code = daemon.stop(timeout=60)
    log = daemon.log()
    assert code == 0, log
    assert "event=model_load_abandoned" in log and "event=stopped" in log, log
    restarted = DaemonProcess(tmp_path / "data", env={"MEMOSD_RUNTIME__MODEL": "none"}).start()
    try:
        with Client(restarted.address, token=restarted.token, timeout=60) as client:
            assert [c.name for c in client.list_cubes()] == ["kept"]
    finally:
        assert restarted.stop() == 0
