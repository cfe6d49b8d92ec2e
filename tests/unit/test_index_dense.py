"""DenseIndex: USearch wrapper keyed by vkey."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from memosd.index.dense import DenseIndex

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_add_search_exact_match(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    vecs = unit(rng, 200)
    keys = np.arange(1, 201, dtype=np.uint64)
    d.add(keys, vecs)
    assert len(d) == 200
    hits = d.search(vecs[41], 5)
    assert hits[0][0] == 42
    assert hits[0][1] == pytest.approx(1.0, abs=2e-3)
    assert len(hits) == 5
    assert all(hits[i][1] >= hits[i + 1][1] for i in range(4))


def test_empty_and_k_zero(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    assert d.search(unit(rng, 1)[0], 5) == []
    d.add([1], unit(rng, 1))
    assert d.search(unit(rng, 1)[0], 0) == []
    assert len(d.search(unit(rng, 1)[0], 10)) == 1


def test_upsert_and_remove(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    v = unit(rng, 3)
    d.add([1, 2], v[:2])
    d.add([2], v[2:])  # re-adding replaces, never raises on duplicates
    assert len(d) == 2
    assert d.search(v[2], 1)[0][0] == 2
    d.add([5, 5], v[:2])  # duplicate in one batch: last wins
    assert d.search(v[1], 1)[0][0] in (5, 1)
    assert d.remove([2, 99]) == 1
    assert d.remove([]) == 0
    assert d.contains_many([1, 2, 5, 99]).tolist() == [True, False, True, False]
    assert all(k != 2 for k, _ in d.search(v[2], 10))


def test_shape_validation(tmp_path: Path) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    with pytest.raises(ValueError):
        d.add([1, 2], np.zeros((1, DIM), dtype=np.float32))
    with pytest.raises(ValueError):
        d.add([1], np.zeros((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError):
        d.search(np.zeros(DIM + 1, dtype=np.float32), 3)
    with pytest.raises(ValueError):
        d.add([-1], np.zeros((1, DIM), dtype=np.float32))


def test_filtered_search_oversamples(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    n = 2000
    vecs = unit(rng, n)
    d.add(np.arange(1, n + 1, dtype=np.uint64), vecs)
    calls: list[int] = []

    def only_multiples_of_97(key: int) -> bool:
        calls.append(key)
        return key % 97 == 0

    hits = d.search(vecs[0], 10, only_multiples_of_97)
    allowed = [k for k in range(1, n + 1) if k % 97 == 0]
    assert len(hits) == 10
    assert all(k % 97 == 0 for k, _ in hits)
    # Against the exact answer among the allowed keys: HNSW is approximate
    # (and random 16-d data is hard for it), so allow a miss or two.
    exact = d.search_exact(vecs[0], np.array(allowed), k=10)
    assert len({k for k, _ in hits} & {k for k, _ in exact}) >= 8
    # accept is asked once per key at most.
    assert len(calls) == len(set(calls))


def test_filtered_search_fewer_than_k_exist(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    d.add(np.arange(1, 101, dtype=np.uint64), unit(rng, 100))
    hits = d.search(unit(rng, 1)[0], 10, lambda k: k in (3, 50))
    assert sorted(k for k, _ in hits) == [3, 50]
    assert d.search(unit(rng, 1)[0], 10, lambda k: False) == []


def test_search_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    vecs = unit(rng, 50)
    d.add(np.arange(1, 51, dtype=np.uint64), vecs)
    q = vecs[9]
    hits = d.search_exact(q, np.array([10, 20, 30, 999]))
    assert hits[0][0] == 10
    assert {k for k, _ in hits} == {10, 20, 30}
    expected = {k: float(vecs[k - 1] @ q) for k in (10, 20, 30)}
    for k, s in hits:
        assert s == pytest.approx(expected[k], abs=2e-3)
    assert d.search_exact(q, np.array([], dtype=np.uint64)) == []
    assert d.search_exact(q, np.array([999])) == []


def test_persistence_across_reopen(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "cube" / "d.usearch"
    d = DenseIndex.open(path, DIM)
    vecs = unit(rng, 30)
    d.add(np.arange(1, 31, dtype=np.uint64), vecs)
    d.remove([7])
    assert d.save() is True
    assert d.save() is False  # nothing changed
    d.close()
    assert not path.with_name(path.name + ".tmp").exists()
    d2 = DenseIndex.open(path, DIM)
    assert len(d2) == 29
    assert d2.search(vecs[4], 1)[0][0] == 5
    assert not d2.contains_many([7])[0]


def test_unsaved_changes_are_lost(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "d.usearch"
    d = DenseIndex.open(path, DIM)
    d.add([1], unit(rng, 1))
    d.save()
    d.add([2], unit(rng, 1))
    assert d.dirty
    d.close()
    d2 = DenseIndex.open(path, DIM)
    assert d2.contains_many([1, 2]).tolist() == [True, False]


def test_corrupt_file_starts_empty(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "d.usearch"
    path.write_bytes(b"not an index" * 50)
    d = DenseIndex.open(path, DIM)
    assert len(d) == 0
    assert d.dirty  # a save will replace the bad file
    d.add([1], unit(rng, 1))
    d.save()
    assert len(DenseIndex.open(path, DIM)) == 1


def test_truncated_file_starts_empty(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "d.usearch"
    d = DenseIndex.open(path, DIM)
    d.add(np.arange(1, 101, dtype=np.uint64), unit(rng, 100))
    d.save()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert len(DenseIndex.open(path, DIM)) == 0


def test_wrong_dim_file_starts_empty(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "d.usearch"
    d = DenseIndex.open(path, DIM)
    d.add([1], unit(rng, 1))
    d.save()
    other = DenseIndex.open(path, DIM * 2)
    assert len(other) == 0
    assert other.dim == DIM * 2


def test_closed_index_raises(tmp_path: Path) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    d.close()
    with pytest.raises(RuntimeError):
        len(d)


def test_concurrent_search_and_writes(tmp_path: Path, rng: np.random.Generator) -> None:
    d = DenseIndex.open(tmp_path / "d.usearch", DIM)
    base = unit(rng, 500)
    d.add(np.arange(1, 501, dtype=np.uint64), base)
    extra = unit(rng, 500)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                hits = d.search(base[0], 5, lambda k: k % 2 == 1)
                assert hits and hits[0][0] == 1
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            for i in range(50):
                keys = np.arange(1000 + 10 * i, 1010 + 10 * i, dtype=np.uint64)
                d.add(keys, extra[10 * i : 10 * i + 10])
                if i % 5 == 0:
                    d.remove(keys[:3])
                    d.save()
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=searcher) for _ in range(3)]
    w = threading.Thread(target=writer)
    for t in ts:
        t.start()
    w.start()
    w.join()
    stop.set()
    for t in ts:
        t.join()
    assert not errors
    assert len(d) == 500 + 500 - 10 * 3
