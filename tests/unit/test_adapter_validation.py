"""What an uploaded adapter may be (the allow-list of adapter_config.json, the weights), and the invariant
that loading one never changes the base model (issue 15, points 1, 5, 6)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from activation_rig import Rig, commit_items, open_rig
from memos.v1 import memos_pb2 as pb
from memos.v1 import types_pb2 as t
from safetensors.torch import save
from tiny_llama import save_tiny_llama

from memosd.errors import AdapterInvalid as AdapterInvalidError
from memosd.errors import AdapterTooLarge as AdapterTooLargeError
from memosd.errors import ModelUnavailable
from memosd.runtime import adapters as rt
from memosd.runtime.lora_train import DEFAULT_TARGETS, adapter_config_dict
from memosd.runtime.model import LoadedModel, ModelSpec, base_name, load_model, model_fingerprint
from memosd.syscalls import adapter_stream

PROMPT = "A KV cache is reusable only as an exact token prefix"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-model", context=256)


@pytest.fixture
def lm(tiny_dir: Path, tmp_path: Path) -> LoadedModel:
    return load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)


def peft_config(model_name: str, **settings: Any) -> dict[str, Any]:
    """adapter_config.json as peft writes it (the trainer's export), for ``settings`` of LoraConfig."""
    from peft import LoraConfig

    settings.setdefault("target_modules", ["q_proj", "v_proj"])
    config = adapter_config_dict(LoraConfig(**settings))
    config["base_model_name_or_path"] = model_name
    return config


def lora_weights(lm: LoadedModel, rank: int, targets: list[str], dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA matrices for every module ``targets`` names, keyed as save_pretrained keys them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in lm.model.named_modules():
        module = getattr(layer, "base_layer", layer)  # a LoRA wrapper left by an earlier adapter
        if name.rsplit(".", 1)[-1] in targets and base_name(name) == name and isinstance(module, torch.nn.Linear):
            prefix = f"base_model.model.{name}"
            out[f"{prefix}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen) * 0.1).to(dtype)
            out[f"{prefix}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen) * 0.1).to(dtype)
    return out


def files(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    return json.dumps(config).encode(), save(tensors)


def refused_key(config: bytes, weights: bytes) -> str:
    with pytest.raises(rt.AdapterInvalid) as refused:
        rt.parse_adapter(config, weights)
    return refused.value.key


# --- the config's allow-list -------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [
    ("layer_replication", [[0, 2], [0, 2]]),
    ("lora_bias", True),
    ("use_dora", True),
    ("modules_to_save", ["lm_head"]),
    ("rank_pattern", {"q_proj": 8}),
    ("alpha_pattern", {"q_proj": 8}),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"),
    ("megatron_config", {"tensor_model_parallel_size": 1}),
    ("loftq_config", {"loftq_bits": 4}),
    ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["mlp.experts.down_proj"]),
    ("layers_to_transform", [0]),
    ("fan_in_fan_out", True),
    ("bias", "all"),
    ("use_qalora", True),
    ("auto_mapping", {"base_model_class": "X", "inject": ["y"]}),
    ("r", True),  # bool is an int in Python: rank 1 in disguise
    ("r", 0),
    ("r", 4.0),
    ("r", "4"),
    ("r", rt.MAX_RANK + 1),
    ("lora_alpha", False),
    ("lora_alpha", -1),
    ("lora_alpha", "__1e400__"),  # written as 1e400: JSON's 1e400 reads as an infinite float
    ("lora_dropout", 1.0),
    ("use_rslora", 1),
    ("target_modules", "q_proj"),  # peft would read a string as a regular expression
    ("target_modules", ["q_proj", "q_proj"]),
    ("target_modules", ["self_attn.q_proj"]),
    ("target_modules", [".*"]),
    ("target_modules", []),
    ("task_type", "SEQ_CLS"),
    ("peft_type", "LOHA"),
    ("something_new", None),  # unknown keys are refused, not ignored
])
def test_unsupported_settings_are_refused_naming_the_key(lm: LoadedModel, key: str, value: Any) -> None:
    config = peft_config(lm.name, r=4)
    config[key] = value
    raw = json.dumps(config).replace('"__1e400__"', "1e400").encode()
    with pytest.raises(rt.AdapterInvalid) as refused:
        rt.parse_config(raw)
    assert refused.value.key == key and key in str(refused.value)


@pytest.mark.parametrize(("raw", "says"), [
    (b"[" * 5000 + b"]" * 5000, "nests 5000 levels"),  # json.loads alone raises RecursionError
    (b'{"r": ' + b"[" * 100 + b"]" * 100 + b"}", "nests 101 levels"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"LORA"', "must be a JSON object"),
    (b'{"peft_type": "LORA", "r": 4, "r": 8, "target_modules": ["q_proj"]}', "appears twice"),
    (b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "NaN"),
    (b'{"peft_type": "LORA", "target_modules": ["q_proj"]}', "needs 'r'"),
    (b'{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "x": "' + b"a" * rt.MAX_CONFIG_BYTES + b'"}',
     "at most"),
    (b"\xff\xfe{}", "not JSON"),
])
def test_malformed_configs_are_refused(raw: bytes, says: str) -> None:
    with pytest.raises(rt.AdapterInvalid, match=says):
        rt.parse_config(raw)


def test_a_string_with_brackets_is_not_nesting() -> None:
    settings = rt.parse_config(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                           "revision": "[[[[[[{{{{{{\\\"]]"}).encode())
    assert settings.rank == 2 and settings.target_modules == ("q_proj",)


# --- the weights -------------------------------------------------------------------------------------------


def test_weights_must_be_finite_floating_lora_pairs_of_rank_r(lm: LoadedModel) -> None:
    config = json.dumps(peft_config(lm.name, r=4)).encode()
    good = lora_weights(lm, 4, ["q_proj", "v_proj"])
    a_key = next(k for k in good if k.endswith("q_proj.lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")

    def with_(key: str, tensor: torch.Tensor | None) -> bytes:
        tensors = dict(good)
        if tensor is None:
            del tensors[key]
        else:
            tensors[key] = tensor
        return save(tensors)

    nan, inf = good[a_key].clone(), good[a_key].clone()
    nan[0, 0], inf[1, 1] = float("nan"), float("-inf")
    short = a_key.removeprefix("base_model.model.")
    assert refused_key(config, with_(a_key, nan)) == short
    assert refused_key(config, with_(a_key, inf)) == short
    assert refused_key(config, with_(a_key, good[a_key].to(torch.int32))) == short
    assert refused_key(config, with_(a_key, good[a_key] > 0)) == short  # bool
    assert refused_key(config, with_(a_key, good[a_key].to(torch.float64))) == short
    assert refused_key(config, with_(a_key, torch.zeros(8, 64))) == short  # not rank 4
    assert refused_key(config, with_(a_key, torch.zeros(4, 64, 1))) == short
    assert refused_key(config, with_(b_key, None)) == short.replace("lora_A", "lora_B")  # half a pair
    assert refused_key(config, with_("base_model.model.model.embed_tokens.weight", torch.zeros(2, 64))) == \
        "model.embed_tokens.weight"
    assert refused_key(config, with_(a_key.replace(".weight", ".bias"), torch.zeros(4))) == \
        short.replace(".weight", ".bias")
    assert refused_key(config, save({})) == ""  # no LoRA weights at all
    # Weights of a module the config does not target: the model could not load them as declared.
    extra = dict(good, **lora_weights(lm, 4, ["k_proj"]))
    parsed = rt.parse_adapter(config, save(extra))
    with pytest.raises(rt.AdapterInvalid, match="do not name 'k_proj'"):
        rt.check_fits(lm, parsed)
    # A target whose modules the weights do not cover would run with uninitialised LoRA layers.
    parsed = rt.parse_adapter(json.dumps(peft_config(lm.name, r=4, target_modules=["q_proj", "v_proj", "k_proj"])
                                         ).encode(), save(good))
    with pytest.raises(rt.AdapterMismatch, match=r"k_proj\.lora_A\.weight"):
        rt.check_fits(lm, parsed)
    rt.check_fits(lm, rt.parse_adapter(config, save(good)))  # and the good one fits


def test_the_checks_give_the_same_verdicts_on_the_module_tree_without_weights(lm: LoadedModel, tiny_dir: Path,
                                                                              tmp_path: Path) -> None:
    """On the vLLM engine adapters are checked against the model's classes built on the meta device."""
    bare = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path, weights=False)
    assert bare.weights is None
    good = lora_weights(lm, 4, ["q_proj", "v_proj"])

    def verdict(loaded: LoadedModel, targets: list[str], tensors: dict[str, torch.Tensor]) -> str:
        config = json.dumps(peft_config(lm.name, r=4, target_modules=targets)).encode()
        try:
            rt.check_fits(loaded, rt.parse_adapter(config, save(tensors)))
        except rt.AdapterError as error:
            return f"{type(error).__name__}: {error}"
        return "fits"

    a_key = next(k for k in good if k.endswith("q_proj.lora_A.weight"))
    cases = [
        (["q_proj", "v_proj"], good),
        (["q_proj", "v_proj"], dict(good, **{a_key: torch.zeros(4, 7)})),  # another model's width
        (["q_proj", "v_proj", "k_proj"], good),  # a target the weights do not cover
        (["q_proj", "v_proj", "w_proj"], good),  # a module the model does not have
        (["lm_head"], {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                       "base_model.model.lm_head.lora_B.weight": torch.zeros(512, 4)}),  # the output head
    ]
    verdicts = [verdict(bare, targets, tensors) for targets, tensors in cases]
    assert verdicts == [verdict(lm, targets, tensors) for targets, tensors in cases]
    assert verdicts[0] == "fits" and all(v.startswith("AdapterMismatch") for v in verdicts[1:]), verdicts


# --- an adapter never changes the base model ----------------------------------------------------------------


def logits(lm: LoadedModel) -> torch.Tensor:
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out: torch.Tensor = lm.model(ids).logits
    return out


def accepted_kinds(lm: LoadedModel) -> Iterator[tuple[str, bytes, bytes]]:
    """One adapter of every kind the validator accepts: each target set, ranks, rslora, alpha, dropout,
    weight dtypes, and the configs peft's save_pretrained, the trainer and a hand-written minimal one give."""
    all_targets = list(DEFAULT_TARGETS)
    kinds: list[tuple[str, dict[str, Any], torch.dtype]] = [
        ("q,v r4", peft_config(lm.name, r=4, lora_alpha=8), torch.float32),
        ("all r1 rslora", peft_config(lm.name, r=1, lora_alpha=2, use_rslora=True, target_modules=all_targets),
         torch.float32),
        ("mlp r8 fp16", peft_config(lm.name, r=8, lora_alpha=3.5, target_modules=["gate_proj", "up_proj",
                                                                                  "down_proj"]), torch.float16),
        ("attn r16 bf16 dropout", peft_config(lm.name, r=16, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
         torch.bfloat16),
        ("o r2 init/inference flags", {**peft_config(lm.name, r=2, target_modules=["o_proj"]),
                                       "init_lora_weights": False, "inference_mode": True}, torch.float32),
        ("minimal", {"peft_type": "LORA", "r": 3, "target_modules": ["k_proj"]}, torch.float32),
        ("save_pretrained", {**peft_config(lm.name, r=4), "auto_mapping": {
            "base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"},
            "task_type": None, "base_model_name_or_path": f"/somewhere/{lm.name}"}, torch.float32),
    ]
    for seed, (label, config, dtype) in enumerate(kinds):
        tensors = lora_weights(lm, config["r"], config["target_modules"], dtype, seed=seed)
        yield (label, *files(config, tensors))



def test_no_accepted_adapter_changes_the_base_model(lm: LoadedModel) -> None:
    base_logits = logits(lm)
    pool = rt.AdapterPool(max_resident=2)  # evictions too: loads into fresh and into reused LoRA layers
    for label, config, weights in accepted_kinds(lm):
        parsed = rt.parse_adapter(config, weights)
        rt.check_fits(lm, parsed)
        pool.ensure(lm, parsed, label)
        pool.use(lm, label)
        assert not torch.equal(logits(lm), base_logits), f"{label}: the adapter did nothing"
        pool.use(lm, None)
        assert torch.equal(logits(lm), base_logits), f"{label}: the base model's output changed"
        assert model_fingerprint(lm.model, lm.tokenizer) == lm.fingerprint, label
    for label in pool.resident():
        pool.unload(lm, label)
    pool.use(lm, None)
    assert torch.equal(logits(lm), base_logits)
    assert model_fingerprint(lm.model, lm.tokenizer) == lm.fingerprint


def test_a_load_that_changes_the_base_model_is_undone_and_refuses_all_later_use(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defense in depth: were a setting that rebuilds the layer stack to get past the allow-list, the pool
    notices the changed structure, unloads, and serves nothing more."""
    config, weights = files(peft_config(lm.name, r=4), lora_weights(lm, 4, ["q_proj", "v_proj"]))
    parsed = rt.parse_adapter(config, weights)
    checked = rt.lora_config

    def replicating(settings: rt.LoraSettings) -> Any:
        lora = checked(settings)
        lora.layer_replication = [[0, 2], [0, 2]]  # what the red team's adapter asked peft for
        return lora

    monkeypatch.setattr(rt, "lora_config", replicating)
    pool = rt.AdapterPool(max_resident=2)
    with pytest.raises(rt.BaseModelChanged, match=r"model\.layers\.2 added"):
        pool.ensure(lm, parsed, "bad")
    assert "bad" not in pool and pool.broken
    with pytest.raises(rt.BaseModelChanged):
        pool.use(lm, None)  # not even the base model: it is not the base model any more
    monkeypatch.setattr(rt, "lora_config", checked)
    with pytest.raises(rt.BaseModelChanged):
        pool.ensure(lm, parsed, "good")


def test_a_swapped_base_weight_is_noticed(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    config, weights = files(peft_config(lm.name, r=4), lora_weights(lm, 4, ["q_proj", "v_proj"]))
    parsed = rt.parse_adapter(config, weights)
    load = type(lm.model).load_adapter

    def load_and_swap(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load(self, *args, **kwargs)
        mlp = self.model.layers[0].mlp.down_proj
        mlp.weight = torch.nn.Parameter(mlp.weight.detach().clone())  # same values, another tensor
        return result

    monkeypatch.setattr(type(lm.model), "load_adapter", load_and_swap)
    pool = rt.AdapterPool(max_resident=2)
    with pytest.raises(rt.BaseModelChanged, match=r"down_proj\.weight replaced"):
        pool.ensure(lm, parsed, "bad")


# --- through the service: nothing invalid is staged, and the model stays usable --------------------------


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


def upload(mount_id: str, config: bytes, weights: bytes, chunk: int = 0) -> Iterator[pb.ImportAdapterRequest]:
    yield pb.ImportAdapterRequest(header=pb.AdapterUpload(mount_id=mount_id, config_bytes=len(config),
                                                          weights_bytes=len(weights)))
    for kind, data in ((t.ADAPTER_FILE_CONFIG, config), (t.ADAPTER_FILE_WEIGHTS, weights)):
        step = chunk or len(data)
        for start in range(0, len(data), step):
            yield pb.ImportAdapterRequest(chunk=t.AdapterChunk(file=kind, data=data[start:start + step]))


def test_a_refused_import_names_the_key_and_stages_nothing(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", ["one fact"])
    lm = rig.loaded
    config = peft_config(lm.name, r=4)
    weights = save(lora_weights(lm, 4, ["q_proj", "v_proj"]))
    with pytest.raises(AdapterInvalidError, match="r = True") as refused:
        adapter_stream.import_adapter(rig.adapters, upload(mount, json.dumps({**config, "r": True}).encode(), weights))
    assert refused.value.metadata["key"] == "r"
    assert rig.kernel.mounts[mount].staged_adapter is None


def test_a_model_changed_by_a_load_is_unavailable_to_everyone(rig: Rig) -> None:
    lm = rig.loaded
    rig.host.adapters.broken = "loading an adapter changed the base model (module model.layers.2 added)"
    with pytest.raises(ModelUnavailable, match="changed the base model"):
        rig.host.model()
    with pytest.raises(ModelUnavailable, match="changed the base model"):  # work queued before it broke
        rig.host.run(lambda: rig.adapters.prepare(lm, "c", None))


# --- the upload is checked against its header as it arrives and spooled to disk -------------------------


def counted(requests: Iterator[pb.ImportAdapterRequest], seen: list[int]) -> Iterator[pb.ImportAdapterRequest]:
    for request in requests:
        seen[0] += 1
        yield request


def test_uploads_are_refused_at_the_header_or_the_first_chunk_too_many_and_leave_nothing(rig: Rig) -> None:
    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", ["one fact"])
    lm = rig.loaded
    config = json.dumps(peft_config(lm.name, r=4)).encode()
    weights = save(lora_weights(lm, 4, ["q_proj", "v_proj"]))
    limit = rig.kernel.limits.max_adapter_bytes

    def header(config_bytes: int, weights_bytes: int) -> pb.ImportAdapterRequest:
        return pb.ImportAdapterRequest(header=pb.AdapterUpload(mount_id=mount, config_bytes=config_bytes,
                                                               weights_bytes=weights_bytes))

    chunks = list(upload(mount, config, weights))[1:]
    seen = [0]
    with pytest.raises(AdapterTooLargeError):  # the declared size alone: no chunk is read
        adapter_stream.import_adapter(rig.adapters, counted(iter([header(len(config), limit), *chunks]), seen))
    assert seen == [1]
    seen = [0]
    with pytest.raises(AdapterInvalidError, match=r"adapter_config\.json is"):
        adapter_stream.import_adapter(rig.adapters, counted(iter([header(rt.MAX_CONFIG_BYTES + 1, len(weights)), *chunks]), seen))
    assert seen == [1]
    seen = [0]
    short = [header(len(config), len(weights) - 1), *chunks, *chunks]  # one byte too many in the last chunk
    with pytest.raises(AdapterInvalidError, match=r"more bytes of adapter_model\.safetensors"):
        adapter_stream.import_adapter(rig.adapters, counted(iter(short), seen))
    assert seen == [3]  # header, config, the weights chunk past the size; the rest never read
    for bad in (json.dumps({**peft_config(lm.name, r=4), "use_dora": True}).encode(), b"{oops"):
        with pytest.raises(AdapterInvalidError):
            adapter_stream.import_adapter(rig.adapters, upload(mount, bad, weights))
    assert list(rig.adapters.spool.iterdir()) == []  # no spool file left
    assert rig.kernel.mounts[mount].staged_adapter is None
    assert rig.kernel.store.get_adapter_files("c", "0" * 64) is None
    record, _ = adapter_stream.import_adapter(rig.adapters, upload(mount, config, weights))
    assert list(rig.adapters.spool.iterdir()) == []
    cube_id = rig.kernel.mounts[mount].record.cube_id
    assert rig.kernel.store.get_adapter_files(cube_id, record.digest) == (config, weights)


def test_an_upload_is_not_buffered_in_memory(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights go to a spool file as they arrive and into the store piece by piece: the daemon's Python
    heap grows by a piece of them, not by the upload (which the old reassembly held twice: the chunks and
    their join). Pieces of 1 MiB here, so that the tiny model's largest adapter is many pieces."""
    import tracemalloc

    from memosd.store import schema

    monkeypatch.setattr(schema, "ADAPTER_CHUNK_BYTES", 1 << 20)

    rig.kernel.alloc_cube("c", "", {})
    mount = commit_items(rig, "c", ["one fact"])
    lm = rig.loaded
    rank = 1024  # ~8 MiB of float32 weights for every linear layer of the tiny model
    config = json.dumps(peft_config(lm.name, r=rank, target_modules=list(DEFAULT_TARGETS))).encode()
    weights = save(lora_weights(lm, rank, list(DEFAULT_TARGETS)))
    requests = list(upload(mount, config, weights, chunk=256 << 10))
    tracemalloc.start()
    try:
        adapter_stream.import_adapter(rig.adapters, iter(requests))
        _, peak = tracemalloc.get_traced_memory()

    finally:
        tracemalloc.stop()
    assert len(weights) > 8 << 20
    assert peak < len(weights) // 2, f"{peak} bytes held at peak for a {len(weights)} byte upload"
    assert exported_weights(rig, mount) == weights


def exported_weights(rig: Rig, mount_id: str) -> bytes:
    _, _, _, chunks = adapter_stream.export(rig.adapters, mount_id)
    return b"".join(c.data for c in chunks if c.file == t.ADAPTER_FILE_WEIGHTS)


def test_what_training_exports_passes_the_checks(lm: LoadedModel) -> None:
    """The daemon's own adapters (a Train job's result, as lora_train.serialize writes it) load through the same
    checks: the allow-list must accept everything the trainer writes."""
    from memosd.runtime.lora_train import LoraTrainer, TrainSettings, serialize

    with LoraTrainer(lm, ["Owls hunt at night."], TrainSettings(rank=2, alpha=4, max_steps=1)) as trainer:
        trainer.step()
        config, weights = serialize(trainer.export(), lm)
    parsed = rt.parse_adapter(config, weights)
    rt.check_fits(lm, parsed)
    assert parsed.rank == 2 and parsed.target_modules == sorted(DEFAULT_TARGETS)
