"""KV caches: block keys, prefix computation and reuse, non-mutation, chunked persistence.

Fast tests use a tiny randomly initialised Llama (hidden 64, 2 layers, 4 heads,
2 KV heads) with a small byte-level BPE tokenizer, fed random token ids. One
test (test_smollm2_prefix_cache_greedy) runs the real embedded SmolLM2 and
prints the prefill / time-to-first-token numbers (run with -s to see them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from smollm2_build import SmolLM2Build
from tiny_llama import save_tiny_llama

from memosd.runtime import LoadedModel, ModelSpec, load_model
from memosd.runtime.kvcache import (
    BLOCK,
    CacheMismatch,
    ComputeCancelled,
    CorruptCache,
    EmptyPrefix,
    KVCache,
    PrefixTooLong,
    block_hashes,
    compute_prefix_cache,
    from_chunks,
    prepare_generation,
    read_chunk_metadata,
    to_chunks,
)

SALT = b"cube-salt-1"
CONTEXT = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=CONTEXT)
    return load_model(ModelSpec(source=str(path), device="cpu"), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-2"), seed=1, context=CONTEXT)
    return load_model(ModelSpec(source=str(path), device="cpu"), tmp_path_factory.mktemp("cache2"))


def _ids(n: int, seed: int, vocab: int = 290) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, vocab, (n,), generator=g)]


def _full_logits(lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        out: Any = lm.model(input_ids=torch.tensor([list(ids)]))
    logits: torch.Tensor = out.logits[0, -1]
    return logits


def _cached_logits(lm: LoadedModel, cache: KVCache, ids: Sequence[int]) -> torch.Tensor:
    dyn, rest = prepare_generation(lm, cache, ids)
    with torch.no_grad():
        out: Any = lm.model(input_ids=torch.tensor([rest]), past_key_values=dyn, use_cache=True)
    logits: torch.Tensor = out.logits[0, -1]
    return logits


def _snapshot(cache: KVCache) -> list[torch.Tensor]:
    return [t.clone() for t in (*cache.keys, *cache.values)]


def _unchanged(cache: KVCache, snap: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip((*cache.keys, *cache.values), snap, strict=True))


# --- block keys ------------------------------------------------------------------------------------


def test_block_hashes_chain_and_key_space() -> None:
    ids = _ids(200, 1)
    h = block_hashes(ids, fingerprint="fp", salt=SALT)
    assert len(h) == 4  # 64 + 64 + 64 + 8 (partial last block)
    assert len(set(h)) == 4 and all(len(x) == 64 for x in h)
    assert h == block_hashes(tuple(torch.tensor(ids).tolist()), fingerprint="fp", salt=SALT)  # deterministic
    # A longer sequence with the same start shares the hashes of the full blocks, and only those.
    longer = block_hashes([*ids, *_ids(100, 2)], fingerprint="fp", salt=SALT)
    assert longer[:3] == h[:3] and longer[3] != h[3]
    # One changed token in block 1 changes block 1 and, through the chain, every later block.
    changed = list(ids)
    changed[70] += 1
    hc = block_hashes(changed, fingerprint="fp", salt=SALT)
    assert hc[0] == h[0] and all(a != b for a, b in zip(hc[1:], h[1:], strict=True))
    # Fingerprint, salt and extra each give a disjoint key space, from the first block on.
    for other in (
        block_hashes(ids, fingerprint="fp2", salt=SALT),
        block_hashes(ids, fingerprint="fp", salt=b"cube-salt-2"),
        block_hashes(ids, fingerprint="fp", salt=SALT, extra=b"adapter"),
        block_hashes(
            ids, fingerprint="fp", salt=SALT[:-1], extra=SALT[-1:]
        ),  # bytes cannot slide across fields
    ):
        assert not set(other) & set(h)
    assert block_hashes([], fingerprint="fp", salt=SALT) == []
    assert len(block_hashes(ids[:BLOCK], fingerprint="fp", salt=SALT)) == 1


# --- compute, reuse, non-mutation ------------------------------------------------------------------


def test_prefix_cache_matches_full_prefill(tiny: LoadedModel) -> None:
    prefix, suffix = _ids(300, 3), _ids(12, 4)
    cache, stats = compute_prefix_cache(tiny, prefix, salt=SALT)
    assert (stats.tokens_computed, stats.tokens_reused) == (300, 0)
    assert cache.n_tokens == 300 and cache.n_layers == 2 and cache.dtype == torch.float32
    assert cache.keys[0].shape == (1, 2, 300, 16)
    # 2 layers x (K + V) x 2 kv heads x 16 head_dim x 4 bytes
    assert stats.bytes == cache.nbytes == 300 * 2 * 2 * 2 * 16 * 4
    assert cache.key == block_hashes(prefix, fingerprint=tiny.fingerprint, salt=SALT)[-1]
    full = _full_logits(tiny, [*prefix, *suffix])
    torch.testing.assert_close(_cached_logits(tiny, cache, [*prefix, *suffix]), full, atol=1e-4, rtol=1e-4)
    # Chunked prefill (here 50 tokens a pass) gives the same cache.
    chunked, _ = compute_prefix_cache(tiny, prefix, salt=SALT, chunk_tokens=50)
    for a, b in zip((*cache.keys, *cache.values), (*chunked.keys, *chunked.values), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_incremental_reuse_computes_only_new_tokens(tiny: LoadedModel) -> None:
    old_ids = _ids(200, 5)  # 3 full blocks + 8 tokens
    old, _ = compute_prefix_cache(tiny, old_ids, salt=SALT)
    snap = _snapshot(old)
    new_ids = [*old_ids, *_ids(100, 6)]  # an append-only commit
    new, stats = compute_prefix_cache(tiny, new_ids, salt=SALT, reuse=old)
    # The partial last block of the old cache is recomputed: reuse stops at the last shared full block.
    assert (stats.tokens_reused, stats.tokens_computed) == (192, 108)
    scratch, _ = compute_prefix_cache(tiny, new_ids, salt=SALT)
    assert new.block_hashes == scratch.block_hashes
    for a, b in zip((*new.keys, *new.values), (*scratch.keys, *scratch.values), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert _unchanged(old, snap)  # computed on a copy
    assert all(n.data_ptr() != o.data_ptr() for n, o in zip(new.keys, old.keys, strict=True))
    query = _ids(5, 7)
    torch.testing.assert_close(
        _cached_logits(tiny, new, [*new_ids, *query]),
        _full_logits(tiny, [*new_ids, *query]),
        atol=1e-4,
        rtol=1e-4,
    )

    same, s_same = compute_prefix_cache(tiny, old_ids, salt=SALT, reuse=old)
    assert (s_same.tokens_reused, s_same.tokens_computed) == (200, 0)
    assert same.key == old.key
    edited = list(old_ids)
    edited[100] += 1  # an edit in block 1: only block 0 survives
    _, s_edit = compute_prefix_cache(tiny, edited, salt=SALT, reuse=old)
    assert (s_edit.tokens_reused, s_edit.tokens_computed) == (64, 136)
    shorter, s_short = compute_prefix_cache(tiny, old_ids[:130], salt=SALT, reuse=old)
    assert (s_short.tokens_reused, s_short.tokens_computed) == (128, 2)
    assert shorter.n_tokens == 130
    # Another cube (salt) or another model never reuses.
    _, s_salt = compute_prefix_cache(tiny, new_ids, salt=b"other", reuse=old)
    assert s_salt.tokens_reused == 0
    assert _unchanged(old, snap)


def test_generation_never_mutates_the_cache(tiny: LoadedModel) -> None:
    prefix, query = _ids(150, 8), _ids(6, 9)
    cache, _ = compute_prefix_cache(tiny, prefix, salt=SALT)
    snap = _snapshot(cache)
    model: Any = tiny.model
    ids = torch.tensor([[*prefix, *query]])
    runs = []
    # DynamicLayers sharing the cache's tensors, then GrowingLayers: one that must grow past its room
    # while decoding, one with room to spare.
    for capacity in (0, 0, ids.shape[1] + 2, 1000):
        dyn, _rest = prepare_generation(tiny, cache, ids[0].tolist(), capacity=capacity)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, past_key_values=dyn, max_new_tokens=10, min_new_tokens=10, do_sample=False
            )
        runs.append(out[0, ids.shape[1] :].tolist())
        assert dyn.get_seq_length() > cache.n_tokens  # the DynamicCache grew ...
    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert _unchanged(cache, snap)  # ... the KVCache did not
    assert cache.keys[0].shape[2] == 150
    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert runs[0] == plain[0, ids.shape[1] :].tolist()
    # to_dynamic_cache hands out copies, never the stored tensors.
    dyn = cache.to_dynamic_cache()
    layers: list[Any] = list(dyn.layers)
    assert all(
        torch.equal(layer.keys, k) and layer.keys.data_ptr() != k.data_ptr()
        for layer, k in zip(layers, cache.keys, strict=True)
    )


def test_compute_refuses_bad_input(tiny: LoadedModel, other_tiny: LoadedModel) -> None:
    with pytest.raises(EmptyPrefix):
        compute_prefix_cache(tiny, [], salt=SALT)
    with pytest.raises(PrefixTooLong):
        compute_prefix_cache(tiny, _ids(CONTEXT, 10), salt=SALT)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ComputeCancelled):
        compute_prefix_cache(tiny, _ids(100, 10), salt=SALT, cancel=cancel)
    prefix = _ids(70, 11)
    cache, _ = compute_prefix_cache(tiny, prefix, salt=SALT)
    with pytest.raises(CacheMismatch, match="model"):
        prepare_generation(other_tiny, cache, [*prefix, 5])
    with pytest.raises(CacheMismatch, match="prefix"):
        prepare_generation(tiny, cache, [*prefix[:-1], prefix[-1] + 1, 5])
    with pytest.raises(ValueError, match="at least one token"):
        prepare_generation(tiny, cache, prefix)
    # A cache of another model is never used as a base for reuse.
    _, stats = compute_prefix_cache(other_tiny, [*prefix, 1, 2], salt=SALT, reuse=cache)
    assert stats.tokens_reused == 0


# --- persistence -----------------------------------------------------------------------------------


def test_chunks_round_trip_and_fp16_error(tiny: LoadedModel) -> None:
    prefix, query = _ids(300, 12), _ids(8, 13)
    cache, _ = compute_prefix_cache(tiny, prefix, salt=SALT)
    full = _full_logits(tiny, [*prefix, *query])

    exact = from_chunks(to_chunks(cache, dtype=torch.float32), expected_fingerprint=tiny.fingerprint)
    assert exact.block_hashes == cache.block_hashes and exact.token_ids == cache.token_ids
    assert all(torch.equal(a, b) for a, b in zip(exact.keys, cache.keys, strict=True))

    per_block = BLOCK * cache.bytes_per_token // 2  # bytes of one block in fp16
    chunks = to_chunks(cache, chunk_bytes=2 * per_block)  # fp16, two blocks per chunk
    assert len(chunks) == 3  # 128 + 128 + 44 tokens
    meta = read_chunk_metadata(chunks[0])
    assert meta["fingerprint"] == tiny.fingerprint and meta["salt"] == SALT.hex()
    assert meta["stored_dtype"] == "float16" and meta["model_dtype"] == "float32"
    assert meta["n_tokens"] == "300" and meta["n_layers"] == "2" and meta["key"] == cache.key
    stored = sum(len(c) for c in chunks)
    assert cache.nbytes // 2 < stored < cache.nbytes // 2 + 3 * 4096  # fp16 payload plus headers

    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        back = from_chunks(
            to_chunks(cache, dtype=dtype), expected_fingerprint=tiny.fingerprint, expected_salt=SALT
        )
        assert back.dtype == torch.float32  # cast to the model's dtype on load
        assert back.key == cache.key
        err = (_cached_logits(tiny, back, [*prefix, *query]) - full).abs().max().item()
        errors[str(dtype)] = err
    print(f"\nnext-token logits max |diff| vs fp32 full prefill (tiny llama): {errors}")
    assert errors["torch.float16"] < 1e-2
    assert errors["torch.bfloat16"] < 5e-2


def test_from_chunks_refuses_other_model_and_cube(tiny: LoadedModel, other_tiny: LoadedModel) -> None:
    cache, _ = compute_prefix_cache(tiny, _ids(100, 14), salt=SALT)
    chunks = to_chunks(cache)
    with pytest.raises(CacheMismatch, match="model"):
        from_chunks(chunks, expected_fingerprint=other_tiny.fingerprint)
    with pytest.raises(CacheMismatch, match="salt"):
        from_chunks(chunks, expected_fingerprint=tiny.fingerprint, expected_salt=b"another cube")


def test_from_chunks_refuses_corruption(tiny: LoadedModel) -> None:
    cache, _ = compute_prefix_cache(tiny, _ids(300, 15), salt=SALT)
    chunks = to_chunks(cache, chunk_bytes=BLOCK * cache.bytes_per_token // 2)  # one block per chunk
    assert len(chunks) == 5
    other, _ = compute_prefix_cache(tiny, _ids(300, 16), salt=SALT)
    other_chunks = to_chunks(other, chunk_bytes=BLOCK * other.bytes_per_token // 2)
    fp = tiny.fingerprint

    def flipped(blob: bytes, at: int) -> bytes:
        return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]

    bad_sets: dict[str, list[bytes]] = {
        "empty": [],
        "garbage": [b"not a cache at all"],
        "truncated": [*chunks[:-1], chunks[-1][:-10]],
        "truncated header": [chunks[0][:20], *chunks[1:]],
        "bit flip in data": [*chunks[:2], flipped(chunks[2], len(chunks[2]) - 7), *chunks[3:]],
        "missing chunk": [*chunks[:2], *chunks[3:]],
        "reordered": [chunks[1], chunks[0], *chunks[2:]],
        "mixed caches": [*chunks[:2], other_chunks[2], *chunks[3:]],
    }
    for name, bad in bad_sets.items():
        with pytest.raises(CorruptCache):
            from_chunks(bad, expected_fingerprint=fp)
            pytest.fail(f"{name} was accepted")
    assert from_chunks(chunks, expected_fingerprint=fp).key == cache.key


def test_reuse_from_a_stored_cache(tiny: LoadedModel) -> None:
    """After a restart the previous cache comes from the store (fp16); incremental activation still works."""
    old_ids = _ids(256, 17)
    old, _ = compute_prefix_cache(tiny, old_ids, salt=SALT)
    restored = from_chunks(to_chunks(old), expected_fingerprint=tiny.fingerprint)
    new_ids = [*old_ids, *_ids(40, 18)]
    new, stats = compute_prefix_cache(tiny, new_ids, salt=SALT, reuse=restored)
    assert (stats.tokens_reused, stats.tokens_computed) == (256, 40)
    query = _ids(4, 19)
    err = (_cached_logits(tiny, new, [*new_ids, *query]) - _full_logits(tiny, [*new_ids, *query])).abs().max()
    assert err.item() < 1e-2


# --- the real embedded model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_build: SmolLM2Build) -> LoadedModel:
    loaded: LoadedModel = smollm2_build.loaded
    return loaded


def _greedy(lm: LoadedModel, ids: list[int], n: int, cache: KVCache | None) -> tuple[list[int], float]:
    """Greedy decode of ``n`` tokens by hand; returns the tokens and the time to the first one."""
    model: Any = lm.model
    start = time.perf_counter()
    with torch.no_grad():
        if cache is None:
            from transformers import DynamicCache

            dyn, rest = DynamicCache(), ids
        else:
            dyn, rest = prepare_generation(lm, cache, ids)
        out = model(input_ids=torch.tensor([rest]), past_key_values=dyn, use_cache=True, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        ttft = time.perf_counter() - start
        while len(tokens) < n:
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=dyn, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, ttft


def test_smollm2_prefix_cache_greedy(smollm2: LoadedModel) -> None:
    tok = smollm2.tokenizer
    facts = " ".join(
        f"Item {i}: the {c} box on shelf {i % 7} holds {i * 3} {n}."
        for i, (c, n) in enumerate(
            [("red", "apples"), ("blue", "pencils"), ("green", "keys"), ("yellow", "coins")] * 7
        )
    )
    block = tok.apply_chat_template(
        [{"role": "system", "content": f"Memory:\n{facts}"}], tokenize=False, add_generation_prompt=False
    )
    prefix: list[int] = tok(block, add_special_tokens=False)["input_ids"]
    query: list[int] = tok(
        "<|im_start|>user\nWhat does the blue box on shelf 1 hold?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    assert 400 <= len(prefix) <= 800, len(prefix)
    salt = b"smollm2-test-cube"

    cache, stats = compute_prefix_cache(smollm2, prefix, salt=salt)
    full_tokens, ttft_full = _greedy(smollm2, [*prefix, *query], 8, None)
    cached_tokens, ttft_cached = _greedy(smollm2, [*prefix, *query], 8, cache)
    assert cached_tokens == full_tokens

    start = time.perf_counter()
    chunks = to_chunks(cache)
    store_s = time.perf_counter() - start
    start = time.perf_counter()
    restored = from_chunks(chunks, expected_fingerprint=smollm2.fingerprint, expected_salt=salt)
    load_s = time.perf_counter() - start
    cold_tokens, ttft_cold = _greedy(smollm2, [*prefix, *query], 8, restored)
    ref = _full_logits(smollm2, [*prefix, *query])
    fp16_err = (_cached_logits(smollm2, restored, [*prefix, *query]) - ref).abs().max().item()
    fp32_err = (_cached_logits(smollm2, cache, [*prefix, *query]) - ref).abs().max().item()
    assert fp32_err < 1e-3
    assert cold_tokens == full_tokens  # greedy through an fp16 round trip agrees on this prompt

    print(
        f"\nSmolLM2 prefix {len(prefix)} tok + query {len(query)} tok: prefill {stats.seconds:.3f}s "
        f"({stats.bytes} B, {cache.bytes_per_token} B/token fp32); TTFT full {ttft_full:.3f}s, "
        f"hot cache {ttft_cached:.3f}s ({ttft_full / ttft_cached:.1f}x), cold {load_s + ttft_cold:.3f}s "
        f"(load {load_s:.3f}s, {len(chunks)} chunks {sum(map(len, chunks))} B fp16, store {store_s:.3f}s); "
        f"logits max|diff| fp32 {fp32_err:.2e} fp16 {fp16_err:.2e}"
    )
