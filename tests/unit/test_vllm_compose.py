"""Composed reuse on vLLM's paged cache (runtime/vllm_compose.py): the CPU layout, the rotation, the plan.

The layout is built here independently of ``keys_of``/``values_of``, the way vLLM's CPU kernels write a
block (per head: the keys head-dimension major, then the values token major), so a wrong view fails."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from memosd.runtime import kvcompose
from memosd.runtime import vllm_compose as vc

HEADS, SIZE, DIM = 3, 32, 16


def paged(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One engine block [heads, block, 2 x head] holding ``keys``/``values`` ([heads, block, head])."""
    flat = torch.cat((keys.transpose(1, 2).reshape(HEADS, -1), values.reshape(HEADS, -1)), dim=1)
    return flat.reshape(HEADS, SIZE, 2 * DIM).contiguous()


def unpaged(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = block.reshape(HEADS, -1)
    half = SIZE * DIM
    return flat[:, :half].reshape(HEADS, DIM, SIZE).transpose(1, 2), flat[:, half:].reshape(HEADS, SIZE, DIM)


def inv_freq() -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


def fake_loaded(freq: torch.Tensor) -> object:
    # kvcompose.rotate_keys reads model.model.rotary_emb.inv_freq (the transformers model's).
    return SimpleNamespace(model=SimpleNamespace(model=SimpleNamespace(rotary_emb=SimpleNamespace(inv_freq=freq))))


def test_the_views_read_the_cpu_layout() -> None:
    keys, values = torch.randn(HEADS, SIZE, DIM), torch.randn(HEADS, SIZE, DIM)
    block = paged(keys, values)
    assert torch.equal(vc.keys_of(block), keys) and torch.equal(vc.values_of(block), values)
    layers = torch.stack([block, paged(values, keys)])  # leading dims (layers) read alike
    assert torch.equal(vc.keys_of(layers)[1], values) and torch.equal(vc.values_of(layers)[1], keys)
    vc.keys_of(layers)[0, :, :2] = 0.0  # they are views: writes land in the block
    assert torch.equal(unpaged(layers[0])[0][:, :2], torch.zeros(HEADS, 2, DIM))


@pytest.mark.parametrize("offset", [1, 45, 4000])
def test_placing_a_paged_block_turns_its_keys_as_the_transformers_engine_does(offset: int) -> None:
    keys, values = torch.randn(HEADS, SIZE, DIM), torch.randn(HEADS, SIZE, DIM)
    src, dst = paged(keys, values), torch.zeros(HEADS, SIZE, 2 * DIM)
    vc.place(dst, src, 0, SIZE, 0, offset, inv_freq())
    got_k, got_v = unpaged(dst)
    want = kvcompose.rotate_keys(fake_loaded(inv_freq()), keys.unsqueeze(0), offset)[0]  # type: ignore[arg-type]
    assert torch.allclose(got_k, want, atol=1e-5) and torch.equal(got_v, values)
    assert not torch.allclose(got_k, keys, atol=1e-3)  # it did turn them


def test_a_block_at_an_unaligned_offset_is_assembled_from_two_stored_blocks() -> None:
    # A segment of 3 stored blocks whose token t carries the value t, placed at prompt position 45.
    tokens = torch.arange(3 * SIZE, dtype=torch.float32)
    stored = [paged(torch.zeros(HEADS, SIZE, DIM), tokens[j * SIZE:(j + 1) * SIZE].view(1, SIZE, 1)
                    .expand(HEADS, SIZE, DIM).clone()) for j in range(3)]
    start = 45
    for block_start in (64, 96):  # the engine blocks wholly inside the segment's first 2 stored blocks' reach
        layers = [torch.stack([s, s * 2]) for s in stored]  # two layers, the second twice the first
        both = vc.assemble([(layers[j], lo, n, at) for j, lo, n, at in vc.pieces(block_start, start, SIZE)],
                           start, inv_freq())
        _, v = unpaged(both[0])
        assert torch.equal(unpaged(both[1])[1], 2 * v)
        assert torch.equal(v[0, :, 0], torch.arange(block_start - start, block_start - start + SIZE,
                                                     dtype=torch.float32))
    assert vc.pieces(64, 0, SIZE) == [(2, 0, SIZE, 0)]  # aligned: one whole stored block


def test_the_plan_recomputes_whole_engine_blocks_and_loads_only_stored_ones() -> None:
    seg = vc.Segment("cube-b", start=100, tokens=300, recompute=3)
    assert vc.recompute_end(seg, SIZE) == 128  # 103 rounded up to a block
    stored = 300 // SIZE * SIZE
    assert vc.load_range(1, seg, stored, SIZE, limit=10_000) == vc.LoadRange(1, 128, (100 + stored) // SIZE * SIZE)
    assert vc.load_range(1, seg, 0, SIZE, limit=10_000) is None  # nothing stored: nothing placed
    assert vc.load_range(0, vc.Segment("a", 0, 100, 0), 96, SIZE, limit=64) == vc.LoadRange(0, 0, 64)
    whole = vc.Segment("cube-b", 100, 300, 300)
    assert vc.load_range(1, whole, stored, SIZE, limit=10_000) is None  # a fraction of 1: all recomputed


def test_a_composed_salt_is_never_a_cubes_and_differs_by_cube_place_and_fraction() -> None:
    a, b, twin = vc.Segment("a", 0, 90, 0), vc.Segment("b", 90, 80, 1), vc.Segment("twin", 90, 80, 1)
    salts = {vc.composed_salt([a, b], ""), vc.composed_salt([a, twin], ""), vc.composed_salt([a, b], "lora"),
             vc.composed_salt([a, vc.Segment("b", 90, 80, 8)], "")}
    assert len(salts) == 4 and not salts & {"a", "b", "twin"}
    assert vc.composed_salt([a, b], "") == vc.composed_salt([a, b], "")


def test_inv_freq_from_the_config_is_the_transformers_models() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_theta=100000.0)
    ours = vc.rope_inv_freq(config)
    assert ours is not None
    assert torch.allclose(ours, LlamaRotaryEmbedding(config).inv_freq)
    assert math.isclose(float(ours[1]), 100000.0 ** (-2 / 16), rel_tol=1e-6)


def test_a_chains_reuse_counts_only_what_the_request_covering_each_block_found() -> None:
    from memosd.runtime.vllm_engine import _composed_reuse, _ComposePlan

    a, b, c = vc.Segment("a", 0, 100, 0), vc.Segment("b", 100, 200, 2), vc.Segment("c", 300, 150, 2)
    rb, rc = vc.LoadRange(1, 128, 288), vc.LoadRange(2, 320, 448)
    plan = _ComposePlan((a, b, c), ((128, rb), (320, rc)), vc.LoadRange(0, 0, 96), ("", "", ""), ())
    # Request 0 (up to b's head) found a's 96; request 1 reached the end of b's range; the last, c's.
    assert _composed_reuse(plan, [96, 288, 448]) == (96, 160, 128)
    # The last request's hit fell short of c's range (evicted, say): c's placed tokens were computed.
    assert _composed_reuse(plan, [96, 288, 320]) == (96, 160, 0)
    assert _composed_reuse(plan, [96, 200, 400]) == (96, 72, 80)  # a load failed part-way through b
