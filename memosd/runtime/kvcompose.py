"""Composed reuse of KV caches (issue 13): a block's KV, computed alone from position 0, placed later.

A memory block's KV depends on two things it did not have when it was
computed alone: its *position* in the prompt, and the tokens *before* it.

* **Position** is exact to fix in rotary models: RoPE turns the key of the
  token at position ``p`` by angles ``p * inv_freq``, and turns compose by
  adding angles, so a key computed at ``j`` becomes the key at ``j + offset``
  by one more turn of ``offset * inv_freq``:
  ``k' = k cos(o) + rotate_half(k) sin(o)`` (the same formula the model
  applies). Values carry no position. Layer 0's keys depend on nothing else,
  so there the placed keys equal a full prefill's (the unit tests check it).
* **What came before** cannot be fixed without computing it: in every later
  layer, the block's hidden states attended only to itself. The approximation
  here recomputes the block's *first* ``recompute`` tokens over everything
  before them (the prompt so far, exact or composed), and takes the rest from
  the block's own cache. The first tokens are the block's chat-template
  header, where attention sinks: recomputing them re-anchors the block after
  the earlier ones, which is what EPIC's LegoLink does (recompute each chunk's
  first tokens) and what APE's shared prefix achieves. Optionally (a placement's
  ``deviating``, ``runtime.compose_deviation``) it also recomputes the tokens
  whose KV deviates most, as CacheBlend picks them (``pick_deviating``: layer 0
  over every block token in context, their layer-1 values against the cached
  ones), at the cost of that one layer over the blocks. Measured in
  BENCHMARKS.md ("Composed reuse"): top-1 agreement and KL against the full
  prefill, and a needle test.

The engine runs it as one prefill (``compose_prefill``): the placed parts go
into the cache first and every computed token goes through the model in one
pass, with a mask by position.

Only model families whose attention is plain RoPE over the whole head, with
angles linear in the position, are composed (``compose_unsupported``): any
other family falls back to exact reuse, and Generate says so per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memosd.runtime.kvcache import KVCache
from memosd.runtime.model import LoadedModel

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

# Llama-style attention (RoPE by rotate_half over the whole head; one KV pair per layer). Others fall back.
COMPOSABLE_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# RoPE variants whose angle is position x a fixed inv_freq (scaled or not): rotations then add up. Dynamic
# NTK changes inv_freq with the length, and YaRN scales cos/sin, so turning twice is not turning once.
COMPOSABLE_ROPE = frozenset({"default", "linear", "llama3"})


@dataclass(frozen=True)
class Placement:
    """A memory block at ``start`` in the prompt whose KV comes from ``cache`` (its own, from position 0):
    the first ``recompute`` of its tokens are computed over the prompt before them, and so are the
    ``deviating`` of the rest whose KV deviates most from the prompt's (``deviating_tokens``, picked in the
    pass itself); the others are placed."""

    start: int
    cache: KVCache
    recompute: int
    deviating: int = 0

    @property
    def recomputed_tokens(self) -> int:
        return min(self.cache.n_tokens, self.recompute + self.deviating)

    @property
    def placed_tokens(self) -> int:
        return self.cache.n_tokens - self.recomputed_tokens


@dataclass(frozen=True)
class PlacedAttention:
    """APE's attention adjustment for the placed keys (Yang et al., ICLR 2025): every query the request
    computes (the recomputed tokens, the question, each decoded token) attends to the later blocks'
    *placed* keys with logits ``q.k / (T sqrt(d))`` (``temperature`` T) and with their unnormalised
    weights times ``scale`` S; to every other key as the model does. The defaults (1, 1) are no
    adjustment: exactly the plain composition. The first block (exact: computed from position 0, where it
    sits) and every computed token are not adjusted, only what composition approximates."""

    temperature: float = 1.0
    scale: float = 1.0

    @property
    def active(self) -> bool:
        return self.temperature != 1.0 or self.scale != 1.0

    def key_bias(self, placed: slice, length: int, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A row over ``length`` keys in memory order: ``log(scale)`` at the ``placed`` ones, 0 elsewhere.
        Added to the mask (an additive ``log S`` before the softmax is a factor S on the weight)."""
        import torch

        bias = torch.zeros(length, dtype=dtype, device=device)
        bias[placed] = math.log(self.scale)
        return bias


NO_ADJUSTMENT = PlacedAttention()


def compose_unsupported(loaded: LoadedModel) -> str:
    """Why this model's blocks cannot be composed ("" if they can), in words for Generate's summary."""
    config: Any = loaded.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    family = str(getattr(text, "model_type", "") or "")
    if family not in COMPOSABLE_FAMILIES:
        return f"composed reuse is not supported for the {family or 'unknown'} model family (only " \
               f"{', '.join(sorted(COMPOSABLE_FAMILIES))}): computed exactly"
    rope = getattr(text, "rope_scaling", None) or getattr(text, "rope_parameters", None) or {}
    kind = str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"
    if kind not in COMPOSABLE_ROPE:
        return f"composed reuse is not supported with {kind} rotary scaling (its angles are not linear in the " \
               "position): computed exactly"
    if float(getattr(text, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "composed reuse is not supported with partial rotary embeddings: computed exactly"
    return ""


def recompute_tokens(n_tokens: int, fraction: float) -> int:
    """How many of a block's first tokens a composed placement recomputes: the fraction, rounded up (so any
    fraction above 0 recomputes at least the first token), and a fraction of 1 the block whole."""
    if fraction >= 1.0:
        return n_tokens
    return min(n_tokens, math.ceil(n_tokens * fraction))


def rotate_keys(loaded: LoadedModel, keys: torch.Tensor, offset: int, *, factor: float = 1.0) -> torch.Tensor:
    """``keys`` ([1, heads, n, head_dim], computed at positions 0..n-1) as if computed ``offset`` later,
    times ``factor`` (folded into the turn: free)."""
    import torch

    if offset == 0 and factor == 1.0:
        return keys
    model: Any = loaded.model
    inv_freq: torch.Tensor = model.model.rotary_emb.inv_freq
    # Angles in float64 (offset x inv_freq can be large), applied in float32, stored in the cache's dtype.
    # rotate_half(k) = (-k_hi, k_lo) and cos/sin repeat over both halves, so each half is two fused passes
    # into one new tensor: a third of the time of building rotate_half(k), k cos and its sin apart.
    angles = offset * inv_freq.to(dtype=torch.float64, device=keys.device)
    cos, sin = (angles.cos() * factor).to(torch.float32), (angles.sin() * factor).to(torch.float32)
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    low, high = k[..., :half], k[..., half:]
    out = torch.empty_like(k)
    torch.mul(low, cos, out=out[..., :half])
    out[..., :half].addcmul_(high, sin, value=-1)
    torch.mul(high, cos, out=out[..., half:])
    out[..., half:].addcmul_(low, sin)
    return out.to(keys.dtype)


def deviating_tokens(n_tokens: int, fraction: float, recompute: int) -> int:
    """How many more of a block's tokens a composed placement recomputes, picked by deviation: ``fraction``
    of its tokens, rounded up, and no more than those after its recomputed first ``recompute``."""
    if fraction <= 0:
        return 0
    return max(0, min(n_tokens - recompute, math.ceil(n_tokens * fraction)))


def compose_prefill(loaded: LoadedModel, dyn: DynamicCache, prompt: Sequence[int], done: int,
                    placements: Sequence[Placement], *, chunk: int,
                    check: Callable[[], None] = lambda: None,
                    attention: PlacedAttention = NO_ADJUSTMENT) -> torch.Tensor:
    """Prefill ``prompt[done:]`` on ``dyn`` (which holds ``prompt[:done]``) with ``placements`` composed in:
    the logits of the prompt's last token.

    One forward pass (in ``chunk``-token pieces, ``check`` before each) computes every token that is not
    placed: the prompt between blocks, each block's first ``recompute`` tokens (and its ``deviating``
    ones, see ``_deviating``), and the conversation after the last block. The placed parts go into the
    cache first, keys turned to their positions, so the cache holds the prompt out of order: attention
    does not care where a key sits in memory, only which keys a query may see, and that is given as a 4D
    mask by *position* (a query at ``p`` sees every key at ``<= p``), with each computed token's RoPE
    position passed explicitly. That is the same arithmetic as computing up to each block, placing it and
    going on, in one pass instead of one per block: on one core a forward pass costs ~65 ms before its
    first token (BENCHMARKS.md, "Composed reuse"). Decoding after it needs nothing special: a new token's
    position is the cache's length, and it sees every key.

    With an active ``attention`` (``PlacedAttention``), the placed keys are divided by its temperature as
    they go into ``dyn`` (this request's cache, never the block's own), and the mask adds ``log(scale)``
    at them: they are the cache's keys ``placed_keys(done, placements)`` in memory order. Decoding then
    needs that bias too (``decode_mask``); the divided keys it finds in ``dyn``."""
    import torch

    end = done
    for placement in placements:
        block = placement.cache
        if placement.start < end or \
                tuple(prompt[placement.start:placement.start + block.n_tokens]) != block.token_ids:
            raise ValueError(f"the prompt at {placement.start} is not the placed block's tokens")
        end = placement.start + block.n_tokens
    if end >= len(prompt):
        raise ValueError("the prompt needs at least one token after its reused KV")
    device = loaded.model.device
    # Before anything is placed: the deviating tokens are picked against dyn's prompt[:done].
    picked = pick_deviating(loaded, dyn, prompt, done, placements, chunk=chunk, check=check) \
        if any(p.deviating and p.placed_tokens for p in placements) else [None] * len(placements)
    placed_range = placed_keys(done, placements)
    key_positions = [torch.arange(done)]
    computed: list[torch.Tensor] = []
    for placement, extra in zip(placements, picked, strict=True):
        n = placement.cache.n_tokens
        recomputed = torch.zeros(n, dtype=torch.bool)
        recomputed[:placement.recompute] = True
        if extra is not None:
            recomputed[extra] = True
        elif not placement.placed_tokens:  # the deviating ones are all the rest: nothing to pick
            recomputed[:] = True
        placed = (~recomputed).nonzero().flatten()
        _place(loaded, dyn, placement, placed, 1.0 / attention.temperature)
        key_positions.append(placement.start + placed)
        computed.append(torch.arange(done, placement.start))
        computed.append(placement.start + recomputed.nonzero().flatten())
        done = placement.start + n
    computed.append(torch.arange(done, len(prompt)))
    positions = torch.cat(computed)
    ids = torch.tensor(list(prompt), dtype=torch.long)[positions].to(device)
    positions = positions.to(device)
    seen = torch.cat(key_positions).to(device)
    model: Any = loaded.model
    dtype = next(model.parameters()).dtype
    logits: torch.Tensor | None = None
    # log(S) at the placed keys (they stay where they are in memory: after prompt[:done], before anything
    # computed), then the mask by position over it.
    bias = attention.key_bias(placed_range, len(seen) + len(ids), dtype=dtype, device=device) \
        if attention.scale != 1.0 else None
    with torch.no_grad():
        for pos in range(0, len(ids), chunk):
            check()
            query = positions[pos:pos + chunk]
            seen = torch.cat((seen, query))
            mask = torch.zeros((len(query), len(seen)), dtype=dtype, device=device)
            if bias is not None:
                mask += bias[:len(seen)]
            mask.masked_fill_(seen[None, :] > query[:, None], torch.finfo(dtype).min)
            logits = model(input_ids=ids[None, pos:pos + chunk], position_ids=query[None], attention_mask=mask[None, None],
                           past_key_values=dyn, use_cache=True, logits_to_keep=1).logits
    assert logits is not None  # at least the prompt's last token is computed (checked above)
    return logits


def placed_keys(done: int, placements: Sequence[Placement]) -> slice:
    """Where ``compose_prefill`` puts the placed keys in the cache's memory order: every block's placed
    tokens, one after the other, right after the ``done`` tokens the cache held."""
    return slice(done, done + sum(p.placed_tokens for p in placements))


def decode_mask(attention: PlacedAttention, placed: slice, dyn: DynamicCache, *, dtype: torch.dtype,
                device: torch.device | str) -> torch.Tensor | None:
    """The mask for decoding one token on ``dyn`` after a composed prefill with ``attention``: its
    ``log(scale)`` at the ``placed`` keys (``placed_keys``), 0 at every other key (a new token sees all of
    them). None when there is no scale to add: the model's own (no) mask."""
    if attention.scale == 1.0 or placed.stop <= placed.start:
        return None
    return attention.key_bias(placed, dyn.get_seq_length() + 1, dtype=dtype, device=device)[None, None, None]


def pick_deviating(loaded: LoadedModel, dyn: DynamicCache, prompt: Sequence[int], done: int,
               placements: Sequence[Placement], *, chunk: int,
               check: Callable[[], None]) -> list[torch.Tensor | None]:
    """For each placement with ``deviating``, which of its tokens (block-relative) to recompute besides its
    first ``recompute``: those whose layer-1 values, as the block's own cache has them, deviate most from
    what they are after the prompt before them (CacheBlend's selection, on one layer).

    Layer 0 is computed over every token from ``done`` to the last block's end, over ``dyn``'s layer 0
    (``prompt[:done]``): it is exact there, because layer 0's input is the token alone. Its output gives
    each token's layer-1 value in context; the squared distance to the placed one is how much the token
    missed of the blocks before it. One layer of the blocks' tokens, about a thirtieth of their prefill
    on SmolLM2 (measured in BENCHMARKS.md). Values, not keys: they carry no position and, in every
    composable family, no norm, so the block's cached values compare as they are."""
    import torch
    from transformers import DynamicCache

    model: Any = loaded.model
    inner = model.model
    device, dtype = model.device, next(model.parameters()).dtype
    first, second = inner.layers[0], inner.layers[1]
    begin = done
    end = placements[-1].start + placements[-1].cache.n_tokens
    past = DynamicCache()
    if done:
        layer: Any = dyn.layers[0]
        past.update(layer.keys[:, :, :done], layer.values[:, :, :done], 0)
    values: list[torch.Tensor] = []
    with torch.no_grad():
        for pos in range(begin, end, chunk):
            check()
            stop = min(end, pos + chunk)
            ids = torch.tensor([list(prompt[pos:stop])], dtype=torch.long, device=device)
            position_ids = torch.arange(pos, stop, device=device)[None]
            hidden = inner.embed_tokens(ids)
            keys = torch.arange(stop, device=device)
            mask = torch.zeros((stop - pos, stop), dtype=dtype, device=device)
            mask.masked_fill_(keys[None, :] > position_ids[0, :, None], torch.finfo(dtype).min)
            hidden = first(hidden, attention_mask=mask[None, None], position_ids=position_ids, past_key_values=past,
                           use_cache=True, position_embeddings=inner.rotary_emb(hidden, position_ids=position_ids))
            values.append(second.self_attn.v_proj(second.input_layernorm(hidden))[0])
    in_context = torch.cat(values)  # [tokens from done to end, kv heads x head dim]
    picked: list[torch.Tensor | None] = []
    for placement in placements:
        n, skip = placement.cache.n_tokens, placement.recompute
        count = min(placement.deviating, n - skip)
        if count <= 0:
            picked.append(None)
            continue
        own = placement.cache.values[1][0].to(device=device, dtype=dtype)  # [kv heads, n, head dim]
        own = own.transpose(0, 1).reshape(n, -1)
        at = placement.start - begin
        deviation = (in_context[at + skip:at + n] - own[skip:]).float().pow(2).sum(-1)
        picked.append((deviation.topk(count).indices + skip).sort().values.cpu())
    return picked


def _place(loaded: LoadedModel, dyn: DynamicCache, placement: Placement, placed: torch.Tensor,
           key_factor: float = 1.0) -> None:
    """Append the tokens ``placed`` (block-relative, ascending) of ``placement``'s block to the cache, keys
    turned to their positions (token ``j`` of the block sits at ``placement.start + j``) and times
    ``key_factor`` (a ``PlacedAttention``'s 1/T: into ``dyn`` only, the block's own cache is untouched)."""
    if not len(placed):
        return
    first, last = int(placed[0]), int(placed[-1])
    # One run of tokens (every block without deviating ones) is a view; picked tokens are gathered.
    pick: slice | torch.Tensor = slice(first, last + 1) if last - first + 1 == len(placed) else placed
    device, dtype = loaded.model.device, next(loaded.model.parameters()).dtype
    for i, (k, v) in enumerate(zip(placement.cache.keys, placement.cache.values, strict=True)):
        placed_k = rotate_keys(loaded, k[:, :, pick].to(device=device, dtype=dtype), placement.start,
                               factor=key_factor)
        layer: Any = dyn.layers[i]  # full attention (compose_unsupported and check_model_supported)
        layer.update(placed_k, v[:, :, pick].to(device=device, dtype=dtype))
