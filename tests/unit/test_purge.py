"""Purge in process: items removed from every revision, both indexes, staging, activations and the disk.

A kernel over a real RocksDB store and real indexes, with a deterministic
embedder (a text's own vector is its nearest neighbour, so dense search finds
an item by its text). The trace test scans every file of the data dir for the
purged text after the purge.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tantivy
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig
from memosd.errors import InvalidField, ItemNotFound
from memosd.index.cube_index import CubeIndex
from memosd.index.fusion import fuse, single
from memosd.index.lexical import TANTIVY_DIR, TEXT, build_schema
from memosd.kernel.indexes import Indexes
from memosd.kernel.kernel import Kernel
from memosd.kernel.search import Searcher, SearchSettings
from memosd.kernel.types import ItemInput, SearchFilter
from memosd.store.records import ActivationRecord, AdapterRecord, PurgedActivation, TaintedAdapter
from memosd.store.rocks import Store


def rank(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], k: int, mode: str) -> list[Any]:
    if mode != "hybrid":
        return single(dense if mode == "dense" else lexical, k, lexical=mode == "lexical")
    return fuse(dense, lexical, k)


def open_kernel(data: Path) -> Kernel:
    kernel = Kernel(Store(data / "store"), HashEmbedder(), CubeIndex.open, data / "index", LimitsConfig())
    kernel.open()
    return kernel


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    """A kernel over tmp_path/first; tests that reopen the data dir close it themselves."""
    k = open_kernel(tmp_path / "first")
    yield k
    if k.store._cfs:  # not closed by the test
        k.close()


def commit(kernel: Kernel, cube: str, items: Sequence[ItemInput], forget: Sequence[str] = ()) -> list[str]:
    """Write (and forget) through a fresh read-write mount, commit, unmount; the written item ids."""
    mount = kernel.mount(cube, 0, True).record.mount_id
    written = kernel.write(mount, items)[0] if items else []
    if forget:
        kernel.forget(mount, forget)
    kernel.commit(mount, "test", "test")
    kernel.unmount(mount)
    return written


def ids_at(kernel: Kernel, cube: str, revision: int) -> set[str]:
    mount = kernel.mount(cube, revision, False).record.mount_id
    try:
        return {v.item_id for v in kernel.list_items(mount, 0, "")[0].entries}
    finally:
        kernel.unmount(mount)


def found(kernel: Kernel, cube: str, revision: int, query: str, mode: str) -> set[str]:
    mount = kernel.mount(cube, revision, False).record.mount_id
    try:
        result = Searcher(kernel, rank, SearchSettings()).search([mount], query, 10, SearchFilter(), mode)
        return {hit.item.item_id for hit in result.hits}
    finally:
        kernel.unmount(mount)


def readable(kernel: Kernel, cube: str, revision: int, item_id: str) -> bool:
    mount = kernel.mount(cube, revision, False).record.mount_id
    try:
        kernel.read(mount, [item_id])
        return True
    except ItemNotFound:
        return False
    finally:
        kernel.unmount(mount)


def history(kernel: Kernel, cube: str) -> list[Any]:
    return kernel.log(cube, 0, "")[0].entries


def build_history(kernel: Kernel) -> dict[str, str]:
    """Revisions 1-4 of cube "c": add a, b, c; edit a; forget b; roll back to 2. Item ids by name."""
    kernel.alloc_cube("c", "", {})
    a, b, c = commit(kernel, "c", [ItemInput("the aardvark digs burrows"), ItemInput("the badger sleeps"),
                                   ItemInput("the capybara swims")])
    commit(kernel, "c", [ItemInput("the aardvark digs deeper burrows", item_id=a)])
    commit(kernel, "c", [], forget=[b])
    kernel.rollback("c", 2, "", "test")
    return {"a": a, "b": b, "c": c}


def test_purge_by_id_removes_the_item_from_every_revision_and_both_indexes(tmp_path: Path, kernel: Kernel) -> None:
    items = build_history(kernel)
    a = items["a"]
    before = {rev: ids_at(kernel, "c", rev) for rev in range(5)}
    log_before = history(kernel, "c")
    assert a in found(kernel, "c", 1, "the aardvark digs burrows", "dense")
    assert a in found(kernel, "c", 4, "aardvark", "lexical")

    receipt = kernel.purge("c", [a])

    assert receipt.item_ids == [a] and receipt.purge_id.startswith("prg_")
    # Two versions: the original and the edit (the rollback to 2 revived only b).
    assert receipt.versions_removed == 2 and receipt.vectors_removed == 2
    assert receipt.dense_entries_removed == 2 and receipt.lexical_entries_removed == 2
    assert receipt.staged_removed == 0 and receipt.kv_caches_deleted == [] and receipt.adapters_tainted == []
    for rev in range(5):
        assert ids_at(kernel, "c", rev) == before[rev] - {a}
        assert not readable(kernel, "c", rev, a)
        for text in ("the aardvark digs burrows", "the aardvark digs deeper burrows"):
            assert a not in found(kernel, "c", rev, text, "dense")
            assert a not in found(kernel, "c", rev, text, "hybrid")
        assert found(kernel, "c", rev, "aardvark burrows", "lexical") == set()
    assert found(kernel, "c", 4, "capybara", "lexical") == {items["c"]}
    assert found(kernel, "c", 1, "badger", "lexical") == {items["b"]}
    # History keeps its revisions (their counts now overstate); diff and rollback go on without the item.
    assert history(kernel, "c") == log_before
    assert {(ch.kind, ch.item_id) for ch in kernel.diff("c", 0, 4, 0, "")[0].entries} == {
        ("added", items["b"]), ("added", items["c"])}
    assert kernel.diff("c", 1, 2, 0, "")[0].entries == []
    kernel.rollback("c", 3, "", "test")
    assert ids_at(kernel, "c", 5) == {items["c"]}
    assert kernel.cube("c").record.item_count == 1
    commit(kernel, "c", [ItemInput("the dingo howls")])
    assert len(ids_at(kernel, "c", 6)) == 2

    kernel.close()
    again = open_kernel(tmp_path / "first")
    try:
        assert [p.purge_id for p in again.purges("c")] == [receipt.purge_id]
        assert again.purges("c")[0] == receipt
        assert not readable(again, "c", 2, a) and found(again, "c", 2, "aardvark", "lexical") == set()
        assert ids_at(again, "c", 4) == before[4] - {a}
    finally:
        again.close()


def test_purge_by_source_and_by_tag_selects_every_item_with_it_in_any_version(kernel: Kernel) -> None:
    kernel.alloc_cube("c", "", {})
    crm, tagged, kept = commit(kernel, "c", [ItemInput("call notes from the crm", source="crm"),
                                             ItemInput("a private remark", tags=("private", "x")),
                                             ItemInput("a public fact", source="web", tags=("x",))])
    commit(kernel, "c", [ItemInput("call notes, cleaned up", item_id=crm, source="web")])  # crm only in v1

    by_source = kernel.purge("c", [], source="crm")
    assert by_source.item_ids == [crm] and by_source.versions_removed == 2
    by_tag = kernel.purge("c", [], tags=["private", "absent"])
    assert by_tag.item_ids == [tagged]
    for rev in (1, 2):
        assert ids_at(kernel, "c", rev) == {kept}
    assert found(kernel, "c", 2, "call notes crm private remark", "lexical") == set()
    assert found(kernel, "c", 2, "public fact", "hybrid") == {kept}
    assert kernel.cube("c").catalog.vkeys_with_tags((), ("private",)) == set()
    assert [p.purge_id for p in kernel.purges("c")] == [by_source.purge_id, by_tag.purge_id]


def test_purge_removes_staged_copies_from_every_open_mount(tmp_path: Path, kernel: Kernel) -> None:
    kernel.alloc_cube("c", "", {})
    a, b = commit(kernel, "c", [ItemInput("alpha"), ItemInput("beta")])
    editing = kernel.mount("c", 0, True).record.mount_id
    (_, gamma), _ = kernel.write(editing, [ItemInput("alpha, edited", item_id=a), ItemInput("gamma")])
    forgetting = kernel.mount("c", 0, True).record.mount_id
    kernel.forget(forgetting, [a])
    adding = kernel.mount("c", 0, True).record.mount_id
    kernel.write(adding, [ItemInput("crm export", source="crm")])

    receipt = kernel.purge("c", [a], source="crm")

    assert len(receipt.item_ids) == 2 and a in receipt.item_ids
    assert sorted(map(tuple, receipt.staged)) == sorted([(editing, a), (forgetting, a),
                                                         (adding, receipt.item_ids[1 - receipt.item_ids.index(a)])])
    assert receipt.versions_removed == 1
    assert kernel.mount_info(kernel.mount_state(adding)).staged_adds == 0
    assert kernel.mount_info(kernel.mount_state(forgetting)).staged_forgets == 0
    with pytest.raises(ItemNotFound):
        kernel.read(editing, [a])
    with pytest.raises(ItemNotFound):  # and the mount cannot stage it again
        kernel.write(editing, [ItemInput("alpha, again", item_id=a)])
    assert found(kernel, "c", 0, "alpha edited crm export", "lexical") == set()
    assert kernel.commit(forgetting, "nothing left", "test").revision is None
    kernel.commit(editing, "gamma", "test")  # the rest of the staging commits as usual
    assert {v.text for v in kernel.list_items(editing, 0, "")[0].entries} == {"beta", "gamma"}
    assert [s.item_id for s, _ in kernel.store.iter_staged(adding)] == []
    assert ids_at(kernel, "c", 0) == {b, gamma}

    kernel.close()
    again = open_kernel(tmp_path / "first")
    try:  # reopened from RocksDB alone: the purge held, and nothing purged came back
        assert again.mounts[adding].staging == {} and again.mounts[forgetting].staging == {}
        assert ids_at(again, "c", 0) == {b, gamma}
        assert found(again, "c", 0, "alpha edited crm export", "lexical") == set()
        with pytest.raises(ItemNotFound):
            again.read(adding, [a])
    finally:
        again.close()


def activation(cube_id: str, fingerprint: str, revision: int, items: list[list[Any]], chunk: bytes
               ) -> tuple[ActivationRecord, list[bytes]]:
    key = hashlib.sha256(fingerprint.encode() + chunk).hexdigest()
    record = ActivationRecord(cube_id, fingerprint, revision, key, 2, 2 * len(chunk), "float16", items,
                              [1, 2, 3], 0)
    return record, [chunk, chunk[::-1]]


def put_activation(kernel: Kernel, record: ActivationRecord, chunks: list[bytes]) -> None:
    batch = kernel.store.batch()
    batch.put_activation(record, chunks)
    kernel.store.write(batch, sync=True)


def test_purge_deletes_the_activations_whose_block_holds_the_item(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    a, b = commit(kernel, "c", [ItemInput("alpha"), ItemInput("beta")])
    with_a, chunks_a = activation(cube_id, "model-1", 1, [[a, 1], [b, 1]], os.urandom(6000))
    without_a, chunks_b = activation(cube_id, "model-2", 1, [[b, 1]], os.urandom(6000))
    put_activation(kernel, with_a, chunks_a)
    put_activation(kernel, without_a, chunks_b)

    receipt = kernel.purge("c", [a])

    assert receipt.activations == [PurgedActivation("model-1", with_a.cache_key, 1, with_a.persisted_bytes)]
    assert receipt.kv_caches_deleted == [with_a.cache_key]
    assert kernel.store.get_activation(cube_id, "model-1") is None
    assert kernel.store.get_kv_chunks(with_a) is None
    assert kernel.store.get_activation(cube_id, "model-2") == without_a
    assert kernel.store.get_kv_chunks(without_a) == chunks_b


def test_adapters_trained_on_the_item_are_tainted_and_stay_tainted_after_reopen(tmp_path: Path,
                                                                             kernel: Kernel) -> None:
    kernel.alloc_cube("c", "", {})
    a, b = commit(kernel, "c", [ItemInput("alpha"), ItemInput("beta")])

    def adapter(digest: str, item_ids: list[str]) -> AdapterRecord:
        return AdapterRecord(digest, 2, 7, 4, ["q_proj"], "tiny", {"origin": "trained", "source_item_ids": item_ids})

    kernel.commit_adapter("c", 1, adapter("d1" * 32, [a, b]), b"{}", b"weights", "train", "test")  # revision 2
    kernel.commit_adapter("c", 2, adapter("d2" * 32, [b]), b"{}", b"weights", "train", "test")  # revision 3

    receipt = kernel.purge("c", [a])

    assert receipt.adapters_tainted == [TaintedAdapter("d1" * 32, 2)]
    assert [(x.digest[:2], x.tainted) for x in kernel.cube("c").adapters] == [("d1", [receipt.purge_id]),
                                                                             ("d2", [])]
    # Rolling back to it keeps the mark; a job that trained on the item meanwhile commits it marked.
    kernel.rollback("c", 2, "", "test")
    assert kernel.cube("c").adapter_at(4).tainted == [receipt.purge_id]  # type: ignore[union-attr]
    kernel.commit_adapter("c", 4, adapter("d3" * 32, [a, b]), b"{}", b"weights", "train", "test")
    assert kernel.cube("c").adapter_at(5).tainted == [receipt.purge_id]  # type: ignore[union-attr]

    kernel.close()
    again = open_kernel(tmp_path / "first")
    try:
        tainted = [(x.digest[:2], x.born, x.tainted) for x in again.cube("c").adapters]
        assert tainted == [("d1", 2, [receipt.purge_id]), ("d2", 3, []), ("d1", 4, [receipt.purge_id]),
                           ("d3", 5, [receipt.purge_id])]
        assert again.store.get_adapter_files(again.cube("c").cube_id, "d1" * 32) == (b"{}", b"weights")
    finally:
        again.close()


CANARY = "zebracorn-7f3a secret canary"


def files_holding(root: Path, needles: Sequence[bytes]) -> list[tuple[str, bytes]]:
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits += [(str(path.relative_to(root)), n) for n in needles if n in data]
    return hits


def term_docs(data: Path, cube_id: str, term: str) -> int:
    """Documents of the cube's lexical index with ``term``, deleted ones included (they keep their terms until
    a merge). Its term dictionary is an FST, whose bytes a scan for the term cannot see."""
    index = tantivy.Index(build_schema(), path=str(data / "index" / cube_id / "lexical" / TANTIVY_DIR), reuse=True)
    return int(index.searcher().doc_freq(TEXT, term))


def test_after_a_purge_the_text_is_found_nowhere_in_the_data_dir(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path)
    cube_id = kernel.alloc_cube("trace", "", {}).record.cube_id
    other_id = kernel.alloc_cube("other", "", {}).record.cube_id
    texts = [CANARY, f"{CANARY}, edited"]
    secret, plain = commit(kernel, "trace", [ItemInput(texts[0], tags=("t",)), ItemInput("the quokka smiles")])
    commit(kernel, "other", [ItemInput("the numbat eats termites")])
    kernel.store.flush()  # the text is in SST files now, not only in the WAL
    commit(kernel, "trace", [ItemInput(texts[1], item_id=secret)])
    commit(kernel, "trace", [], forget=[secret])
    kernel.rollback("trace", 2, "", "test")  # revives a copy of the edit
    staging = kernel.mount("trace", 0, True).record.mount_id
    kernel.write(staging, [ItemInput(f"{CANARY}, staged", item_id=secret)])
    # KV caches (in blob files): one whose block holds the item, and another cube's, likely in the same blob file.
    kv = CANARY.encode() + os.urandom(8192)
    put_activation(kernel, *activation(cube_id, "m", 4, [[secret, 4], [plain, 1]], kv))
    put_activation(kernel, *activation(other_id, "m", 1, [["itm_x", 1]], os.urandom(8192)))
    kernel.save_indexes()
    kernel.store.flush()
    vectors = HashEmbedder().embed([*texts, f"{CANARY}, staged"])
    needles = [CANARY.encode(), b"zebracorn", b"canari",  # tantivy keeps the stemmed, lowercased tokens
               *(v.astype(np.float32).tobytes() for v in vectors),  # the store's vectors
               *(v.astype(np.float16).tobytes() for v in vectors)]  # the dense index's
    planted = files_holding(tmp_path, needles)
    assert {n for _, n in planted} >= {CANARY.encode(), b"zebracorn", vectors[0].astype(np.float32).tobytes()}
    assert any(p.startswith("index/") for p, _ in planted) and any(p.endswith(".blob") for p, _ in planted)
    assert term_docs(tmp_path, cube_id, "zebracorn") == 3 and term_docs(tmp_path, cube_id, "canari") == 3

    receipt = kernel.purge("trace", [secret])
    assert receipt.versions_removed == 3 and receipt.staged_removed == 1 and len(receipt.activations) == 1
    kernel.close()

    assert files_holding(tmp_path, needles) == []
    assert term_docs(tmp_path, cube_id, "zebracorn") == 0 and term_docs(tmp_path, cube_id, "canari") == 0
    assert term_docs(tmp_path, cube_id, "quokka") == 1
    again = open_kernel(tmp_path)
    try:
        assert found(again, "trace", 0, "quokka", "lexical") == {plain}
        assert found(again, "other", 0, "numbat", "lexical") != set()
        assert again.store.get_activation(other_id, "m") is not None
    finally:
        again.close()


def test_purge_drops_every_stored_kv_block_of_the_cube_and_no_other_s(tmp_path: Path) -> None:
    """A block's key does not say which items it holds: all of the cube's go, for every model, and scrub
    leaves no copy in any file; another cube's blocks stay."""
    kernel = open_kernel(tmp_path)
    cube_id = kernel.alloc_cube("blocks", "", {}).record.cube_id
    other_id = kernel.alloc_cube("other", "", {}).record.cube_id
    [secret] = commit(kernel, "blocks", [ItemInput("the item the blocks were computed from")])
    commit(kernel, "other", [ItemInput("the numbat eats termites")])
    canary = b"kv-block-canary-51c9" + os.urandom(8192)  # above the blob size: it lands in a blob file
    for fingerprint in ("model-1", "model-2"):
        kernel.store.put_kv_block(cube_id, fingerprint, "ab" * 32, canary)
        kernel.store.put_kv_block(cube_id, fingerprint, "cd" * 32, canary[::-1])
    kept = b"other cube" + os.urandom(8192)
    kernel.store.put_kv_block(other_id, "model-1", "ab" * 32, kept)
    kernel.store.flush()
    assert any(p.endswith(".blob") for p, _ in files_holding(tmp_path, [canary]))

    kernel.purge("blocks", [secret])

    assert list(kernel.store.iter_kv_block_keys(cube_id)) == [] and kernel.store.kv_block_bytes(cube_id) == 0
    kernel.close()
    assert files_holding(tmp_path, [canary, canary[::-1]]) == []
    again = open_kernel(tmp_path)
    try:
        assert again.store.get_kv_block(other_id, "model-1", "ab" * 32) == kept
    finally:
        again.close()


def test_free_cube_drops_its_stored_kv_blocks_and_no_other_cube_s(kernel: Kernel) -> None:
    cube_id = kernel.alloc_cube("c", "", {}).record.cube_id
    other_id = kernel.alloc_cube("d", "", {}).record.cube_id
    for owner in (cube_id, other_id):
        kernel.store.put_kv_block(owner, "model-1", "ab" * 32, owner.encode())
    kernel.free_cube("c")
    assert list(kernel.store.iter_kv_block_keys(cube_id)) == []
    assert kernel.store.get_kv_block(other_id, "model-1", "ab" * 32) == other_id.encode()


def test_a_crash_after_the_batch_rebuilds_the_indexes_without_the_item(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = open_kernel(tmp_path)
    kernel.alloc_cube("c", "", {})
    a, b = commit(kernel, "c", [ItemInput("the aardvark digs"), ItemInput("the badger sleeps")])
    kernel.save_indexes()

    class Crash(BaseException):
        pass

    def crash(_indexes: Indexes, _cube: Any) -> None:
        raise Crash

    monkeypatch.setattr(Indexes, "refill", crash)
    with pytest.raises(Crash):  # the batch is written; the process "dies" before the indexes are refilled
        kernel.purge("c", [a])
    monkeypatch.undo()
    kernel.store.close()
    for cube in kernel.cubes.values():
        cube.index.close()

    again = open_kernel(tmp_path)
    try:
        cube = again.cube("c")
        assert list(cube.catalog.by_item) == [b]
        index: Any = cube.index
        assert len(index.dense) == 1 and index.lexical.num_docs == 1
        assert found(again, "c", 0, "aardvark", "lexical") == set()
        assert found(again, "c", 0, "the aardvark digs", "dense") == {b}
        assert found(again, "c", 0, "badger", "lexical") == {b}
    finally:
        again.close()


def test_a_failed_batch_purges_nothing_and_the_indexes_are_whole_again(kernel: Kernel,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    kernel.alloc_cube("c", "", {})
    a, _b = commit(kernel, "c", [ItemInput("the aardvark digs"), ItemInput("the badger sleeps")])

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Store, "write", fail)
    with pytest.raises(OSError):
        kernel.purge("c", [a])
    monkeypatch.undo()
    assert readable(kernel, "c", 0, a) and kernel.purges("c") == []
    assert found(kernel, "c", 0, "aardvark", "lexical") == {a}
    assert found(kernel, "c", 0, "the aardvark digs", "dense") >= {a}
    commit(kernel, "c", [ItemInput("the aardvark digs again", item_id=a)])  # not locked out of the item


def test_bad_selectors_are_refused_and_unknown_ids_change_nothing(kernel: Kernel) -> None:
    kernel.alloc_cube("c", "", {})
    a, b = commit(kernel, "c", [ItemInput("alpha", source="crm"), ItemInput("beta")])
    for selector in ({}, {"tags": [""]}, {"source": ""}):
        with pytest.raises(InvalidField) as refused:
            kernel.purge("c", [], **selector)
        assert "item_ids, a source, or tags" in refused.value.message
    unknown = "itm_aaaaaaaaaaaaaaaaaaaa"
    with pytest.raises(ItemNotFound) as missing:
        kernel.purge("c", [a, unknown], source="crm")
    assert unknown in missing.value.message and a not in missing.value.message
    assert readable(kernel, "c", 0, a) and kernel.purges("c") == []

    nothing = kernel.purge("c", [], source="nowhere", tags=["none"])
    assert nothing.purge_id == "" and nothing.item_ids == [] and kernel.purges("c") == []

    kernel.purge("c", [a])
    with pytest.raises(ItemNotFound) as again:
        kernel.purge("c", [a])
    assert "purged already" in again.value.message
    assert ids_at(kernel, "c", 0) == {b}


# --- activations computed by the model (the tiny random Llama) -----------------------------------------

FACTS = ["The capital of France is Paris.", "The lighthouse keeper feeds the cat at noon.",
         "Paris has a river called the Seine."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=512)


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Any]:
    from activation_rig import open_rig

    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


def committed_facts(rig: Any) -> tuple[str, str]:
    """Commit FACTS to cube "facts"; the mount and the id of the second fact."""
    from activation_rig import commit_items

    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    views = rig.kernel.list_items(mount, 0, "")[0].entries
    return mount, next(v.item_id for v in views if v.text == FACTS[1])


def test_an_activation_holding_the_item_is_deleted_and_the_next_one_computed_without_it(rig: Any) -> None:
    mount, target = committed_facts(rig)
    record = rig.activator.activate(mount).record
    assert target in [i for i, _ in record.items]

    receipt = rig.kernel.purge("facts", [target])
    rig.activator.drop_pooled(receipt.cube_id)  # the caller drops the pool's copies

    assert receipt.kv_caches_deleted == [record.cache_key]
    assert rig.kernel.store.get_activation(record.cube_id, record.fingerprint) is None
    assert rig.kernel.store.get_kv_chunks(record) is None and record.cache_key not in rig.host.pool
    again = rig.activator.activate(mount)
    assert again.source == "computed" and target not in [i for i, _ in again.record.items]


def test_an_activation_that_read_the_block_before_a_purge_keeps_no_copy(rig: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from memosd.activation.activator import Activator

    mount, target = committed_facts(rig)
    read_block = Activator.block_items

    def purged_meanwhile(self: Activator, cube: Any, revision: int, selector: Any = None) -> Any:
        block = read_block(self, cube, revision) if selector is None else read_block(self, cube, revision, selector)
        receipt = rig.kernel.purge("facts", [target])
        rig.activator.drop_pooled(receipt.cube_id)
        return block

    monkeypatch.setattr(Activator, "block_items", purged_meanwhile)
    outcome = rig.activator.activate(mount)
    assert target in [i for i, _ in outcome.record.items]  # computed from the block read before the purge
    assert not outcome.pooled and outcome.record.cache_key not in rig.host.pool
    assert list(rig.kernel.store.iter_activations(outcome.record.cube_id)) == []


def test_purging_a_turn_purges_the_items_derived_from_it_from_both_indexes(kernel: Kernel) -> None:
    kernel.alloc_cube("c", "", {})
    [turn] = commit(kernel, "c", [ItemInput("I keep my quokka in the garden", speaker="Caroline")])
    [fact, other] = commit(kernel, "c", [ItemInput("Caroline keeps a quokka.", derived_from=(turn,)),
                                         ItemInput("a note about gardens")])
    assert fact in found(kernel, "c", 2, "quokka", "lexical")
    assert fact in found(kernel, "c", 2, "Caroline keeps a quokka.", "dense")
    receipt = kernel.purge("c", [turn])
    assert receipt.item_ids == sorted([turn, fact]) and receipt.derived_item_ids == [fact]
    assert receipt.versions_removed == 2 and receipt.lexical_entries_removed == 2
    for rev in (1, 2):
        assert not readable(kernel, "c", rev, fact)
        assert fact not in found(kernel, "c", rev, "quokka", "lexical")
        assert fact not in found(kernel, "c", rev, "Caroline keeps a quokka.", "dense")
    assert ids_at(kernel, "c", 2) == {other}
