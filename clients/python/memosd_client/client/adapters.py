"""A peft LoRA adapter's two files on the client's side: reading them, naming them by digest, cutting an
upload into messages, and checking and saving what an export delivered."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import suppress

from memosd_client.client.inputs import AdapterSource
from memosd_client.errors import DataLoss
from memosd_client.v1 import memos_pb2, types_pb2

# The two files of a peft adapter directory.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_digest(config: bytes, weights: bytes) -> str:
    """The digest naming an adapter: sha256 over its config bytes then its weights bytes (64 hex)."""
    h = hashlib.sha256(config)
    h.update(weights)
    return h.hexdigest()


def load_adapter_dir(directory: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The (config, weights) bytes of a peft adapter directory; ValueError when one of the files is missing."""
    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; an adapter is a directory holding "
                         f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}")
    files = []
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{path!r} holds no {name}: not a peft LoRA adapter directory")
        with open(file, "rb") as f:
            files.append(f.read())
    return files[0], files[1]


def adapter_bytes(source: AdapterSource) -> tuple[bytes, bytes]:
    """The (config, weights) bytes of an adapter given as a directory or as the two files' bytes."""
    if isinstance(source, tuple):
        if len(source) != 2 or not all(isinstance(b, bytes | bytearray | memoryview) for b in source):
            raise TypeError("an adapter given as a tuple is (config_bytes, weights_bytes)")
        return bytes(source[0]), bytes(source[1])
    return load_adapter_dir(source)


def adapter_upload(
    mount_id: str, config: bytes, weights: bytes, chunk_bytes: int, request_id: str = ""
) -> Iterator[memos_pb2.ImportAdapterRequest]:
    """The messages of an ImportAdapter: the header (sizes, digest, request id), then each file in chunks."""
    yield memos_pb2.ImportAdapterRequest(header=memos_pb2.AdapterUpload(
        mount_id=mount_id, config_bytes=len(config), weights_bytes=len(weights),
        digest=adapter_digest(config, weights), request_id=request_id,
    ))
    for file, data in ((types_pb2.ADAPTER_FILE_CONFIG, config), (types_pb2.ADAPTER_FILE_WEIGHTS, weights)):
        view = memoryview(data)
        for start in range(0, len(data), chunk_bytes):
            chunk = types_pb2.AdapterChunk(file=file, data=bytes(view[start:start + chunk_bytes]))
            yield memos_pb2.ImportAdapterRequest(chunk=chunk)


def receive_adapter(
    responses: Iterable[memos_pb2.ExportAdapterResponse],
) -> tuple[types_pb2.Adapter, bytes, bytes]:
    """``(adapter, config, weights)`` from an ExportAdapter's responses, checked against the adapter's sizes
    and digest: DataLoss when what arrived is not the adapter announced (gRPC errors pass through)."""
    adapter: types_pb2.Adapter | None = None
    parts: dict[int, list[bytes]] = {types_pb2.ADAPTER_FILE_CONFIG: [], types_pb2.ADAPTER_FILE_WEIGHTS: []}
    for resp in responses:
        if adapter is None and resp.HasField("adapter"):
            adapter = resp.adapter
        if resp.HasField("chunk"):
            if resp.chunk.file not in parts:
                raise DataLoss(f"the export sent a chunk of unknown file {resp.chunk.file}")
            parts[resp.chunk.file].append(resp.chunk.data)
    if adapter is None:
        raise DataLoss("the export ended before sending the adapter")
    config = b"".join(parts[types_pb2.ADAPTER_FILE_CONFIG])
    weights = b"".join(parts[types_pb2.ADAPTER_FILE_WEIGHTS])
    if (len(config), len(weights)) != (adapter.config_bytes, adapter.weights_bytes):
        raise DataLoss(
            f"the export of adapter {adapter.digest[:12] or '?'} delivered {len(config)} + {len(weights)} "
            f"bytes (config + weights), not the {adapter.config_bytes} + {adapter.weights_bytes} it announced"
        )
    if adapter.digest and adapter_digest(config, weights) != adapter.digest:
        raise DataLoss(f"the exported files do not hash to the adapter's digest {adapter.digest}")
    return adapter, config, weights


def save_adapter_dir(directory: str | os.PathLike[str], config: bytes, weights: bytes) -> None:
    """Write an adapter's two files into ``directory`` (created if need be; files of those names replaced)."""
    path = os.fspath(directory)
    os.makedirs(path, exist_ok=True)
    _write_file(os.path.join(path, ADAPTER_CONFIG_FILE), config)
    _write_file(os.path.join(path, ADAPTER_WEIGHTS_FILE), weights)


def _write_file(path: str, data: bytes) -> None:
    # Through a temporary name, so a reader never sees half a file.
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
