"""Block keys, block stores, the block codec and the token stream of the engine interface (no vLLM needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from memosd.runtime.engine import Finished, Token, TokenStream
from memosd.runtime.kvblocks import (
    BlockMismatch,
    BlockStore,
    DirBlockStore,
    MemoryBlockStore,
    block_keys,
    copy_block,
    decode_block,
    encode_block,
)
from memosd.runtime.kvcache import BLOCK, block_hashes
from memosd.store import schema
from memosd.store.blocks import RocksBlockStore
from memosd.store.rocks import Store

FP = "fingerprint-a"
CUBE = "cub_a"


class _Stores:
    """Opens the store kinds that survive a restart, and reopens them as a fresh process would."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.rocks: list[Store] = []

    def open(self, kind: str) -> DirBlockStore | RocksBlockStore:
        if kind == "dir":
            return DirBlockStore(self.tmp_path / "blocks")
        for old in self.rocks:  # one RocksDB handle at a time: a reopen closes the previous one first
            old.close()
        self.rocks = [Store(self.tmp_path / "store")]
        return RocksBlockStore(self.rocks[0], CUBE, FP)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[_Stores]:
    opened = _Stores(tmp_path)
    yield opened
    for store in opened.rocks:
        store.close()


_EVERY_KIND = ["memory", "dir", "rocks"]


def _open(stores: _Stores, kind: str) -> BlockStore:
    return MemoryBlockStore() if kind == "memory" else stores.open(kind)


def _layers(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # The CPU paged layout of one block: [kv heads, block size, 2 * head dim].
    return {f"model.layers.{i}.self_attn.attn": torch.randn(3, BLOCK, 128, generator=g) for i in range(4)}


def _shapes(layers: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in layers.items()}


def test_block_keys_are_memosd_chained_hashes_of_full_blocks_only() -> None:
    ids = list(range(3 * BLOCK + 10))
    keys = block_keys(ids, fingerprint=FP, salt=b"cube-1", extra=b"digest")
    assert len(keys) == 3  # the trailing 10 tokens are no block of their own
    assert keys == block_hashes(ids[:3 * BLOCK], fingerprint=FP, salt=b"cube-1", extra=b"digest")
    # A key names its whole prefix: the first keys of a longer prompt are the same.
    assert block_keys(ids + [7] * BLOCK, fingerprint=FP, salt=b"cube-1", extra=b"digest")[:3] == keys


def test_block_keys_differ_by_cube_adapter_and_model() -> None:
    ids = list(range(2 * BLOCK))
    base = block_keys(ids, fingerprint=FP, salt=b"cube-1")
    assert not set(base) & set(block_keys(ids, fingerprint=FP, salt=b"cube-2"))
    assert not set(base) & set(block_keys(ids, fingerprint=FP, salt=b"cube-1", extra=b"adapter"))
    assert not set(base) & set(block_keys(ids, fingerprint="fingerprint-b", salt=b"cube-1"))


def test_block_keys_cut_by_the_engines_block_size() -> None:
    ids = list(range(100))
    keys = block_keys(ids, fingerprint=FP, salt=b"s", block_size=32)
    assert len(keys) == 3  # the 4 tokens after the last full block have no key
    assert keys == block_hashes(ids[:96], fingerprint=FP, salt=b"s", block_size=32)
    # A key hashes its block's tokens: blocks of another size never share one.
    assert not set(keys) & set(block_keys(ids, fingerprint=FP, salt=b"s", block_size=64))


def test_codec_round_trips_bit_for_bit() -> None:
    layers = _layers()
    blob = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    back = decode_block(blob, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))
    assert set(back) == set(layers)
    for name, t in layers.items():
        assert torch.equal(back[name], t)


@pytest.mark.parametrize("field", ["key", "fingerprint", "block_size"])
def test_codec_refuses_a_block_asked_for_under_other_terms(field: str) -> None:
    layers = _layers()
    blob = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    key = "cd" * 32 if field == "key" else "ab" * 32
    fingerprint = "fingerprint-b" if field == "fingerprint" else FP
    block_size = 128 if field == "block_size" else BLOCK
    with pytest.raises(BlockMismatch, match=field):
        decode_block(blob, key=key, fingerprint=fingerprint, block_size=block_size, layers=_shapes(layers))


def test_codec_refuses_other_layers_shapes_and_dtypes() -> None:
    layers = _layers()
    blob = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    fewer = dict(list(_shapes(layers).items())[:3])
    with pytest.raises(BlockMismatch, match="layers"):
        decode_block(blob, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=fewer)
    other_shape = {name: ((3, BLOCK, 64), dtype) for name, (_, dtype) in _shapes(layers).items()}
    with pytest.raises(BlockMismatch, match="expected"):
        decode_block(blob, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=other_shape)
    other_dtype = {name: (shape, torch.float16) for name, (shape, _) in _shapes(layers).items()}
    with pytest.raises(BlockMismatch, match="expected"):
        decode_block(blob, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=other_dtype)


def test_codec_refuses_damaged_and_foreign_bytes() -> None:
    layers = _layers()
    blob = bytearray(encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK))
    blob[-5] ^= 0xFF  # a bit of tensor data: the header still parses
    with pytest.raises(BlockMismatch, match="damaged"):
        decode_block(bytes(blob), key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))
    whole = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    with pytest.raises(BlockMismatch, match="not where its header says"):  # cut short: the header still parses
        decode_block(whole[:-100], key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))
    for junk in (b"", b"\0" * 64, b"not a block at all"):
        with pytest.raises(BlockMismatch):
            decode_block(junk, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))


def _paged(layers: dict[str, torch.Tensor], blocks: int = 5) -> dict[str, torch.Tensor]:
    """A paged cache like vLLM's on CPU ([blocks, kv heads, block size, 2 x head] per layer), filled with junk."""
    return {name: torch.full((blocks, *t.shape), -7.0, dtype=t.dtype) for name, t in layers.items()}


def test_copy_block_writes_the_block_bit_for_bit_into_the_engines_slice_and_nothing_else() -> None:
    layers = _layers()
    layers["model.layers.0.self_attn.attn"][0, 0, 0] = float("nan")  # any bit pattern comes back as it was
    blob = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    cache = _paged(layers)
    copy_block(blob, {name: t[3] for name, t in cache.items()}, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    for name, t in layers.items():
        assert cache[name][3].view(torch.int32).equal(t.view(torch.int32))
        others = torch.cat([cache[name][:3], cache[name][4:]])
        assert bool((others == -7.0).all()), "only the named block is written"


def test_copy_block_refuses_what_decode_block_refuses_and_leaves_the_cache_untouched() -> None:
    layers = _layers()
    blob = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    cache = _paged(layers)
    into = {name: t[1] for name, t in cache.items()}
    refusals = [(bytes(damaged), "ab" * 32, FP, "damaged"), (blob, "cd" * 32, FP, "key"),
                (blob, "ab" * 32, "fingerprint-b", "fingerprint"), (blob[:-100], "ab" * 32, FP, "not where"),
                (b"not a block at all", "ab" * 32, FP, "not a readable")]
    for data, key, fingerprint, why in refusals:
        with pytest.raises(BlockMismatch, match=why):
            copy_block(data, into, key=key, fingerprint=fingerprint, block_size=BLOCK)
    with pytest.raises(BlockMismatch, match="layers"):  # the engine has a layer the block lacks
        copy_block(blob, {**into, "model.layers.9.self_attn.attn": into[next(iter(into))]}, key="ab" * 32,
                   fingerprint=FP, block_size=BLOCK)
    with pytest.raises(BlockMismatch, match="expected"):  # another layout of the same bytes
        copy_block(blob, {name: t.view(3, BLOCK * 2, 64) for name, t in into.items()}, key="ab" * 32,
                   fingerprint=FP, block_size=BLOCK)
    assert all(bool((t == -7.0).all()) for t in cache.values()), "a refused block writes nothing"


@pytest.mark.parametrize("kind", _EVERY_KIND)
def test_store_puts_gets_and_deletes_blocks(stores: _Stores, kind: str) -> None:
    store = _open(stores, kind)
    assert not store.has("ab" * 32) and store.get("ab" * 32) is None
    store.put("ab" * 32, b"one")
    store.put("cd" * 32, b"two")
    store.put("cd" * 32, b"two, again")  # a put replaces
    assert store.has("ab" * 32) and store.get("ab" * 32) == b"one" and store.get("cd" * 32) == b"two, again"
    store.delete(["ab" * 32, "ef" * 32])  # deleting a missing key is not an error
    assert not store.has("ab" * 32) and store.get("ab" * 32) is None and store.has("cd" * 32)


@pytest.mark.parametrize("kind", ["dir", "rocks"])
def test_store_keeps_blocks_across_instances(stores: _Stores, kind: str) -> None:
    store = stores.open(kind)
    store.put("ab" * 32, b"one")
    store.put("cd" * 32, b"two")
    again = stores.open(kind)  # rocks: the store is closed and reopened, as after a restart
    assert again.has("ab" * 32) and again.get("cd" * 32) == b"two" and len(again) == 2
    again.delete(["ab" * 32, "ef" * 32])  # deleting a missing key is not an error
    assert not again.has("ab" * 32) and again.get("ab" * 32) is None and len(again) == 1


@pytest.mark.parametrize("kind", ["dir", "rocks"])
def test_store_refuses_keys_that_are_not_hex(stores: _Stores, kind: str) -> None:
    store = stores.open(kind)
    for key in ("../escape", "", "AB", "ab/cd"):
        with pytest.raises(ValueError, match="hex"):
            store.put(key, b"x")


@pytest.mark.parametrize("kind", ["dir", "rocks"])
def test_a_damaged_stored_block_is_refused_by_the_codec_as_damaged(stores: _Stores, kind: str) -> None:
    """A store hands back the bytes it holds; the codec is what tells a damaged block (BlockMismatch)."""
    store = stores.open(kind)
    layers = _layers()
    blob = bytearray(encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK))
    blob[-5] ^= 0xFF
    store.put("ab" * 32, bytes(blob))
    stored = stores.open(kind).get("ab" * 32)
    assert stored == bytes(blob)
    with pytest.raises(BlockMismatch, match="damaged"):
        decode_block(stored, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))


def test_rocks_store_corrupted_in_place_reads_as_damaged(stores: _Stores) -> None:
    """A row overwritten behind the store's back (raw) is read as is and refused by the codec, never loaded."""
    store = stores.open("rocks")
    assert isinstance(store, RocksBlockStore)
    layers = _layers()
    store.put("ab" * 32, encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK))
    store.store.put_row(schema.CF_KV_BLOCKS, schema.kv_block_key(CUBE, FP, "ab" * 32), b"\0" * 64, sync=False)
    stored = store.get("ab" * 32)
    assert stored == b"\0" * 64
    with pytest.raises(BlockMismatch, match="not a readable"):
        decode_block(stored, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))


def test_rocks_blob_file_damaged_on_disk_reads_as_damaged(stores: _Stores) -> None:
    """RocksDB reads kv blocks without its own blob checksum (the codec's CRC-32 is the check): a byte flipped
    in the blob file on disk still reaches the codec, which refuses the block as damaged."""
    store = stores.open("rocks")
    assert isinstance(store, RocksBlockStore)
    layers = _layers()
    blob = encode_block(layers, key="ab" * 32, fingerprint=FP, block_size=BLOCK)
    store.put("ab" * 32, blob)
    store.store.flush()  # the blob leaves the memtable for a blob file
    [blob_file] = (stores.tmp_path / "store").glob("*.blob")
    raw = bytearray(blob_file.read_bytes())
    at = raw.find(blob[-64:])  # the last tensor bytes of the block, where they sit in the file
    assert at > 0
    raw[at + 10] ^= 0xFF
    blob_file.write_bytes(bytes(raw))
    stored = stores.open("rocks").get("ab" * 32)  # reopened: nothing is served from memory
    assert stored is not None and stored != blob and len(stored) == len(blob)
    with pytest.raises(BlockMismatch, match="damaged"):
        decode_block(stored, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))
    with pytest.raises(BlockMismatch, match="damaged"):
        copy_block(stored, {name: t[0] for name, t in _paged(layers).items()}, key="ab" * 32, fingerprint=FP,
                   block_size=BLOCK)


def _rocks_views(stores: _Stores) -> Callable[[str, str], RocksBlockStore]:
    store = stores.open("rocks")
    assert isinstance(store, RocksBlockStore)
    return lambda cube_id, fingerprint: RocksBlockStore(store.store, cube_id, fingerprint)


def test_rocks_stores_of_two_cubes_or_models_share_no_block(stores: _Stores) -> None:
    view = _rocks_views(stores)
    view("cub_a", FP).put("ab" * 32, b"a")
    assert not view("cub_b", FP).has("ab" * 32) and view("cub_a", "fingerprint-b").get("ab" * 32) is None
    view("cub_b", FP).delete(["ab" * 32])
    assert view("cub_a", FP).get("ab" * 32) == b"a"


def test_rocks_store_index_follows_its_blocks(stores: _Stores) -> None:
    """has, len and the byte count read kv_block_index: every put, replace and delete keeps it in step."""
    view = _rocks_views(stores)
    a, other_model = view("cub_a", FP), view("cub_a", "fingerprint-b")
    a.put("ab" * 32, b"12345")
    a.put("cd" * 32, b"123")
    a.put("cd" * 32, b"1234567")  # a replace counts once, at its new size
    other_model.put("ab" * 32, b"12")
    store = a.store
    assert store.kv_block_bytes("cub_a", FP) == 12 and store.kv_block_bytes("cub_a") == 14
    a.delete(["ab" * 32])
    blob_keys = {bytes(k) for k, _ in store.scan_rows(schema.CF_KV_BLOCKS)}
    index = {bytes(k): bytes(v) for k, v in store.scan_rows(schema.CF_KV_BLOCK_INDEX)}
    assert blob_keys == set(index) == {schema.kv_block_key("cub_a", FP, "cd" * 32),
                                       schema.kv_block_key("cub_a", "fingerprint-b", "ab" * 32)}
    assert index[schema.kv_block_key("cub_a", FP, "cd" * 32)] == b"7"
    assert (len(a), store.kv_block_bytes("cub_a", FP), a.has("cd" * 32), a.has("ab" * 32)) == (1, 7, True, False)


@pytest.mark.parametrize("drop", ["free_cube", "delete_kv_blocks"])
def test_dropping_a_cube_s_blocks_keeps_every_other_cube_s(stores: _Stores, drop: str) -> None:
    """FreeCube's range delete of the cube-scoped families, and Evict/Purge's delete_kv_blocks."""
    view = _rocks_views(stores)
    # "cub_a0" sorts right after the range of "cub_a/": a range that overshot would take it.
    for cube_id in ("cub_a", "cub_a0", "cub_b"):
        for fingerprint in (FP, "fingerprint-b"):
            view(cube_id, fingerprint).put("ab" * 32, cube_id.encode())
    store = view("cub_a", FP).store
    if drop == "free_cube":
        from memosd.store.records import CubeRecord

        batch = store.batch()
        batch.delete_cube(CubeRecord("cub_a", "notes", "", {}, 0))
        store.write(batch, sync=True)
    else:
        store.delete_kv_blocks("cub_a", sync=True)
    assert [len(view("cub_a", fp)) for fp in (FP, "fingerprint-b")] == [0, 0]
    assert store.kv_block_bytes("cub_a") == 0
    for cube_id in ("cub_a0", "cub_b"):
        assert [view(cube_id, fp).get("ab" * 32) for fp in (FP, "fingerprint-b")] == [cube_id.encode()] * 2


def test_rocks_store_refuses_a_cube_or_model_that_would_leave_its_range(stores: _Stores) -> None:
    view = _rocks_views(stores)
    for cube_id, fingerprint in (("cub_a/x", FP), ("", FP), ("cub_a", "f/p"), ("cub_a", "")):
        with pytest.raises(ValueError, match="without '/'"):
            view(cube_id, fingerprint)


def test_memory_store_counts_and_deletes() -> None:
    store = MemoryBlockStore()
    store.put("ab", b"1")
    assert store.has("ab") and store.get("ab") == b"1" and store.get("cd") is None
    store.delete(["ab"])
    assert not store.has("ab") and len(store) == 0 and store.puts == 1 and store.gets == 2


def test_token_stream_hands_events_in_order_whoever_comes_first() -> None:
    aborted: list[str] = []
    stream = TokenStream("g1", aborted.append)
    stream.push(Token(5, -0.1, "a"))  # before anyone waits
    assert stream.next().result(1) == Token(5, -0.1, "a")
    waiting = stream.next()  # before the engine pushes
    assert not waiting.done()
    stream.push(Token(6, None, "b"))
    assert waiting.result(1) == Token(6, None, "b")
    done = Finished("length", 10, 0, 2, 1, 2)
    threading.Timer(0.05, stream.push, args=(done,)).start()
    assert stream.events(5) == [done]
    stream.push(Token(7, None, "late"))  # after Finished: dropped
    with pytest.raises(RuntimeError, match="finished"):
        stream.next()
    stream.abort()
    assert aborted == ["g1"]


def test_engine_modules_import_without_pulling_in_vllm() -> None:
    """The daemon imports the engine interface whatever is installed: vLLM is imported only by a VllmEngine."""
    import subprocess
    import sys

    code = ("import sys, memosd.runtime.engine, memosd.runtime.kvblocks, memosd.runtime.vllm_engine; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
