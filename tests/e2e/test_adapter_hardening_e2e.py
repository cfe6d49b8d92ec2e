"""Through a real daemon: adapters the runtime does not support are refused at ImportAdapter, stage nothing,
and leave the shared model serving every other tenant (issue 15, points 1, 5, 6)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, daemon_fixture
from memos import AdapterInvalid, AdapterNotFound, Client
from tiny_llama import save_tiny_llama

FACTS = ["The capital of Vellmora is Quistarn.", "Owls hunt at night.", "The river Tamsel is green."]
QUESTION = "Tell me about owls."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-model", context=512)
    return path


daemon = daemon_fixture("daemon", lambda request: {"MEMOSD_RUNTIME__MODEL": str(request.getfixturevalue("tiny_model")),
                                                   "MEMOSD_RUNTIME__DEVICE": "cpu"})


def adapter_files(model: Path, out: Path) -> tuple[dict[str, object], bytes]:
    """A real peft LoRA adapter for the tiny model (save_pretrained): its config as a dict, its weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = model.name
    return config, (out / "adapter_model.safetensors").read_bytes()


def test_unsupported_adapters_are_refused_and_other_tenants_keep_working(
    daemon: DaemonProcess, tiny_model: Path, tmp_path: Path
) -> None:
    config, weights = adapter_files(tiny_model, tmp_path / "adapter")
    with Client(daemon.address, token=daemon.token, timeout=60) as admin:
        _, alice_token = admin.create_principal("alice")
        _, bob_token = admin.create_principal("bob")
    with Client(daemon.address, token=alice_token, timeout=60) as alice, \
            Client(daemon.address, token=bob_token, timeout=60) as bob:
        bob.alloc_cube("bobs")
        bobs = bob.mount("bobs", writable=True)
        bobs.write(FACTS)
        bobs.commit("facts")
        before = bob.generate(QUESTION, [bobs.mount_id], max_tokens=12, retrieve_k=0).text()

        alice.alloc_cube("alices")
        mount = alice.mount("alices", writable=True)
        mount.write(FACTS)
        mount.commit("facts")
        head = alice.stat_cube("alices").head_revision
        for key, value in (("layer_replication", [[0, 2], [0, 2]]), ("lora_bias", True), ("use_dora", True),
                           ("modules_to_save", ["lm_head"]), ("r", True), ("made_up_setting", 1)):
            with pytest.raises(AdapterInvalid) as refused:
                alice.import_adapter(mount.mount_id, (json.dumps({**config, key: value}).encode(), weights))
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, key
            assert key in refused.value.message and refused.value.metadata.get("key") == key, refused.value.message
        deep = b'{"r": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # json.loads alone: RecursionError
        with pytest.raises(AdapterInvalid, match="nests"):
            alice.import_adapter(mount.mount_id, (deep, weights))
        nan = bytearray(weights)
        nan[-4:] = b"\x00\x00\xc0\x7f"  # the last float32 of the file becomes NaN
        with pytest.raises(AdapterInvalid, match="NaN") as refused_nan:
            alice.import_adapter(mount.mount_id, (json.dumps(config).encode(), bytes(nan)))
        assert refused_nan.value.code == grpc.StatusCode.INVALID_ARGUMENT

        # Nothing was staged: a commit now makes no revision and there is no adapter to export or use.
        alice.commit(mount.mount_id, "after the refusals")
        assert alice.stat_cube("alices").head_revision == head
        with pytest.raises(AdapterNotFound):
            alice.export_adapter(mount.mount_id)

        # The shared model is untouched: bob gets the same greedy answer, before and after alice's real
        # adapter is loaded and used.
        assert bob.generate(QUESTION, [bobs.mount_id], max_tokens=12, retrieve_k=0).text() == before
        alice.import_adapter(mount.mount_id, (json.dumps(config).encode(), weights))
        alice.commit(mount.mount_id, "adapter")
        adapted = alice.generate(QUESTION, [mount.mount_id], max_tokens=12, retrieve_k=0,
                                 adapter_mount=mount.mount_id)
        adapted.text()
        assert adapted.summary is not None and adapted.summary.completion_tokens > 0
        assert bob.generate(QUESTION, [bobs.mount_id], max_tokens=12, retrieve_k=0).text() == before
