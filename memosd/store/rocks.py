"""RocksDB access for the kernel and governance: typed reads and writes, and write batches.

Only this module imports rocksdict, and only the store package uses raw rows
(``put_row``, ``delete_row``, ``scan_rows``): everyone else reads and writes
records through the typed accessors, so every key is made by a function of
store/schema.py (tests/unit/test_store_schema.py checks both). A Batch is one atomic RocksDB WriteBatch:
the kernel builds one per syscall that changes durable state and writes it
with `sync=True` where the syscall promises durability (Commit, Rollback,
AllocCube, FreeCube), so a crash never leaves half of it applied.

Every write goes through ``_writing``: while the disk is full (the NOSPACE
alarm, store/space.py) it is refused at once with ``DiskFull``; a write that
fails for lack of space raises the alarm and becomes ``DiskFull``. Reads never
look at the alarm.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rocksdict import (
    BottommostLevelCompaction,
    CompactOptions,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from memosd.errors import DiskFull, MemosError
from memosd.logfmt import log_event
from memosd.store import schema
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
    decode,
    decode_audit,
    decode_cube_usage,
    decode_item_usage,
    decode_vector,
    encode,
    encode_audit,
    encode_cube_usage,
    encode_item_usage,
    encode_vector,
)
from memosd.store.space import DiskSpace, is_no_space

log = logging.getLogger("memosd.store")
# The alarm is lowered only once this much is free: RocksDB itself resumes only with a write buffer (64 MiB)
# free, and a probe write on a disk with a few bytes left would just raise it again.
PROBE_MIN_FREE_BYTES = 1 << 20


class SchemaMismatch(RuntimeError):
    """The data dir was written by an incompatible schema version."""


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    opts.set_compression_type(DBCompressionType.lz4())
    opts.increase_parallelism(max(2, os.cpu_count() or 2))
    return opts


# RocksDB's default: a compaction rewrites the live blobs of the oldest quarter of the blob files.
BLOB_GC_AGE_CUTOFF = 0.25


def _blob_options() -> Options:
    """KV chunks are megabytes of fp16: keep them in blob files, out of the LSM tree, so
    compaction does not rewrite them, and do not try to compress them."""
    opts = _options()
    opts.set_compression_type(DBCompressionType.none())
    opts.set_enable_blob_files(True)
    opts.set_min_blob_size(4096)
    opts.set_blob_compression_type(DBCompressionType.none())
    opts.set_enable_blob_gc(True)
    opts.set_blob_gc_age_cutoff(BLOB_GC_AGE_CUTOFF)
    return opts


class Batch:
    """One atomic write: every put and delete lands together or not at all."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._wb = WriteBatch(raw_mode=True)

    def _put(self, cf: str, key: bytes, value: bytes) -> None:
        self._wb.put(key, value, self._store.handle(cf))

    def _delete(self, cf: str, key: bytes) -> None:
        self._wb.delete(key, self._store.handle(cf))

    def put_cube(self, cube: CubeRecord) -> None:
        self._put(schema.CF_CUBES, schema.cube_key(cube.cube_id), encode(cube))

    def put_name(self, name: str, cube_id: str) -> None:
        self._put(schema.CF_CUBE_NAMES, schema.name_key(name), cube_id.encode())

    def put_revision(self, cube_id: str, rev: RevisionRecord) -> None:
        self._put(schema.CF_REVISIONS, schema.revision_key(cube_id, rev.number), encode(rev))

    def put_version(self, cube_id: str, version: VersionRecord) -> None:
        key = schema.version_key(cube_id, version.item_id, version.born)
        self._put(schema.CF_ITEMS, key, encode(version))

    def put_vector(self, cube_id: str, vkey: int, vector: np.ndarray) -> None:
        self._put(schema.CF_VECTORS, schema.vector_key(cube_id, vkey), encode_vector(vector))

    def delete_version(self, cube_id: str, item_id: str, born: int, vkey: int) -> None:
        """One version and its vector (Purge: history itself forgets it)."""
        self._delete(schema.CF_ITEMS, schema.version_key(cube_id, item_id, born))
        self._delete(schema.CF_VECTORS, schema.vector_key(cube_id, vkey))

    def put_mount(self, mount: MountRecord) -> None:
        self._put(schema.CF_MOUNTS, schema.mount_key(mount.mount_id), encode(mount))

    def put_staged(self, mount_id: str, staged: StagedRecord, vector: np.ndarray | None) -> None:
        key = schema.staged_key(mount_id, staged.item_id)
        self._put(schema.CF_STAGING, key, encode(staged))
        if vector is None:
            self._delete(schema.CF_STAGED_VECTORS, key)
        else:
            self._put(schema.CF_STAGED_VECTORS, key, encode_vector(vector))

    def delete_staged(self, mount_id: str, item_id: str) -> None:
        key = schema.staged_key(mount_id, item_id)
        self._delete(schema.CF_STAGING, key)
        self._delete(schema.CF_STAGED_VECTORS, key)

    def clear_staging(self, mount_id: str) -> None:
        begin, end = schema.prefix_range(mount_id)
        for cf in (schema.CF_STAGING, schema.CF_STAGED_VECTORS):
            self._wb.delete_range(begin, end, self._store.handle(cf))
        self._delete(schema.CF_STAGED_ADAPTERS, schema.mount_key(mount_id))

    def delete_mount(self, mount_id: str) -> None:
        self._delete(schema.CF_MOUNTS, schema.mount_key(mount_id))
        self.clear_staging(mount_id)

    # -- adapters ---------------------------------------------------------
    def put_adapter(self, cube_id: str, adapter: AdapterRecord) -> None:
        self._put(schema.CF_ADAPTERS, schema.adapter_key(cube_id, adapter.born), encode(adapter))

    def put_adapter_files(self, cube_id: str, digest: str, config: bytes, weights: bytes | Path) -> None:
        """The adapter's files under its digest; ``weights`` as bytes or a file, read piece by piece."""
        self._put(schema.CF_ADAPTER_BLOBS, schema.adapter_config_key(cube_id, digest), config)
        step = schema.ADAPTER_CHUNK_BYTES
        if isinstance(weights, bytes):
            for index, start in enumerate(range(0, max(len(weights), 1), step)):
                self._put(schema.CF_ADAPTER_BLOBS, schema.adapter_weights_key(cube_id, digest, index),
                          weights[start:start + step])
            return
        with weights.open("rb") as f:
            index = 0
            while piece := f.read(step):
                self._put(schema.CF_ADAPTER_BLOBS, schema.adapter_weights_key(cube_id, digest, index), piece)
                del piece  # one piece in Python at a time: the batch has its copy
                index += 1

    def delete_adapter_files(self, cube_id: str, digest: str) -> None:
        begin, end = schema.adapter_blob_range(cube_id, digest)
        self._wb.delete_range(begin, end, self._store.handle(schema.CF_ADAPTER_BLOBS))

    def put_staged_adapter(self, mount_id: str, staged: StagedAdapterRecord) -> None:
        self._put(schema.CF_STAGED_ADAPTERS, schema.mount_key(mount_id), encode(staged))

    def delete_staged_adapter(self, mount_id: str) -> None:
        self._delete(schema.CF_STAGED_ADAPTERS, schema.mount_key(mount_id))

    def delete_cube(self, cube: CubeRecord) -> None:
        """Every row of the cube: its record, name, revisions, versions, vectors."""
        self._delete(schema.CF_CUBES, schema.cube_key(cube.cube_id))
        self._delete(schema.CF_CUBE_NAMES, schema.name_key(cube.name))
        begin, end = schema.prefix_range(cube.cube_id)
        for cf in schema.CUBE_SCOPED:
            self._wb.delete_range(begin, end, self._store.handle(cf))

    def put_activation(self, record: ActivationRecord, chunks: Sequence[bytes]) -> None:
        """The record and its chunks, in one batch: a record never points at missing chunks."""
        for index, chunk in enumerate(chunks):
            self._put(schema.CF_KV_CHUNKS, schema.kv_chunk_key(record.cube_id, record.cache_key, index), chunk)
        self._put(schema.CF_ACTIVATIONS, schema.activation_key(record.cube_id, record.fingerprint), encode(record))

    def delete_kv_cache(self, cube_id: str, cache_key: str) -> None:
        begin, end = schema.kv_cache_range(cube_id, cache_key)
        self._wb.delete_range(begin, end, self._store.handle(schema.CF_KV_CHUNKS))

    def delete_activation(self, record: ActivationRecord) -> None:
        """One activation and its chunks."""
        self._delete(schema.CF_ACTIVATIONS, schema.activation_key(record.cube_id, record.fingerprint))
        self.delete_kv_cache(record.cube_id, record.cache_key)

    def put_purge(self, receipt: PurgeReceipt) -> None:
        self._put(schema.CF_PURGES, schema.purge_key(receipt.cube_id, receipt.purge_id), encode(receipt))

    def put_request(self, cube_id: str, principal_id: str, request_id: str, record: RequestRecord) -> None:
        self._put(schema.CF_REQUEST_IDS, schema.request_key(cube_id, principal_id, request_id), encode(record))

    # -- usage (statistics; kernel/usage.py) -------------------------------
    def put_cube_usage(self, cube_id: str, usage: CubeUsage) -> None:
        self._put(schema.CF_USAGE, schema.usage_key(cube_id, schema.USAGE_CUBE_ROW), encode_cube_usage(usage))

    def put_item_usage(self, cube_id: str, item_id: str, usage: ItemUsage) -> None:
        self._put(schema.CF_USAGE, schema.usage_key(cube_id, item_id), encode_item_usage(usage))

    def delete_item_usage(self, cube_id: str, item_id: str) -> None:
        self._delete(schema.CF_USAGE, schema.usage_key(cube_id, item_id))

    def put_kv_block(self, cube_id: str, fingerprint: str, block_key: str, blob: bytes) -> None:
        """One stored block and its index row (kv_block_index), together."""
        key = schema.kv_block_key(cube_id, fingerprint, block_key)
        self._put(schema.CF_KV_BLOCKS, key, blob)
        self._put(schema.CF_KV_BLOCK_INDEX, key, str(len(blob)).encode())

    def delete_cube_rows(self, cube_id: str) -> None:
        """Every cube-scoped row of ``cube_id`` (not its record or name): an import that did not finish."""
        begin, end = schema.prefix_range(cube_id)
        for cf in schema.CUBE_SCOPED:
            self._wb.delete_range(begin, end, self._store.handle(cf))

    def delete_kv_blocks(self, cube_id: str) -> None:
        """Every stored KV block of the cube, for every model, with its index rows (one range delete each)."""
        begin, end = schema.kv_blocks_range(cube_id)
        for cf in (schema.CF_KV_BLOCKS, schema.CF_KV_BLOCK_INDEX):
            self._wb.delete_range(begin, end, self._store.handle(cf))

    def delete_activations(self, cube_id: str) -> None:
        """Every activation of the cube, for every model, and all its chunks."""
        begin, end = schema.prefix_range(cube_id)
        for cf in (schema.CF_ACTIVATIONS, schema.CF_KV_CHUNKS):
            self._wb.delete_range(begin, end, self._store.handle(cf))

    def __len__(self) -> int:
        return int(self._wb.len())


class Store:
    """The cube store: one RocksDB with a column family per kind of record."""

    def __init__(self, path: Path, space: DiskSpace | None = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.space = space or DiskSpace(path)
        families = {
            name: _blob_options() if name in schema.BLOB_FAMILIES else _options() for name in schema.COLUMN_FAMILIES
        }
        self._db = Rdict(str(path), _options(), column_families=families)
        self._cfs: dict[str, Rdict] = {name: self._db.get_column_family(name) for name in families}
        self._handles: dict[str, Any] = {
            name: self._db.get_column_family_handle(name) for name in families
        }
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nosync = WriteOptions()
        # KV blocks are read without RocksDB's own checksum of the blob: the block codec checks a CRC-32 of
        # every layer's bytes (and the key, model and layout in its header) on each load, and refuses a
        # damaged block; RocksDB's check of the same bytes came on top, a third of a cold load's time (its
        # CRC-32C runs in software in this build: ~50 ms of a 2,000-token, 88 MiB load).
        self._unverified = ReadOptions()
        self._unverified.set_verify_checksums(False)
        self._scrub_lock = threading.Lock()
        self._check_schema_version()

    def _check_schema_version(self) -> None:
        found = self._db.get(schema.KEY_SCHEMA_VERSION)
        if found is None:
            with self._writing():
                self._db.put(schema.KEY_SCHEMA_VERSION, schema.SCHEMA_VERSION, self._sync)
        elif found != schema.SCHEMA_VERSION:
            raise SchemaMismatch(
                f"data dir {self.path} has store schema version {found.decode()!r}; this memosd "
                f"reads version {schema.SCHEMA_VERSION.decode()!r}"
            )

    def handle(self, cf: str) -> Any:
        return self._handles[cf]

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every write: refused while the disk is full; "no space" becomes DiskFull (no path, no
        RocksDB text) and raises the alarm."""
        self.space.refuse_if_full()
        try:
            yield
        except MemosError:
            raise
        except Exception as error:
            if is_no_space(error):
                raise self.space.trip(error) from None
            raise

    def recheck_space(self) -> bool:
        """While the disk is full: lower the alarm once there is room and RocksDB takes a small synced
        probe write again (it resumes by itself after ENOSPC). Returns whether the disk is still full."""
        if not self.space.full:
            return False
        if self.space.free_bytes() < PROBE_MIN_FREE_BYTES:
            return True
        try:
            self._db.put(schema.KEY_SPACE_PROBE, str(time.time_ns()).encode(), self._sync)
        except Exception as error:
            if is_no_space(error):  # RocksDB has not resumed yet (it polls every 5 s), or space went again
                return True
            raise
        self.space.clear()
        return False

    # -- metadata -------------------------------------------------------
    def get_meta(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def put_meta(self, key: bytes, value: bytes) -> None:
        with self._writing():
            self._db.put(key, value, self._sync)

    # -- writes ---------------------------------------------------------
    def batch(self) -> Batch:
        return Batch(self)

    def write(self, batch: Batch, *, sync: bool) -> None:
        with self._writing():
            self._db.write(batch._wb, self._sync if sync else self._nosync)

    # -- reads ----------------------------------------------------------
    def _scan(self, cf: str, begin: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._cfs[cf].iter()
        it.seek(begin)
        while it.valid():
            key = it.key()
            if key >= end:
                break
            yield key, it.value()
            it.next()

    def _scan_owner(self, cf: str, owner_id: str) -> Iterator[tuple[bytes, bytes]]:
        begin, end = schema.prefix_range(owner_id)
        return self._scan(cf, begin, end)

    def iter_cubes(self) -> Iterator[CubeRecord]:
        for _key, raw in self._cfs[schema.CF_CUBES].items():
            yield decode(CubeRecord, raw)

    def get_cube(self, cube_id: str) -> CubeRecord | None:
        raw = self._cfs[schema.CF_CUBES].get(schema.cube_key(cube_id))
        return None if raw is None else decode(CubeRecord, raw)

    def get_revision(self, cube_id: str, number: int) -> RevisionRecord | None:
        raw = self._cfs[schema.CF_REVISIONS].get(schema.revision_key(cube_id, number))
        return None if raw is None else decode(RevisionRecord, raw)

    def iter_revisions(self, cube_id: str, *, newest: int) -> Iterator[RevisionRecord]:
        """Revisions from `newest` down to 1."""
        begin = schema.revision_key(cube_id, 0)
        it = self._cfs[schema.CF_REVISIONS].iter()
        it.seek_for_prev(schema.revision_key(cube_id, newest))
        while it.valid() and it.key() > begin:
            yield decode(RevisionRecord, it.value())
            it.prev()

    def iter_versions(self, cube_id: str) -> Iterator[VersionRecord]:
        for _key, raw in self._scan_owner(schema.CF_ITEMS, cube_id):
            yield decode(VersionRecord, raw)

    def get_version(self, cube_id: str, item_id: str, born: int) -> VersionRecord | None:
        raw = self._cfs[schema.CF_ITEMS].get(schema.version_key(cube_id, item_id, born))
        return None if raw is None else decode(VersionRecord, raw)

    def _multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        """One RocksDB MultiGet: much cheaper than a get per key."""
        if not keys:
            return []
        found: list[bytes | None] = self._cfs[cf].get(keys)  # type: ignore[arg-type, assignment]
        return found

    def get_versions(self, cube_id: str, refs: Sequence[tuple[str, int]]) -> list[VersionRecord | None]:
        keys = [schema.version_key(cube_id, item_id, born) for item_id, born in refs]
        raws: list[bytes | None] = self._multi_get(schema.CF_ITEMS, keys)
        return [None if raw is None else decode(VersionRecord, raw) for raw in raws]

    def get_vectors(self, cube_id: str, vkeys: Sequence[int]) -> list[np.ndarray | None]:
        keys = [schema.vector_key(cube_id, vkey) for vkey in vkeys]
        raws: list[bytes | None] = self._multi_get(schema.CF_VECTORS, keys)
        return [None if raw is None else decode_vector(raw) for raw in raws]

    def iter_vectors(self, cube_id: str) -> Iterator[tuple[int, np.ndarray]]:
        """(vkey, vector) of every stored version of the cube, in vkey order."""
        for key, raw in self._scan_owner(schema.CF_VECTORS, cube_id):
            yield int(bytes(key).rsplit(b"/", 1)[1], 16), decode_vector(raw)

    def iter_mounts(self) -> Iterator[MountRecord]:
        for _key, raw in self._cfs[schema.CF_MOUNTS].items():
            yield decode(MountRecord, raw)

    def iter_staged(self, mount_id: str) -> Iterator[tuple[StagedRecord, np.ndarray | None]]:
        vectors = self._cfs[schema.CF_STAGED_VECTORS]
        for key, raw in self._scan_owner(schema.CF_STAGING, mount_id):
            vec = vectors.get(key)
            yield decode(StagedRecord, raw), None if vec is None else decode_vector(vec)

    def cube_id_by_name(self, name: str) -> str | None:
        raw = self._cfs[schema.CF_CUBE_NAMES].get(schema.name_key(name))
        return None if raw is None else bytes(raw).decode()

    def iter_adapters(self, cube_id: str) -> Iterator[AdapterRecord]:
        """The cube's adapter versions, oldest first."""
        for _key, raw in self._scan_owner(schema.CF_ADAPTERS, cube_id):
            yield decode(AdapterRecord, raw)

    def get_adapter_files(self, cube_id: str, digest: str) -> tuple[bytes, bytes] | None:
        """(config, weights) of the adapter, or None if its blobs are missing."""
        config = self._cfs[schema.CF_ADAPTER_BLOBS].get(schema.adapter_config_key(cube_id, digest))
        if config is None:
            return None
        begin = schema.adapter_weights_key(cube_id, digest, 0)
        _, end = schema.prefix_range(f"{cube_id}/{digest}/w")
        weights = b"".join(bytes(v) for _k, v in self._scan(schema.CF_ADAPTER_BLOBS, begin, end))
        return bytes(config), weights

    def get_staged_adapter(self, mount_id: str) -> StagedAdapterRecord | None:
        raw = self._cfs[schema.CF_STAGED_ADAPTERS].get(schema.mount_key(mount_id))
        return None if raw is None else decode(StagedAdapterRecord, raw)

    def iter_jobs(self) -> Iterator[JobRecord]:
        """Every kept job, oldest first (job ids sort by creation time)."""
        for _key, raw in self._cfs[schema.CF_JOBS].items():
            yield decode(JobRecord, raw)

    def put_job(self, job: JobRecord, *, sync: bool = False) -> None:
        with self._writing():
            self._cfs[schema.CF_JOBS].put(schema.job_key(job.job_id), encode(job), self._sync if sync else self._nosync)

    def delete_job(self, job_id: str) -> None:
        with self._writing():
            self._cfs[schema.CF_JOBS].delete(schema.job_key(job_id), self._nosync)

    # -- governance: principals and grants (written synced), the audit log (appended unsynced) -----
    def iter_principals(self) -> Iterator[PrincipalRecord]:
        for _key, raw in self.scan_rows(schema.CF_PRINCIPALS):
            yield decode(PrincipalRecord, raw)

    def put_principal(self, record: PrincipalRecord) -> None:
        self.put_row(schema.CF_PRINCIPALS, schema.principal_key(record.principal_id), encode(record), sync=True)

    def iter_grants(self) -> Iterator[GrantRecord]:
        for _key, raw in self.scan_rows(schema.CF_GRANTS):
            yield decode(GrantRecord, raw)

    def put_grant(self, record: GrantRecord) -> None:
        self.put_row(schema.CF_GRANTS, schema.grant_key(record.cube_id, record.principal_id), encode(record),
                     sync=True)

    def delete_grant(self, cube_id: str, principal_id: str) -> None:
        self.delete_row(schema.CF_GRANTS, schema.grant_key(cube_id, principal_id), sync=True)

    def put_audit(self, record: StoredRecord) -> None:
        """Not synced: the WAL is, with the next synced write (see governance/audit.py)."""
        self.put_row(schema.CF_AUDIT, schema.audit_key(record.seq), encode_audit(record), sync=False)

    def iter_audit(self, after_seq: int = 0) -> Iterator[StoredRecord]:
        """Records after ``after_seq``, in seq order, as stored (unchecked)."""
        for key, raw in self.scan_rows(schema.CF_AUDIT, schema.audit_key(after_seq + 1)):
            yield decode_audit(schema.audit_seq(key), raw)

    def last_audit(self) -> StoredRecord | None:
        """The newest record. Its hash is decoded strictly: the chain's head is never a guess."""
        it = self._cfs[schema.CF_AUDIT].iter()
        it.seek_to_last()
        return decode_audit(schema.audit_seq(it.key()), it.value(), errors="strict") if it.valid() else None

    # -- usage (kernel/usage.py); written through Batch, one unsynced batch per flush ---------------
    def iter_usage(self) -> Iterator[tuple[str, str, CubeUsage | ItemUsage]]:
        """Every usage row as (cube_id, item_id, usage): a CubeUsage where item_id is
        schema.USAGE_CUBE_ROW, else the item's ItemUsage."""
        for key, raw in self.scan_rows(schema.CF_USAGE):
            cube_id, item_id = schema.split_usage_key(key)
            if item_id == schema.USAGE_CUBE_ROW:
                yield cube_id, item_id, decode_cube_usage(raw)
            else:
                yield cube_id, item_id, decode_item_usage(raw)

    # -- raw rows: for the store package (and tests that tamper with rows) only -------------------
    def put_row(self, cf: str, key: bytes, value: bytes, *, sync: bool) -> None:
        with self._writing():
            self._cfs[cf].put(key, value, self._sync if sync else self._nosync)

    def delete_row(self, cf: str, key: bytes, *, sync: bool) -> None:
        with self._writing():
            self._cfs[cf].delete(key, self._sync if sync else self._nosync)

    def scan_rows(self, cf: str, begin: bytes = b"", end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Rows with begin <= key < end (no end: to the last), in key order."""
        it = self._cfs[cf].iter()
        it.seek(begin) if begin else it.seek_to_first()
        while it.valid():
            key = it.key()
            if end is not None and key >= end:
                break
            yield key, it.value()
            it.next()

    def get_activation(self, cube_id: str, fingerprint: str) -> ActivationRecord | None:
        raw = self._cfs[schema.CF_ACTIVATIONS].get(schema.activation_key(cube_id, fingerprint))
        return None if raw is None else decode(ActivationRecord, raw)

    def iter_activations(self, cube_id: str | None = None) -> Iterator[ActivationRecord]:
        """The activations of one cube (every model), or of every cube."""
        rows = (self._scan_owner(schema.CF_ACTIVATIONS, cube_id) if cube_id is not None
                else self._cfs[schema.CF_ACTIVATIONS].items())
        for _key, raw in rows:
            yield decode(ActivationRecord, raw)

    def iter_purges(self, cube_id: str) -> Iterator[PurgeReceipt]:
        """The cube's purges, oldest first (purge ids sort by time)."""
        for _key, raw in self._scan_owner(schema.CF_PURGES, cube_id):
            yield decode(PurgeReceipt, raw)

    def get_request(self, cube_id: str, principal_id: str, request_id: str) -> RequestRecord | None:
        raw = self._cfs[schema.CF_REQUEST_IDS].get(schema.request_key(cube_id, principal_id, request_id))
        return None if raw is None else decode(RequestRecord, raw)

    def iter_requests(self, cube_id: str) -> Iterator[tuple[str, str, RequestRecord]]:
        """The cube's request ids: (principal_id, request_id, record)."""
        for key, raw in self._scan_owner(schema.CF_REQUEST_IDS, cube_id):
            _cube_id, principal_id, request_id = schema.split_request_key(key)
            yield principal_id, request_id, decode(RequestRecord, raw)

    def delete_requests_before(self, time_ns: int) -> int:
        """Delete every request id recorded before ``time_ns`` (one unsynced batch); returns how many."""
        batch = self.batch()
        for key, raw in self.scan_rows(schema.CF_REQUEST_IDS):
            if decode(RequestRecord, raw).time_ns < time_ns:
                batch._delete(schema.CF_REQUEST_IDS, bytes(key))
        removed = len(batch)
        if removed:
            self.write(batch, sync=False)
        return removed

    def get_kv_chunks(self, record: ActivationRecord) -> list[bytes] | None:
        """The record's chunks in order, or None if any is missing."""
        keys = [schema.kv_chunk_key(record.cube_id, record.cache_key, i) for i in range(record.chunk_count)]
        found = self._multi_get(schema.CF_KV_CHUNKS, keys)
        if any(chunk is None for chunk in found):
            return None
        return [bytes(chunk) for chunk in found if chunk is not None]

    # -- KV blocks of a paged engine (store/blocks.py): unsynced, a lost block is recomputed -----------
    # Each block is two rows written and deleted together: the blob (kv_blocks) and its size
    # (kv_block_index), which answers has/count/bytes without loading megabytes of blob (schema.py).
    def put_kv_block(self, cube_id: str, fingerprint: str, block_key: str, blob: bytes) -> None:
        batch = self.batch()
        batch.put_kv_block(cube_id, fingerprint, block_key, blob)
        self.write(batch, sync=False)

    def get_kv_block(self, cube_id: str, fingerprint: str, block_key: str) -> bytes | None:
        """The stored blob as it is, unchecked by RocksDB (the caller's codec checks it: see ``_unverified``)."""
        raw = self._cfs[schema.CF_KV_BLOCKS].get(schema.kv_block_key(cube_id, fingerprint, block_key),
                                                 read_opt=self._unverified)
        return None if raw is None else bytes(raw)

    def has_kv_block(self, cube_id: str, fingerprint: str, block_key: str) -> bool:
        return self._cfs[schema.CF_KV_BLOCK_INDEX].get(schema.kv_block_key(cube_id, fingerprint, block_key)) is not None

    def delete_kv_block_keys(self, cube_id: str, fingerprint: str, block_keys: Sequence[str]) -> None:
        """These blocks of the cube, if stored (one unsynced batch)."""
        batch = self.batch()
        for block_key in block_keys:
            key = schema.kv_block_key(cube_id, fingerprint, block_key)
            batch._delete(schema.CF_KV_BLOCKS, key)
            batch._delete(schema.CF_KV_BLOCK_INDEX, key)
        if len(batch):
            self.write(batch, sync=False)

    def delete_kv_blocks(self, cube_id: str, *, sync: bool) -> None:
        """Every stored block of the cube, for every model (Evict's delete; Purge uses the Batch's, in its batch)."""
        batch = self.batch()
        batch.delete_kv_blocks(cube_id)
        self.write(batch, sync=sync)

    def _kv_block_index(self, cube_id: str, fingerprint: str | None) -> Iterator[tuple[bytes, bytes]]:
        begin, end = schema.kv_blocks_range(cube_id, fingerprint)
        return self._scan(schema.CF_KV_BLOCK_INDEX, begin, end)

    def iter_kv_blocks(self, cube_id: str) -> Iterator[tuple[str, str, bytes]]:
        """(fingerprint, block key, blob) of every block stored for the cube, every model's."""
        for key, blob in self._scan_owner(schema.CF_KV_BLOCKS, cube_id):
            _cube_id, fingerprint, block_key = bytes(key).decode().split("/")
            yield fingerprint, block_key, bytes(blob)

    def iter_kv_block_keys(self, cube_id: str, fingerprint: str | None = None) -> Iterator[str]:
        """The block keys stored for the cube (every model's, or one's), in key order."""
        for key, _size in self._kv_block_index(cube_id, fingerprint):
            yield bytes(key).decode().rsplit("/", 1)[1]

    def kv_block_bytes(self, cube_id: str, fingerprint: str | None = None) -> int:
        """The bytes of the cube's stored blocks (every model's, or one's), from the index."""
        return sum(int(size) for _key, size in self._kv_block_index(cube_id, fingerprint))

    # -- maintenance ----------------------------------------------------
    def sweep_orphans(self) -> list[str]:
        """Delete the cube-scoped rows of cubes that have no record (an ImportCube cut short by a crash:
        its rows are written before the record that makes the cube exist). Returns those cube ids.

        One seek per cube per family: each family's keys are grouped by cube id."""
        known = {record.cube_id for record in self.iter_cubes()}
        orphans: set[str] = set()
        for cf in schema.CUBE_SCOPED:
            it = self._cfs[cf].iter()
            it.seek_to_first()
            while it.valid():
                cube_id = bytes(it.key()).split(b"/", 1)[0].decode()
                if cube_id not in known:
                    orphans.add(cube_id)
                it.seek(schema.prefix_range(cube_id)[1])
            del it
        if orphans:
            batch = self.batch()
            for cube_id in sorted(orphans):
                batch.delete_cube_rows(cube_id)
            self.write(batch, sync=True)
        return sorted(orphans)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def compact(self) -> None:
        with self._writing():
            for cf in self._cfs.values():
                cf.compact_range(None, None)

    def scrub(self, cube_id: str, *, kv_chunks: bool, kv_blocks: bool = False) -> None:
        """Leave no copy of the cube's deleted rows in any file of the data dir (after a Purge).

        A delete only writes a tombstone: the old value stays in the WAL, in SST
        files until a compaction drops it, and in blob files until blob GC. So:
        flush every family (the WAL files that held the rows become obsolete and
        are deleted), then compact down to the bottommost level, which drops
        the tombstones with the values they cover and deletes the old SSTs. The
        cube's key range is compacted in its families, the small staging
        families whole (their keys are mount ids). With ``kv_chunks`` the whole
        kv_chunks family is compacted with blob GC forced on every blob file,
        since a blob file mixes the caches of many cubes: this rewrites every
        persisted KV cache of every cube, the costly part. ``kv_blocks`` does
        the same to the kv_blocks family (a paged engine's stored blocks).

        Assumes no long-lived iterator or snapshot pins the old files (the
        store holds none past a call)."""
        force = CompactOptions()
        force.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        begin, end = schema.prefix_range(cube_id)
        with self._scrub_lock, self._writing():
            self.flush()
            for cf in (schema.CF_ITEMS, schema.CF_VECTORS, schema.CF_ACTIVATIONS, schema.CF_REQUEST_IDS):
                self._cfs[cf].compact_range(begin, end, force)
            for cf in (schema.CF_STAGING, schema.CF_STAGED_VECTORS):
                self._cfs[cf].compact_range(None, None, force)
            blob_families = [cf for cf, wanted in ((schema.CF_KV_CHUNKS, kv_chunks), (schema.CF_KV_BLOCKS, kv_blocks))
                             if wanted]
            for cf in blob_families:
                blobs = self._cfs[cf]
                blobs.set_options({"blob_garbage_collection_age_cutoff": "1.0"})
                try:
                    blobs.compact_range(None, None, force)
                finally:
                    blobs.set_options({"blob_garbage_collection_age_cutoff": str(BLOB_GC_AGE_CUTOFF)})

    def flush(self) -> None:
        with self._writing():
            for cf in self._cfs.values():
                cf.flush(True)
            self._db.flush(True)
            self._db.flush_wal(True)

    def close(self) -> None:
        try:
            self.flush()
        except DiskFull:  # nothing is lost: what the memtables hold is in the WAL, replayed at the next open
            log_event(log, "store_flush_skipped", level=logging.WARNING, reason="disk full",
                      hint="the WAL is replayed at the next start")
        # Each column-family handle keeps the database open (and its LOCK held) until it is
        # dropped, so drop them all before closing: the same process can then reopen it.
        self._cfs.clear()
        self._handles.clear()
        try:
            self._db.close()
        except Exception as error:  # close() flushes first, which fails the same way; the DB still closes
            if not is_no_space(error):
                raise
