"""Composed reuse on the vLLM engine (issue 13): the plan of a composed prompt, and the paged-cache maths.

A composed prompt is memory blocks ``[A][B][C]`` then the conversation. vLLM
fills a request's KV as one prefix: its own cache hit, then what the
connector offers (whole 32-token engine blocks), then the computed rest. A
composed prompt alternates: A loaded (its own stored blocks, exact), B's first
``r`` tokens computed over A, B's rest loaded from B's own blocks with keys
turned by B's offset, C's first tokens computed, ... So it runs as a chain of
requests under one ``cache_salt`` of its own (``composed_salt``): request ``k``
is the prompt up to the engine block that ends block ``k``'s recomputed
tokens (``recompute_end``), ``max_tokens = 1``; the next one finds all that in
vLLM's prefix cache (same salt, same tokens) and the connector loads its
block's placed range after it; the last request is the whole prompt, and
streams the reply. The salt keeps this approximate KV under hashes no exact
request (salted by its first cube) ever computes, and nothing of it is saved.

A block is placed at any offset, not only on an engine-block boundary: an
engine block of the prompt is assembled token by token from (at most) two of
the block's own stored blocks. So the prompt is exactly the exact mode's,
unpadded, and the full prefill of the very same tokens is the reference.

The CPU backend's layout of one engine block of one layer, as vLLM allocates
it, is ``[kv heads, block, 2 x head]``; what its kernels write there (checked
at engine start, ``VllmEngine._check_compose``, and against a transformers
prefill in docs/engine-notes.md) is, per head, the block's keys head-dimension
major (``[head, block]``) and then its values token major (``[block, head]``).
``keys_of`` and ``values_of`` are views in ``[heads, block, head]`` either way.

Only torch here: the connector (which imports vLLM) and the unit tests use it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Segment:
    """A memory block of a composed prompt: its cube (the salt of its own stored blocks), where it starts,
    its tokens, and how many of its first tokens to compute over the prompt before it (0: the first block,
    reused exactly)."""

    salt: str
    start: int
    tokens: int
    recompute: int


@dataclass(frozen=True)
class LoadRange:
    """Engine blocks ``[lo, hi)`` (prompt positions, whole blocks) taken from segment ``segment``'s own stored
    blocks, keys turned by the segment's start (0 for the first segment: exact)."""

    segment: int
    lo: int
    hi: int


def composed_salt(segments: Sequence[Segment], adapter: str) -> str:
    """The ``cache_salt`` of a composed request: its cubes, their places and recomputed tokens, the adapter.

    Never a cube id (an exact request's salt), so vLLM's prefix cache never serves this KV to an exact
    request; two composed requests share blocks only if they compose the same cubes the same way."""
    tag = "|".join(f"{s.salt}@{s.start}+{s.tokens}-{s.recompute}" for s in segments) + f"|{adapter}"
    return "memosd-composed:" + hashlib.sha256(tag.encode()).hexdigest()[:32]


def recompute_end(segment: Segment, block_size: int) -> int:
    """The prompt position where a later block's computed head ends: its first ``recompute`` tokens (at least
    one) rounded up to a whole engine block, since only whole blocks carry over to the next request."""
    return math.ceil((segment.start + max(1, segment.recompute)) / block_size) * block_size


def load_range(index: int, segment: Segment, stored_tokens: int, block_size: int, limit: int) -> LoadRange | None:
    """Which of the prompt's engine blocks segment ``index`` fills from its own ``stored_tokens`` (its
    leading stored blocks' tokens), none past ``limit`` (the prompt position vLLM must compute from)."""
    lo = 0 if index == 0 else recompute_end(segment, block_size)
    hi = min((segment.start + min(stored_tokens, segment.tokens)) // block_size * block_size, limit)
    return LoadRange(index, lo, hi) if hi > lo else None


def pieces(block_start: int, segment_start: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """Where the prompt's engine block at ``block_start`` comes from in a segment starting at
    ``segment_start``: (stored block index, first token in it, tokens, first token in the engine block)."""
    src = block_start - segment_start  # the segment's token at the engine block's first slot
    first, skip = divmod(src, block_size)
    if skip == 0:
        return [(first, 0, block_size, 0)]
    return [(first, skip, block_size - skip, 0), (first + 1, 0, skip, block_size - skip)]


# -- the CPU layout -----------------------------------------------------------------------------------
def keys_of(block: torch.Tensor) -> torch.Tensor:
    """A view ``[..., heads, block, head]`` of engine blocks' keys (``block`` is ``[..., heads, block,
    2 x head]``: any leading dims, e.g. layers; the keys stored head-dimension major)."""
    *lead, heads, size, double = block.shape
    head = double // 2
    # view, never reshape: a copy would take the writes (place) away from the block.
    flat = block.view(*lead, heads, 2, size * head)
    return flat[..., 0, :].view(*lead, heads, head, size).transpose(-1, -2)


def values_of(block: torch.Tensor) -> torch.Tensor:
    """A view ``[..., heads, block, head]`` of engine blocks' values (stored token major)."""
    *lead, heads, size, double = block.shape
    head = double // 2
    flat = block.view(*lead, heads, 2, size * head)
    return flat[..., 1, :].view(*lead, heads, size, head)


def rotate(keys: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``keys`` ([..., n, head], RoPE'd at positions j) as if at ``j + offset``: one more turn of
    ``offset x inv_freq`` (rotate_half pairing, as Llama's), angles in float64, result in the keys' dtype."""
    import torch

    if offset == 0:
        return keys
    angles = offset * inv_freq.to(dtype=torch.float64, device=keys.device)
    angles = torch.cat((angles, angles))
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    turned = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos + turned * sin).to(keys.dtype)


def place(dst: torch.Tensor, src: torch.Tensor, src_lo: int, n: int, dst_lo: int, offset: int,
          inv_freq: torch.Tensor) -> None:
    """Copy tokens ``src_lo:src_lo+n`` of stored engine blocks into ``dst_lo:`` of engine blocks (the CPU
    layout, any leading dims: all layers at once), keys turned by ``offset``."""
    keys_of(dst)[..., dst_lo:dst_lo + n, :] = rotate(keys_of(src)[..., src_lo:src_lo + n, :], offset, inv_freq)
    values_of(dst)[..., dst_lo:dst_lo + n, :] = values_of(src)[..., src_lo:src_lo + n, :]


def assemble(pieces: Sequence[tuple[torch.Tensor, int, int, int]], offset: int,
             inv_freq: torch.Tensor) -> torch.Tensor:
    """One engine block of every layer (``[layers, heads, block, 2 x head]``) from (stored block of every
    layer, first token, tokens, first slot) pieces that cover it, keys turned by ``offset``: a handful of
    tensor ops for all the layers (per layer, a load would cost 30 times its dozen small ops)."""
    import torch

    out = torch.empty_like(pieces[0][0])
    for src, lo, n, at in pieces:
        place(out, src, lo, n, at, offset, inv_freq)
    return out


def rope_inv_freq(config: Any) -> torch.Tensor | None:
    """The model's RoPE ``inv_freq`` (as transformers computes it), or None if it cannot be had from the
    config (the caller then does not compose)."""
    import torch

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind = str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"
    if kind == "default":
        theta = float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)) if isinstance(rope, dict)
                      else getattr(text, "rope_theta", 10000.0))
        dim = int(getattr(text, "head_dim", 0) or text.hidden_size // text.num_attention_heads)
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS.get(kind)
    if init is None:
        return None
    inv_freq, scaling = init(text, "cpu")
    return inv_freq if float(scaling) == 1.0 else None
