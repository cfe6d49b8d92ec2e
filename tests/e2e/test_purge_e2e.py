"""Purge through a real daemon (tiny random Llama): every derived memory goes, and no byte of the text stays.

The cube's items are activated (a KV cache in the pool and the store), used
by a Generate (whose audit record names them), and trained into an adapter; then a Purge by source erases one item. The receipt
lists what went, the trained adapter is tainted, the next Activate recomputes
the cache without the item, the purge is audited, and after the daemon stops
the item's text is in no file of the data dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_proc import DaemonProcess
from memos import Client
from memos.errors import InvalidField, ItemNotFound
from memos.v1 import types_pb2 as t
from tiny_llama import save_tiny_llama

CANARY = "Zebracorn-7f3a keeps the vault code 9431 secret"
OTHERS = ["Owls hunt at night.", "The river Tamsel is green."]


def test_purge_leaves_no_trace(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "tiny-model", context=512)
    env = {"MEMOSD_RUNTIME__MODEL": str(model), "MEMOSD_RUNTIME__DEVICE": "cpu"}
    daemon = DaemonProcess(tmp_path / "data", env=env).start()
    try:
        with Client(daemon.address, token=daemon.token, timeout=60) as c:
            c.alloc_cube("diary")
            with c.mount("diary", writable=True) as m:
                canary_id = m.write([{"text": CANARY, "source": "chat-7"}])[0]
                m.write(OTHERS, source="notes")
                m.commit("seed")
            mount = c.mount("diary")
            first = c.activate(mount)
            c.generate("What is the vault code?", [mount], max_tokens=4).text()
            generated = [r for r in c.audit(method="Generate")][-1]  # what memory went into the answer
            assert canary_id in generated.item_ids and f"kv:{first.cache_key}" in generated.artifacts
            activated = [r for r in c.audit(method="Activate")][-1]
            assert canary_id in activated.item_ids and f"kv:{first.cache_key}" in activated.artifacts
            job = c.wait_job(c.train(mount, steps=2, rank=4).job_id)
            assert job.state == t.JOB_STATE_SUCCEEDED, job.error
            with pytest.raises(InvalidField):
                c.purge("diary")
            with pytest.raises(ItemNotFound):
                c.purge("diary", ["itm_aaaaaaaaaaaaaaaaaaaa"])

            receipt = c.purge("diary", source="chat-7")
            assert list(receipt.item_ids) == [canary_id] and receipt.versions_removed == 1
            assert first.cache_key in receipt.kv_caches_deleted
            assert [a.digest for a in receipt.adapters_tainted] == [job.adapter_digest]
            with c.mount("diary") as at_head:
                assert sorted(i.text for i in at_head.iter_items()) == sorted(OTHERS)
                assert all(h.item.item_id != canary_id for h in at_head.search("vault code Zebracorn"))
                assert at_head.export_adapter()[0].tainted_by_purges == [receipt.purge_id]
            with c.mount("diary", revision=1) as old, pytest.raises(ItemNotFound):
                old.read([canary_id])
            again = c.activate(c.mount("diary"))
            assert again.source == t.ACTIVATION_SOURCE_COMPUTED and again.item_count == 2
            audited = [r for r in c.audit(method="Purge") if r.outcome == t.AUDIT_OUTCOME_OK]
            assert audited[-1].item_ids == [canary_id] and f"purge:{receipt.purge_id}" in audited[-1].artifacts
    finally:
        assert daemon.stop() == 0, daemon.log()
    needles = [CANARY.encode(), b"Zebracorn", b"zebracorn", b"9431 secret"]
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file() and path.name != "data.log":
            content = path.read_bytes()
            assert not any(n in content for n in needles), path
