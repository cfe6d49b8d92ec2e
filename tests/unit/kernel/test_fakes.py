"""The fakes the kernel tests stand on score like the real ports: exact cosine, term counts, no-match no hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hash_embedder import HashEmbedder

from .fakes import FakeCubeIndex


def index_of(texts: list[str]) -> tuple[FakeCubeIndex, np.ndarray]:
    vectors = HashEmbedder().embed(texts)
    index = FakeCubeIndex(Path("unused"), HashEmbedder.dim)
    index.add(np.arange(1, len(texts) + 1, dtype=np.uint64), vectors, texts)
    return index, vectors


def test_the_hash_embedder_gives_unit_vectors_the_same_for_the_same_text() -> None:
    vectors = HashEmbedder().embed(["a", "b", "a"])
    assert vectors.shape == (3, HashEmbedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert np.array_equal(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])


def test_dense_search_ranks_by_cosine_and_honours_accept() -> None:
    index, vectors = index_of(["one", "two", "three"])
    hits = index.dense_search(vectors[1], 3, None)
    assert hits[0] == (2, float(vectors[1] @ vectors[1]))
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert [k for k, _ in index.dense_search(vectors[1], 3, lambda key: key != 2)] == [
        k for k, _ in hits if k != 2]
    exact = index.dense_exact(vectors[0], np.array([3, 1, 9], dtype=np.uint64))  # 9 is not held
    assert [k for k, _ in exact] == [1, 3]


def test_lexical_search_counts_query_terms_and_skips_documents_without_any() -> None:
    index, _ = index_of(["red fox", "red red hen", "blue whale"])
    assert index.lexical_search("Red", 10, None) == [(2, 2.0), (1, 1.0)]
    assert index.lexical_search("green", 10, None) == []
    assert index.lexical_staged("whale", [(7, "a whale"), (8, "a fish")], 10) == [(7, 1.0)]


def test_removed_keys_are_gone_from_both_lists_and_reported_missing() -> None:
    index, vectors = index_of(["red fox", "red hen"])
    index.remove(np.array([1], dtype=np.uint64))
    assert [k for k, _ in index.dense_search(vectors[0], 10, None)] == [2]
    assert index.lexical_search("red", 10, None) == [(2, 1.0)]
    assert index.dense_missing(np.array([1, 2], dtype=np.uint64)).tolist() == [1]
    assert index.lexical_watermark == 2
