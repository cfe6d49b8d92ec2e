"""ImportAdapter, ExportAdapter, and making a cube's adapter resident for the model.

An upload is checked against its header as it arrives (the declared sizes
against ``limits.max_adapter_bytes`` before any chunk is read; a stream is
refused at the first chunk past what the header declared), its weights spooled
to a file under ``<data dir>/uploads/`` (not a growing buffer), validated from
there tensor by tensor on the worker thread (``validate``), and only then
staged in the mount: a refused upload changes nothing and leaves no file. Export streams the stored files back unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memos.v1 import memos_pb2 as pb
from memos.v1 import types_pb2 as t

from memosd.activation.host import ModelHost
from memosd.errors import (
    AdapterInvalid,
    AdapterMismatch,
    AdapterNotFound,
    AdapterTooLarge,
    InvalidField,
    ModelUnavailable,
)
from memosd.kernel.kernel import Kernel
from memosd.kernel.requests import RequestRef
from memosd.kernel.state import MountState
from memosd.kernel.types import MountInfo
from memosd.logfmt import log_event
from memosd.runtime import adapters as rt
from memosd.runtime.model import LoadedModel
from memosd.store.records import AdapterRecord

log = logging.getLogger("memosd.parametric")

EXPORT_CHUNK_BYTES = 1 << 20
SPOOL_PREFIX = "upload-"
SPOOL_READ_BYTES = 1 << 20
_FILES = {t.ADAPTER_FILE_CONFIG: 0, t.ADAPTER_FILE_WEIGHTS: 1}


@dataclass(frozen=True)
class Upload:
    mount_id: str
    config: bytes  # at most rt.MAX_CONFIG_BYTES
    weights: Path  # the spool file (deleted when ``receive`` exits)
    weights_bytes: int
    digest: str  # sha256 of the config bytes, then the weights bytes
    declared_digest: str  # as the client declared it; "" if it did not


@contextmanager
def receive(requests: Iterator[pb.ImportAdapterRequest], limit: int, spool: Path) -> Iterator[Upload]:
    """Receive an upload: a header, then chunks, checked against the header as they come. The weights are
    spooled to a file under ``spool`` (never a growing buffer) that is deleted on exit, whatever happens.
    Raises AdapterInvalid / AdapterTooLarge / InvalidField."""
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidField("the first ImportAdapter message must be the header (mount_id and file sizes)",
                           field="header")
    header = first.header
    declared = (header.config_bytes, header.weights_bytes)
    if sum(declared) > limit:
        raise AdapterTooLarge(f"the adapter is {sum(declared)} bytes; the daemon takes at most {limit} "
                              "(limits.max_adapter_bytes)", size=sum(declared), limit=limit)
    if not header.config_bytes or not header.weights_bytes:
        raise AdapterInvalid("the header must give the sizes of both adapter_config.json and "
                             "adapter_model.safetensors")
    if header.config_bytes > rt.MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"adapter_config.json is {header.config_bytes} bytes; at most {rt.MAX_CONFIG_BYTES} "
                             "are accepted", key="adapter_config.json")
    spool.mkdir(parents=True, exist_ok=True)
    config = bytearray()
    sizes = [0, 0]
    with tempfile.NamedTemporaryFile(dir=spool, prefix=SPOOL_PREFIX) as weights:
        for request in requests:
            if request.WhichOneof("part") != "chunk" or request.chunk.file not in _FILES:
                raise InvalidField("after the header, every message must be a chunk of ADAPTER_FILE_CONFIG or "
                                   "ADAPTER_FILE_WEIGHTS", field="chunk.file")
            index = _FILES[request.chunk.file]
            sizes[index] += len(request.chunk.data)
            if sizes[index] > declared[index]:  # at the first chunk past the header's size
                raise AdapterInvalid(f"more bytes of {_name(index)} than the {declared[index]} the header "
                                     "declared")
            if index == 0:
                config += request.chunk.data
            else:
                weights.write(request.chunk.data)
        for index in (0, 1):
            if sizes[index] != declared[index]:
                raise AdapterInvalid(f"the upload is truncated: {sizes[index]} of {declared[index]} bytes of "
                                     f"{_name(index)} arrived; send the whole file")
        weights.flush()
        # The digest covers the config first: chunks of the two files may come in any order, so the weights
        # are hashed from the file once both are whole.
        digest = hashlib.sha256(config)
        weights.seek(0)
        buffer = bytearray(SPOOL_READ_BYTES)
        view = memoryview(buffer)
        while size := weights.readinto(buffer):
            digest.update(view[:size])
        yield Upload(header.mount_id, bytes(config), Path(weights.name), sizes[1], digest.hexdigest(),
                     header.digest)


def validate(loaded: LoadedModel, config: bytes, weights: bytes | Path, digest: str) -> rt.ParsedAdapter:
    """On the worker: check an upload's files as a supported peft LoRA adapter (the config's allow-list, the
    weights' keys, dtypes, shapes and values) and against the model, without keeping its tensors. Raises
    AdapterInvalid (naming the key at fault) / AdapterMismatch."""
    try:
        parsed = rt.parse_adapter(config, weights, keep_tensors=False, digest=digest)
        rt.check_fits(loaded, parsed)
    except rt.AdapterMismatch as error:
        raise AdapterMismatch(f"{error}; it cannot be used with this model", digest=digest) from None
    except rt.AdapterInvalid as error:
        raise AdapterInvalid(str(error), digest=digest, **({"key": error.key} if error.key else {})) from None
    return parsed


def _name(index: int) -> str:
    return ("adapter_config.json", "adapter_model.safetensors")[index]


class AdapterService:
    def __init__(self, kernel: Kernel, host: ModelHost, *, spool: Path) -> None:
        self.kernel = kernel
        self.host = host
        # Uploads being received (the daemon puts them in the data dir); what a crash left there is deleted now.
        self.spool = spool
        for stale in self.spool.glob(SPOOL_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def import_adapter(self, requests: Iterator[pb.ImportAdapterRequest], request: RequestRef | None = None
                       ) -> tuple[AdapterRecord, MountInfo]:
        """Receive, check and stage an upload; with a request id (the header's), a retry of the same upload
        gets the first call's adapter back and stages nothing (kernel/requests.py)."""
        with receive(requests, self.kernel.limits.max_adapter_bytes, self.spool) as upload:
            mount = self.kernel.mount_state(upload.mount_id)  # an unknown mount fails before the model is involved
            digest = upload.digest
            if upload.declared_digest and upload.declared_digest.lower() != digest:
                raise AdapterInvalid(f"the upload's digest is {digest}, not the {upload.declared_digest} the "
                                     "header declared: the bytes were damaged on the way", digest=digest)
            cube_id = self.kernel.cube_of(mount).cube_id
            with self.kernel.requests.claim(cube_id, request, "import_adapter", upload.mount_id, digest) as claim:
                if claim.done is not None and claim.done.adapter is not None:
                    return AdapterRecord(**claim.done.adapter), self.kernel.mount_info(mount)
                loaded = self.host.model()
                parsed = self.host.run(lambda: validate(loaded, upload.config, upload.weights, digest))
                record = AdapterRecord(
                    digest=digest, config_bytes=len(upload.config), weights_bytes=upload.weights_bytes,
                    rank=parsed.rank, target_modules=parsed.target_modules, base_model=parsed.base_model,
                    lineage={"origin": "imported", "model_fingerprint": loaded.fingerprint,
                             "create_ns": time.time_ns()})
                info = self.kernel.stage_adapter(upload.mount_id, record, upload.config, upload.weights, claim)
        log_event(log, "import_adapter", mount=upload.mount_id, digest=digest[:16], rank=parsed.rank,
                  bytes=len(upload.config) + upload.weights_bytes)
        return record, info

    def export(self, mount_id: str) -> tuple[AdapterRecord, bool, MountState, Iterator[t.AdapterChunk]]:
        """The adapter the mount sees, whether it is staged, and its files as chunks."""
        mount = self.kernel.mount_state(mount_id)
        cube = self.kernel.cube_of(mount)
        adapter, staged = self.kernel.adapter_in(mount)
        if adapter is None:
            raise AdapterNotFound(f"cube {cube.record.name!r} has no adapter at revision {mount.record.base}"
                                  f"{' in this mount' if mount.staged_adapter else ''}; import or train one",
                                  cube=cube.cube_id, revision=mount.record.base)
        config, weights = self.kernel.adapter_files(cube.cube_id, adapter)

        def chunks() -> Iterator[t.AdapterChunk]:
            for kind, data in ((t.ADAPTER_FILE_CONFIG, config), (t.ADAPTER_FILE_WEIGHTS, weights)):
                for start in range(0, len(data), EXPORT_CHUNK_BYTES):
                    yield t.AdapterChunk(file=kind, data=data[start:start + EXPORT_CHUNK_BYTES])

        return adapter, staged, mount, chunks()

    # -- residency (for Activate, Generate, Evict) -----------------------------
    def prepare(self, loaded: LoadedModel, cube_id: str, adapter: AdapterRecord | None) -> None:
        """On the worker, before model work: run with ``adapter`` (loading it if it is not resident), or
        with the base model for None. Called by every job, since another request may have unloaded it."""
        pool = self.host.adapters
        if adapter is None:
            try:
                pool.use(loaded, None)
            except rt.BaseModelChanged as error:
                raise ModelUnavailable(str(error)) from None
            return
        key = rt.pool_key(cube_id, adapter.digest)
        try:
            if not pool.touch(key):
                config, weights = self.kernel.adapter_files(cube_id, adapter)
                parsed = rt.parse_adapter(config, weights, digest=adapter.digest)
                rt.check_fits(loaded, parsed)
                dropped = pool.ensure(loaded, parsed, key)
                log_event(log, "adapter_loaded", cube=cube_id, digest=adapter.digest[:16], unloaded=len(dropped))
            pool.use(loaded, key)
        except rt.BaseModelChanged as error:
            raise ModelUnavailable(str(error)) from None
        except rt.AdapterError as error:  # it passed at import: another model (or an older memosd's check)
            raise AdapterMismatch(f"the adapter {adapter.digest[:12]} of cube {cube_id} cannot be used with "
                                  f"the runtime's model: {error}", digest=adapter.digest) from None

    def make_resident(self, cube_id: str, adapter: AdapterRecord) -> None:
        """Load the adapter into the model now (Activate), unless it is resident."""
        loaded = self.host.model()
        self.host.run(lambda: self.prepare(loaded, cube_id, adapter))

    def unload_cube(self, cube_id: str, versions: list[AdapterRecord]) -> int:
        """Unload every adapter version of the cube that is resident; returns how many."""
        loaded = self.host.loaded_now()
        if loaded is None:
            return 0
        keys = {rt.pool_key(cube_id, a.digest) for a in versions}
        return self.host.run(lambda: sum(self.host.adapters.unload(loaded, k) for k in keys))
