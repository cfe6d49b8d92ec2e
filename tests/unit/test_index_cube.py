"""CubeIndex: one cube's dense + lexical indexes, with the real embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memosd.index.cube_index import DENSE_FILE, LEXICAL_DIR, CubeIndex, StagedItems, default_depth
from memosd.index.embedder import Embedder

MEMORIES = [
    "Caroline went to the LGBTQ support group on 7 May 2023.",
    "Melanie painted a sunrise over the lake last year.",
    "Caroline is researching adoption agencies.",
    "Melanie ran a charity race for mental health.",
    "The user's dog is named Biscuit and loves the beach.",
    "Deploys happen every Tuesday after the standup.",
    "The API key rotation is scheduled for the first of the month.",
    "Jon bought a red bicycle from the market.",
]


@pytest.fixture(scope="module")
def emb() -> Embedder:
    return Embedder.load("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="module")
def vecs(emb: Embedder) -> np.ndarray:
    return emb.embed(MEMORIES)


def open_filled(path: Path, emb: Embedder, vecs: np.ndarray) -> CubeIndex:
    cube = CubeIndex.open(path, emb.dim)
    cube.add(np.arange(1, len(MEMORIES) + 1, dtype=np.uint64), vecs, MEMORIES)
    return cube


def test_modes(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    cube = open_filled(tmp_path / "c", emb, vecs)
    q = "What is the name of the user's pet?"
    qv = emb.embed_one(q)
    hybrid = cube.search(qv, q, 3)
    assert hybrid[0].key == 5
    assert hybrid[0].dense_rank >= 1
    dense = cube.search(qv, q, 3, mode="dense")
    assert dense[0].key == 5
    assert dense[0].score == dense[0].dense_score and dense[0].lexical_rank == 0
    lexical = cube.search(None, "Biscuit", 3, mode="lexical")
    assert [h.key for h in lexical] == [5]
    assert lexical[0].score == lexical[0].lexical_score and lexical[0].dense_rank == 0
    cube.close()


def test_hybrid_without_one_part(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    cube = open_filled(tmp_path / "c", emb, vecs)
    assert cube.search(None, "bicycle", 2)[0].key == 8  # no vector: lexical alone
    only_dense = cube.search(emb.embed_one("a bike purchase"), "???", 2)
    assert only_dense[0].key == 8 and only_dense[0].lexical_rank == 0
    assert cube.search(None, "", 5, mode="dense") == []
    assert cube.search(None, "bicycle", 0) == []
    cube.close()


def test_accept_and_candidates(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    cube = open_filled(tmp_path / "c", emb, vecs)
    q = "What did Caroline do?"
    qv = emb.embed_one(q)
    hits = cube.search(qv, q, 5, accept=lambda k: k != 1)
    assert 1 not in [h.key for h in hits]
    assert hits[0].key == 3
    cand = cube.search(qv, q, 5, candidates=np.array([2, 4, 6]))
    assert {h.key for h in cand} <= {2, 4, 6}
    assert len(cand) == 3
    both = cube.search(qv, q, 5, candidates=[2, 4, 6], accept=lambda k: k != 4)
    assert {h.key for h in both} <= {2, 6}
    cube.close()


def test_staged_items_join_the_search(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    cube = open_filled(tmp_path / "c", emb, vecs)
    texts = ["Caroline adopted a puppy named Pixel yesterday.", "Staged note about tax forms."]
    staged = StagedItems(keys=[1_000_001, 1_000_002], vectors=emb.embed(texts), texts=texts)
    q = "What is the name of Caroline's new puppy?"
    qv = emb.embed_one(q)
    hits = cube.search(qv, q, 3, staged=staged)
    assert hits[0].key == 1_000_001
    assert hits[0].dense_rank == 1 and hits[0].lexical_rank >= 1
    # Staged scores are on the committed scale: the same text committed scores alike.
    staged_lex = cube.search(None, "Pixel puppy", 1, mode="lexical", staged=staged)[0]
    staged_dense = cube.search(qv, "", 1, mode="dense", staged=staged)[0]
    cube.add([1_000_001], staged.vectors[:1], texts[:1])
    committed_lex = cube.search(None, "Pixel puppy", 1, mode="lexical")[0]
    committed_dense = cube.search(qv, "", 1, mode="dense")[0]
    assert committed_lex.key == staged_lex.key == 1_000_001
    assert staged_lex.score == pytest.approx(committed_lex.score, rel=0.1)
    assert staged_dense.score == pytest.approx(committed_dense.score, abs=2e-3)
    # accept applies to staged items; candidates do not.
    assert 1_000_002 not in [
        h.key for h in cube.search(qv, "tax", 5, staged=staged, accept=lambda k: k < 1_000_002)
    ]
    only = cube.search(qv, "tax forms", 5, staged=staged, candidates=[2])
    assert {h.key for h in only} <= {2, 1_000_001, 1_000_002}
    assert 1_000_002 in {h.key for h in only}
    with pytest.raises(ValueError):
        StagedItems(keys=[1], vectors=staged.vectors, texts=["a"])
    cube.close()


def test_remove(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    cube = open_filled(tmp_path / "c", emb, vecs)
    q = "Biscuit the dog"
    assert 5 in [h.key for h in cube.search(emb.embed_one(q), q, 8)]  # found before, so its absence after counts
    cube.remove([5])
    assert 5 not in [h.key for h in cube.search(emb.embed_one(q), q, 8)]
    cube.close()


def test_persistence_and_recovery_helpers(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    path = tmp_path / "c"
    cube = open_filled(path, emb, vecs)
    assert cube.lexical_watermark == len(MEMORIES)
    cube.close()  # saves dense
    assert (path / DENSE_FILE).exists() and (path / LEXICAL_DIR).is_dir()

    cube = CubeIndex.open(path, emb.dim)
    all_keys = np.arange(1, len(MEMORIES) + 2, dtype=np.uint64)
    assert cube.dense_missing(all_keys).tolist() == [len(MEMORIES) + 1]
    assert cube.lexical_watermark == len(MEMORIES)
    q = "charity race"
    assert cube.search(emb.embed_one(q), q, 1)[0].key == 4
    dense_bytes, lexical_bytes = cube.bytes_on_disk()
    assert dense_bytes > 0 and lexical_bytes > 0

    # Dense changes not saved are lost; lexical ones are committed at once.
    cube.add([100], emb.embed(["a brand new memory about volcanoes"]), ["a brand new memory about volcanoes"])
    cube.close(save=False)
    cube = CubeIndex.open(path, emb.dim)
    assert cube.dense_missing([100]).tolist() == [100]
    assert cube.lexical_watermark == 100
    cube.close()


def test_add_validates_lengths(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    cube = CubeIndex.open(tmp_path / "c", emb.dim)
    with pytest.raises(ValueError):
        cube.add([1, 2], vecs[:2], ["only one"])
    cube.add([], np.zeros((0, emb.dim), dtype=np.float32), [])
    cube.close()


def test_destroy(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    path = tmp_path / "c"
    cube = open_filled(path, emb, vecs)
    cube.destroy()
    assert not path.exists()


def test_default_depth() -> None:
    assert default_depth(10) >= 50
    assert default_depth(1000) >= 1000


def test_port_methods(tmp_path: Path, emb: Embedder, vecs: np.ndarray) -> None:
    """The single-list calls the kernel's CubeIndexPort makes."""
    cube = CubeIndex.open(tmp_path / "c", emb.dim)
    keys = np.arange(1, len(MEMORIES) + 1, dtype=np.uint64)
    cube.add_dense(keys, vecs)
    cube.add_lexical(list(zip(keys.tolist(), MEMORIES, strict=True)))
    assert cube.lexical_watermark == len(MEMORIES)
    q = emb.embed_one("bicycle")
    assert cube.dense_search(q, 1, None)[0][0] == 8
    assert cube.dense_exact(q, np.array([7, 8]))[0][0] == 8
    assert cube.lexical_search("bicycle", 3, lambda k: True) == cube.lexical.search("bicycle", 3)
    cube.save()
    cube.close()
