"""ExportCube and ImportCube in the kernel: a cube as a ``memosd-cube`` archive and back (docs/ARCHIVE.md).

Export writes, under the cube's lock (commits, purges and compaction of that cube
wait; other cubes do not), the durable part: the cube record, every revision,
every item version and its vector, the adapter versions and files, the purge
receipts. Then, with the lock released, the KV caches (``with_kv``): they are
caches, content-addressed, and their records are written with their chunks, so
a race with Evict can only drop one, never mismatch one.

Import is staged, then committed in one step:
1. ``archive.verify`` checks the whole file (framing, header, trailer, counts, sha256);
2. every frame is decoded and checked (ids, keys, revision numbers, vkeys, one vector a version, adapter
   digests), and its rows are written under the target cube id, with no cube record yet: rows without a
   record are invisible, and ``Store.sweep_orphans`` deletes them at the next start if the daemon dies;
3. the cube is loaded from those rows as at start (catalog, adapters, tombstones, indexes caught up);
4. under the tables' lock the name is checked again and the record and the name are written in one synced
   batch: the cube exists from that write on. A failure before it deletes the rows and the index files.

The cube keeps the source's id where it is free here (a restore, a move to another daemon), so its KV
caches, salted with the id, still match; beside its source it gets a new id and its KV is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from memosd.errors import ArchiveInvalid, MoveRefused
from memosd.kernel import clock, ids, validate
from memosd.kernel.cubes import check_name_free
from memosd.kernel.indexes import Indexes
from memosd.kernel.memory_text import MEMORY_TEXT_RECIPE, memory_text
from memosd.kernel.ports import NO_DIRECTORY, DirectoryPort, EmbedderPort
from memosd.kernel.state import CubeState
from memosd.kernel.table import Tables
from memosd.kernel.types import CubeInfo
from memosd.logfmt import log_event
from memosd.store import archive
from memosd.store.archive import ArchiveSummary, ArchiveWriter
from memosd.store.records import (
    ActivationRecord,
    AdapterRecord,
    CubeRecord,
    PurgeReceipt,
    RevisionRecord,
    VersionRecord,
    decode,
    encode,
)
from memosd.store.rocks import Batch, Store

log = logging.getLogger("memosd.kernel")

# Frame kinds (docs/ARCHIVE.md): the payload of each is the record's JSON (store/records.py), a vector,
# or a blob frame (JSON meta + bytes).
CUBE, REVISION, VERSION, VECTOR = b"C", b"R", b"V", b"E"
ADAPTER, ADAPTER_FILE, PURGE = b"A", b"F", b"P"
ACTIVATION, KV_CHUNK, KV_BLOCK = b"T", b"K", b"B"
KV_KINDS = (ACTIVATION, KV_CHUNK, KV_BLOCK)
FLUSH_BYTES = 32 << 20  # an import writes its rows in batches of about this much
_KEY_PART = re.compile(r"\A[0-9A-Za-z_.:-]{1,128}\Z")  # a fingerprint, cache or block key: one key segment
_DIGEST = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass
class ImportResult:
    cube: CubeInfo
    archive: ArchiveSummary
    reembedded: bool
    kept_cube_id: bool
    kv_loaded: int = 0
    kv_skipped: int = 0
    kv_skipped_reason: str = ""


@dataclass
class _Adapter:
    """An adapter's files as they arrive: the config, then the weights pieces in order."""

    config: bytes | None = None
    pieces: list[bytes] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)

    @property
    def weights_bytes(self) -> int:
        return sum(map(len, self.pieces))


def _inconsistent(message: str, **metadata: object) -> ArchiveInvalid:
    return ArchiveInvalid(f"the archive is inconsistent: {message}; nothing was imported",
                          problem="inconsistent", **metadata)


def _decode(cls: type[Any], payload: bytes, offset: int) -> Any:
    try:
        return decode(cls, payload)
    except (ValueError, TypeError) as error:
        raise _inconsistent(f"the {cls.__name__} at byte {offset} does not decode ({type(error).__name__})",
                            offset=offset) from None


def _key_part(value: object, what: str, offset: int) -> str:
    if not isinstance(value, str) or not _KEY_PART.match(value):
        raise _inconsistent(f"the {what} at byte {offset} is not a valid key", offset=offset)
    return value


def _section(header: dict[str, Any], key: str) -> dict[str, Any]:
    """A JSON object of the header ({} when absent or not an object: the checks that use it then fail)."""
    value = header.get(key)
    return value if isinstance(value, dict) else {}


def _int(value: object, what: str, offset: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _inconsistent(f"{what} at byte {offset} is not a non-negative integer", offset=offset)
    return value


class CubePorter:
    def __init__(self, tables: Tables, store: Store, indexes: Indexes, embedder: EmbedderPort, *,
                 sync: bool, directory: DirectoryPort = NO_DIRECTORY) -> None:
        self._directory = directory
        self._tables = tables
        self._store = store
        self._indexes = indexes
        self._embedder = embedder
        self._sync = sync
        self._reserved: set[str] = set()  # cube ids of imports in progress (under the tables' lock)

    # -- export ---------------------------------------------------------
    def export_cube(self, ref: str, out: IO[bytes], *, with_kv: bool) -> tuple[CubeInfo, ArchiveSummary]:
        cube = self._tables.cube(ref)
        with cube.lock:
            locked = time.perf_counter()
            record = replace(cube.record)
            info = self._tables.cube_info(cube)
            header = {"created_ns": clock.now_ns(), "with_kv": with_kv,
                      "source": {"cube_id": record.cube_id, "name": record.name, "head": record.head},
                      "embedder": {"fingerprint": self._embedder.fingerprint, "dim": self._embedder.dim},
                      "memory_text": MEMORY_TEXT_RECIPE}
            writer = ArchiveWriter(out, header)
            writer.frame(CUBE, encode(record))
            for revision in reversed(list(self._store.iter_revisions(record.cube_id, newest=record.head))):
                writer.frame(REVISION, encode(revision))
            for version in self._store.iter_versions(record.cube_id):
                writer.frame(VERSION, encode(version))
            for vkey, vector in self._store.iter_vectors(record.cube_id):
                writer.vector(VECTOR, vkey, vector)
            for adapter in cube.adapters:
                writer.frame(ADAPTER, encode(adapter))
            for digest in dict.fromkeys(a.digest for a in cube.adapters):
                files = self._store.get_adapter_files(record.cube_id, digest)
                if files is None:
                    continue  # an adapter row without its files: the import refuses that version
                self._write_adapter_files(writer, digest, *files)
            for receipt in self._store.iter_purges(record.cube_id):
                writer.frame(PURGE, encode(receipt))
            locked_ms = round((time.perf_counter() - locked) * 1000, 1)
        if with_kv:
            self._write_kv(writer, record.cube_id)
        summary = writer.finish()
        log_event(log, "export_cube", cube=record.cube_id, bytes=summary.size_bytes, locked_ms=locked_ms,
                  frames=",".join(f"{kind}={n}" for kind, n in sorted(summary.counts.items())))
        return info, summary

    @staticmethod
    def _write_adapter_files(writer: ArchiveWriter, digest: str, config: bytes, weights: bytes) -> None:
        writer.blob(ADAPTER_FILE, {"digest": digest, "file": "config"}, config)
        step = 8 << 20
        for index, start in enumerate(range(0, len(weights), step)):
            writer.blob(ADAPTER_FILE, {"digest": digest, "file": "weights", "index": index},
                        weights[start:start + step])

    def _write_kv(self, writer: ArchiveWriter, cube_id: str) -> None:
        for activation in self._store.iter_activations(cube_id):
            chunks = self._store.get_kv_chunks(activation) if activation.chunk_count else []
            if chunks is None:
                continue  # evicted meanwhile
            writer.frame(ACTIVATION, encode(activation))
            for index, chunk in enumerate(chunks):
                writer.blob(KV_CHUNK, {"fingerprint": activation.fingerprint, "index": index}, chunk)
        for fingerprint, block_key, blob in self._store.iter_kv_blocks(cube_id):
            writer.blob(KV_BLOCK, {"fingerprint": fingerprint, "key": block_key}, blob)

    # -- import ---------------------------------------------------------
    def import_cube(self, path: Path, name: str, owner: str, accept_kv: Callable[[str], bool],
                    kv_unavailable: str = "", *, moved_from: str = "", cube_id: str = "") -> ImportResult:
        """Import the archive at ``path`` as cube ``name`` owned by ``owner``. KV caches load where
        ``accept_kv(fingerprint)`` holds (this daemon's model); ``kv_unavailable`` says why none can.

        ``moved_from`` (a cluster move, cluster/move.py): the cube ``cube_id`` arrives from that node, already
        in the directory under it: it keeps its id, name and owner exactly (or is refused), is not claimed,
        and stays moving (no change taken) until the move settles it."""
        if not moved_from:
            validate.cube_name(name)
            check_name_free(self._store, name)
        summary = archive.verify(path)
        header = summary.header
        source = _section(header, "source")
        source_id = str(source.get("cube_id") or "")
        if moved_from:
            if source_id != cube_id:
                raise _inconsistent(f"it holds cube {source_id!r}, not the moved cube {cube_id!r}")
            name = str(source.get("name") or "")
            validate.cube_name(name)  # its name is checked free with the id below, and again at the commit
        with self._tables.lock:
            kept = (bool(ids.CUBE_ID_RE.match(source_id)) and source_id not in self._tables.cubes
                    and source_id not in self._reserved and self._store.get_cube(source_id) is None)
            if moved_from and not kept:
                raise MoveRefused(f"this node already holds cube {cube_id} (or is receiving it): an operator must "
                                  "remove that copy before the cube can move here", cube=cube_id)
            if moved_from:
                check_name_free(self._store, name)
            cube_id = source_id if kept else ids.new_id(ids.CUBE_PREFIX)
            self._reserved.add(cube_id)
        if not moved_from:
            cube_id, kept = self._claim(cube_id, name, kept, owner)
        loader = _Loader(self._store, self._embedder, cube_id, header, accept_kv if kept else (lambda _: False))
        cube: CubeState | None = None
        try:
            record = loader.load(path)
            record = replace(record, cube_id=cube_id, name=name, owner=record.owner if moved_from else owner)
            cube = self._indexes.load(record)
            if moved_from:  # before any other thread can see it: no change until the move settles it
                cube.moving, cube.move_direction, cube.move_frozen = moved_from, "from", True
            with self._tables.lock:
                check_name_free(self._store, name)
                batch = self._store.batch()
                batch.put_cube(record)
                batch.put_name(name, cube_id)
                self._store.write(batch, sync=self._sync)
                self._tables.cubes[cube_id] = cube
        except BaseException:
            self._discard(cube_id, cube)
            if not moved_from:
                self._directory.release(cube_id)
            raise
        finally:
            with self._tables.lock:
                self._reserved.discard(cube_id)
        kv_reason = "" if not loader.kv_skipped else (
            "the cube has a new id here (its source's is taken), and KV caches are salted with the id"
            if not kept else kv_unavailable or "they were made by another model than this daemon's")
        log_event(log, "import_cube", cube=cube_id, name=name, kept_id=kept, reembedded=loader.reembed,
                  revisions=record.head, versions=loader.versions, kv_loaded=loader.kv_loaded,
                  kv_skipped=loader.kv_skipped, moved_from=moved_from)
        return ImportResult(self._tables.cube_info(cube), summary, loader.reembed, kept, loader.kv_loaded,
                            loader.kv_skipped, kv_reason)

    def _claim(self, cube_id: str, name: str, kept: bool, owner: str) -> tuple[str, bool]:
        """Claim the id in the cluster's directory, outside the lock; an id claimed elsewhere is not kept."""
        try:
            if not self._directory.claim(cube_id, name, owner):
                with self._tables.lock:
                    self._reserved.discard(cube_id)
                    kept, cube_id = False, ids.new_id(ids.CUBE_PREFIX)
                    self._reserved.add(cube_id)
                self._directory.claim(cube_id, name, owner)
        except BaseException:
            with self._tables.lock:
                self._reserved.discard(cube_id)
            raise
        return cube_id, kept

    def _discard(self, cube_id: str, cube: CubeState | None) -> None:
        """Delete what an import that failed wrote: its rows and its index files. If that fails too (the disk
        is full), the rows stay invisible and the next start sweeps them (Store.sweep_orphans)."""
        try:
            if cube is not None:
                cube.index.destroy()
            self._indexes.remove_files(cube_id)
            cleanup = self._store.batch()
            cleanup.delete_cube_rows(cube_id)
            self._store.write(cleanup, sync=False)
        except Exception as error:
            log_event(log, "import_cleanup_failed", level=logging.WARNING, cube=cube_id, error=type(error).__name__,
                      hint="the rows are swept at the next start")


class _Loader:
    """Pass 2 of an import: decode and check every frame, and write its rows under ``cube_id``."""

    def __init__(self, store: Store, embedder: EmbedderPort, cube_id: str, header: dict[str, Any],
                 accept_kv: Callable[[str], bool]) -> None:
        self._store = store
        self._embedder = embedder
        self._cube_id = cube_id
        self._accept_kv = accept_kv
        source_embedder = _section(header, "embedder")
        self.dim = source_embedder.get("dim")
        # Vectors are recomputed when they were made by another embedder, or from another memory text.
        self.reembed = (source_embedder.get("fingerprint") != embedder.fingerprint or self.dim != embedder.dim
                        or header.get("memory_text") != MEMORY_TEXT_RECIPE)
        self._batch: Batch = store.batch()
        self._pending = 0
        self.versions = 0
        self.kv_loaded = 0
        self.kv_skipped = 0

    def _grew(self, size: int) -> None:
        """``size`` more bytes are in the batch: write it once it holds FLUSH_BYTES."""
        self._pending += size
        if self._pending >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if len(self._batch):
            self._store.write(self._batch, sync=False)
        self._batch, self._pending = self._store.batch(), 0

    def load(self, path: Path) -> CubeRecord:
        record: CubeRecord | None = None
        revisions: set[int] = set()
        vkeys: dict[int, VersionRecord] = {}
        seen_versions: set[tuple[str, int]] = set()
        vectors: set[int] = set()
        adapters: dict[int, AdapterRecord] = {}  # by born revision
        files: dict[str, _Adapter] = {}
        activations: dict[str, tuple[ActivationRecord, list[bytes]]] = {}
        to_embed: list[VersionRecord] = []
        cube_id = self._cube_id
        for kind, payload, offset in archive.frames(path):
            if record is None and kind != CUBE:
                raise _inconsistent(f"the frame at byte {offset} comes before the cube record", offset=offset)
            if kind == CUBE:
                if record is not None:
                    raise _inconsistent(f"a second cube record at byte {offset}", offset=offset)
                record = _decode(CubeRecord, payload, offset)
                _int(record.head, "the cube's head", offset)
                _int(record.next_vkey, "the cube's next_vkey", offset)
            elif kind == REVISION:
                revision = _decode(RevisionRecord, payload, offset)
                number = _int(revision.number, "a revision number", offset)
                assert record is not None
                if not 1 <= number <= record.head or number in revisions:
                    raise _inconsistent(f"revision {number} at byte {offset} is repeated or past HEAD "
                                        f"{record.head}", offset=offset)
                revisions.add(number)
                self._batch.put_revision(cube_id, revision)
                self._grew(len(payload))
            elif kind == VERSION:
                assert record is not None
                version = self._check_version(_decode(VersionRecord, payload, offset), record, offset,
                                              vkeys, seen_versions)
                self.versions += 1
                if self.reembed:
                    to_embed.append(version)
                    if len(to_embed) >= 256:
                        self._embed(to_embed)
                self._batch.put_version(cube_id, version)
                self._grew(len(payload))
            elif kind == VECTOR:
                if self.reembed:
                    continue  # recomputed from the text instead
                vkey, vector = archive.vector(payload, offset, int(self.dim or 0))
                if vkey not in vkeys or vkey in vectors:
                    raise _inconsistent(f"the vector at byte {offset} is for no version, or a second one for "
                                        f"vkey {vkey}", offset=offset)
                vectors.add(vkey)
                self._batch.put_vector(cube_id, vkey, vector)
                self._grew(len(payload))
            elif kind == ADAPTER:
                adapter = _decode(AdapterRecord, payload, offset)
                if not isinstance(adapter.digest, str) or not _DIGEST.match(adapter.digest):
                    raise _inconsistent(f"the adapter at byte {offset} has no valid digest", offset=offset)
                adapters[adapter.born] = adapter
                self._batch.put_adapter(cube_id, adapter)
                self._grew(len(payload))
            elif kind == ADAPTER_FILE:
                self._adapter_file(payload, offset, files)
            elif kind == PURGE:
                receipt = _decode(PurgeReceipt, payload, offset)
                _key_part(receipt.purge_id, "purge id", offset)
                receipt = replace(receipt, cube_id=cube_id)
                self._batch.put_purge(receipt)
                self._grew(len(payload))
            elif kind in KV_KINDS:
                self._kv(kind, payload, offset, activations)
            else:
                raise _inconsistent(f"memosd-cube/1 has no frame kind {kind!r} (byte {offset})", offset=offset)
        if record is None:
            raise _inconsistent("it holds no cube record")
        if self.reembed and to_embed:
            self._embed(to_embed)
        missing_revisions = record.head - len(revisions)
        if missing_revisions:
            raise _inconsistent(f"{missing_revisions} of its {record.head} revisions are missing")
        if not self.reembed and len(vectors) != len(vkeys):
            raise _inconsistent(f"{len(vkeys) - len(vectors)} item versions have no vector")
        for adapter in adapters.values():
            got = files.get(adapter.digest)
            if (got is None or got.config is None or got.digest.hexdigest() != adapter.digest
                    or len(got.config) != adapter.config_bytes or got.weights_bytes != adapter.weights_bytes):
                raise _inconsistent(f"the files of adapter {adapter.digest[:12]} are missing or do not match "
                                    "its digest and sizes")
        for digest in {adapter.digest for adapter in adapters.values()}:
            config, weights = files[digest].config or b"", b"".join(files[digest].pieces)
            self._batch.put_adapter_files(cube_id, digest, config, weights)
            self._grew(len(config) + len(weights))
        for activation, chunks in activations.values():
            if len(chunks) != activation.chunk_count:
                self.kv_skipped += 1  # an incomplete cache is only a cache: recomputed when needed
                continue
            self._batch.put_activation(activation, chunks)
            self._grew(sum(map(len, chunks)))
            self.kv_loaded += 1
        self._flush()
        return record

    def _check_version(self, version: VersionRecord, record: CubeRecord, offset: int,
                       vkeys: dict[int, VersionRecord], seen: set[tuple[str, int]]) -> VersionRecord:
        if not isinstance(version.item_id, str) or not ids.ITEM_ID_RE.match(version.item_id):
            raise _inconsistent(f"the version at byte {offset} has no valid item id", offset=offset)
        vkey = _int(version.vkey, "a version's vkey", offset)
        born = _int(version.born, "a version's born revision", offset)
        died = _int(version.died, "a version's died revision", offset)
        if not 1 <= born <= record.head or (died and not born < died <= record.head):
            raise _inconsistent(f"the version at byte {offset} lives outside revisions 1..{record.head}",
                                offset=offset)
        if vkey in vkeys or not 0 < vkey < record.next_vkey or (version.item_id, born) in seen:
            raise _inconsistent(f"the version at byte {offset} repeats a vkey or version, or is past next_vkey",
                                offset=offset)
        if not isinstance(version.text, str) or not isinstance(version.tags, list):
            raise _inconsistent(f"the version at byte {offset} has a malformed text or tags", offset=offset)
        vkeys[vkey] = version
        seen.add((version.item_id, born))
        return version

    def _embed(self, versions: list[VersionRecord]) -> None:
        vectors = self._embedder.embed([memory_text(v.text, v.speaker, v.event_ns) for v in versions])
        for version, vector in zip(versions, vectors, strict=True):
            self._batch.put_vector(self._cube_id, version.vkey, vector)
            self._grew(vector.nbytes)
        versions.clear()

    @staticmethod
    def _adapter_file(payload: bytes, offset: int, files: dict[str, _Adapter]) -> None:
        """Collect an adapter's files (config, then weights pieces 0, 1, ...); written once checked."""
        meta, data = archive.blob(payload, offset)
        digest = meta.get("digest")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise _inconsistent(f"the adapter file at byte {offset} names no valid digest", offset=offset)
        got = files.setdefault(digest, _Adapter())
        if meta.get("file") == "config" and got.config is None:
            got.config = data
        elif meta.get("file") == "weights" and got.config is not None and meta.get("index") == len(got.pieces):
            got.pieces.append(data)
        else:
            raise _inconsistent(f"the adapter file at byte {offset} is out of order", offset=offset)
        got.digest.update(data)

    def _kv(self, kind: bytes, payload: bytes, offset: int,
            activations: dict[str, tuple[ActivationRecord, list[bytes]]]) -> None:
        cube_id = self._cube_id
        if kind == ACTIVATION:
            activation = _decode(ActivationRecord, payload, offset)
            fingerprint = _key_part(activation.fingerprint, "activation's fingerprint", offset)
            _key_part(activation.cache_key, "activation's cache key", offset)
            if self._accept_kv(fingerprint):
                activations[fingerprint] = (replace(activation, cube_id=cube_id), [])
            else:
                self.kv_skipped += 1
            return
        meta, data = archive.blob(payload, offset)
        fingerprint = _key_part(meta.get("fingerprint"), "KV fingerprint", offset)
        if kind == KV_CHUNK:
            entry = activations.get(fingerprint)
            if entry is not None and meta.get("index") == len(entry[1]):
                entry[1].append(data)
            return
        block_key = _key_part(meta.get("key"), "KV block key", offset)
        if self._accept_kv(fingerprint):
            self._batch.put_kv_block(cube_id, fingerprint, block_key, data)
            self._grew(len(data))
            self.kv_loaded += 1
        else:
            self.kv_skipped += 1
