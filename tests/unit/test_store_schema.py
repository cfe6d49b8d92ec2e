"""The key tree drawn in store/schema.py is the one the store writes.

Every row is written through its typed accessor and read back raw: the keys of
each column family must be exactly the drawn templates, formatted with the
sample ids below. The drawn families must be the ones the store opens, and the
cube-scoped ones (FreeCube's range delete) those whose keys all start with
``{cube_id}/``. The governance and usage accessors also read back what they
wrote, and their value bytes are pinned: the storage format does not change.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import re
from pathlib import Path

import numpy as np
import pytest
from rocksdict import Options, Rdict

from memosd.store import records, schema
from memosd.store.records import (
    ActivationRecord,
    AdapterRecord,
    CubeRecord,
    CubeUsage,
    GrantRecord,
    ItemUsage,
    JobRecord,
    MountRecord,
    PrincipalRecord,
    PurgeReceipt,
    RequestRecord,
    RevisionRecord,
    StagedAdapterRecord,
    StagedRecord,
    StoredRecord,
    VersionRecord,
)
from memosd.store.rocks import Store

REPO = Path(__file__).resolve().parents[2]
# Numbers whose hex differs from their decimal, so a template's format spec is checked too. The request id
# holds a "/": it is the client's, and the key's rest.
SAMPLE: dict[str, object] = {
    "cube_id": "cub_a", "name": "notes", "rev": 0x1A, "item_id": "itm_b", "born": 0x2B, "vkey": 0x3C,
    "mount_id": "mnt_c", "fingerprint": "fp_d", "cache_key": "ck_e", "chunk": 0, "digest": "f" * 64,
    "job_id": "job_f", "purge_id": "prg_g", "principal_id": "prn_h", "request_id": "req/i", "seq": 0x4D,
    "block_key": "ab" * 32,
}

_FAMILY = re.compile(r"^ {4}([a-z_]+)(?: {2,}.*)?$")
_KEY = re.compile(r"^ {6}(\S+)(?: +-> (.*))?$")
_VALUE = re.compile(r"^ +-> (.*)$")


@dataclasses.dataclass
class Drawn:
    family: str
    template: str
    value: str


def drawn_tree() -> list[Drawn]:
    """The (family, key template, value) rows of schema.py's docstring."""
    rows: list[Drawn] = []
    family, pending = "", ""
    for line in (schema.__doc__ or "").splitlines():
        if m := _FAMILY.match(line):
            family = m.group(1)
        elif m := _KEY.match(line):
            assert family, f"a key drawn before any family: {line!r}"
            if m.group(2) is None:
                pending = m.group(1)  # the value is on the next line
            else:
                rows.append(Drawn(family, m.group(1), m.group(2)))
        elif pending and (m := _VALUE.match(line)):
            rows.append(Drawn(family, pending, m.group(1)))
            pending = ""
    assert not pending, f"key {pending!r} is drawn without a value"
    return rows


def drawn_families() -> dict[str, list[Drawn]]:
    families: dict[str, list[Drawn]] = {}
    for row in drawn_tree():
        families.setdefault(row.family, []).append(row)
    return families


def expected_key(template: str) -> bytes:
    return template.format(**SAMPLE).encode()


def _s(name: str) -> str:
    value = SAMPLE[name]
    assert isinstance(value, str)
    return value


def _n(name: str) -> int:
    value = SAMPLE[name]
    assert isinstance(value, int)
    return value


def write_one_of_each(store: Store) -> None:
    """One row of every drawn key, each through the accessor the code uses for it."""
    cube_id, mount_id, item_id = _s("cube_id"), _s("mount_id"), _s("item_id")
    store.put_meta(schema.KEY_EMBEDDER, b"e")
    store.put_meta(schema.KEY_MEMORY_TEXT, b"m")
    store.space.trip(OSError(errno.ENOSPC, "no space"))
    assert not store.recheck_space(), "the probe write should go through on a disk with room"

    batch = store.batch()
    batch.put_cube(CubeRecord(cube_id, _s("name"), "", {}, 0))
    batch.put_name(_s("name"), cube_id)
    batch.put_revision(cube_id, RevisionRecord(_n("rev"), 0, "commit", "", "", 0, 0, 0, 0, 0))
    batch.put_version(cube_id, VersionRecord(item_id, _n("vkey"), "t", [], "", 0, 0, _n("born")))
    batch.put_vector(cube_id, _n("vkey"), np.zeros(4, dtype=np.float32))
    batch.put_mount(MountRecord(mount_id, cube_id, 0, "rw", 0))
    batch.put_staged(mount_id, StagedRecord(item_id, "add", 0, "t"), np.zeros(4, dtype=np.float32))
    batch.put_activation(ActivationRecord(cube_id, _s("fingerprint"), 1, _s("cache_key"), 1, 1, "float16", [], [], 0),
                         [b"chunk"])
    batch.put_adapter(cube_id, AdapterRecord(_s("digest"), 2, 1, 8, [], "base", {}, born=_n("born")))
    batch.put_adapter_files(cube_id, _s("digest"), b"{}", b"w")
    batch.put_staged_adapter(mount_id, StagedAdapterRecord("remove", 0))
    batch.put_purge(PurgeReceipt(_s("purge_id"), cube_id, 0))
    batch.put_cube_usage(cube_id, CubeUsage())
    batch.put_item_usage(cube_id, item_id, ItemUsage(1, 2))
    batch.put_request(cube_id, _s("principal_id"), _s("request_id"), RequestRecord("write", "d", 0, mount_id))
    store.write(batch, sync=True)

    store.put_kv_block(cube_id, _s("fingerprint"), _s("block_key"), b"block")
    store.put_job(JobRecord(_s("job_id"), cube_id, 1, {}, "", "", 0))
    store.put_principal(PrincipalRecord(_s("principal_id"), "p", "user", False, "h", 0))
    store.put_grant(GrantRecord(cube_id, _s("principal_id"), ["read"], "", 0))
    store.put_audit(StoredRecord(_n("seq"), "0" * 64, b"{}"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    write_one_of_each(s)
    return s


def test_the_drawn_families_are_the_ones_the_store_opens(store: Store) -> None:
    drawn = set(drawn_families())
    assert drawn == {schema.CF_DEFAULT, *schema.COLUMN_FAMILIES}
    store.close()
    assert set(Rdict.list_cf(str(store.path), Options(raw_mode=True))) == drawn


def test_every_family_holds_exactly_the_drawn_keys(store: Store) -> None:
    for family, rows in drawn_families().items():
        if family == schema.CF_DEFAULT:
            continue  # not scanned through the store; see the metadata test
        want = {expected_key(row.template) for row in rows}
        found = {bytes(key) for key, _ in store.scan_rows(family)}
        assert found == want, f"column family {family!r}: the store wrote {found}, the schema draws {want}"


def test_the_drawn_metadata_keys_are_the_store_s(store: Store) -> None:
    drawn = {expected_key(row.template) for row in drawn_families()[schema.CF_DEFAULT]}
    constants = {value for name, value in vars(schema).items() if name.startswith("KEY_")}
    assert drawn == constants
    assert all(store.get_meta(key) is not None for key in drawn)
    assert store.get_meta(schema.KEY_SCHEMA_VERSION) == schema.SCHEMA_VERSION


def test_cube_scoped_families_are_those_keyed_by_the_cube() -> None:
    keyed_by_cube = {family for family, rows in drawn_families().items()
                     if all(row.template.startswith("{cube_id}/") for row in rows)}
    assert keyed_by_cube == set(schema.CUBE_SCOPED)


def test_every_drawn_record_is_a_record_of_records_py() -> None:
    named = {m.group(0) for row in drawn_tree() if (m := re.match(r"[A-Z][A-Za-z]+", row.value))}
    assert "CubeRecord" in named and "StoredRecord" in named
    for name in named:
        assert dataclasses.is_dataclass(getattr(records, name, None)), f"{name} is not a record of records.py"


def test_governance_accessors_read_back_what_they_wrote(store: Store) -> None:
    assert [p.principal_id for p in store.iter_principals()] == [SAMPLE["principal_id"]]
    assert list(store.iter_grants()) == [GrantRecord(_s("cube_id"), _s("principal_id"), ["read"], "", 0)]
    store.delete_grant(_s("cube_id"), _s("principal_id"))
    assert list(store.iter_grants()) == []
    assert list(store.scan_rows(schema.CF_GRANTS)) == []


def test_audit_accessors_keep_the_stored_bytes(store: Store) -> None:
    record = StoredRecord(_n("seq"), "0" * 64, b"{}")
    assert list(store.scan_rows(schema.CF_AUDIT)) == [(expected_key("{seq:016x}"), b"0" * 64 + b"\n{}")]
    assert list(store.iter_audit()) == [record]
    assert list(store.iter_audit(after_seq=_n("seq"))) == []
    assert store.last_audit() == record
    nxt = StoredRecord(_n("seq") + 1, "1" * 64, b'{"a":1}')
    store.put_audit(nxt)
    assert store.last_audit() == nxt
    assert list(store.iter_audit(after_seq=_n("seq"))) == [nxt]


def test_usage_accessors_keep_the_stored_bytes(store: Store) -> None:
    rows = dict(store.scan_rows(schema.CF_USAGE))
    assert rows[expected_key("{cube_id}/#")] == (b'{"searches": 0, "reads": 0, "generations": 0, "item_hits": 0, '
                                                 b'"last_used_ns": 0, "items_tracked": 0, "heat": 0.0}')
    assert rows[expected_key("{cube_id}/{item_id}")] == b"[1, 2]"
    assert sorted(store.iter_usage(), key=lambda r: r[1]) == [
        (SAMPLE["cube_id"], schema.USAGE_CUBE_ROW, CubeUsage()), (SAMPLE["cube_id"], SAMPLE["item_id"], ItemUsage(1, 2))]
    batch = store.batch()
    batch.delete_item_usage(_s("cube_id"), _s("item_id"))
    store.write(batch, sync=False)
    assert [bytes(k) for k, _ in store.scan_rows(schema.CF_USAGE)] == [expected_key("{cube_id}/#")]


def test_kv_block_accessors_read_back_and_delete_by_cube(store: Store) -> None:
    cube_id, fp, key = _s("cube_id"), _s("fingerprint"), _s("block_key")
    assert store.get_kv_block(cube_id, fp, key) == b"block" and store.has_kv_block(cube_id, fp, key)
    assert not store.has_kv_block(cube_id, fp, "cd" * 32) and store.get_kv_block(cube_id, "fp_z", key) is None
    assert list(store.iter_kv_block_keys(cube_id)) == [key] and store.kv_block_bytes(cube_id) == len(b"block")
    store.put_kv_block("cub_b", fp, key, b"other cube")
    store.delete_kv_blocks(cube_id, sync=False)
    assert list(store.scan_rows(schema.CF_KV_BLOCKS)) == [(schema.kv_block_key("cub_b", fp, key), b"other cube")]
    assert store.kv_block_bytes(cube_id) == 0


def test_request_ids_read_back_with_their_principal_and_id(store: Store) -> None:
    [(principal_id, request_id, record)] = store.iter_requests(_s("cube_id"))
    assert (principal_id, request_id, record.kind) == (SAMPLE["principal_id"], SAMPLE["request_id"], "write")


RAW_ROW_API = {"put_row", "delete_row", "scan_rows", "_cfs", "_db"}


def test_only_the_store_uses_raw_rows() -> None:
    """Outside memosd/store/, rows are read and written through the typed accessors only."""
    users = []
    for path in sorted((REPO / "memosd").rglob("*.py")):
        if (REPO / "memosd" / "store") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in RAW_ROW_API:
                users.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert users == []
