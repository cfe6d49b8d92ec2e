"""Model loading: local directories, dtype/device, the fingerprint, the GGUF cache, the real SmolLM2.

Fast tests use a tiny randomly initialised Llama saved with a small byte-level
BPE tokenizer trained on the spot. One test (test_builtin_smollm2_gguf_then_cache)
loads the real embedded model.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from smollm2_build import SmolLM2Build
from tiny_llama import CHAT_TEMPLATE, save_tiny_llama

import memosd.runtime.model as rm
from memosd.runtime import (
    BUILTIN_MODEL,
    LoadedModel,
    ModelLoadError,
    ModelSpec,
    load_model,
    model_fingerprint,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path_factory.mktemp("cache"))


def _greedy(lm: LoadedModel, prompt: str, n: int) -> list[int]:
    ids = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    model: Any = lm.model  # transformers types generate() loosely
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    tokens: list[int] = out[0, ids["input_ids"].shape[1] :].tolist()
    return tokens


# --- local directories -------------------------------------------------------------------------


def test_load_local_dir(tiny: LoadedModel, tiny_dir: Path) -> None:
    assert tiny.origin == "dir"
    assert tiny.name == tiny_dir.name
    assert tiny.path == tiny_dir
    assert tiny.device == "cpu"
    assert tiny.dtype == "float32"
    assert tiny.context_length == 256
    assert not tiny.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in tiny.model.parameters())
    assert len(tiny.fingerprint) == 16
    int(tiny.fingerprint, 16)
    assert tiny.tokenizer.chat_template == CHAT_TEMPLATE
    assert len(_greedy(tiny, "The capital of France is", 4)) == 4


def test_explicit_dtype(tiny: LoadedModel, tiny_dir: Path, tmp_path: Path) -> None:
    bf = load_model(ModelSpec(source=str(tiny_dir), device="cpu", dtype="bfloat16"), tmp_path)
    assert bf.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf.model.parameters())
    # A cache computed in another dtype is not the same computation.
    assert bf.fingerprint != tiny.fingerprint


def test_auto_resolution() -> None:
    assert rm.resolve_dtype("auto", "cpu") == torch.float32
    assert rm.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert rm.resolve_dtype("Float16", "cpu") == torch.float16
    assert rm.resolve_device("cpu") == "cpu"
    assert rm.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (ModelSpec(device="cpu", dtype="int8"), "bad dtype"),
        (ModelSpec(device="tpu"), "bad device"),
        (ModelSpec(device="cuda:x"), "bad device"),
        (ModelSpec(source="/nonexistent/model/dir", device="cpu"), "neither"),
    ],
)
def test_bad_specs(spec: ModelSpec, match: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, tmp_path)


def test_cuda_without_cuda(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(ModelSpec(source=str(tiny_dir), device=device), tmp_path)
    assert rm.resolve_device("auto") == "cpu"


def test_dir_without_config_or_weights(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(ModelSpec(source=str(empty), device="cpu"), tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelSpec(source=str(broken), device="cpu"), tmp_path)
    assert issubclass(ModelLoadError, RuntimeError)


# --- the fingerprint ---------------------------------------------------------------------------


def test_fingerprint_stable_across_loads_and_locations(
    tiny: LoadedModel, tiny_dir: Path, tmp_path: Path
) -> None:
    again = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)
    assert again.fingerprint == tiny.fingerprint
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, moved)
    assert load_model(ModelSpec(source=str(moved), device="cpu"), tmp_path).fingerprint == tiny.fingerprint
    assert model_fingerprint(tiny.model, tiny.tokenizer) == tiny.fingerprint


def test_fingerprint_differs_for_other_weights(tiny: LoadedModel, tmp_path: Path) -> None:
    other = save_tiny_llama(tmp_path / "seed1", seed=1)
    assert load_model(ModelSpec(source=str(other), device="cpu"), tmp_path).fingerprint != tiny.fingerprint


def test_fingerprint_sensitive_to_one_weight(tiny_dir: Path, tmp_path: Path) -> None:
    lm = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)
    param = lm.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = param[3, 7].item()
        param[3, 7] = torch.nextafter(param[3, 7], torch.tensor(float("inf")))  # one ulp
    assert param[3, 7].item() != old
    assert model_fingerprint(lm.model, lm.tokenizer) != lm.fingerprint


def test_fingerprint_sensitive_to_config_and_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    lm = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)
    lm.model.config.rms_norm_eps = 1e-3
    changed_config = model_fingerprint(lm.model, lm.tokenizer)
    assert changed_config != lm.fingerprint

    lm2 = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)
    lm2.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert model_fingerprint(lm2.model, lm2.tokenizer) not in {lm.fingerprint, changed_config}

    lm3 = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)
    lm3.tokenizer.add_tokens(["<|memory|>"], special_tokens=True)
    assert model_fingerprint(lm3.model, lm3.tokenizer) != lm.fingerprint


# --- the dequantized-weights cache (GGUF loading stubbed with the tiny model) -------------------


@pytest.fixture
def fake_builtin(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Point the builtin model at a fake GGUF whose 'dequantization' loads the tiny model."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls: list[int] = []

    def fake_dequantize(path: Path) -> tuple[Any, Any]:
        assert path == gguf
        calls.append(1)
        lm = load_model(ModelSpec(source=str(tiny_dir), device="cpu"), tmp_path)
        return lm.model, lm.tokenizer

    monkeypatch.setattr(rm, "builtin_gguf_path", lambda: gguf)
    monkeypatch.setattr(rm, "dequantize_gguf", fake_dequantize)
    return calls


def test_gguf_cache_built_once_then_reused(
    fake_builtin: list[int], tiny: LoadedModel, tmp_path: Path
) -> None:
    cache = tmp_path / "data"
    cold = load_model(ModelSpec(device="cpu"), cache)
    assert cold.origin == "gguf"
    assert cold.name == BUILTIN_MODEL
    assert cold.path.parent == cache / "models"
    assert len(cold.path.name) == 16
    assert (cold.path / "model.safetensors").is_file()
    assert (cold.path / rm._CACHE_MARKER).is_file()
    assert [p.name for p in (cache / "models").iterdir()] == [cold.path.name]  # no temp dirs left
    warm = load_model(ModelSpec(device="cpu"), cache)
    assert warm.origin == "cache"
    assert fake_builtin == [1]
    assert cold.fingerprint == warm.fingerprint == tiny.fingerprint


def test_gguf_cache_damaged_is_rebuilt(fake_builtin: list[int], tiny: LoadedModel, tmp_path: Path) -> None:
    cache = tmp_path / "data"
    cold = load_model(ModelSpec(device="cpu"), cache)
    (cold.path / "model.safetensors").write_bytes(b"")  # e.g. lost in a crash
    again = load_model(ModelSpec(device="cpu"), cache)
    assert again.origin == "gguf"
    assert again.fingerprint == tiny.fingerprint
    assert fake_builtin == [1, 1]
    # A directory without the marker was not written by us: rebuilt, not trusted.
    (again.path / rm._CACHE_MARKER).unlink()
    assert load_model(ModelSpec(device="cpu"), cache).origin == "gguf"


def test_gguf_cache_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")

    def broken(path: Path) -> tuple[Any, Any]:
        raise ValueError("unsupported quantization")

    monkeypatch.setattr(rm, "builtin_gguf_path", lambda: gguf)
    monkeypatch.setattr(rm, "dequantize_gguf", broken)
    with pytest.raises(ModelLoadError, match="unsupported quantization"):
        load_model(ModelSpec(device="cpu"), tmp_path / "data")
    assert list((tmp_path / "data" / "models").iterdir()) == []


def test_builtin_gguf_is_installed() -> None:
    path = rm.builtin_gguf_path()
    assert path.name.endswith(".gguf")
    assert path.stat().st_size > 50_000_000


# --- the real embedded model (the one slow test) -----------------------------------------------


def test_builtin_smollm2_gguf_then_cache(smollm2_build: SmolLM2Build, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold load dequantizes the GGUF and caches it; the restart loads the cache: same model."""
    def no_dequantizing(path: Path) -> None:
        raise AssertionError(f"the warm load dequantized {path} again instead of loading the cache")

    cold = smollm2_build.loaded
    # What makes the warm load fast is that it skips the GGUF: shown by a spy, not by a stopwatch.
    monkeypatch.setattr(rm, "dequantize_gguf", no_dequantizing)
    t1 = time.perf_counter()
    warm = load_model(ModelSpec(device="cpu"), smollm2_build.cache_dir)
    t2 = time.perf_counter()
    print(
        f"\nSmolLM2 cold (GGUF) {smollm2_build.seconds:.1f}s, warm (cache) {t2 - t1:.2f}s "
        f"(load {warm.load_seconds:.2f}s + fingerprint {warm.fingerprint_seconds:.2f}s)"
    )

    assert (cold.origin, warm.origin) == ("gguf", "cache")
    assert cold.name == warm.name == BUILTIN_MODEL
    assert cold.context_length == 8192
    assert warm.tokenizer.chat_template is not None
    assert "<|im_start|>" in warm.tokenizer.chat_template
    assert cold.fingerprint == warm.fingerprint
    # The dense weights written to the cache are exactly what the GGUF dequantized to.
    gguf_model, gguf_tokenizer = smollm2_build.gguf_model, smollm2_build.gguf_tokenizer
    assert model_fingerprint(gguf_model, gguf_tokenizer) == warm.fingerprint

    prompt = "The capital of France is"
    ids = gguf_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        from_gguf = gguf_model.generate(**ids, max_new_tokens=8, do_sample=False)[
            0, ids["input_ids"].shape[1] :
        ]
    assert _greedy(warm, prompt, 8) == from_gguf.tolist() == _greedy(cold, prompt, 8)
    assert "Paris" in warm.tokenizer.decode(from_gguf)


# --- the fingerprint kept beside the model (loads without the weights: the vLLM engine) ----------


def _stored(marker: Path) -> dict[str, str]:
    """The fingerprints kept in ``marker``, by key (dtype and transformers version)."""
    prints = rm.json.loads(marker.read_text())[rm._FINGERPRINTS_KEY]
    return {key: entry["fingerprint"] for key, entry in prints.items()}


def test_the_cache_keeps_the_fingerprint_of_the_model_it_serves(fake_builtin: list[int], tmp_path: Path) -> None:
    """Written when the cache is built, from the cache's own weights: the value every later load computes
    (the keys of persisted blocks, caches and adapters' lineage), so a load without the weights can use it."""
    cache = tmp_path / "data"
    cold = load_model(ModelSpec(device="cpu"), cache)
    stored = _stored(cold.path / rm._CACHE_MARKER)
    assert list(stored) == [rm.fingerprint_key(torch.float32)]
    warm = load_model(ModelSpec(device="cpu"), cache)
    assert stored[rm.fingerprint_key(torch.float32)] == model_fingerprint(warm.model, warm.tokenizer) \
        == warm.fingerprint == cold.fingerprint


def test_a_load_without_weights_reads_the_stored_fingerprint_and_loads_no_tensors(
    fake_builtin: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "data"
    full = load_model(ModelSpec(device="cpu"), cache)

    def no_weights(*args: object) -> None:
        raise AssertionError("the weights were loaded")

    with monkeypatch.context() as m:
        m.setattr(rm, "_load_dir", no_weights)
        bare = load_model(ModelSpec(device="cpu"), cache, weights=False)
    assert bare.weights is None and bare.fingerprint_stored
    assert bare.fingerprint == full.fingerprint
    assert (bare.context_length, bare.dtype, bare.origin) == (full.context_length, full.dtype, "cache")
    with pytest.raises(rm.WeightsNotLoaded, match="vllm engine serves them"):
        _ = bare.model
    # The module tree is the model's, on the meta device: classes and shapes, no storage.
    assert {n: type(x) for n, x in bare.structure.named_modules()} == {
        n: type(x) for n, x in full.model.named_modules()}
    assert {p.device.type for p in bare.structure.parameters()} == {"meta"}
    assert bare.config.to_dict() == full.config.to_dict()
    # Train's copy: the weights again, under the same fingerprint.
    copy = rm.load_weights(bare)
    assert copy.weights is not None and copy.weights is not full.weights
    assert model_fingerprint(copy.model, copy.tokenizer) == bare.fingerprint


def test_a_cache_without_a_stored_fingerprint_gets_it_at_its_next_load(
    fake_builtin: list[int], tmp_path: Path
) -> None:
    """A cache built before fingerprints were kept (or by another transformers version, whose key differs)."""
    cache = tmp_path / "data"
    cold = load_model(ModelSpec(device="cpu"), cache)
    marker = cold.path / rm._CACHE_MARKER
    old = rm.json.loads(marker.read_text())
    del old[rm._FINGERPRINTS_KEY]
    marker.write_text(rm.json.dumps(old))
    first = load_model(ModelSpec(device="cpu"), cache, weights=False)
    assert not first.fingerprint_stored and first.fingerprint == cold.fingerprint
    kept = rm.json.loads(marker.read_text())
    assert kept["gguf_sha256"] == old["gguf_sha256"] and kept["format"] == old["format"]
    assert _stored(marker) == {rm.fingerprint_key(torch.float32): cold.fingerprint}
    again = load_model(ModelSpec(device="cpu"), cache, weights=False)
    assert again.fingerprint_stored and again.fingerprint == cold.fingerprint
    assert fake_builtin == [1]


def test_a_configured_directory_keeps_its_fingerprint_in_a_sidecar_keyed_by_its_files(
    tiny_dir: Path, tiny: LoadedModel, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    cache = tmp_path / "cache"
    first = load_model(ModelSpec(source=str(model_dir), device="cpu"), cache, weights=False)
    assert not first.fingerprint_stored and first.fingerprint == tiny.fingerprint
    [sidecar] = (cache / rm._SIDECAR_DIR).iterdir()
    assert sidecar.name == f"{rm.dir_digest(model_dir)}.json"
    assert _stored(sidecar) == {rm.fingerprint_key(torch.float32): tiny.fingerprint}
    second = load_model(ModelSpec(source=str(model_dir), device="cpu"), cache, weights=False)
    assert second.fingerprint_stored and second.fingerprint == tiny.fingerprint
    # Other weights in the same directory: another listing, so the sidecar is not used; computed afresh.
    model: Any = rm.load_weights(second).model
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    model.save_pretrained(model_dir)
    changed = load_model(ModelSpec(source=str(model_dir), device="cpu"), cache, weights=False)
    assert not changed.fingerprint_stored and changed.fingerprint != tiny.fingerprint
    assert changed.fingerprint == model_fingerprint(rm.load_weights(changed).model, changed.tokenizer)
    assert len(list((cache / rm._SIDECAR_DIR).iterdir())) == 2


def test_a_bfloat16_load_stores_its_own_fingerprint(fake_builtin: list[int], tmp_path: Path) -> None:
    """The fingerprint hashes the tensors in the dtype the model runs in: one stored value per dtype."""
    cache = tmp_path / "data"
    f32 = load_model(ModelSpec(device="cpu"), cache)
    bf16 = load_model(ModelSpec(device="cpu", dtype="bfloat16"), cache, weights=False)
    assert not bf16.fingerprint_stored and bf16.fingerprint != f32.fingerprint
    assert bf16.fingerprint == load_model(ModelSpec(device="cpu", dtype="bfloat16"), cache).fingerprint
    assert set(_stored(f32.path / rm._CACHE_MARKER)) == {rm.fingerprint_key(torch.float32),
                                                         rm.fingerprint_key(torch.bfloat16)}


def test_weights_changed_in_the_cache_are_hashed_again_and_truncated_ones_rebuild_it(
    fake_builtin: list[int], tiny: LoadedModel, tmp_path: Path
) -> None:
    """The stored value holds only for the files it was computed on (their sizes and mtimes)."""
    cache = tmp_path / "data"
    cold = load_model(ModelSpec(device="cpu"), cache)
    model: Any = rm.load_weights(load_model(ModelSpec(device="cpu"), cache, weights=False)).model
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    model.save_pretrained(cold.path)  # by hand, in place
    changed = load_model(ModelSpec(device="cpu"), cache, weights=False)
    assert not changed.fingerprint_stored and changed.fingerprint != cold.fingerprint
    assert changed.fingerprint == model_fingerprint(model, changed.tokenizer)
    (cold.path / "model.safetensors").write_bytes(b"")  # lost in a crash: unreadable, so rebuilt
    rebuilt = load_model(ModelSpec(device="cpu"), cache, weights=False)
    assert rebuilt.origin == "gguf" and rebuilt.fingerprint_stored and rebuilt.fingerprint == tiny.fingerprint
    assert fake_builtin == [1, 1]
