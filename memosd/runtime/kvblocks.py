"""KV blocks for a paged engine: keys, the storage protocol, and the block codec.

A paged engine (vLLM) holds the KV cache as fixed-size blocks of tokens. The
memosd KV connector (``vllm_connector``) persists a request's full blocks one
by one and loads them back into the engine's cache, so this module deals in
single blocks, not whole caches like ``kvcache.to_chunks``:

* **Keys.** Block ``i``'s key is ``kvcache.block_hashes``' ``h_i`` for the
  request's tokens cut at the engine's block size (``vllm_engine.engine_block_size``),
  so a key names what a cache key names: model fingerprint, every token up to the
  end of block ``i``, the cube salt and the adapter digest. Only *full* blocks have
  keys: the engine never shares a partial block.
* **Storage.** ``BlockStore`` is the few calls the connector makes; a dict
  (``MemoryBlockStore``) and a directory (``DirBlockStore``) implement it for
  tests and scripts, and ``store.blocks.RocksBlockStore`` (one cube's range of
  a column family) in the daemon; ``BlockStores`` picks a cube's store by salt.
* **Codec.** ``encode_block``/``decode_block``: one safetensors blob per block
  holding every layer's slice of the paged cache, with the key, fingerprint
  and block size in its metadata and a CRC-32 of its layers; decoding checks
  them against what the caller asked for, so a blob filed under the wrong key,
  written by another model, or damaged, is refused (``BlockMismatch``) and
  recomputed, never loaded. ``copy_block`` is decoding straight into the
  engine's slices of a block (the connector's exact load: one copy per layer).
  This CRC-32 is the only check of a block's bytes: RocksDB reads them
  without its own (``store.rocks.Store.get_kv_block``).

Pure Python apart from the codec (torch, safetensors), and importable without
vLLM: the normal test suite checks it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from memosd.runtime.kvcache import BLOCK, block_hashes

if TYPE_CHECKING:
    import torch

FORMAT = "memosd-kv-block/2"  # 2: a CRC-32, not a sha256


class BlockMismatch(RuntimeError):
    """A stored block is not the one asked for: another key, model, block size or layer set, or damaged."""


def block_keys(token_ids: Sequence[int], *, fingerprint: str, salt: bytes, extra: bytes = b"",
               block_size: int = BLOCK) -> list[str]:
    """The keys of the full ``block_size`` blocks of ``token_ids`` (a trailing partial block has none).

    The block size is part of every key's chain (a key hashes its block's tokens), and the engine's
    fingerprint names it too, so blocks of two sizes never meet."""
    full = len(token_ids) // block_size * block_size
    return block_hashes(token_ids[:full], fingerprint=fingerprint, salt=salt, extra=extra, block_size=block_size)


class BlockStore(Protocol):
    """Where the connector keeps blocks. Called from the engine's thread; must be thread-safe."""

    def has(self, key: str) -> bool: ...

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, blob: bytes) -> None: ...

    def delete(self, keys: Sequence[str]) -> None: ...


class BlockStores(Protocol):
    """The block store of each cube: the connector picks one by a request's ``cache_salt`` (the cube id).

    The daemon's stores are RocksDB ranges per (cube, fingerprint), so a cube's blocks go with one range
    delete (FreeCube, Purge, Evict --delete) and no block list is kept anywhere."""

    def for_salt(self, salt: str) -> BlockStore: ...


class OneStore:
    """Every cube's blocks in one store (their keys differ by salt already): for tests and scripts."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def for_salt(self, salt: str) -> BlockStore:
        return self.store


class MemoryBlockStore:
    """A dict behind a lock: for tests and one-process runs."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.puts = 0
        self.gets = 0

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._blobs

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self.gets += 1
            return self._blobs.get(key)

    def put(self, key: str, blob: bytes) -> None:
        with self._lock:
            self.puts += 1
            self._blobs[key] = blob

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._blobs.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._blobs)


class DirBlockStore:
    """One file per block under ``root`` (named by the key, which is hex): survives a restart.

    Writes go to a temporary file renamed into place, so a reader never sees a
    half-written block; the spike does not fsync (a lost block is recomputed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"a block key is lower-case hex, not {key!r}")
        return self.root / key

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, blob: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for p in self.root.iterdir() if not p.name.startswith("."))


def encode_block(layers: Mapping[str, torch.Tensor], *, key: str, fingerprint: str, block_size: int) -> bytes:
    """One block of every layer's paged cache (``layers``: name -> that layer's slice) as a safetensors blob.

    Stored in the cache's own dtype: a block is copied back bit for bit, which
    is what makes stored-KV generation equal a full prefill."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in layers.items()}
    meta = {"format": FORMAT, "key": key, "fingerprint": fingerprint, "block_size": str(block_size),
            "crc32": str(_crc32((name, _bytes_of(tensors[name])) for name in sorted(tensors)))}
    return save(tensors, metadata=meta)


def decode_block(blob: bytes, *, key: str, fingerprint: str, block_size: int,
                 layers: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """The block's tensors, checked against what the caller expects (``layers``: name -> shape, dtype).

    The tensors are read-only views of ``blob`` (the caller copies from them, never writes). Raises
    ``BlockMismatch`` for anything else: the caller recomputes the block."""
    data, spans = _checked(blob, key=key, fingerprint=fingerprint, block_size=block_size, layers=layers)
    return {name: data[spans[name][0]:spans[name][1]].view(dtype).view(shape)
            for name, (shape, dtype) in layers.items()}


def copy_block(blob: bytes, into: Mapping[str, torch.Tensor], *, key: str, fingerprint: str, block_size: int) -> None:
    """``decode_block`` straight into ``into`` (name -> the engine's slice of one block: the layers, shapes and
    dtypes expected): each layer's bytes copied once, from the blob to the paged cache, with no tensor made per
    layer but a view. Everything is checked before the first byte is written; raises ``BlockMismatch`` like
    ``decode_block``, and then ``into`` is untouched."""
    layers = {name: (tuple(t.shape), t.dtype) for name, t in into.items()}
    data, spans = _checked(blob, key=key, fingerprint=fingerprint, block_size=block_size, layers=layers)
    for name, dst in into.items():
        begin, end = spans[name]
        # In the cache's dtype, not as bytes: a copy of the same dtype is bit for bit either way, and 4x fewer
        # elements keep it under torch's grain for splitting one copy across threads.
        dst.copy_(data[begin:end].view(dst.dtype).view(dst.shape))


def _checked(blob: bytes, *, key: str, fingerprint: str, block_size: int,
             layers: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """The blob as one read-only uint8 tensor (no copy) and each layer's byte span in it, once its metadata,
    layers, shapes, dtypes, spans and CRC-32 are what the caller asked for (``BlockMismatch`` otherwise).

    A cold load reads each byte twice: once for the checksum and once for the copy into the paged cache."""
    try:
        header, data_start = _header(blob)
    except Exception as e:  # not even a safetensors header
        raise BlockMismatch(f"block {key[:16]} is not a readable safetensors blob: {e}") from e
    meta = header.pop("__metadata__", None) or {}
    want = {"format": FORMAT, "key": key, "fingerprint": fingerprint, "block_size": str(block_size)}
    for name, value in want.items():
        if meta.get(name) != value:
            raise BlockMismatch(f"block {key[:16]}: {name} is {meta.get(name)!r}, expected {value!r}")
    if set(header) != set(layers):
        raise BlockMismatch(f"block {key[:16]} holds {len(header)} layers, not the engine's {len(layers)}")
    view = memoryview(blob)
    spans: dict[str, tuple[int, int]] = {}
    for name, (shape, dtype) in layers.items():
        entry = header[name]
        got_shape, got_dtype = tuple(entry.get("shape", ())), _DTYPES.get(entry.get("dtype"))
        if got_shape != shape or got_dtype != dtype:
            raise BlockMismatch(f"block {key[:16]}, layer {name}: {got_shape} {entry.get('dtype')}, "
                                f"expected {shape} {dtype}")
        begin, end = (data_start + int(o) for o in entry["data_offsets"])
        # Aligned to its dtype too (safetensors writes it so): the tensor is then a view of the blob.
        if (not data_start <= begin <= end <= len(blob) or end - begin != _nbytes(shape, dtype)
                or begin % dtype.itemsize):
            raise BlockMismatch(f"block {key[:16]}, layer {name}: its bytes are not where its header says")
        spans[name] = (begin, end)
    if meta.get("crc32") != str(_crc32((name, view[spans[name][0]:spans[name][1]]) for name in sorted(spans))):
        raise BlockMismatch(f"block {key[:16]} is damaged (checksum mismatch)")
    return _as_tensor(blob), spans


def _header(blob: bytes) -> tuple[dict[str, Any], int]:
    """A safetensors blob's header (name -> dtype, shape, data_offsets; and ``__metadata__``), and where
    its data starts."""
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise ValueError("truncated header")
    header = json.loads(blob[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not an object")
    return header, 8 + size


def _crc32(parts: Iterable[tuple[str, Any]]) -> int:
    """CRC-32 of each layer's name and bytes, in name order: it tells a damaged block (RocksDB checks its
    own reads too), at ~2 GB/s where sha256 ran at ~1 and was a fifth of a cold load."""
    crc = 0
    for name, data in parts:
        crc = zlib.crc32(data, zlib.crc32(name.encode() + b"\0", crc))
    return crc


def _bytes_of(t: torch.Tensor) -> memoryview:
    array: Any = t.reshape(-1).view(dtype=_u8()).numpy()  # a contiguous uint8 array: no copy
    return memoryview(array)


def _as_tensor(blob: bytes) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():  # the blob is immutable bytes; the tensor is only read (copied from)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(blob, dtype=torch.uint8)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _u8() -> torch.dtype:
    import torch

    return torch.uint8


class _Dtypes(dict[str, "torch.dtype"]):
    """safetensors' dtype names -> torch dtypes (filled on first use: importing this module stays cheap)."""

    def get(self, name: object, default: Any = None) -> Any:
        if not self:
            import torch

            self.update(F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, F64=torch.float64)
        return super().get(name, default) if isinstance(name, str) else default


_DTYPES = _Dtypes()
