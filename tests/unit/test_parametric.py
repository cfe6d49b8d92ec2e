"""Parametric memory in process: adapters imported, versioned, validated, exported, and hot-swapped.

Adapters are real peft LoRA directories (PeftModel.save_pretrained) made for
the tiny random Llama, with random (non-zero) LoRA weights so that they
change what the model computes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from activation_rig import Rig, commit_items, open_rig, run_generation
from memos.v1 import memos_pb2 as pb
from memos.v1 import types_pb2 as t
from safetensors.torch import load, save
from tiny_llama import save_tiny_llama

from memosd.activation.generator import GenerateParams
from memosd.config import LimitsConfig
from memosd.errors import (
    AdapterInvalid,
    AdapterMismatch,
    AdapterNotFound,
    AdapterTooLarge,
    CommitConflict,
)
from memosd.runtime.adapters import adapter_digest, pool_key
from memosd.syscalls import adapter_stream

FACTS = ["The capital of Vellmora is Quistarn.", "Owls hunt at night.", "The river Tamsel is green."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=512)


def make_adapter(tiny_dir: Path, out: Path, *, seed: int, rank: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj")) -> tuple[bytes, bytes]:
    """A peft LoRA adapter directory for the tiny model, as PeftModel.save_pretrained writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    # peft records the directory it loaded from; ours is named after the model, as the runtime names it.
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = tiny_dir.name
    (out / "adapter_config.json").write_text(json.dumps(config))
    return (out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def adapter_a(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter-a"), seed=1)


@pytest.fixture(scope="module")
def adapter_b(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter-b"), seed=2, rank=8,
                        targets=("q_proj", "k_proj", "o_proj", "gate_proj"))


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


def upload(mount_id: str, config: bytes, weights: bytes, *, declare: tuple[int, int] | None = None,
           digest: str = "", chunk: int = 1000) -> Iterator[pb.ImportAdapterRequest]:
    sizes = declare or (len(config), len(weights))
    yield pb.ImportAdapterRequest(header=pb.AdapterUpload(mount_id=mount_id, config_bytes=sizes[0],
                                                          weights_bytes=sizes[1], digest=digest))
    for kind, data in ((t.ADAPTER_FILE_CONFIG, config), (t.ADAPTER_FILE_WEIGHTS, weights)):
        for start in range(0, len(data), chunk):
            yield pb.ImportAdapterRequest(chunk=t.AdapterChunk(file=kind, data=data[start:start + chunk]))


def exported(rig: Rig, mount_id: str) -> tuple[bytes, bytes]:
    _, _, _, chunks = adapter_stream.export(rig.adapters, mount_id)
    parts: dict[int, bytes] = {t.ADAPTER_FILE_CONFIG: b"", t.ADAPTER_FILE_WEIGHTS: b""}
    for c in chunks:
        parts[c.file] += c.data
    return parts[t.ADAPTER_FILE_CONFIG], parts[t.ADAPTER_FILE_WEIGHTS]


def import_and_commit(rig: Rig, cube: str, files: tuple[bytes, bytes]) -> str:
    mount = rig.kernel.mount(cube, 0, True).record.mount_id
    adapter_stream.import_adapter(rig.adapters, upload(mount, *files))
    rig.kernel.commit(mount, "adapter", "test")
    return mount


# --- versioning ---------------------------------------------------------------------------------------


def test_import_stage_commit_export_log_diff_rollback(
    rig: Rig, adapter_a: tuple[bytes, bytes], adapter_b: tuple[bytes, bytes]
) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)  # revision 1: items only
    record, info = adapter_stream.import_adapter(rig.adapters, upload(mount, *adapter_a, digest=adapter_digest(*adapter_a)))
    assert info.staged_adapter and record.rank == 4 and record.target_modules == ["q_proj", "v_proj"]
    assert record.lineage["origin"] == "imported" and record.lineage["model_fingerprint"]
    assert exported(rig, mount) == adapter_a  # staged: visible in its mount, byte-identical
    reader = rig.kernel.mount("c", 0, False).record.mount_id
    with pytest.raises(AdapterNotFound):
        adapter_stream.export(rig.adapters, reader)  # ... and nowhere else until committed
    rev2 = rig.kernel.commit(mount, "adapter a", "test").revision
    assert rev2 is not None and rev2.adapter_changed and rev2.adapter_digest == adapter_digest(*adapter_a)
    assert rev2.added == 0
    adapter_stream.import_adapter(rig.adapters, upload(mount, *adapter_b))
    rev3 = rig.kernel.commit(mount, "adapter b", "test").revision
    assert rev3 is not None and rev3.adapter_digest == adapter_digest(*adapter_b)
    # Diff covers the adapter like an item.
    before, after = rig.kernel.adapter_change("c", 1, 3)
    assert before is None and after is not None and after.digest == adapter_digest(*adapter_b)
    before, after = rig.kernel.adapter_change("c", 2, 3)
    assert before is not None and before.digest == adapter_digest(*adapter_a) and after is not None
    # Rollback brings revision 2's adapter back (a new version of the same bytes).
    rev4 = rig.kernel.rollback("c", 2, "", "test")
    assert rev4.adapter_changed and rev4.adapter_digest == adapter_digest(*adapter_a)
    at_head = rig.kernel.mount("c", 0, False).record.mount_id
    assert exported(rig, at_head) == adapter_a
    old = rig.kernel.mount("c", 3, False).record.mount_id
    assert exported(rig, old) == adapter_b  # history keeps every version
    log = rig.kernel.log("c", 10, "")[0].entries
    assert [r.adapter_changed for r in log] == [True, True, True, False]
    # Forget removes it at the next revision; revision 1 never had one.
    writer = rig.kernel.mount("c", 0, True).record.mount_id
    rig.kernel.forget(writer, [], adapter=True)
    rev5 = rig.kernel.commit(writer, "drop adapter", "test").revision
    assert rev5 is not None and rev5.adapter_changed and rev5.adapter_digest == ""
    with pytest.raises(AdapterNotFound):
        adapter_stream.export(rig.adapters, writer)


def test_the_adapter_survives_a_restart(tmp_path: Path, tiny_dir: Path, adapter_a: tuple[bytes, bytes]) -> None:
    first = open_rig(tmp_path, str(tiny_dir))
    first.kernel.alloc_cube("c", "", {})
    staged_mount = first.kernel.mount("c", 0, True).record.mount_id
    adapter_stream.import_adapter(first.adapters, upload(staged_mount, *adapter_a))
    committed = import_and_commit(first, "c", adapter_a)
    first.close()
    second = open_rig(tmp_path, str(tiny_dir))
    try:
        assert exported(second, committed) == adapter_a
        assert second.kernel.mounts[staged_mount].staged_adapter is not None  # staging survives too
        assert exported(second, staged_mount) == adapter_a
    finally:
        second.close()


def test_concurrent_adapter_changes_conflict(rig: Rig, adapter_a: tuple[bytes, bytes],
                                             adapter_b: tuple[bytes, bytes]) -> None:
    rig.kernel.alloc_cube("c", "", {})
    one = rig.kernel.mount("c", 0, True).record.mount_id
    two = rig.kernel.mount("c", 0, True).record.mount_id
    adapter_stream.import_adapter(rig.adapters, upload(one, *adapter_a))
    adapter_stream.import_adapter(rig.adapters, upload(two, *adapter_b))
    rig.kernel.commit(one, "a", "test")
    with pytest.raises(CommitConflict, match="adapter"):
        rig.kernel.commit(two, "b", "test")
    assert exported(rig, two) == adapter_b  # the staging area is kept


# --- bad uploads ------------------------------------------------------------------------------------------


def test_truncated_corrupt_oversized_and_damaged_uploads_are_refused(
    tmp_path: Path, tiny_dir: Path, adapter_a: tuple[bytes, bytes]
) -> None:
    config, weights = adapter_a
    r = open_rig(tmp_path, str(tiny_dir), limits=LimitsConfig(max_adapter_bytes=len(config) + len(weights)))
    try:
        r.kernel.alloc_cube("c", "", {})
        mount = r.kernel.mount("c", 0, True).record.mount_id
        with pytest.raises(AdapterInvalid, match="truncated"):
            adapter_stream.import_adapter(r.adapters, upload(mount, config, weights[:-100],
                                             declare=(len(config), len(weights))))
        with pytest.raises(AdapterInvalid, match="unreadable"):
            adapter_stream.import_adapter(r.adapters, upload(mount, config, b"\x00" * len(weights)))
        with pytest.raises(AdapterInvalid, match="not JSON"):
            adapter_stream.import_adapter(r.adapters, upload(mount, b"{oops", weights))
        with pytest.raises(AdapterInvalid, match="damaged"):
            adapter_stream.import_adapter(r.adapters, upload(mount, config, weights, digest="0" * 64))
        with pytest.raises(AdapterTooLarge, match="max_adapter_bytes"):
            adapter_stream.import_adapter(r.adapters, upload(mount, config, weights + b"x"))
        assert r.kernel.mounts[mount].staged_adapter is None  # nothing was staged
        adapter_stream.import_adapter(r.adapters, upload(mount, config, weights))  # and the real one still goes in
        assert r.kernel.mounts[mount].staged_adapter is not None
    finally:
        r.close()


def test_adapters_for_another_model_are_refused_with_the_mismatch(
    rig: Rig, tiny_dir: Path, adapter_a: tuple[bytes, bytes], tmp_path: Path
) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = rig.kernel.mount("c", 0, True).record.mount_id
    config, weights = adapter_a
    cfg = json.loads(config)
    other_base = json.dumps({**cfg, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M"}).encode()
    with pytest.raises(AdapterMismatch, match="SmolLM2-360M"):
        adapter_stream.import_adapter(rig.adapters, upload(mount, other_base, weights))
    wrong_target = json.dumps({**cfg, "target_modules": ["c_attn"]}).encode()
    with pytest.raises(AdapterMismatch, match="c_attn"):
        adapter_stream.import_adapter(rig.adapters, upload(mount, wrong_target, weights))
    tensors = load(weights)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(4, 128)  # the tiny model's q_proj takes 64 features
    with pytest.raises(AdapterMismatch, match="shape"):
        adapter_stream.import_adapter(rig.adapters, upload(mount, config, save(tensors)))
    assert rig.kernel.mounts[mount].staged_adapter is None


# --- hot swap -------------------------------------------------------------------------------------------


def test_activate_loads_the_adapter_and_keys_the_cache_by_it(
    rig: Rig, adapter_a: tuple[bytes, bytes]
) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    base = rig.activator.activate(mount)
    assert base.record.adapter_digest == "" and len(rig.host.adapters) == 0
    import_and_commit(rig, "c", adapter_a)
    rig.kernel.commit(mount, "", "")  # move the mount to HEAD (nothing staged)
    under = rig.activator.activate(mount)
    digest = adapter_digest(*adapter_a)
    assert under.record.adapter_digest == digest and pool_key(under.record.cube_id, digest) in rig.host.adapters
    # Same tokens, another adapter: another key, and nothing of the base cache is reused.
    assert under.record.token_ids == base.record.token_ids
    assert under.record.cache_key != base.record.cache_key
    assert under.source == "computed" and under.tokens_reused == 0
    evicted = rig.activator.evict("c", delete_persisted=False)
    assert evicted.adapters_unloaded == 1 and len(rig.host.adapters) == 0


def test_generate_uses_the_named_adapter_and_reuses_only_its_own_cache(
    rig: Rig, adapter_a: tuple[bytes, bytes]
) -> None:
    rig.kernel.alloc_cube("c", "", {})
    commit_items(rig, "c", FACTS)
    mount = import_and_commit(rig, "c", adapter_a)
    rig.activator.activate(mount)
    question = [("user", "Where is Quistarn?")]
    with_adapter = GenerateParams(question, [mount], max_tokens=12, adapter_mount_id=mount)
    text_a, report_a = run_generation(rig, with_adapter)
    assert report_a.adapter_digest == adapter_digest(*adapter_a)
    assert report_a.memory[0].cache_key and report_a.reused_tokens > 0
    text_base, report_base = run_generation(rig, replace(with_adapter, adapter_mount_id=""))
    # The base model gets the same prompt, but not the adapter's cache: the block is prefilled.
    assert report_base.memory[0].activated and report_base.memory[0].cache_key == ""
    assert report_base.reused_tokens == 0 and report_base.prompt_tokens == report_a.prompt_tokens
    assert text_a != text_base
    # The adapter's answer with its cache equals its answer without the cache.
    full_a, _ = run_generation(rig, replace(with_adapter, bypass_kv_cache=True))
    assert full_a == text_a


def test_interleaved_generations_each_get_their_own_adapter(
    tmp_path: Path, tiny_dir: Path, adapter_a: tuple[bytes, bytes], adapter_b: tuple[bytes, bytes]
) -> None:
    r = open_rig(tmp_path, str(tiny_dir), max_adapters=1)  # every switch also reloads: the hard case
    try:
        for name in ("a", "b"):
            r.kernel.alloc_cube(name, "", {})
            commit_items(r, name, FACTS)
        mounts = {name: import_and_commit(r, name, files) for name, files in (("a", adapter_a), ("b", adapter_b))}
        runs = {name: GenerateParams([("user", "Tell me about owls.")], [], max_tokens=24,
                                     adapter_mount_id=mount_id) for name, mount_id in mounts.items()}
        runs["base"] = GenerateParams([("user", "Tell me about owls.")], [], max_tokens=24)
        solo = {name: run_generation(r, params)[0] for name, params in runs.items()}
        assert len(set(solo.values())) == 3
        results: dict[str, str] = {}
        start = threading.Barrier(3)

        def go(name: str) -> None:
            start.wait()
            results[name] = run_generation(r, runs[name])[0]

        threads = [threading.Thread(target=go, args=(name,)) for name in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == solo
        assert r.host.adapters.evictions >= 2  # they really did take turns in one resident slot
    finally:
        r.close()


def test_generate_with_a_cube_without_adapter_says_so(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", FACTS)
    with pytest.raises(AdapterNotFound, match="import or train one"):
        run_generation(rig, GenerateParams([("user", "hi")], [mount], adapter_mount_id=mount))


def test_cubes_never_share_a_resident_adapter(rig: Rig, adapter_a: tuple[bytes, bytes]) -> None:
    """The same adapter bytes in two cubes are two pool entries: nothing loaded for one serves the other."""
    mounts = {}
    for name in ("one", "two"):
        rig.kernel.alloc_cube(name, "", {})
        commit_items(rig, name, FACTS)
        mounts[name] = import_and_commit(rig, name, adapter_a)
        rig.kernel.commit(mounts[name], "", "")
    digest = adapter_digest(*adapter_a)
    for name in ("one", "two"):
        rig.activator.activate(mounts[name])
    keys = {pool_key(rig.kernel.cube(n).cube_id, digest) for n in ("one", "two")}
    assert set(rig.host.adapters.resident()) == keys and len(keys) == 2
    rig.activator.evict("one", delete_persisted=False)
    assert rig.host.adapters.resident() == [pool_key(rig.kernel.cube("two").cube_id, digest)]


def test_with_a_rank_the_coldest_cubes_adapter_is_unloaded_first(tmp_path: Path, tiny_dir: Path,
                                                                  adapter_a: tuple[bytes, bytes]) -> None:
    r = open_rig(tmp_path, str(tiny_dir), max_adapters=2)
    try:
        mounts = {}
        for name in ("cold", "warm", "new"):
            r.kernel.alloc_cube(name, "", {})
            commit_items(r, name, FACTS)
            mounts[name] = import_and_commit(r, name, adapter_a)
            r.kernel.commit(mounts[name], "", "")
        heat = {r.kernel.cube("cold").cube_id: 1.0, r.kernel.cube("warm").cube_id: 5.0,
                r.kernel.cube("new").cube_id: 0.0}
        r.host.adapters.rank = lambda key: heat[key.partition("/")[0]]
        r.activator.activate(mounts["warm"])
        r.activator.activate(mounts["cold"])  # the most recently used, but the coldest cube
        r.activator.activate(mounts["new"])
        digest = adapter_digest(*adapter_a)
        assert set(r.host.adapters.resident()) == {pool_key(r.kernel.cube(n).cube_id, digest) for n in ("warm", "new")}
    finally:
        r.close()
