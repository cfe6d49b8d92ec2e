"""KV caches as memory: block keys, prefix computation, serialization.

A cube's memory block, once encoded, is a KV cache that lets the model skip the
prefill of those tokens. A cache is only valid as an exact token prefix, at the
same positions (0..n-1), for the same weights and tokenizer, so:

* **Keys.** The token ids are cut into blocks of ``BLOCK`` tokens (the last one
  may be partial) and hashed as a chain, as vLLM's prefix cache does:
  ``h_i = sha256(h_{i-1} | fingerprint | salt | extra | tokens of block i)``.
  ``h_i`` names the whole prefix up to the end of block i, so equal hashes mean
  equal prefixes. The model fingerprint is in every link (a cache of another
  model never matches), the per-cube salt too (two cubes never share entries),
  and ``extra`` is reserved for an adapter digest. ``KVCache.key`` is the last
  hash: the cache key of the whole cache.
* **Immutability.** transformers' ``DynamicCache`` grows in place during
  generation. ``KVCache`` keeps plain tensors and hands out a fresh
  ``DynamicCache`` per call (``to_dynamic_cache``), so a pooled or stored
  cache can never be changed by a generation.
* **Incremental reuse.** ``compute_prefix_cache(..., reuse=old)`` keeps the
  blocks whose hashes match (cropping the old cache to that block boundary)
  and computes only the rest, on a copy.
* **Persistence.** ``to_chunks``/``from_chunks`` turn a cache into
  self-describing safetensors blobs (fp16 or bf16) and back. Loading refuses a
  cache made by another model (``CacheMismatch``) and damaged or incomplete
  chunk sets (``CorruptCache``). This module stores nothing itself: the
  kernel puts the bytes in RocksDB.

Threading: everything that touches tensors (compute, ``to_dynamic_cache``,
``to_chunks``, ``from_chunks``) runs on the runtime worker thread.
``block_hashes`` and the metadata properties are pure and safe anywhere.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from memosd.runtime.model import LoadedModel

BLOCK = 64  # tokens per hashed block; vLLM uses 16, but our prefixes are long and few
FORMAT = "memosd-kv/1"
DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_PREFILL_CHUNK = 512  # tokens per forward pass: bounds activation memory on long prefixes

_BLOCK_DOMAIN = b"memosd-kv-block/v1\0"
_ROOT = hashlib.sha256(_BLOCK_DOMAIN).digest()  # h_{-1}: no cache starts from an empty parent
_STORED_DTYPES = ("float16", "bfloat16", "float32")


class KVCacheError(RuntimeError):
    """Base class of everything this module refuses."""


class CacheMismatch(KVCacheError):
    """The cache was made by another model fingerprint, or for another salt (cube)."""


class CorruptCache(KVCacheError):
    """Stored chunks are truncated, damaged, incomplete, out of order or inconsistent."""


class EmptyPrefix(KVCacheError):
    """A cache of zero tokens was asked for (e.g. activating a cube with no items)."""


class PrefixTooLong(KVCacheError):
    """The prefix does not fit in the model's context (leaving room for at least one more token)."""


class UnsupportedModel(KVCacheError):
    """The model's attention is not plain full attention, which prefix caching here assumes."""


class ComputeCancelled(KVCacheError):
    """The ``cancel`` event was set while the prefix was being computed."""


# --- block keys ------------------------------------------------------------------------------------


def block_hashes(token_ids: Sequence[int], *, fingerprint: str, salt: bytes, extra: bytes = b"",
                 block_size: int = BLOCK) -> list[str]:
    """The chained hashes of ``token_ids`` cut into ``block_size``-token blocks (hex, one per block).

    Every field is length-prefixed, so bytes cannot slide from the salt into
    ``extra`` or the tokens and collide. Token ids are hashed as little-endian
    int64, independent of how the caller holds them.
    """
    fp = fingerprint.encode()
    # Everything but the tokens is the same in every link: build it once.
    fixed = _lp(fp) + _lp(salt) + _lp(extra)
    # struct, not numpy: importing this module must stay cheap (the kernel imports it for the key).
    ids = [int(t) for t in token_ids]
    out: list[str] = []
    prev = _ROOT
    for start in range(0, len(ids), block_size):
        block = ids[start : start + block_size]
        h = hashlib.sha256(prev)
        h.update(fixed)
        h.update(_lp(struct.pack(f"<{len(block)}q", *block)))
        prev = h.digest()
        out.append(prev.hex())
    return out


def _lp(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def shared_blocks(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading hashes two chains share. Each hash chains its parent, so the first difference ends it."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --- the cache -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KVCache:
    """An immutable (by convention) KV cache of a token prefix, starting at position 0.

    ``keys[i]``/``values[i]`` are layer i's tensors, shape ``[1, kv_heads,
    n_tokens, head_dim]``, on the model's device in ``dtype``. Never modify
    them in place: pools and stores share them. ``block_hashes`` is derived
    from the token ids here, so a ``KVCache`` can never carry hashes that do
    not name its tokens.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: tuple[int, ...]
    fingerprint: str
    salt: bytes
    extra: bytes = b""
    # The salts of other cubes whose memory it holds too (a combination of memory blocks, led by ``salt``'s
    # cube): not part of the key, but whoever drops a cube's caches drops these with them.
    also_holds: tuple[bytes, ...] = ()
    block_hashes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise EmptyPrefix("a KV cache needs at least one token")
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(
                f"need one key and one value tensor per layer, got {len(self.keys)}/{len(self.values)}"
            )
        n = len(self.token_ids)
        shape0 = tuple(self.keys[0].shape)
        for k, v in zip(self.keys, self.values, strict=True):
            if k.dim() != 4 or k.shape[0] != 1 or k.shape[2] != n or tuple(k.shape) != tuple(v.shape):
                raise ValueError(
                    f"layer tensors must be [1, heads, {n}, head_dim]; got {tuple(k.shape)}/{tuple(v.shape)}"
                )
            if tuple(k.shape) != shape0 or k.dtype != self.keys[0].dtype or v.dtype != k.dtype:
                raise ValueError("all layers must share one shape and dtype")
        hashes = block_hashes(self.token_ids, fingerprint=self.fingerprint, salt=self.salt, extra=self.extra)
        object.__setattr__(self, "block_hashes", tuple(hashes))

    @property
    def key(self) -> str:
        """The cache key: the hash of the last block, which chains all the others."""
        return self.block_hashes[-1]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors as stored (a cropped view reports its own share)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // self.n_tokens

    def crop(self, n_tokens: int) -> KVCache:
        """The first ``n_tokens`` tokens, as views (no copy). ``n_tokens`` must be >= 1."""
        if not 1 <= n_tokens <= self.n_tokens:
            raise ValueError(f"cannot crop a {self.n_tokens}-token cache to {n_tokens}")
        if n_tokens == self.n_tokens:
            return self
        return KVCache(
            keys=tuple(k[:, :, :n_tokens] for k in self.keys),
            values=tuple(v[:, :, :n_tokens] for v in self.values),
            token_ids=self.token_ids[:n_tokens],
            fingerprint=self.fingerprint,
            salt=self.salt,
            extra=self.extra,
            also_holds=self.also_holds,  # conservatively: the crop may hold less
        )

    def to_dynamic_cache(self) -> DynamicCache:
        """A fresh ``DynamicCache`` holding copies of the tensors, to hand to the model.

        Generation appends to (and may crop) the DynamicCache it is given; the
        copy is what keeps this KVCache, and every pool or store that holds
        it, unchanged.
        """
        return _dynamic_cache(self.keys, self.values)

    def describe(self) -> dict[str, Any]:
        """Plain facts for logs and Stats."""
        return {
            "key": self.key,
            "fingerprint": self.fingerprint,
            "tokens": self.n_tokens,
            "blocks": len(self.block_hashes),
            "layers": self.n_layers,
            "dtype": _dtype_name(self.dtype),
            "device": str(self.device),
            "bytes": self.nbytes,
        }


def _dynamic_cache(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DynamicCache:
    """A new DynamicCache over copies of ``keys``/``values``, moved/cast on the way if asked."""
    from transformers import DynamicCache

    # No config: every layer is a plain DynamicLayer (full attention), which is
    # what compute_prefix_cache checked the model uses.
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        # copy=True makes the copy explicit (and the only one, cast included) rather than
        # relying on DynamicLayer.update concatenating onto an empty tensor, an internal
        # detail that could change.
        kc = k.to(
            device=k.device if device is None else device,
            dtype=k.dtype if dtype is None else dtype,
            copy=True,
        )
        vc = v.to(
            device=v.device if device is None else device,
            dtype=v.dtype if dtype is None else dtype,
            copy=True,
        )
        cache.update(kc, vc, i)
    return cache


# --- compute ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeStats:
    tokens_computed: int
    tokens_reused: int
    seconds: float
    bytes: int


def compute_prefix_cache(
    loaded: LoadedModel,
    token_ids: Sequence[int],
    *,
    salt: bytes,
    extra: bytes = b"",
    reuse: KVCache | None = None,
    chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
    cancel: threading.Event | None = None,
    step: Callable[[Callable[[], Any]], Any] | None = None,
) -> tuple[KVCache, ComputeStats]:
    """Run the model over ``token_ids`` and return its KV cache.

    With ``reuse`` (typically the cube's previous cache), the leading full
    blocks whose hashes match the new sequence's are taken from it, and only
    the remaining tokens are computed, on a copy: ``reuse`` is never changed.
    A reuse cache of another fingerprint, salt or extra is ignored (nothing
    matches). The whole sequence is computed in ``chunk_tokens`` pieces, so a
    long prefix does not hold the activations of every token at once; setting
    ``cancel`` stops between pieces with ``ComputeCancelled``.

    ``step`` runs each piece of model work (the reuse copy, every chunk's
    forward pass, the final gather); by default inline, on the caller's thread,
    which must then be the runtime worker. A background caller passes a step
    that queues each piece on the worker at background priority, so
    interactive work waits for one chunk at most, not the whole prefix.

    Raises ``EmptyPrefix``, ``PrefixTooLong`` (the prefix must leave room for
    at least one more token), ``UnsupportedModel``.
    """
    import torch

    start = time.perf_counter()
    ids = [int(t) for t in token_ids]
    if not ids:
        raise EmptyPrefix("nothing to encode: the prefix has no tokens")
    if len(ids) >= loaded.context_length:
        raise PrefixTooLong(
            f"the prefix has {len(ids)} tokens; the model's context is {loaded.context_length}, "
            "and generation needs room after it"
        )
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    check_model_supported(loaded)
    hashes = block_hashes(ids, fingerprint=loaded.fingerprint, salt=salt, extra=extra)

    reused = 0
    dyn: DynamicCache | None = None
    same_key_space = reuse is not None and (reuse.fingerprint, reuse.salt, reuse.extra) == (
        loaded.fingerprint, salt, extra
    )  # fmt: skip
    run: Callable[[Callable[[], Any]], Any] = step or (lambda fn: fn())
    if reuse is not None and same_key_space:
        reused = reusable_tokens(reuse, hashes, len(ids))
        if reused:
            base = reuse.crop(reused)
            # Copy onto the model's device/dtype: a reuse cache may come from a
            # store in fp16, and the new tokens must attend to exactly what a
            # fresh prefill would give, as closely as the cast allows.
            dyn = run(lambda: _dynamic_cache(
                base.keys, base.values, device=loaded.model.device, dtype=_model_dtype(loaded)
            ))
    if dyn is None:
        from transformers import DynamicCache

        dyn = DynamicCache()

    model: Any = loaded.model  # transformers types forward() loosely
    device = model.device

    def forward(piece_ids: list[int]) -> None:
        with torch.no_grad():  # per piece: no_grad is per thread, and a step may run on another
            piece = torch.tensor([piece_ids], dtype=torch.long, device=device)
            # logits_to_keep=1: the logits of a prefix are not needed, and the LM
            # head over a 50k vocabulary for every token is a fifth of the work on
            # a small model. Positions come from the cache length.
            model(input_ids=piece, past_key_values=dyn, use_cache=True, logits_to_keep=1)

    for pos in range(reused, len(ids), chunk_tokens):
        if cancel is not None and cancel.is_set():
            raise ComputeCancelled(f"prefix computation cancelled after {pos - reused} tokens")
        run(lambda piece_ids=ids[pos : pos + chunk_tokens]: forward(piece_ids))  # type: ignore[misc]

    keys, values = run(lambda: _layer_tensors(dyn))
    cache = KVCache(
        keys=keys, values=values, token_ids=tuple(ids), fingerprint=loaded.fingerprint, salt=salt, extra=extra
    )
    if cache.block_hashes != tuple(hashes):  # cannot happen; cheap insurance for the key contract
        raise KVCacheError("block hashes changed during computation")
    stats = ComputeStats(
        tokens_computed=len(ids) - reused,
        tokens_reused=reused,
        seconds=time.perf_counter() - start,
        bytes=cache.nbytes,
    )
    return cache, stats


def snapshot_prefix(dyn: DynamicCache, token_ids: Sequence[int], *, fingerprint: str, salt: bytes,
                    extra: bytes = b"", also_holds: tuple[bytes, ...] = ()) -> KVCache:
    """The first ``len(token_ids)`` tokens of a generation's cache as a ``KVCache`` of their own.

    Copied, not viewed: the generation goes on extending its DynamicCache, and a view would keep
    the whole prompt's tensors alive for as long as the snapshot is pooled."""
    n = len(token_ids)
    keys, values = _layer_tensors(dyn)
    return KVCache(keys=tuple(k[:, :, :n].clone() for k in keys), values=tuple(v[:, :, :n].clone() for v in values),
                   token_ids=tuple(int(t) for t in token_ids), fingerprint=fingerprint, salt=salt, extra=extra,
                   also_holds=also_holds)


def _layer_tensors(dyn: DynamicCache) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Each layer's key and value tensors; refuses layers that are not plain full-attention KV."""
    import torch
    from transformers.cache_utils import DynamicLayer

    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for i, layer in enumerate(dyn.layers):
        # The model may have swapped in other layer kinds (sliding window, linear attention):
        # their state is not a prefix KV that can be stored and replayed.
        if type(layer) is not DynamicLayer and type(layer) is not _growing_layer_class():
            raise UnsupportedModel(f"layer {i} keeps a {type(layer).__name__}, not a plain KV cache")
        plain: Any = layer  # a DynamicLayer, or our GrowingLayer (one)
        k, v = plain.keys, plain.values
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise UnsupportedModel(f"layer {i} produced no KV tensors")
        keys.append(k)
        values.append(v)
    return tuple(keys), tuple(values)


def reusable_tokens(reuse: KVCache, new_hashes: Sequence[str], n_new: int) -> int:
    """Tokens of ``reuse`` that are an exact prefix of the new sequence, cut to a full-block boundary."""
    if reuse.block_hashes == tuple(new_hashes):
        return n_new  # the same sequence: nothing to compute
    # Only blocks that are full in both sequences count. The hash of a partial
    # last block names just the tokens it has; the other sequence's block at
    # that index holds more (or other) tokens, so it never matches anyway, and
    # the cut at a full-block boundary is what the chain can vouch for.
    n = min(shared_blocks(reuse.block_hashes, new_hashes), reuse.n_tokens // BLOCK, n_new // BLOCK)
    return n * BLOCK


def check_model_supported(loaded: LoadedModel) -> None:
    """Refuse models whose cache is not one full-attention KV pair per layer."""
    config: Any = loaded.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types))
        raise UnsupportedModel(
            f"model {loaded.name} has {', '.join(kinds)} layers; prefix caching needs full attention in every layer"
        )


def prepare_generation(
    loaded: LoadedModel, cache: KVCache, token_ids: Sequence[int], *, capacity: int = 0
) -> tuple[DynamicCache, list[int]]:
    """A DynamicCache to extend from ``cache``, and the tokens of ``token_ids`` still to prefill.

    Extending it never changes ``cache`` (see ``_shared_dynamic_cache``). With ``capacity`` (the tokens
    the generation may reach), its layers are ``GrowingLayer``s of that room, ``cache`` copied in once.

    ``token_ids`` is the whole prompt; it must start with exactly the cache's
    tokens and have at least one token after them (the model needs an input
    to produce the next-token logits). Refuses a cache of another model.
    """
    if cache.fingerprint != loaded.fingerprint:
        raise CacheMismatch(f"cache made by model {cache.fingerprint}, the runtime runs {loaded.fingerprint}")
    ids = [int(t) for t in token_ids]
    n = cache.n_tokens
    if tuple(ids[:n]) != cache.token_ids:
        raise CacheMismatch("the prompt does not start with the cached prefix tokens")
    if len(ids) <= n:
        raise ValueError("the prompt needs at least one token after the cached prefix")
    device, dtype = loaded.model.device, _model_dtype(loaded)
    if capacity:
        growing = growing_cache(max(capacity, len(ids)))
        for i, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            growing.update(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), i)
        return growing, ids[n:]
    if cache.device == device and cache.dtype == dtype:
        return _shared_dynamic_cache(cache.keys, cache.values), ids[n:]
    # A cache held in another dtype/device (a caller's choice; from_chunks already casts) is copied over.
    return _dynamic_cache(cache.keys, cache.values, device=device, dtype=dtype), ids[n:]


def _shared_dynamic_cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> DynamicCache:
    """A DynamicCache whose layers start as these very tensors: no copy at all.

    Safe because ``DynamicLayer.update`` concatenates into *new* tensors and
    never writes into the ones it holds, so the first forward pass makes the
    generation's own copy (the one copy that is needed anyway) and the shared
    tensors stay as they are. Copying here first would only double the work: at
    2,000 tokens of SmolLM2 that is ~90 MB, ~20 ms on 2 cores. The non-mutation
    tests (test_runtime_kvcache, test_activation) hold transformers to this.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates layer i (plain full attention), copies nothing
        layer: Any = cache.layers[i]  # a DynamicLayer: update() made it
        layer.keys, layer.values = k, v
    return cache


def growing_cache(capacity: int) -> DynamicCache:
    """An empty DynamicCache whose layers are ``GrowingLayer``s with room for ``capacity`` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: _growing_layer_class()(capacity)  # type: ignore[assignment]
    return cache


_GROWING: type | None = None


def _growing_layer_class() -> Any:
    """``GrowingLayer``, defined on first use: transformers is imported only where the model runs."""
    global _GROWING
    if _GROWING is not None:
        return _GROWING
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[misc,no-untyped-call,unused-ignore]
        """A full-attention layer whose KV live in buffers with room to grow: ``update`` writes into them
        and returns views, where ``DynamicLayer`` concatenates, copying the whole layer at every forward
        pass (a generation's prefill chunks, every token it decodes, and each composed block: at 2,600
        tokens of SmolLM2 that is 120 MB a pass, most of the time of a short pass)."""

        def __init__(self, capacity: int) -> None:
            super().__init__()  # type: ignore[no-untyped-call,unused-ignore]
            self.capacity = capacity
            self.length = 0
            self.key_buffer: torch.Tensor | None = None
            self.value_buffer: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self.key_buffer = key_states.new_empty((b, h, self.capacity, d))
            self.value_buffer = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            assert self.key_buffer is not None and self.value_buffer is not None
            n, m = self.length, key_states.shape[-2]
            if n + m > self.key_buffer.shape[2]:  # past the room planned: grow (once, by doubling)
                room = max(2 * self.key_buffer.shape[2], n + m)
                self.key_buffer = torch.cat([self.key_buffer[:, :, :n],
                                             self.key_buffer.new_empty((*key_states.shape[:2], room - n,
                                                                        key_states.shape[-1]))], dim=2)
                self.value_buffer = torch.cat([self.value_buffer[:, :, :n],
                                               self.value_buffer.new_empty((*value_states.shape[:2], room - n,
                                                                            value_states.shape[-1]))], dim=2)
            self.key_buffer[:, :, n:n + m].copy_(key_states)
            self.value_buffer[:, :, n:n + m].copy_(value_states)
            self.length = n + m
            self.keys, self.values = self.key_buffer[:, :, :n + m], self.value_buffer[:, :, :n + m]
            return self.keys, self.values

    _GROWING = GrowingLayer
    return GrowingLayer


def _model_dtype(loaded: LoadedModel) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, loaded.dtype)
    return dtype


# --- serialization ---------------------------------------------------------------------------------


def to_chunks(
    cache: KVCache, *, dtype: torch.dtype | str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[bytes]:
    """The cache as safetensors blobs of about ``chunk_bytes`` each, in ``dtype`` (a torch dtype or its name,
    such as ``runtime.kv_dtype``'s "float16"; default float16).

    Chunks cut the sequence at block boundaries: chunk j holds tokens
    ``[start, end)`` of every layer (``k.<layer>``, ``v.<layer>``,
    ``token_ids``), so a chunk is never split mid-block and each is readable on
    its own. Every chunk carries the full metadata (format, fingerprint, salt,
    block hashes, ...) and a CRC32 of its tensor bytes, which ``from_chunks``
    checks. ``chunk_bytes`` is a target: one block per chunk is the minimum.
    Refuses to write values that overflow ``dtype`` (fp16 tops out at 65504;
    use bfloat16 for such models).
    """
    import torch
    from safetensors.torch import save

    dtype = torch.float16 if dtype is None else getattr(torch, dtype) if isinstance(dtype, str) else dtype
    name = _dtype_name(dtype)
    if name not in _STORED_DTYPES:
        raise ValueError(f"cannot store a KV cache as {name}; use one of {', '.join(_STORED_DTYPES)}")
    keys = [k.detach().to("cpu", dtype).contiguous() for k in cache.keys]
    values = [v.detach().to("cpu", dtype).contiguous() for v in cache.values]
    if not all(bool(torch.isfinite(t).all()) for t in (*keys, *values)):
        raise ValueError(f"the cache overflows {name}; store it as bfloat16")
    per_token = sum(t[0, :, 0].numel() for t in (*keys, *values)) * dtype.itemsize
    blocks_per_chunk = max(1, chunk_bytes // (per_token * BLOCK))
    span = blocks_per_chunk * BLOCK
    n = cache.n_tokens
    starts = list(range(0, n, span))
    ids = torch.tensor(cache.token_ids, dtype=torch.int64)
    common = {
        "format": FORMAT,
        "fingerprint": cache.fingerprint,
        "salt": cache.salt.hex(),
        "extra": cache.extra.hex(),
        "key": cache.key,
        "block_hashes": json.dumps(list(cache.block_hashes)),
        "block": str(BLOCK),
        "n_tokens": str(n),
        "n_layers": str(cache.n_layers),
        "model_dtype": _dtype_name(cache.dtype),
        "stored_dtype": name,
        "chunk_count": str(len(starts)),
    }
    out: list[bytes] = []
    for index, s in enumerate(starts):
        e = min(n, s + span)
        tensors = {"token_ids": ids[s:e].clone()}
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            # clone(): a slice would make safetensors write the whole storage of the layer.
            tensors[f"k.{i}"] = k[:, :, s:e].contiguous().clone()
            tensors[f"v.{i}"] = v[:, :, s:e].contiguous().clone()
        meta = dict(
            common, chunk_index=str(index), token_start=str(s), token_end=str(e), crc32=str(_crc(tensors))
        )
        out.append(save(tensors, metadata=meta))
    return out


def read_chunk_metadata(chunk: bytes) -> dict[str, str]:
    """The metadata of one chunk, from its header alone (no tensor is read). Raises ``CorruptCache``."""
    if len(chunk) < 8:
        raise CorruptCache("chunk shorter than a safetensors header")
    (size,) = struct.unpack("<Q", chunk[:8])
    if size > len(chunk) - 8 or size > 100 << 20:
        raise CorruptCache("chunk truncated inside its header")
    try:
        header = json.loads(chunk[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCache(f"chunk header is not JSON: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCache(f"not a {FORMAT} chunk")
    return {str(k): str(v) for k, v in meta.items()}


def from_chunks(
    chunks: Sequence[bytes],
    *,
    expected_fingerprint: str,
    expected_salt: bytes | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> KVCache:
    """Rebuild a cache from ``to_chunks`` output, in ``dtype`` (a torch dtype or its name, such as
    ``LoadedModel.dtype``; default: the dtype it was computed in).

    The fingerprint (and the salt, if given) are checked from the first
    header before any tensor is read: ``CacheMismatch``. Truncated, damaged,
    missing, reordered or mixed chunks: ``CorruptCache``.
    """
    import torch
    from safetensors.torch import load

    if not chunks:
        raise CorruptCache("no chunks")
    first = read_chunk_metadata(chunks[0])
    if first["fingerprint"] != expected_fingerprint:
        raise CacheMismatch(
            f"cache made by model {first['fingerprint']}, the runtime runs {expected_fingerprint}; not loaded"
        )
    if expected_salt is not None and first["salt"] != expected_salt.hex():
        raise CacheMismatch("cache belongs to another cube (salt differs); not loaded")
    try:
        count = int(first["chunk_count"])
        n_tokens = int(first["n_tokens"])
        n_layers = int(first["n_layers"])
        model_dtype = first["model_dtype"]
        if int(first["block"]) != BLOCK:
            raise CorruptCache(f"cache made with {first['block']}-token blocks, this runtime uses {BLOCK}")
    except (KeyError, ValueError) as e:
        raise CorruptCache(f"bad chunk metadata: {e}") from e
    if count != len(chunks):
        raise CorruptCache(f"cache has {count} chunks, {len(chunks)} given")
    target = getattr(torch, model_dtype if dtype is None else dtype, None) if not isinstance(dtype, torch.dtype) else dtype
    if not isinstance(target, torch.dtype):
        raise CorruptCache(f"unknown model dtype {model_dtype!r}")

    keys: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    ids: list[torch.Tensor] = []
    expected_start = 0
    for index, chunk in enumerate(chunks):
        meta = first if index == 0 else read_chunk_metadata(chunk)
        # Every chunk must belong to the same cache (same key, same everything) and sit at its place.
        for name in (
            "fingerprint",
            "salt",
            "extra",
            "key",
            "n_tokens",
            "n_layers",
            "stored_dtype",
            "chunk_count",
        ):
            if meta.get(name) != first.get(name):
                raise CorruptCache(f"chunk {index} is from another cache ({name} differs)")
        if meta.get("chunk_index") != str(index) or meta.get("token_start") != str(expected_start):
            raise CorruptCache(f"chunk {index} is out of order or missing")
        try:
            tensors = load(chunk)
        except Exception as e:  # safetensors raises its own SafetensorError, untyped
            raise CorruptCache(f"chunk {index} is unreadable: {e}") from e
        if str(_crc(tensors)) != meta.get("crc32"):
            raise CorruptCache(f"chunk {index} is damaged (checksum mismatch)")
        try:
            end = int(meta["token_end"])
            part_ids = tensors["token_ids"]
            if part_ids.shape != (end - expected_start,):
                raise CorruptCache(f"chunk {index} token range does not match its tensors")
            ids.append(part_ids)
            for i in range(n_layers):
                keys[i].append(tensors[f"k.{i}"])
                values[i].append(tensors[f"v.{i}"])
        except KeyError as e:
            raise CorruptCache(f"chunk {index} lacks tensor {e}") from e
        expected_start = end
    if expected_start != n_tokens:
        raise CorruptCache(f"chunks cover {expected_start} of {n_tokens} tokens")

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return whole.to(device, target)

    try:
        cache = KVCache(
            keys=tuple(join(p) for p in keys),
            values=tuple(join(p) for p in values),
            token_ids=tuple(int(t) for t in torch.cat(ids).tolist()),
            fingerprint=first["fingerprint"],
            salt=bytes.fromhex(first["salt"]),
            extra=bytes.fromhex(first["extra"]),
        )
    except (ValueError, RuntimeError) as e:
        raise CorruptCache(f"chunks do not form a cache: {e}") from e
    if list(cache.block_hashes) != json.loads(first["block_hashes"]):
        raise CorruptCache("block hashes do not match the stored tokens")
    return cache


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    """CRC32 of the tensors' raw bytes in name order: catches damage, not tampering (the store is ours)."""
    import torch

    crc = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.view(torch.uint8).numpy().data, crc)
    return crc


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
