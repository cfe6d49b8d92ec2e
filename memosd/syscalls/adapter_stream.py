"""ImportAdapter's client stream and ExportAdapter's server stream: protobuf messages <-> plain files.

The wire side of parametric memory, so that ``parametric/`` sees plain values only: an upload is
reassembled here (a header, then chunks of the two files, checked against the header as they arrive,
the weights spooled to a file under the service's spool directory, never a growing buffer) and handed
to ``AdapterService.import_adapter`` as an ``Upload``; an export's files are cut into chunks here.
The header's declared sizes are bounded (``kernel.validate.adapter_upload``) before any chunk is read.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.errors import AdapterInvalid, InvalidField
from memosd.kernel import validate
from memosd.kernel.requests import RequestRef
from memosd.kernel.types import MountInfo
from memosd.parametric.adapters import SPOOL_PREFIX, AdapterService, Upload
from memosd.store.records import AdapterRecord

EXPORT_CHUNK_BYTES = 1 << 20
SPOOL_READ_BYTES = 1 << 20
_FILES = {t.ADAPTER_FILE_CONFIG: 0, t.ADAPTER_FILE_WEIGHTS: 1}


def import_adapter(service: AdapterService, requests: Iterator[pb.ImportAdapterRequest],
                   request: RequestRef | None = None) -> tuple[AdapterRecord, MountInfo]:
    """Receive the stream (whole, before the mount is looked up, as the upload is checked first), then
    check and stage it; the spool file is deleted when this returns or raises."""
    with receive(requests, service.kernel.limits.max_adapter_bytes, service.spool) as upload:
        return service.import_adapter(upload, request)


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
    validate.adapter_upload(header.config_bytes, header.weights_bytes, limit)
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


def export(service: AdapterService, mount_id: str) -> tuple[AdapterRecord, bool, MountInfo, Iterator[t.AdapterChunk]]:
    """The adapter the mount sees, whether it is staged, and its files as chunks (config, then weights)."""
    adapter, staged, mount, files = service.export(mount_id)

    def chunks() -> Iterator[t.AdapterChunk]:
        for kind, data in zip((t.ADAPTER_FILE_CONFIG, t.ADAPTER_FILE_WEIGHTS), files, strict=True):
            for start in range(0, len(data), EXPORT_CHUNK_BYTES):
                yield t.AdapterChunk(file=kind, data=data[start:start + EXPORT_CHUNK_BYTES])

    return adapter, staged, mount, chunks()


def _name(index: int) -> str:
    return ("adapter_config.json", "adapter_model.safetensors")[index]
