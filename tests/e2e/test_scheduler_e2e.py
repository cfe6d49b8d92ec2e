"""The scheduler and activation selectors through a real daemon (tiny random Llama, a fast scheduler)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess
from memos import Client
from memos.errors import AccessDenied, InvalidField
from memos.v1 import types_pb2 as t
from tiny_llama import save_tiny_llama

FACTS = [f"fact {i}: the harbour of town {i} freezes in month {i % 12}" for i in range(8)]


def test_auto_policy_keeps_the_working_set_activated(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "tiny-model", context=512)
    env = {"MEMOSD_RUNTIME__MODEL": str(model), "MEMOSD_RUNTIME__DEVICE": "cpu",
           "MEMOSD_SCHEDULER__INTERVAL_SECONDS": "0.2"}
    daemon = DaemonProcess(tmp_path / "data", env=env).start()
    try:
        with Client(daemon.address, token=daemon.token, timeout=60) as c:
            c.alloc_cube("hot")
            with c.mount("hot", writable=True) as m:
                ids = m.write(FACTS)
                m.commit("seed")
            # Selectors on an explicit Activate.
            with c.mount("hot") as m:
                tagged = m.activate(items=[ids[5], ids[2]])
                assert tagged.item_count == 2 and tagged.selector == "items"
                for _ in range(3):
                    searched = [h.item.item_id for h in m.search("harbour of town 3 freezes", k=1, mode="lexical")]
                    m.read([ids[6]])
            with pytest.raises(InvalidField):
                c.set_cube_policy("hot", schedule="auto", drift_threshold=2.0)
            cube = c.set_cube_policy("hot", schedule="auto", working_set_size=3)
            assert cube.policy.schedule == t.SCHEDULE_POLICY_AUTO_ACTIVATE and cube.policy.working_set_size == 3
            assert c.stat_cube("hot").policy.working_set_size == 3

            deadline = time.monotonic() + 60
            status = c.scheduler_status()
            while time.monotonic() < deadline and status.activations < 1:
                time.sleep(0.2)
                status = c.scheduler_status()
            assert status.enabled and status.activations >= 1, status
            decision = [d for d in status.decisions if d.action == "activate"][-1]
            assert decision.cube_id == cube.cube_id and "drift" in decision.reason
            # The working set: the two items used, then the newest unused one; in commit order.
            with c.mount("hot") as m:
                again = m.activate(working_set=0)  # the policy's N; already in the pool
            assert again.selector == "working_set:3" and again.source == t.ACTIVATION_SOURCE_POOL
            # Its items, as the block Generate uses shows them: the searched and the read item, then the newest
            # unused one, in commit order.
            wanted = {*searched, ids[6]}
            wanted |= {next(i for i in reversed(ids) if i not in wanted)}
            with c.mount("hot") as m:
                gen = c.generate("which harbour freezes?", [m.mount_id], max_tokens=1, retrieve_k=0)
                gen.text()
            assert gen.summary is not None and gen.summary.memory[0].activated
            assert [u.item_id for u in gen.summary.memory[0].block_items] == sorted(wanted, key=ids.index)
            assert status.kv_pool.entries >= 1 and status.kv_pool.bytes_used <= status.kv_pool.budget_bytes

            # memosctl shows it; a non-admin may not look.
            env_ctl = {**os.environ, "MEMOS_TARGET": daemon.address, "MEMOS_TOKEN": daemon.token}
            shown = subprocess.run([sys.executable, "-m", "memos.cli.main", "sched", "status"], env=env_ctl,
                                   capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0 and "activate" in shown.stdout
            # The decisions name the cube (the table shows names; -o json keeps the id).
            decisions = shown.stdout.split("\n\n", 1)[1].splitlines()[1:]
            assert decisions and all(row.split()[1] == "hot" for row in decisions), shown.stdout
            assert cube.cube_id not in shown.stdout
            _, token = c.create_principal("viewer")
            with Client(daemon.address, token=token) as viewer, pytest.raises(AccessDenied):
                viewer.scheduler_status()
    finally:
        assert daemon.stop() == 0, daemon.log()
