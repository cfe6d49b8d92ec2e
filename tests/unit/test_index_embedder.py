"""Embedder: the builtin model, loaded offline, gives normalized float32 vectors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

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
