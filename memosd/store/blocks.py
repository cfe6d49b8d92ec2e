"""RocksBlockStore: a paged engine's KV blocks in the store's kv_blocks column family.

It implements ``runtime.kvblocks.BlockStore`` (has/get/put/delete by block
key) structurally: the protocol speaks only ``str`` and ``bytes``, so this
module needs nothing from runtime/ and the store package keeps its one job
(RocksDB access); tests/unit/test_kvblocks.py holds it to the protocol's
contract beside the dict and directory stores.

One instance serves one cube and one model: the rows are keyed
``{cube_id}/{fingerprint}/{block_key}`` (schema.py says why), and a block key
alone does not tell its cube. The blob is stored as given; decoding and its
checks (``kvblocks.decode_block``) stay with the caller, so a damaged row is
read back as its bytes and refused there, like a damaged file of
``DirBlockStore``: blobs are read without RocksDB's own checksum (it checked
the same bytes again, in software, a third of a cold load), so bytes damaged
in a blob file on disk reach the codec too, instead of an exception.

``has`` and ``len`` read the small kv_block_index family, never a blob: the
connector asks ``has`` for every block of every waiting request (31 stored
3 MB blocks: ~0.1 ms, against ~170 ms when the blobs were read).

Writes are not synced: a block lost in a crash is recomputed by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from memosd.store.rocks import Store

_HEX = frozenset("0123456789abcdef")


class RocksBlockStore:
    """The stored blocks of one cube under one model fingerprint. Thread-safe (RocksDB is)."""

    def __init__(self, store: Store, cube_id: str, fingerprint: str) -> None:
        # Both are parts of a key: a "/" in either would move rows into another cube's or model's range.
        for name, value in (("cube id", cube_id), ("fingerprint", fingerprint)):
            if not value or "/" in value:
                raise ValueError(f"a {name} is a non-empty id without '/', not {value!r}")
        self.store = store
        self.cube_id = cube_id
        self.fingerprint = fingerprint

    def _key(self, key: str) -> str:
        if not key or not _HEX.issuperset(key):
            raise ValueError(f"a block key is lower-case hex, not {key!r}")
        return key

    def has(self, key: str) -> bool:
        return self.store.has_kv_block(self.cube_id, self.fingerprint, self._key(key))

    def get(self, key: str) -> bytes | None:
        return self.store.get_kv_block(self.cube_id, self.fingerprint, self._key(key))

    def put(self, key: str, blob: bytes) -> None:
        self.store.put_kv_block(self.cube_id, self.fingerprint, self._key(key), blob)

    def delete(self, keys: Sequence[str]) -> None:
        self.store.delete_kv_block_keys(self.cube_id, self.fingerprint, [self._key(k) for k in keys])

    def __len__(self) -> int:
        return sum(1 for _ in self.store.iter_kv_block_keys(self.cube_id, self.fingerprint))


class RocksBlockStores:
    """Every cube's ``RocksBlockStore`` under one fingerprint, by cache salt (the cube id):
    ``runtime.kvblocks.BlockStores`` for the engine's connector."""

    def __init__(self, store: Store, fingerprint: str) -> None:
        self.store = store
        self.fingerprint = fingerprint

    def for_salt(self, salt: str) -> RocksBlockStore:
        return RocksBlockStore(self.store, salt, self.fingerprint)
