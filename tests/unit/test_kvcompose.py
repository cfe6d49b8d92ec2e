"""Composed reuse (runtime/kvcompose.py and the transformers engine's placements), on a tiny random Llama.

What can be exact is checked exactly: the re-rotated keys of layer 0 (which depend on nothing but the token
and its position) equal a full prefill's, and a placement that recomputes every token is the full prefill.
The approximation itself is checked to be the one described: closer to the full prefill than the same
caches concatenated without re-rotation, and what it reports reusing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tiny_llama import save_tiny_llama
from transformers import DynamicCache

from memosd.runtime import LoadedModel, ModelSpec, load_model
from memosd.runtime.engine import Finished, Sampling, Token
from memosd.runtime.kvcache import compute_prefix_cache, prepare_generation
from memosd.runtime.kvcompose import (
    PlacedAttention,
    Placement,
    compose_prefill,
    compose_unsupported,
    decode_mask,
    deviating_tokens,
    pick_deviating,
    recompute_tokens,
    rotate_keys,
)
from memosd.runtime.transformers_engine import KeepPrefix, TransformersEngine
from memosd.runtime.worker import RuntimeWorker

FIRST = [5, 9, 17, 3, 11, 40, 2, 8, 13, 21, 34, 7, 6, 30, 19, 12] * 3  # 48 tokens
SECOND = [14, 22, 4, 33, 27, 18, 10, 25, 36, 15, 29, 31] * 4  # 48 tokens
TAIL = [41, 42, 43, 44, 45, 46]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=512)
    return load_model(ModelSpec(source=str(path), device="cpu"), tmp_path_factory.mktemp("cache"))


@pytest.fixture
def engine() -> Iterator[TransformersEngine]:
    worker = RuntimeWorker()
    yield TransformersEngine(worker, prefill_chunk=32)
    worker.shutdown(wait=True, cancel_pending=True)


def _full_keys(tiny: LoadedModel, ids: list[int]) -> list[torch.Tensor]:
    cache = DynamicCache()
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return [layer.keys for layer in cache.layers]


def _first_logprobs(engine: TransformersEngine, tiny: LoadedModel, prompt: list[int],
                    **kw: Any) -> tuple[list[Token], Finished]:
    stream = engine.generate(tiny, prompt, Sampling(max_tokens=4, ignore_eos=True), prepare=lambda: None,
                             cancel=threading.Event(), **kw)
    events = stream.events(timeout=60)
    end = events[-1]
    assert isinstance(end, Finished) and end.reason == "length", end
    return [e for e in events if isinstance(e, Token)], end


def test_rotated_keys_of_layer_0_equal_the_full_prefill_at_the_new_position(tiny: LoadedModel) -> None:
    alone, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    full = _full_keys(tiny, FIRST + SECOND)
    placed = rotate_keys(tiny, alone.keys[0], len(FIRST))
    assert torch.allclose(placed, full[0][:, :, len(FIRST):], atol=1e-5)
    # Not vacuous: unrotated, they differ, and in a later layer the missing context shows.
    assert not torch.allclose(alone.keys[0], full[0][:, :, len(FIRST):], atol=1e-3)
    assert not torch.allclose(rotate_keys(tiny, alone.keys[1], len(FIRST)), full[1][:, :, len(FIRST):], atol=1e-3)
    assert rotate_keys(tiny, alone.keys[0], 0) is alone.keys[0]


def test_a_placement_that_recomputes_every_token_is_the_full_prefill(
        tiny: LoadedModel, engine: TransformersEngine) -> None:
    prompt = FIRST + SECOND + TAIL
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    full, full_end = _first_logprobs(engine, tiny, prompt, prefix=None)
    whole = Placement(len(FIRST), second, recompute=len(SECOND))
    exact, exact_end = _first_logprobs(engine, tiny, prompt, prefix=first, placements=[whole])
    assert [t.token_id for t in exact] == [t.token_id for t in full]
    assert [t.logprob for t in exact] == pytest.approx([t.logprob for t in full], abs=1e-4)
    assert full_end.cached_tokens == 0 and exact_end.cached_tokens == len(FIRST)  # nothing of SECOND placed


def test_composition_is_closer_to_the_full_prefill_than_unrotated_caches_and_counts_what_it_placed(
        tiny: LoadedModel, engine: TransformersEngine) -> None:
    prompt = FIRST + SECOND + TAIL
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")

    def next_logprobs(cache: DynamicCache) -> torch.Tensor:
        with torch.no_grad():
            out = tiny.model(input_ids=torch.tensor([TAIL]), past_key_values=cache, use_cache=True)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)

    full = next_logprobs(_cache(tiny, FIRST + SECOND))
    naive = DynamicCache()  # the caches concatenated as they are (what MemOS does)
    for i, (a, b) in enumerate(zip(first.keys, second.keys, strict=True)):
        naive.update(torch.cat([a, b], dim=2), torch.cat([first.values[i], second.values[i]], dim=2), i)

    def kl(got: torch.Tensor) -> float:
        return float((full.exp() * (full - got)).sum())

    tokens, end = _first_logprobs(engine, tiny, prompt, prefix=first, placements=[Placement(len(FIRST), second, 4)])
    assert end.cached_tokens == len(FIRST) + len(SECOND) - 4 and end.prompt_tokens == len(prompt)
    composed, _ = _composed_logprobs(tiny, first, [(len(FIRST), second, 4)], prompt)
    assert float(tokens[0].logprob or 0) == pytest.approx(float(composed[tokens[0].token_id]), abs=1e-4)
    assert kl(composed) < kl(next_logprobs(naive))
    assert kl(composed) > 0  # an approximation, and the test would see if it were not one


def _cache(tiny: LoadedModel, ids: list[int]) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache


def _composed_logprobs(tiny: LoadedModel, first: Any, blocks: list[tuple[int, Any, int]],
                       prompt: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """The composition written out by hand, one block after another: the reference the engine's one-pass
    prefill (4D mask by position, keys placed first) is checked against. ``blocks``: (start, cache,
    recompute) after ``first``, which is the prompt's prefix."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(first.keys, first.values, strict=True)):
        cache.update(k.clone(), v.clone(), i)
    done = first.n_tokens
    with torch.no_grad():
        for start, block, recompute in blocks:
            tiny.model(input_ids=torch.tensor([prompt[done:start + recompute]]), past_key_values=cache, use_cache=True)
            for i, (k, v) in enumerate(zip(block.keys, block.values, strict=True)):
                cache.update(rotate_keys(tiny, k[:, :, recompute:], start), v[:, :, recompute:], i)
            done = start + block.n_tokens
        out = tiny.model(input_ids=torch.tensor([prompt[done:]]), past_key_values=cache, use_cache=True)
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1), cache


def _greedy_continuation(tiny: LoadedModel, first: torch.Tensor, cache: DynamicCache, steps: int) -> list[int]:
    """The greedy reply from a reference composition (its cache in prompt order)."""
    picked = [int(first.argmax())]
    with torch.no_grad():
        while len(picked) < steps:
            out = tiny.model(input_ids=torch.tensor([[picked[-1]]]), past_key_values=cache, use_cache=True)
            picked.append(int(out.logits[0, -1].argmax()))
    return picked


def test_one_pass_over_several_blocks_gaps_and_chunks_is_the_block_by_block_composition(
        tiny: LoadedModel, engine: TransformersEngine) -> None:
    # Three blocks, prompt tokens between them, and more computed tokens than a prefill chunk (32): the
    # engine's single masked pass must be the same arithmetic as composing one block after another.
    third = [37, 23, 16, 28, 20, 35, 26, 32] * 5  # 40 tokens
    gap = [47, 48, 49]
    prompt = FIRST + SECOND + gap + third + TAIL * 4
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    own_third, _ = compute_prefix_cache(tiny, third, salt=b"third")
    at_third = len(FIRST + SECOND + gap)
    blocks = [(len(FIRST), second, 5), (at_third, own_third, 9)]
    tokens, end = _first_logprobs(engine, tiny, prompt, prefix=first,
                                  placements=[Placement(s, c, r) for s, c, r in blocks])
    assert end.cached_tokens == len(FIRST) + (len(SECOND) - 5) + (len(third) - 9)
    reference, reference_cache = _composed_logprobs(tiny, first, blocks, prompt)
    assert tokens[0].token_id == int(reference.argmax())
    assert float(tokens[0].logprob or 0) == pytest.approx(float(reference[tokens[0].token_id]), abs=1e-4)
    # Every key sits at its position: layer 0's keys (which depend on nothing but the token and its
    # position) in the composed cache, in memory order (the prefix, the placed parts, then the computed
    # tokens), equal the full prefill's at those positions. The tiny model's near-uniform attention would
    # hide a wrong position in the logits; this does not.
    dyn, _ = prepare_generation(tiny, first, prompt)
    compose_prefill(tiny, dyn, prompt, len(FIRST), [Placement(s, c, r) for s, c, r in blocks], chunk=32)
    placed = [p for s, c, r in blocks for p in range(s + r, s + c.n_tokens)]
    order = list(range(len(FIRST))) + placed + [p for p in range(len(FIRST), len(prompt)) if p not in placed]
    full_keys = _full_keys(tiny, prompt)[0]
    assert torch.allclose(dyn.layers[0].keys, full_keys[:, :, order], atol=1e-5)
    # Decoding goes on from the out-of-order cache at the right positions: the reference's greedy reply.
    assert [t.token_id for t in tokens] == _greedy_continuation(tiny, reference, reference_cache, len(tokens))
    whole = [Placement(s, c, c.n_tokens) for s, c, _ in blocks]  # everything recomputed: the full prefill
    exact, _ = _first_logprobs(engine, tiny, prompt, prefix=first, placements=whole)
    greedy, _ = _first_logprobs(engine, tiny, prompt, prefix=None)
    assert [t.token_id for t in exact] == [t.token_id for t in greedy]
    assert [t.logprob for t in exact] == pytest.approx([t.logprob for t in greedy], abs=1e-4)


def test_the_placed_keys_temperature_and_scale_are_those_of_keys_divided_and_duplicated(
        tiny: LoadedModel, engine: TransformersEngine) -> None:
    # APE's adjustment, checked against arithmetic that needs no mask: a scale of 2 on a key's weight is
    # that key (and its value) present twice, and a temperature T on q.k is the key divided by T. So the
    # reference composes block by block with each placed part appended twice, its keys divided by T, and
    # every computed query (the tail, each decoded token) attends to it; the first block and every computed
    # token stay as they are. Three blocks and a gap, to check where the placed keys are in the cache.
    third = [37, 23, 16, 28, 20, 35, 26, 32] * 5
    gap = [47, 48, 49]
    prompt = FIRST + SECOND + gap + third + TAIL * 2
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    own_third, _ = compute_prefix_cache(tiny, third, salt=b"third")
    own_keys = [k.clone() for k in second.keys]
    blocks = [(len(FIRST), second, 5), (len(FIRST + SECOND + gap), own_third, 9)]
    temperature, scale = 0.5, 2.0
    tokens, _ = _first_logprobs(engine, tiny, prompt, prefix=first, placements=[Placement(*b) for b in blocks],
                                attention=PlacedAttention(temperature, scale))

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(first.keys, first.values, strict=True)):
        cache.update(k.clone(), v.clone(), i)
    done = first.n_tokens

    def run(ids: list[int], at: int) -> torch.Tensor:  # positions passed: the duplicates lengthen the cache
        out = tiny.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(at, at + len(ids))[None],
                         past_key_values=cache, use_cache=True)
        return out.logits[0, -1]

    with torch.no_grad():
        for start, block, recompute in blocks:
            run(prompt[done:start + recompute], done)
            for _ in range(2):
                for i, (k, v) in enumerate(zip(block.keys, block.values, strict=True)):
                    cache.update(rotate_keys(tiny, k[:, :, recompute:], start) / temperature, v[:, :, recompute:], i)
            done = start + block.n_tokens
        logits = run(prompt[done:], done)
        reference = torch.log_softmax(logits.float(), dim=-1)
        picked = [int(reference.argmax())]
        logprobs = [float(reference[picked[0]])]
        while len(picked) < len(tokens):
            step = torch.log_softmax(run(picked[-1:], len(prompt) + len(picked) - 1).float(), dim=-1)
            picked.append(int(step.argmax()))
            logprobs.append(float(step[picked[-1]]))
    assert [t.token_id for t in tokens] == picked
    assert [t.logprob for t in tokens] == pytest.approx(logprobs, abs=1e-4)
    # Not vacuous: the plain composition gives other logprobs, and the blocks' own caches are untouched.
    plain, _ = _first_logprobs(engine, tiny, prompt, prefix=first, placements=[Placement(*b) for b in blocks])
    assert max(abs(float(a.logprob or 0) - float(b.logprob or 0)) for a, b in zip(plain, tokens, strict=True)) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(own_keys, second.keys, strict=True))


def test_no_adjustment_adds_no_mask_and_the_scale_is_a_log_bias_on_the_placed_keys_only() -> None:
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4), 0)
    placed = slice(3, 7)
    assert decode_mask(PlacedAttention(), placed, cache, dtype=torch.float32, device="cpu") is None
    assert decode_mask(PlacedAttention(0.5), placed, cache, dtype=torch.float32, device="cpu") is None
    assert not PlacedAttention().active and PlacedAttention(0.8).active and PlacedAttention(1.0, 0.9).active
    mask = decode_mask(PlacedAttention(1.0, 0.5), placed, cache, dtype=torch.float32, device="cpu")
    assert mask is not None and mask.shape == (1, 1, 1, 11)  # the cache's keys and the new token's
    expected = torch.zeros(11)
    expected[3:7] = torch.log(torch.tensor(0.5))
    assert torch.allclose(mask[0, 0, 0], expected)


def test_a_placement_must_sit_on_its_own_tokens_and_is_never_kept(
        tiny: LoadedModel, engine: TransformersEngine) -> None:
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    wrong = FIRST + list(reversed(SECOND)) + TAIL
    stream = engine.generate(tiny, wrong, Sampling(max_tokens=2), prefix=first, prepare=lambda: None,
                             cancel=threading.Event(), placements=[Placement(len(FIRST), second, 2)])
    end = stream.events(timeout=60)[-1]
    assert isinstance(end, Finished) and end.reason == "error" and isinstance(end.exception, ValueError)
    keep = KeepPrefix(len(FIRST + SECOND), b"first", b"", (b"second",), lambda cache: None)
    with pytest.raises(ValueError, match="not exact"):
        engine.generate(tiny, FIRST + SECOND + TAIL, Sampling(max_tokens=2), prefix=first, prepare=lambda: None,
                        cancel=threading.Event(), keep=keep, placements=[Placement(len(FIRST), second, 2)])


def _loaded(**config: Any) -> LoadedModel:
    return SimpleNamespace(config=SimpleNamespace(**config))  # type: ignore[return-value]


def test_families_and_rotary_kinds_outside_plain_rope_fall_back_and_say_why(tiny: LoadedModel) -> None:
    assert compose_unsupported(tiny) == ""  # the tiny Llama composes
    assert compose_unsupported(_loaded(model_type="llama", rope_scaling={"rope_type": "llama3"})) == ""
    assert "gpt2 model family" in compose_unsupported(_loaded(model_type="gpt2"))
    assert "yarn rotary scaling" in compose_unsupported(_loaded(model_type="qwen2", rope_scaling={"type": "yarn"}))
    assert "dynamic" in compose_unsupported(_loaded(model_type="llama", rope_scaling={"rope_type": "dynamic"}))
    assert "partial rotary" in compose_unsupported(_loaded(model_type="llama", partial_rotary_factor=0.5))


def test_the_recompute_fraction_rounds_up_and_one_recomputes_the_block() -> None:
    assert recompute_tokens(700, 0.0) == 0
    assert recompute_tokens(700, 0.05) == 35
    assert recompute_tokens(700, 0.001) == 1
    assert recompute_tokens(700, 1.0) == 700


def test_the_deviation_count_rounds_up_and_stops_at_the_block() -> None:
    assert deviating_tokens(700, 0.0, 7) == 0
    assert deviating_tokens(700, 0.02, 7) == 14
    assert deviating_tokens(700, 0.001, 7) == 1
    assert deviating_tokens(700, 1.0, 7) == 693  # no more than the tokens after the recomputed first ones
    assert Placement(0, SimpleNamespace(n_tokens=700), 7, 14).placed_tokens == 679  # type: ignore[arg-type]


def test_the_deviating_tokens_are_those_whose_layer_1_values_differ_most_from_the_full_prefill(
        tiny: LoadedModel) -> None:
    # Layer 1's values in context are exactly the full prefill's (layer 0 depends on nothing but tokens and
    # positions), so the picks can be checked against an independent reference: the full prefill's layer-1
    # values against the block's own, largest squared distance first, after its recomputed first tokens.
    third = [37, 23, 16, 28, 20, 35, 26, 32] * 5
    gap = [47, 48, 49]
    prompt = FIRST + SECOND + gap + third + TAIL
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    own_third, _ = compute_prefix_cache(tiny, third, salt=b"third")
    at_third = len(FIRST + SECOND + gap)
    placements = [Placement(len(FIRST), second, 3, 7), Placement(at_third, own_third, 2, 5)]
    full = _cache(tiny, prompt).layers[1].values
    dyn, _ = prepare_generation(tiny, first, prompt)
    picked = pick_deviating(tiny, dyn, prompt, len(FIRST), placements, chunk=16, check=lambda: None)
    assert dyn.get_seq_length() == len(FIRST)  # picking changes nothing in the cache
    for placement, got in zip(placements, picked, strict=True):
        n, skip = placement.cache.n_tokens, placement.recompute
        in_context = full[:, :, placement.start:placement.start + n]
        deviation = (in_context - placement.cache.values[1]).pow(2).sum(dim=(0, 1, 3))[skip:]
        want = sorted(int(j) + skip for j in deviation.topk(placement.deviating).indices)
        assert got is not None and got.tolist() == want
        assert deviation.max() > 1e-3  # not vacuous: the block alone has other values than in context


def test_recomputing_the_deviating_tokens_recomputes_them_and_places_the_rest(
        tiny: LoadedModel, engine: TransformersEngine) -> None:
    prompt = FIRST + SECOND + TAIL
    first, _ = compute_prefix_cache(tiny, FIRST, salt=b"first")
    second, _ = compute_prefix_cache(tiny, SECOND, salt=b"second")
    chosen = Placement(len(FIRST), second, 3, 9)
    tokens, end = _first_logprobs(engine, tiny, prompt, prefix=first, placements=[chosen])
    assert end.cached_tokens == len(FIRST) + len(SECOND) - 12  # what Generate's summary reports as reused
    # In memory order: the prefix, the placed tokens, then the computed ones (the recomputed, the tail);
    # layer 0's keys equal the full prefill's at those positions, and the logits are the composition's with
    # exactly those tokens recomputed, written out by hand one token run at a time.
    dyn, _ = prepare_generation(tiny, first, prompt)
    picked = pick_deviating(tiny, dyn, prompt, len(FIRST), [chosen], chunk=32, check=lambda: None)[0]
    assert picked is not None and len(picked) == 9 and min(picked.tolist()) >= 3
    recomputed = [*range(3), *picked.tolist()]
    placed = [j for j in range(len(SECOND)) if j not in recomputed]
    logits = compose_prefill(tiny, dyn, prompt, len(FIRST), [chosen], chunk=32)
    order = [*range(len(FIRST)), *(len(FIRST) + j for j in placed), *(len(FIRST) + j for j in recomputed),
             *range(len(FIRST + SECOND), len(prompt))]
    assert torch.allclose(dyn.layers[0].keys, _full_keys(tiny, prompt)[0][:, :, order], atol=1e-5)
    reference = DynamicCache()
    for i, (k, v) in enumerate(zip(first.keys, first.values, strict=True)):
        reference.update(torch.cat([k, rotate_keys(tiny, second.keys[i][:, :, placed], len(FIRST))], dim=2),
                         torch.cat([v, second.values[i][:, :, placed]], dim=2), i)
    positions = torch.tensor([len(FIRST) + j for j in recomputed] + list(range(len(FIRST + SECOND), len(prompt))))
    seen = torch.cat([torch.arange(len(FIRST)), len(FIRST) + torch.tensor(placed), positions])
    mask = torch.zeros((len(positions), len(seen)))
    mask.masked_fill_(seen[None, :] > positions[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = tiny.model(input_ids=torch.tensor([[prompt[p] for p in positions.tolist()]]),
                         position_ids=positions[None], attention_mask=mask[None, None], past_key_values=reference,
                         use_cache=True)
    assert torch.allclose(logits[0, -1], out.logits[0, -1], atol=1e-4)
    assert float(tokens[0].logprob or 0) == pytest.approx(
        float(torch.log_softmax(logits[0, -1].float(), dim=-1)[tokens[0].token_id]), abs=1e-4)
    # Every token picked: the block is recomputed whole, which is the full prefill.
    whole, _ = _first_logprobs(engine, tiny, prompt, prefix=first,
                               placements=[Placement(len(FIRST), second, 3, len(SECOND))])
    full, _ = _first_logprobs(engine, tiny, prompt, prefix=None)
    assert [t.token_id for t in whole] == [t.token_id for t in full]
    assert [t.logprob for t in whole] == pytest.approx([t.logprob for t in full], abs=1e-4)
