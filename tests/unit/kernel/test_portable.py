"""ExportCube / ImportCube in the kernel: a cube's whole history round-trips, all or nothing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig
from memosd.errors import ArchiveInvalid, CubeNameTaken
from memosd.kernel.kernel import Kernel
from memosd.kernel.types import ItemInput, Message
from memosd.store import schema
from memosd.store.rocks import Store

from .fakes import FakeIndexes
from .rig import commit, items_at, open_kernel, rw_mount


def _history(kernel: Kernel) -> dict[str, str]:
    """Cube "src": 1 adds a, b (tagged); 2 edits a, forgets b; 3 ingests two turns; 4 rolls back to 1."""
    kernel.alloc_cube("src", "a cube to move", {"team": "x"})
    (a, b), _ = commit(kernel, "src", ["alpha one", ItemInput("beta one", tags=["t1"])])
    commit(kernel, "src", [ItemInput("alpha two", item_id=a)], forget=[b])
    mount = rw_mount(kernel, "src")
    kernel.ingest(mount, [Message("user", "I moved to Lisbon in May", "s1", 1_700_000_000_000_000_000)])
    kernel.unmount(mount)
    kernel.rollback("src", 1, "", "tester")
    return {"a": a, "b": b}


def _export(kernel: Kernel, ref: str, path: Path) -> Path:
    with path.open("wb") as out:
        kernel.export_cube(ref, out, with_kv=False)
    return path


def _everything(kernel: Kernel, ref: str) -> tuple[object, ...]:
    head = kernel.cube_info(kernel.cube(ref)).record.head
    log = kernel.log(ref, 100, "")[0].entries
    diffs = [[(c.item_id, c.kind) for c in kernel.diff(ref, r, r + 1, 100, "")[0].entries] for r in range(1, head)]
    return head, log, diffs, [items_at(kernel, ref, r) for r in range(1, head + 1)]


def test_an_archive_round_trips_to_another_daemon_with_the_same_id(kernel: Kernel, tmp_path: Path) -> None:
    _history(kernel)
    archive = _export(kernel, "src", tmp_path / "src.memcube")
    other = open_kernel(tmp_path / "other", FakeIndexes())
    try:
        result = other.import_cube(archive, "copy", "principal_new", lambda _: False)
        assert result.kept_cube_id and not result.reembedded
        assert result.cube.record.cube_id == kernel.cube("src").cube_id
        assert (result.cube.record.name, result.cube.record.owner) == ("copy", "principal_new")
        assert result.cube.record.description == "a cube to move"
        assert _everything(other, "copy") == _everything(kernel, "src")
        turn = [v for v in other.visible_items(result.cube.record.cube_id, 3, 0) if v.speaker]
        assert [(t.speaker, t.session_id) for t in turn] == [("user", "s1")]
        # The imported cube takes new commits after its history.
        commit(other, "copy", ["gamma"])
        assert other.cube_info(other.cube("copy")).record.head == 5
    finally:
        other.close()


def test_an_import_beside_its_source_gets_a_new_id(kernel: Kernel, tmp_path: Path) -> None:
    _history(kernel)
    archive = _export(kernel, "src", tmp_path / "src.memcube")
    result = kernel.import_cube(archive, "twin", "", lambda _: True)
    assert not result.kept_cube_id
    assert result.cube.record.cube_id != kernel.cube("src").cube_id
    assert _everything(kernel, "twin") == _everything(kernel, "src")


def test_an_import_under_a_taken_name_is_refused(kernel: Kernel, tmp_path: Path) -> None:
    _history(kernel)
    archive = _export(kernel, "src", tmp_path / "src.memcube")
    with pytest.raises(CubeNameTaken):
        kernel.import_cube(archive, "src", "", lambda _: False)
    assert [r.name for r in kernel.cube_records()] == ["src"]


def _rows(store: Store) -> dict[str, int]:
    return {cf: sum(1 for _ in store.scan_rows(cf)) for cf in schema.CUBE_SCOPED}


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_archive_is_refused_and_leaves_nothing(kernel: Kernel, tmp_path: Path, damage: str) -> None:
    _history(kernel)
    data = bytearray(_export(kernel, "src", tmp_path / "src.memcube").read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[data.index(b"alpha two")] ^= 0x01  # one bit of an item's text: only the digest can tell
    broken = tmp_path / "broken.memcube"
    broken.write_bytes(bytes(data))
    other = open_kernel(tmp_path / "other", FakeIndexes())
    try:
        with pytest.raises(ArchiveInvalid) as info:
            other.import_cube(broken, "copy", "", lambda _: False)
        assert info.value.metadata["problem"] == ("truncated" if damage == "truncate" else "corrupt")
        assert other.cube_records() == []
        assert sum(_rows(other.store).values()) == 0
        assert not (tmp_path / "other" / "index").exists() or not any((tmp_path / "other" / "index").iterdir())
    finally:
        other.close()


def test_a_well_formed_but_inconsistent_archive_is_refused_and_its_rows_deleted(kernel: Kernel,
                                                                                tmp_path: Path) -> None:
    """A frame that passes the digest but breaks the cube's invariants (a vector for no version): the rows
    written before it are deleted."""
    from memosd.store.archive import ArchiveWriter

    _history(kernel)
    good = io.BytesIO()
    kernel.export_cube("src", good, with_kv=False)
    # Rewrite the archive with one extra vector frame, under a valid digest.
    from memosd.store import archive as fmt

    source = tmp_path / "src.memcube"
    source.write_bytes(good.getvalue())
    header = fmt.verify(source).header
    bad = tmp_path / "bad.memcube"
    with bad.open("wb") as out:
        writer = ArchiveWriter(out, {k: v for k, v in header.items() if k not in ("format", "version")})
        for kind, payload, _offset in fmt.frames(source):
            writer.frame(kind, payload)
        writer.vector(b"E", 999_999, np.zeros(HashEmbedder.dim, np.float32))
        writer.finish()
    other = open_kernel(tmp_path / "other", FakeIndexes())
    try:
        with pytest.raises(ArchiveInvalid) as info:
            other.import_cube(bad, "copy", "", lambda _: False)
        assert info.value.metadata["problem"] == "inconsistent"
        assert other.cube_records() == [] and sum(_rows(other.store).values()) == 0
    finally:
        other.close()


class _OtherEmbedder(HashEmbedder):
    fingerprint = "hash-embedder/2"


def test_an_archive_from_another_embedder_is_reembedded(kernel: Kernel, tmp_path: Path) -> None:
    ids = _history(kernel)
    archive = _export(kernel, "src", tmp_path / "src.memcube")
    store = Store(tmp_path / "other" / "store")
    other = Kernel(store, _OtherEmbedder(), FakeIndexes(), tmp_path / "other" / "index", LimitsConfig(),
                   sync_commits=False)
    other.open()
    try:
        result = other.import_cube(archive, "copy", "", lambda _: False)
        assert result.reembedded
        cube_id = result.cube.record.cube_id
        versions = {v.vkey: v for v in store.iter_versions(cube_id)}
        vectors = dict(store.iter_vectors(cube_id))
        assert set(vectors) == set(versions)
        a = next(v for v in versions.values() if v.item_id == ids["a"] and v.text == "alpha one")
        assert np.allclose(vectors[a.vkey], _OtherEmbedder().embed(["alpha one"])[0])
    finally:
        other.close()


def test_rows_of_an_import_cut_short_are_swept_at_start(tmp_path: Path) -> None:
    """A crash after an import wrote rows but before it wrote the cube record: the next start deletes them."""
    store = Store(tmp_path / "store")
    batch = store.batch()
    batch.put_vector("cube_orphanorphanorphan00", 1, np.ones(HashEmbedder.dim, np.float32))
    store.write(batch, sync=True)
    store.close()
    kernel = open_kernel(tmp_path, FakeIndexes())
    try:
        assert sum(_rows(kernel.store).values()) == 0
    finally:
        kernel.close()


def test_an_adapter_travels_with_its_lineage_and_files(kernel: Kernel, tmp_path: Path) -> None:
    import hashlib

    from memosd.store.records import AdapterRecord

    _history(kernel)
    config, weights = b'{"r": 4}', bytes(range(256)) * 40
    digest = hashlib.sha256(config + weights).hexdigest()
    adapter = AdapterRecord(digest, len(config), len(weights), 4, ["q_proj"], "SmolLM2-135M-Instruct",
                            {"origin": "trained", "revision": 4, "items": ["x"]})
    mount = rw_mount(kernel, "src")
    kernel.stage_adapter(mount, adapter, config, weights)
    kernel.commit(mount, "adapter", "tester")
    kernel.unmount(mount)
    archive = _export(kernel, "src", tmp_path / "src.memcube")
    other = open_kernel(tmp_path / "other", FakeIndexes())
    try:
        other.import_cube(archive, "copy", "", lambda _: False)
        cube_id = other.cube("copy").cube_id
        ro = other.mount("copy", 0, False)
        copied, staged = other.adapter_in(other.mount_state(ro.record.mount_id))
        assert copied is not None and not staged
        assert (copied.digest, copied.lineage, copied.born) == (digest, adapter.lineage, 5)
        assert other.adapter_files(cube_id, copied) == (config, weights)
        assert other.adapter_change("copy", 4, 5) == kernel.adapter_change("src", 4, 5)
    finally:
        other.close()
