"""Embedder: the builtin model, loaded offline, gives normalized float32 vectors."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from memosd.index.bert import read_pipeline
from memosd.index.embedder import BUILTIN_MODEL, Embedder, model_fingerprint, resolve_model_path


@pytest.fixture(scope="module")
def emb() -> Embedder:
    return Embedder.load(BUILTIN_MODEL, device="cpu", batch_size=8)


def test_shape_dtype_and_norm(emb: Embedder) -> None:
    assert emb.name == BUILTIN_MODEL
    assert emb.dim == 384
    texts = [f"memory number {i} about cats and dogs" for i in range(19)]  # > one batch of 8
    v = emb.embed(texts)
    assert v.shape == (19, 384)
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_empty_and_single(emb: Embedder) -> None:
    assert emb.embed([]).shape == (0, 384)
    one = emb.embed_one("hello world")
    assert one.shape == (384,)
    np.testing.assert_allclose(one, emb.embed(["hello world"])[0], atol=1e-6)


def test_rejects_bare_string(emb: Embedder) -> None:
    with pytest.raises(TypeError):
        emb.embed("not a list")


def test_semantics(emb: Embedder) -> None:
    q, near, far = emb.embed(
        ["where does the cat sleep", "the kitten naps on the sofa", "quarterly tax filing"]
    )
    assert float(q @ near) > float(q @ far) + 0.2


def test_offline_env_forced(emb: Embedder) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_fingerprint_stable_and_sensitive(emb: Embedder, tmp_path: Path) -> None:
    fp = emb.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(resolve_model_path(BUILTIN_MODEL)) == fp
    # A changed file changes the fingerprint; a README does not count.
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    base = model_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("docs")
    assert model_fingerprint(tmp_path) == base
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 10)
    assert model_fingerprint(tmp_path) != base


def test_local_path_model(emb: Embedder) -> None:
    other = Embedder.load(str(resolve_model_path(BUILTIN_MODEL)), device="cpu")
    assert other.dim == emb.dim
    np.testing.assert_allclose(other.embed(["x y z"]), emb.embed(["x y z"]), atol=1e-5)


def test_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Embedder.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        Embedder.load("sentence-transformers/some-hub-name")


def test_concurrent_calls_are_serialized(emb: Embedder) -> None:
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(emb.embed(["concurrent call"] * 3))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], atol=1e-6)


# Texts that stress tokenization and pooling: padding beside long rows, truncation at 256 tokens,
# surrounding whitespace, an empty string, non-ASCII.
AWKWARD_TEXTS = ["hello", "  leading and trailing spaces  ", "", "Ünïcödé façade — naïve 東京 🙂", "A" * 3000,
                 " ".join(["word"] * 400), "The quick brown fox jumps over the lazy dog.", "\tTabbed\nnewline\n",
                 "UPPER case Mixed", "what did Caroline do on 7 May 2023?"]


def _model_copy(tmp_path: Path, pooling: dict[str, bool] | None = None, lower: bool = False,
                extra_module: bool = False) -> Path:
    """The builtin model's directory, linked file by file, with its pipeline edited."""
    source = resolve_model_path(BUILTIN_MODEL)
    copy = tmp_path / "model"
    for f in source.rglob("*"):
        if f.is_file():
            target = copy / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    if pooling is not None:
        config = copy / "1_Pooling" / "config.json"
        data = {**json.loads(config.read_text()), **pooling}
        config.unlink()
        config.write_text(json.dumps(data))
    if lower:
        (copy / "sentence_bert_config.json").unlink()
        (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": True}))
    if extra_module:
        modules = json.loads((copy / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
        (copy / "modules.json").unlink()
        (copy / "modules.json").write_text(json.dumps(modules))
    return copy


def test_the_builtin_model_runs_on_plain_torch_with_sentence_transformers_vectors(emb: Embedder) -> None:
    from sentence_transformers import SentenceTransformer

    assert emb.runner == "plain torch"
    reference = SentenceTransformer(str(resolve_model_path(BUILTIN_MODEL)), device="cpu", local_files_only=True)
    want = reference.encode(AWKWARD_TEXTS * 2, batch_size=8, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)
    got = emb.embed(AWKWARD_TEXTS * 2)
    assert np.abs(got - want).max() < 1e-5
    # Batching does not change a row: the same text alone, and among longer rows, gives one vector.
    np.testing.assert_allclose(emb.embed_one("hello"), got[0], atol=1e-6)


def test_read_pipeline_takes_mean_or_cls_pooling_and_nothing_else(tmp_path: Path) -> None:
    builtin = read_pipeline(resolve_model_path(BUILTIN_MODEL))
    assert builtin is not None and (builtin.pooling, builtin.normalize, builtin.max_seq_length) == ("mean", True, 256)
    cls = read_pipeline(_model_copy(tmp_path / "cls", {"pooling_mode_mean_tokens": False,
                                                       "pooling_mode_cls_token": True}))
    assert cls is not None and cls.pooling == "cls"
    # What index/bert.py does not do is left to sentence-transformers.
    assert read_pipeline(_model_copy(tmp_path / "max", {"pooling_mode_mean_tokens": False,
                                                        "pooling_mode_max_tokens": True})) is None
    assert read_pipeline(_model_copy(tmp_path / "lower", lower=True)) is None
    assert read_pipeline(_model_copy(tmp_path / "dense", extra_module=True)) is None
    assert read_pipeline(tmp_path / "missing") is None


def test_a_pipeline_plain_torch_does_not_run_loads_through_sentence_transformers(tmp_path: Path) -> None:
    copy = _model_copy(tmp_path, {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True})
    other = Embedder.load(str(copy), device="cpu")
    assert other.runner == "sentence-transformers"
    vectors = other.embed(["the kitten naps on the sofa", "quarterly tax filing"])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
