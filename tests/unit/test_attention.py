"""runtime/attention.py: grouped-query SDPA under a mask is transformers' sdpa without the K/V copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import save_tiny_llama
from transformers import DynamicCache

from memosd.runtime import LoadedModel, ModelSpec, load_model
from memosd.runtime.attention import GROUPED_SDPA, use_grouped_sdpa

PREFIX = [5, 9, 17, 3, 11, 40, 2, 8, 13, 21, 34, 7] * 4
QUESTION = [41, 42, 43, 44, 45, 46, 30, 19]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=256)  # 4 query heads over 2 KV heads
    return load_model(ModelSpec(source=str(path), device="cpu"), tmp_path_factory.mktemp("cache"))


def _logits_and_reply(tiny: LoadedModel) -> tuple[torch.Tensor, list[int]]:
    """A prefill over a cached prefix (a masked pass), then greedy decode steps (unmasked)."""
    model = tiny.model
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([PREFIX]), past_key_values=cache, use_cache=True)
        logits = model(input_ids=torch.tensor([QUESTION]), past_key_values=cache, use_cache=True).logits[0]
        reply = [int(logits[-1].argmax())]
        for _ in range(4):
            step = model(input_ids=torch.tensor([[reply[-1]]]), past_key_values=cache, use_cache=True)
            reply.append(int(step.logits[0, -1].argmax()))
    return logits, reply


def test_a_cpu_model_attends_with_grouped_sdpa_and_computes_what_sdpa_computes(tiny: LoadedModel) -> None:
    model = tiny.model
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads to keep grouped
    assert model.config._attn_implementation == GROUPED_SDPA  # chosen at load on the CPU
    grouped, grouped_reply = _logits_and_reply(tiny)
    model.set_attn_implementation("sdpa")
    try:
        plain, plain_reply = _logits_and_reply(tiny)
    finally:
        assert use_grouped_sdpa(model)
    assert torch.allclose(grouped, plain, atol=1e-5) and grouped_reply == plain_reply
    # Causality holds in the masked pass: the first question token's logits ignore the tokens after it.
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([PREFIX]), past_key_values=cache, use_cache=True)
        alone = model(input_ids=torch.tensor([QUESTION[:1]]), past_key_values=cache, use_cache=True).logits[0, -1]
    assert torch.allclose(alone, grouped[0], atol=1e-5)


def test_a_model_on_another_attention_is_left_as_it_is(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny_llama(tmp_path / "tiny", context=64)
    eager = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
    assert not use_grouped_sdpa(eager) and eager.config._attn_implementation == "eager"
