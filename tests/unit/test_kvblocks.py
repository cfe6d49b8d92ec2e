"""Block keys, block stores, the block codec and the token stream of the engine interface (no vLLM needed)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from memosd.runtime.engine import Finished, Token, TokenStream
from memosd.runtime.kvblocks import (
    BlockMismatch,
    DirBlockStore,
    MemoryBlockStore,
    block_keys,
    decode_block,
    encode_block,
)
from memosd.runtime.kvcache import BLOCK, block_hashes

FP = "fingerprint-a"


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


def test_block_keys_refuse_another_block_size() -> None:
    with pytest.raises(ValueError, match="64"):
        block_keys(list(range(64)), fingerprint=FP, salt=b"s", block_size=16)


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
    for junk in (b"", b"\0" * 64, b"not a block at all"):
        with pytest.raises(BlockMismatch):
            decode_block(junk, key="ab" * 32, fingerprint=FP, block_size=BLOCK, layers=_shapes(layers))


def test_dir_store_keeps_blocks_across_instances(tmp_path: Path) -> None:
    store = DirBlockStore(tmp_path / "blocks")
    store.put("ab" * 32, b"one")
    store.put("cd" * 32, b"two")
    again = DirBlockStore(tmp_path / "blocks")
    assert again.has("ab" * 32) and again.get("cd" * 32) == b"two" and len(again) == 2
    again.delete(["ab" * 32, "ef" * 32])  # deleting a missing key is not an error
    assert not store.has("ab" * 32) and store.get("ab" * 32) is None and len(store) == 1


def test_dir_store_refuses_keys_that_are_not_hex(tmp_path: Path) -> None:
    store = DirBlockStore(tmp_path)
    for key in ("../escape", "", "AB"):
        with pytest.raises(ValueError, match="hex"):
            store.put(key, b"x")


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
