"""Parametric memory through a real daemon: adapters over gRPC, bad uploads, training jobs, restarts.

Most tests run a daemon with the tiny random Llama (every call takes
milliseconds); one runs the embedded SmolLM2 on the session daemon end to end:
train a little, generate with the adapter, move it to another cube by export
and import, and activate under it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import (
    AdapterInvalid,
    AdapterMismatch,
    AdapterTooLarge,
    Client,
    CubeEmpty,
    JobFinished,
    TrainingInProgress,
)
from memos.v1 import types_pb2 as t
from tiny_llama import save_tiny_llama

FACTS = ["The capital of Vellmora is Quistarn.", "Owls hunt at night.", "The river Tamsel is green."]
MAX_ADAPTER_BYTES = 200_000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-model", context=512)
    return path


def tiny_env(model: Path) -> dict[str, str]:
    return {"MEMOSD_RUNTIME__MODEL": str(model), "MEMOSD_RUNTIME__DEVICE": "cpu",
            "MEMOSD_LIMITS__MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES)}


tiny_daemon = daemon_fixture("tiny-daemon", lambda request: tiny_env(request.getfixturevalue("tiny_model")))
tc = client_fixture("tiny_daemon")


def make_adapter(model: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = model.name
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def fill(client: Client, name: str, texts: list[str]) -> str:
    client.alloc_cube(name)
    mount = client.mount(name, writable=True)
    mount.write(texts)
    mount.commit("facts")
    return mount.mount_id


def test_import_commit_export_diff_and_generate_with_an_adapter(
    tc: Client, tiny_model: Path, tmp_path: Path
) -> None:
    source = make_adapter(tiny_model, tmp_path / "a", seed=1)
    mount = fill(tc, "adapted", FACTS)
    imported = tc.import_adapter(mount, source)
    assert imported.adapter.staged and imported.mount.staged_adapter
    revision = tc.commit(mount, "adapter").revision
    assert revision.adapter_changed and revision.adapter_digest == imported.adapter.digest
    adapter, config, weights = tc.export_adapter(mount, tmp_path / "exported")
    assert adapter.born_revision == revision.number and adapter.lineage.origin == "imported"
    assert (config, weights) == ((source / "adapter_config.json").read_bytes(),
                                 (source / "adapter_model.safetensors").read_bytes())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "exported" / name).read_bytes() == (source / name).read_bytes()
    changes = tc.diff("adapted", 1, revision.number)
    list(changes)
    assert changes.adapter_change.kind == t.CHANGE_KIND_ADDED
    assert changes.adapter_change.after.digest == adapter.digest
    with_adapter = tc.generate("Tell me about owls.", [mount], max_tokens=12, adapter_mount=mount, retrieve_k=0)
    text_adapter = with_adapter.text()
    assert with_adapter.summary is not None and with_adapter.summary.model_fingerprint
    base = tc.generate("Tell me about owls.", [mount], max_tokens=12, retrieve_k=0).text()
    assert text_adapter != base
    activation = tc.activate(mount)
    assert activation.adapter_digest == adapter.digest
    stats = tc.stats()
    assert stats.adapters.resident == 1 and stats.adapters.stored >= 1
    assert tc.evict("adapted").adapters_unloaded == 1


def test_bad_uploads_are_refused_and_lose_nothing(tc: Client, tiny_model: Path, tmp_path: Path) -> None:
    source = make_adapter(tiny_model, tmp_path / "a", seed=2)
    config = (source / "adapter_config.json").read_bytes()
    weights = (source / "adapter_model.safetensors").read_bytes()
    mount = fill(tc, "uploads", FACTS)
    with pytest.raises(AdapterInvalid, match="unreadable") as corrupt:
        tc.import_adapter(mount, (config, weights[:100] + b"\x00" * (len(weights) - 100)))
    assert corrupt.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(AdapterTooLarge) as big:
        tc.import_adapter(mount, (config, weights + b"\x00" * MAX_ADAPTER_BYTES))
    assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapter_bytes" in big.value.message
    other = json.loads(config)
    other["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(AdapterMismatch, match="SmolLM2-135M-Instruct") as mismatch:
        tc.import_adapter(mount, (json.dumps(other).encode(), weights))
    assert mismatch.value.code == grpc.StatusCode.FAILED_PRECONDITION
    info = tc.stat_cube("uploads")
    assert info.head_revision == 1 and len(list(tc.iter_items(mount))) == len(FACTS)
    tc.import_adapter(mount, source)  # a good upload still works on the same mount


def test_truncated_upload_stream(tc: Client, tiny_model: Path, tmp_path: Path) -> None:
    """A stream that ends before the declared sizes: the header promises more than arrives."""
    from memos.v1 import memos_pb2 as pb
    from memos.v1 import memos_pb2_grpc

    source = make_adapter(tiny_model, tmp_path / "a", seed=3)
    config = (source / "adapter_config.json").read_bytes()
    weights = (source / "adapter_model.safetensors").read_bytes()
    mount = fill(tc, "truncated", FACTS)

    def requests() -> Iterator[pb.ImportAdapterRequest]:
        yield pb.ImportAdapterRequest(header=pb.AdapterUpload(mount_id=mount, config_bytes=len(config),
                                                              weights_bytes=len(weights)))
        yield pb.ImportAdapterRequest(chunk=t.AdapterChunk(file=t.ADAPTER_FILE_CONFIG, data=config))
        yield pb.ImportAdapterRequest(chunk=t.AdapterChunk(file=t.ADAPTER_FILE_WEIGHTS, data=weights[:1000]))

    stub = memos_pb2_grpc.MemOSStub(tc.channel)  # carries the token
    with pytest.raises(grpc.RpcError) as caught:
        stub.ImportAdapter(requests(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in (caught.value.details() or "")
    assert not tc.stat_cube("truncated").head_revision > 1


def test_training_jobs_run_refuse_and_cancel(tc: Client) -> None:
    empty = tc.mount(tc.alloc_cube("untrainable").cube_id, writable=True)
    with pytest.raises(CubeEmpty):
        tc.train(empty.mount_id)
    mount = fill(tc, "trained", FACTS)
    job = tc.train(mount, steps=3, rank=4, message="learn")
    updates: list[t.Job] = []
    final = tc.wait_job(job.job_id, on_update=updates.append)
    assert final.state == t.JOB_STATE_SUCCEEDED, final.error
    assert final.step == final.total_steps == 3 and final.result_revision == 2
    assert any(u.state == t.JOB_STATE_RUNNING for u in updates)
    adapter, _, _ = tc.export_adapter(tc.mount("trained", revision=2).mount_id)
    assert adapter.lineage.origin == "trained" and adapter.lineage.job_id == job.job_id
    assert adapter.lineage.source_revision == 1 and len(adapter.lineage.source_item_ids) == len(FACTS)
    long_job = tc.train(mount, steps=100_000, rank=4)
    with pytest.raises(TrainingInProgress, match=long_job.job_id):
        tc.train(mount, steps=3)
    wait_for_a_step(tc, long_job.job_id)
    cancelled = tc.cancel_job(long_job.job_id)
    assert cancelled.state == t.JOB_STATE_CANCELLED
    assert tc.stat_cube("trained").head_revision == 2  # unchanged by the cancelled job
    with pytest.raises(JobFinished):
        tc.cancel_job(long_job.job_id)


def wait_for_a_step(c: Client, job_id: str) -> None:
    """Poll until the job has taken a training step; the generous deadline (a loaded 2-core machine is
    slow) makes a job that never runs fail here, with a message, rather than hang the test run."""
    deadline = time.monotonic() + 300
    while not any(j.job_id == job_id and j.step >= 1 for j in c.list_jobs()):
        assert time.monotonic() < deadline, f"job {job_id} took no step in 300 s: {c.list_jobs()}"
        time.sleep(0.05)


def test_a_restart_while_a_job_runs_reports_it_failed(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = DaemonProcess(data, env=tiny_env(tiny_model)).start()
    try:
        with Client(daemon.address, token=daemon.token, timeout=60) as c:
            mount = fill(c, "restarted", FACTS)
            job = c.train(mount, steps=100_000, rank=4)
            wait_for_a_step(c, job.job_id)
    finally:
        daemon.kill()  # a crash, mid-job
    again = DaemonProcess(data, env=tiny_env(tiny_model)).start()
    try:
        with Client(again.address, token=again.token, timeout=60) as c:
            [after] = c.list_jobs()
            assert after.job_id == job.job_id and after.state == t.JOB_STATE_FAILED
            assert "stopped while the job was running" in after.error
            assert c.stat_cube("restarted").head_revision == 1
    finally:
        assert again.stop() == 0


def test_smollm2_train_generate_move_and_activate(client: Client, cube_name: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + 180  # the session daemon loads SmolLM2 in the background after start
    while client.stats().model.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.stats().model.state == "ready", f"the model did not load in 180 s: {client.stats().model}"
    mount = fill(client, cube_name, ["Q: What is the capital of Vellmora?\nA: Quistarn"])
    final = client.wait_job(client.train(mount, steps=2, rank=4).job_id)
    assert final.state == t.JOB_STATE_SUCCEEDED, final.error
    trained = client.mount(cube_name)
    adapter, _, _ = client.export_adapter(trained, tmp_path / "trained")
    assert adapter.lineage.model_fingerprint == client.stats().model.fingerprint
    assert adapter.base_model == "SmolLM2-135M-Instruct"
    reply = client.generate("What is the capital of Vellmora?", [], max_tokens=8, adapter_mount=trained)
    assert reply.text() and reply.summary is not None
    # The adapter was applied: the audit record names it, and the base model scores the same tokens otherwise.
    # (followed: the gate appends the record as the call ends, which may be just after the stream's last message)
    records = client.audit(method="Generate", follow=True, timeout=60)
    assert any(f"adapter:{adapter.digest}" in r.artifacts for r in records)
    records.close()
    base = client.generate("What is the capital of Vellmora?", [], max_tokens=8)
    base.text()
    assert base.summary is not None
    assert (list(base.summary.token_ids), list(base.summary.token_logprobs)) != (
        list(reply.summary.token_ids), list(reply.summary.token_logprobs))
    # The same adapter moves to another cube byte for byte, and that cube activates under it.
    other = fill(client, cube_name + "-copy", ["Owls hunt at night."])
    client.import_adapter(other, tmp_path / "trained")
    client.commit(other, "copied adapter")
    activation = client.activate(other)
    assert activation.adapter_digest == adapter.digest
    assert client.stats().adapters.resident >= 1
