"""KV blocks for a paged engine: keys, the storage protocol, and the block codec.

A paged engine (vLLM) holds the KV cache as fixed-size blocks of tokens. The
memosd KV connector (``vllm_connector``) persists a request's full blocks one
by one and loads them back into the engine's cache, so this module deals in
single blocks, not whole caches like ``kvcache.to_chunks``:

* **Keys.** Block ``i``'s key is ``kvcache.block_hashes``' ``h_i`` for the
  request's tokens, with the engine's block size equal to ``kvcache.BLOCK``
  (64; vLLM's CPU attention takes any multiple of 32), so a key names the same
  thing as today's cache key: model fingerprint, every token up to the end of
  block ``i``, the cube salt and the adapter digest. Only *full* blocks have
  keys: the engine never shares a partial block.
* **Storage.** ``BlockStore`` is the few calls the connector makes; a dict
  (``MemoryBlockStore``) and a directory (``DirBlockStore``) implement it for
  tests and scripts, and ``store.blocks.RocksBlockStore`` (one cube's range of
  a column family) in the daemon; ``BlockStores`` picks a cube's store by salt.
* **Codec.** ``encode_block``/``decode_block``: one safetensors blob per block
  holding every layer's slice of the paged cache, with the key, fingerprint
  and block size in its metadata; decoding checks them against what the
  caller asked for, so a blob filed under the wrong key, or written by another
  model, is refused (``BlockMismatch``) and recomputed, never loaded.

Pure Python apart from the codec (torch, safetensors), and importable without
vLLM: the normal test suite checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from memosd.runtime.kvcache import BLOCK, block_hashes

if TYPE_CHECKING:
    import torch

FORMAT = "memosd-kv-block/1"


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
            "digest": _digest(tensors)}
    return save(tensors, metadata=meta)


def decode_block(blob: bytes, *, key: str, fingerprint: str, block_size: int,
                 layers: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """The block's tensors, checked against what the caller expects (``layers``: name -> shape, dtype).

    Raises ``BlockMismatch`` for anything else: the caller recomputes the block."""
    from safetensors.torch import load

    try:
        meta = _header_metadata(blob)
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types for damaged blobs
        raise BlockMismatch(f"block {key[:16]} is not a readable safetensors blob: {e}") from e
    want = {"format": FORMAT, "key": key, "fingerprint": fingerprint, "block_size": str(block_size)}
    for name, value in want.items():
        if meta.get(name) != value:
            raise BlockMismatch(f"block {key[:16]}: {name} is {meta.get(name)!r}, expected {value!r}")
    if set(tensors) != set(layers):
        raise BlockMismatch(f"block {key[:16]} holds {len(tensors)} layers, not the engine's {len(layers)}")
    for name, (shape, dtype) in layers.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise BlockMismatch(f"block {key[:16]}, layer {name}: {tuple(t.shape)} {t.dtype}, "
                                f"expected {shape} {dtype}")
    if meta.get("digest") != _digest(tensors):
        raise BlockMismatch(f"block {key[:16]} is damaged (digest mismatch)")
    return tensors


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, from its header alone."""
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise ValueError("truncated header")
    header = json.loads(blob[8:8 + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in (meta or {}).items()}


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(dtype=_u8()).numpy().tobytes())
    return h.hexdigest()


def _u8() -> torch.dtype:
    import torch

    return torch.uint8
