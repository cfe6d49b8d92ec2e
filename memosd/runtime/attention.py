"""The transformers engine's attention on the CPU: SDPA that keeps grouped-query heads grouped under a mask.

transformers' ``sdpa`` attention copies every key and value head once per
query head (``repeat_kv``) whenever a mask is passed on the CPU, because
CUDA's flash kernels take no mask with grouped heads. A mask is passed for
every prefill over a cached prefix (a Generate's question after its memory
blocks, a composed prompt's one pass): with SmolLM2 (9 query heads over 3 KV
heads) at 2,600 cached tokens, that copy is ~40% of a 20-token pass. torch's
CPU SDPA takes ``enable_gqa`` with a mask (its math and flash kernels both),
so this is ``sdpa`` without the copy: the same arithmetic, the same masks
(``sdpa_mask``), registered under its own name and chosen when the model is
loaded on the CPU (``use_grouped_sdpa``). Measured in BENCHMARKS.md
("Composed reuse").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GROUPED_SDPA = "memosd_grouped_sdpa"
_registered = False


def grouped_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **_kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``[batch, heads, q, dim]`` in, ``[batch, q, heads, dim]``
    out (no attention weights)."""
    import torch

    q_length, kv_length = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    # As transformers' sdpa: the kernel's own causal flag only without a mask and past the first token, and
    # then over as many keys as queries (its causal mask is aligned top-left).
    causal = q_length > 1 and attention_mask is None and causal
    if causal and kv_length > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: Any) -> bool:
    """Make ``model`` (loaded on the CPU) attend with ``grouped_sdpa_attention`` if it attends with ``sdpa``;
    whether it does now. A model on another implementation (eager, flash) is left as it is."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    if not _registered:
        AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
        AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
        _registered = True
    model.set_attn_implementation(GROUPED_SDPA)
    return True
