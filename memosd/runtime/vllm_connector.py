"""memosd's KV connector for vLLM (v1 API): a request's full KV blocks to and from a ``BlockStore``.

vLLM builds two instances from ``KVTransferConfig``: the *scheduler* side
decides, per request, which blocks can be loaded from the store and which
must be saved, and puts that in the step's metadata; the *worker* side copies
blocks between the paged cache tensors and the store around the forward pass.
In process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) both run on the engine's
thread, one after the other, so neither needs a lock of its own.

A request takes part only when it carries ``cache_salt`` (the cube) and
``kv_transfer_params = {"memosd": {...}}`` in its sampling params'
``extra_args``:

* ``"load": true`` (default): leading full blocks whose keys are in the store,
  beyond vLLM's own prefix-cache hit, are loaded instead of computed;
* ``"persist_tokens": n``: the full blocks among the first ``n`` prompt tokens
  are saved once computed (Activate persists a memory block; Generate's
  conversation is never persisted);
* ``"compose": {"segments": [[salt, start, tokens, recompute], ...],
  "ranges": [[segment, lo, hi], ...]}``: a composed request (``vllm_compose``):
  instead of the prefix of its own salt's blocks, the connector offers the
  engine blocks of those ranges, each assembled from its segment's own stored
  blocks (keyed by the segment's tokens in this prompt and its salt: its
  cube's), keys turned by the segment's start; nothing is saved;
* ``"probe": true``: the engine's start-up check reads the request's blocks
  after it finishes (``_Binding.probes``).

Keys are memosd's chained block hashes (``kvblocks.block_keys``), computed
here from the request's tokens with the engine's fingerprint (connector
config), the request's ``cache_salt`` and, as ``extra``, the digest of its
LoRA (the engine names every ``LoRARequest`` by its adapter digest). They are
never taken from the caller, so a request cannot load another cube's,
adapter's or model's blocks by asking for them.

The store is not picklable config: the engine registers it under a name
(``register_store``) and passes the name in ``kv_connector_extra_config``.
A block that is missing or fails its checks at load time is reported through
``get_block_ids_with_load_errors`` and vLLM recomputes it (the engine sets
``kv_load_failure_policy = "recompute"``).

This module imports vLLM at the top: only vLLM (by ``kv_connector_module_path``)
and ``vllm_engine`` import it, never the daemon's normal path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from memosd.runtime import vllm_compose
from memosd.runtime.kvblocks import (
    BlockMismatch,
    BlockStore,
    BlockStores,
    block_keys,
    copy_block,
    decode_block,
    encode_block,
)

if TYPE_CHECKING:
    import torch

CONNECTOR_NAME = "MemosdKVConnector"
PARAMS_KEY = "memosd"


@dataclass
class ConnectorStats:
    """Counters the engine reports (Stats); updated on the engine thread, read anywhere."""

    blocks_loaded: int = 0
    blocks_saved: int = 0
    blocks_skipped: int = 0  # already stored: not written again
    load_errors: int = 0
    lookups: int = 0
    hit_tokens: int = 0


@dataclass
class Reuse:
    """What one request did not compute, as the connector saw it (vLLM's ``num_cached_tokens`` also counts
    offered blocks whose load failed, so reports take this instead)."""

    engine_tokens: int = 0  # vLLM's own prefix-cache hit
    offered_blocks: int = 0  # blocks after it to load from the store
    failed_at: int | None = None  # index (among the offered) of the first that failed to load

    @property
    def loaded_blocks(self) -> int:
        return self.offered_blocks if self.failed_at is None else self.failed_at

    def tokens(self, block_size: int) -> tuple[int, int]:
        """(engine cache tokens, tokens loaded from the store): vLLM recomputes from the first failed block."""
        return self.engine_tokens, self.loaded_blocks * block_size


@dataclass
class _Binding:
    stores: BlockStores
    fingerprint: str
    stats: ConnectorStats = field(default_factory=ConnectorStats)
    # Per request id, until the engine takes it when the request finishes (both on the engine thread).
    reuse: dict[str, Reuse] = field(default_factory=dict)
    inv_freq: Any = None  # the model's RoPE inv_freq (set by the engine): composed loads turn keys by it
    caches: dict[str, Any] = field(default_factory=dict)  # the paged cache, per layer (worker side)
    probes: dict[str, list[int]] = field(default_factory=dict)  # a probe request's block ids, once finished


_BINDINGS: dict[str, _Binding] = {}
_BINDINGS_LOCK = threading.Lock()


def register_store(name: str, stores: BlockStores, fingerprint: str) -> ConnectorStats:
    """Make ``stores`` the storage of the connector configured with ``memosd_store = name``."""
    with _BINDINGS_LOCK:
        binding = _Binding(stores, fingerprint)
        _BINDINGS[name] = binding
        return binding.stats


def take_reuse(name: str, request_id: str) -> Reuse | None:
    """What the finished request ``request_id`` reused (None: it did not take part), forgotten after."""
    return _binding(name).reuse.pop(request_id, None)


def binding_of(name: str) -> _Binding:
    """The engine's view of what it registered (inv_freq, the probes, the paged cache)."""
    return _binding(name)


def unregister_store(name: str) -> None:
    with _BINDINGS_LOCK:
        _BINDINGS.pop(name, None)


def _binding(name: str) -> _Binding:
    with _BINDINGS_LOCK:
        try:
            return _BINDINGS[name]
        except KeyError:
            raise RuntimeError(f"no memosd block store registered as {name!r}") from None


@dataclass
class MemosdConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc,unused-ignore]
    """One step's work for the worker side: which engine blocks to fill from which stored ones."""

    # The worker side has no plans, only this.
    loads: list[Load] = field(default_factory=list)
    # (request id, cache salt, engine block id, key)
    saves: list[tuple[str, str, int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Load:
    """An engine block filled from stored blocks: (salt, key, first token, tokens, first slot) pieces, keys
    turned by ``offset`` (0: an exact load of one whole block)."""

    req_id: str
    block_id: int
    pieces: tuple[tuple[str, str, int, int, int], ...]
    offset: int = 0


@dataclass
class _Composed:
    """A composed request's segments (with their own blocks' keys) and the ranges to load."""

    segments: list[vllm_compose.Segment]
    keys: list[list[str]]
    stores: list[BlockStore]
    ranges: list[vllm_compose.LoadRange]


@dataclass
class _Plan:
    """Scheduler-side state of one participating request."""

    keys: list[str]
    salt: str
    store: BlockStore  # the cube's (by cache_salt)
    load: bool
    persist_blocks: int
    block_ids: list[int] = field(default_factory=list)
    match: tuple[int, int] = (0, 0)  # (first, end) block indices the last lookup found in the store
    pending_load: tuple[int, int] | None = None
    next_save: int = 0  # blocks below this are stored or were planned for saving
    composed: _Composed | None = None
    load_range: int = -1  # composed: the range the last lookup offered from
    probe: bool = False


class MemosdKVConnector(KVConnectorBase_V1):  # type: ignore[misc,unused-ignore]
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._binding = _binding(str(extra["memosd_store"]))
        self._block_size = int(vllm_config.cache_config.block_size)
        self._plans: dict[str, _Plan] = {}
        self._caches: dict[str, torch.Tensor] = {}
        self._block_dim = 0
        self._layers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._load_errors: set[int] = set()

    @property
    def stats(self) -> ConnectorStats:
        return self._binding.stats

    # -- scheduler side -------------------------------------------------------
    def _plan(self, request: Any) -> _Plan | None:
        plan = self._plans.get(request.request_id)
        if plan is not None:
            return plan
        params = (request.kv_transfer_params or {}).get(PARAMS_KEY)
        if not isinstance(params, dict) or request.cache_salt is None:
            return None
        lora = request.lora_request
        extra = lora.lora_name.encode() if lora is not None else b""
        tokens = list(request.prompt_token_ids or [])
        keys = block_keys(tokens, fingerprint=self._binding.fingerprint, salt=request.cache_salt.encode(),
                          extra=extra, block_size=self._block_size)
        persist = int(params.get("persist_tokens", 0))
        composed = self._composed(params.get("compose"), tokens, extra)
        plan = _Plan(keys=keys, salt=request.cache_salt, store=self._binding.stores.for_salt(request.cache_salt),
                     load=bool(params.get("load", True)),
                     persist_blocks=0 if composed is not None else min(len(keys), max(0, persist) // self._block_size),
                     composed=composed, probe=bool(params.get("probe", False)))
        self._plans[request.request_id] = plan
        return plan

    def _composed(self, spec: Any, tokens: list[int], extra: bytes) -> _Composed | None:
        """A composed request's plan: each segment's keys from its own tokens in this prompt and its own salt
        (so a range loads only its cube's blocks of exactly these tokens), and the ranges to load."""
        if not isinstance(spec, dict):
            return None
        segments = [vllm_compose.Segment(str(salt), int(start), int(n), int(r))
                    for salt, start, n, r in spec["segments"]]
        keys = [block_keys(tokens[s.start:s.start + s.tokens], fingerprint=self._binding.fingerprint,
                           salt=s.salt.encode(), extra=extra, block_size=self._block_size) for s in segments]
        ranges = [vllm_compose.LoadRange(int(i), int(lo), int(hi)) for i, lo, hi in spec["ranges"]]
        for r in ranges:
            if r.lo % self._block_size or r.hi % self._block_size or not 0 <= r.segment < len(segments):
                raise ValueError(f"a composed range {r} is not in whole engine blocks of a segment")
        return _Composed(segments, keys, [self._binding.stores.for_salt(s.salt) for s in segments], ranges)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        plan = self._plan(request)
        if plan is None or not plan.load:
            return 0, False
        # vLLM must compute at least the prompt's last token (its logits pick the first output token).
        if plan.composed is not None:
            return self._composed_match(request, plan, plan.composed, num_computed_tokens), False
        limit = min(len(plan.keys), (request.num_prompt_tokens - 1) // self._block_size)
        first = num_computed_tokens // self._block_size
        end = first
        while end < limit and plan.store.has(plan.keys[end]):
            end += 1
        plan.match = (first, end)
        # Asked again after a preemption: the latest answer is what the request ends up reusing.
        self._binding.reuse[request.request_id] = Reuse(engine_tokens=num_computed_tokens)
        self.stats.lookups += 1
        return (end - first) * self._block_size, False

    def _composed_match(self, request: Any, plan: _Plan, composed: _Composed, computed: int) -> int:
        """Tokens to load after ``computed``: to the end of the range holding it, while every stored block
        its engine blocks are assembled from is in its cube's store."""
        size = self._block_size
        self._binding.reuse[request.request_id] = Reuse(engine_tokens=computed)
        self.stats.lookups += 1
        limit = (request.num_prompt_tokens - 1) // size * size
        plan.match, plan.load_range = (computed // size, computed // size), -1
        for n, r in enumerate(composed.ranges):
            if not r.lo <= computed < r.hi:
                continue
            segment, keys, store = composed.segments[r.segment], composed.keys[r.segment], composed.stores[r.segment]
            end = computed
            while end < min(r.hi, limit) and all(
                    j < len(keys) and store.has(keys[j])
                    for j, *_ in vllm_compose.pieces(end, segment.start, size)):
                end += size
            plan.match, plan.load_range = (computed // size, end // size), n
            return end - computed
        return 0

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        plan = self._plans.get(request.request_id)
        if plan is None or num_external_tokens <= 0:
            return
        first, end = plan.match
        # vLLM may take fewer tokens than offered, never more, and only whole blocks.
        blocks, rest = divmod(num_external_tokens, self._block_size)
        if rest or first + blocks > end:
            raise RuntimeError(f"vLLM scheduled {num_external_tokens} external tokens for {request.request_id}; "
                               f"the connector offered {(end - first) * self._block_size} in whole blocks")
        plan.pending_load = (first, first + blocks)
        self._binding.reuse[request.request_id].offered_blocks = blocks
        self.stats.hit_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output: Any) -> MemosdConnectorMetadata:
        meta = MemosdConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            plan = self._plans.get(new.req_id)
            if plan is None:
                continue
            plan.block_ids = list(new.block_ids[0])
            self._plan_loads(new.req_id, plan, meta)
            self._plan_saves(new.req_id, plan, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            plan = self._plans.get(req_id)
            if plan is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                # A request resumed after preemption gets all its blocks anew; otherwise only the added ones.
                if req_id in cached.resumed_req_ids:
                    plan.block_ids = list(new_ids[0])
                else:
                    plan.block_ids.extend(new_ids[0])
            # A preempted request comes back through get_num_new_matched_tokens and lands here, not
            # among the new ones: its loads must be made here too, or vLLM would read unloaded blocks.
            self._plan_loads(req_id, plan, meta)
            self._plan_saves(req_id, plan, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        return meta

    def _plan_loads(self, req_id: str, plan: _Plan, meta: MemosdConnectorMetadata) -> None:
        if plan.pending_load is None:
            return
        first, end = plan.pending_load
        composed = plan.composed
        if composed is None:
            meta.loads.extend(Load(req_id, plan.block_ids[i], ((plan.salt, plan.keys[i], 0, self._block_size, 0),))
                              for i in range(first, end))
        else:
            segment_index = composed.ranges[plan.load_range].segment
            segment, keys = composed.segments[segment_index], composed.keys[segment_index]
            offset = 0 if segment_index == 0 else segment.start  # the first block is where it was computed
            for i in range(first, end):
                pieces = tuple((segment.salt, keys[j], lo, n, dst)
                               for j, lo, n, dst in vllm_compose.pieces(i * self._block_size, segment.start,
                                                                        self._block_size))
                meta.loads.append(Load(req_id, plan.block_ids[i], pieces, offset))
        plan.next_save = max(plan.next_save, end)  # loaded blocks are stored already
        plan.pending_load = None

    def _plan_saves(self, req_id: str, plan: _Plan, computed_after_step: int, meta: MemosdConnectorMetadata) -> None:
        """Blocks this step completes, among those to persist, that the store does not have yet."""
        done = min(plan.persist_blocks, computed_after_step // self._block_size, len(plan.block_ids))
        for i in range(plan.next_save, done):
            if plan.store.has(plan.keys[i]):
                self.stats.blocks_skipped += 1
            else:
                meta.saves.append((req_id, plan.salt, plan.block_ids[i], plan.keys[i]))
        plan.next_save = max(plan.next_save, done)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves happen in the step that computed the block (wait_for_save), so nothing is in flight here.
        plan = self._plans.pop(request.request_id, None)
        if plan is not None and plan.probe:
            self._binding.probes[request.request_id] = list(plan.block_ids)
        return False, None

    # -- worker side ----------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = dict(kv_caches)
        self._binding.caches = self._caches
        # The block index is the first dimension in the CPU layout ([blocks, kv heads, block, 2 * head]);
        # layouts that stack K and V first ([2, blocks, ...]) have it second.
        num_blocks = int(self._kv_cache_config.num_blocks)
        sample = next(iter(self._caches.values()))
        self._block_dim = 0 if sample.shape[0] == num_blocks else 1
        if sample.shape[self._block_dim] != num_blocks:
            raise RuntimeError(f"cannot find the block dimension in a KV cache of shape {tuple(sample.shape)}")
        # What a stored block must hold: each layer's one-block slice, by shape and dtype.
        self._layers = {name: (tuple(v.shape), v.dtype) for name, v in self._block_views(0).items()}

    def _block_views(self, block_id: int) -> dict[str, torch.Tensor]:
        return {name: t.select(self._block_dim, block_id) for name, t in self._caches.items()}

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MemosdConnectorMetadata)
        binding = self._binding
        index: dict[str, int] = {}  # per request: how many of its loads came before this one
        exact: list[tuple[Load, int]] = []
        decoded: dict[str, dict[str, torch.Tensor]] = {}  # this step's: a composed load reads a block twice
        # Composed loads by (offset, pieces' layout), placed together after the loop.
        composed: dict[tuple[int, tuple[tuple[int, int, int], ...]],
                       list[tuple[int, list[str], list[dict[str, torch.Tensor]]]]] = {}
        for load in meta.loads:
            nth = index[load.req_id] = index.get(load.req_id, -1) + 1
            if len(load.pieces) == 1 and load.offset == 0 and load.pieces[0][3] == self._block_size:
                exact.append((load, nth))
                continue
            try:
                sources = [self._decoded(salt, key, decoded) for salt, key, *_ in load.pieces]
            except BlockMismatch:
                self._failed(load, nth)
                continue
            pieces = tuple((lo, n, at) for _s, _k, lo, n, at in load.pieces)
            group = composed.setdefault((load.offset, pieces), [])
            group.append((load.block_id, [key for _s, key, *_ in load.pieces], sources))
        for load, nth in exact:  # one blob at a time, copied straight into its engine block
            if self._load_exact(load):
                binding.stats.blocks_loaded += 1
            else:
                self._failed(load, nth)
        for (offset, layout), loads in composed.items():
            self._place_group(offset, layout, loads)
            binding.stats.blocks_loaded += len(loads)

    def _load_exact(self, load: Load) -> bool:
        """One stored block copied straight into the engine block (False: missing or refused by the codec).

        Each blob is dropped once copied, so a load holds one block's bytes at a time, not the step's."""
        salt, key, *_ = load.pieces[0]
        blob = self._binding.stores.for_salt(salt).get(key)
        if blob is None:  # left the store after the lookup
            return False
        try:
            copy_block(blob, self._block_views(load.block_id), key=key, fingerprint=self._binding.fingerprint,
                       block_size=self._block_size)
        except BlockMismatch:
            return False
        return True

    def _failed(self, load: Load, nth: int) -> None:
        """vLLM recomputes the request from the first bad block (kv_load_failure_policy = recompute)."""
        self._load_errors.add(load.block_id)
        self._binding.stats.load_errors += 1
        reuse = self._binding.reuse.get(load.req_id)
        if reuse is not None and (reuse.failed_at is None or nth < reuse.failed_at):
            reuse.failed_at = nth

    def _place_group(self, offset: int, layout: tuple[tuple[int, int, int], ...],
                     loads: list[tuple[int, list[str], list[dict[str, torch.Tensor]]]]) -> None:
        """Composed loads of one step that share an offset and a piece layout (a range's engine blocks all
        do: the segment's start fixes where its stored blocks cut them): assembled and turned together, then
        written with one index_copy per layer, since per-block work costs its small ops hundreds of times.
        Each stored block is copied once (a range's consecutive engine blocks share them: views)."""
        import torch

        names = list(self._caches)
        order: dict[str, int] = {}
        layers: list[torch.Tensor] = []
        for _, keys, sources in loads:
            for key, tensors in zip(keys, sources, strict=True):
                if key not in order:
                    order[key] = len(order)
                    layers.extend(tensors[name] for name in names)
        flat = torch.stack(layers)
        stored = flat.view(len(order), len(names), *flat.shape[1:])  # [stored blocks, layers, ...]
        picked = []
        for p in range(len(layout)):
            index = [order[keys[p]] for _, keys, _ in loads]
            if index == list(range(index[0], index[0] + len(index))):
                picked.append(stored[index[0]:index[0] + len(index)])
            else:
                picked.append(stored.index_select(0, torch.tensor(index, dtype=torch.long)))
        blocks = vllm_compose.assemble([(src, lo, n, at) for src, (lo, n, at) in zip(picked, layout, strict=True)],
                                       offset, self._binding.inv_freq)  # [loads, layers, heads, block, 2 x head]
        ids = torch.tensor([block_id for block_id, _, _ in loads], dtype=torch.long)
        for i, name in enumerate(names):
            self._caches[name].index_copy_(self._block_dim, ids, blocks[:, i])

    def _decoded(self, salt: str, key: str, decoded: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if key in decoded:
            return decoded[key]
        blob = self._binding.stores.for_salt(salt).get(key)
        if blob is None:
            raise BlockMismatch(f"block {key[:16]} left the store after the lookup")
        tensors = decode_block(blob, key=key, fingerprint=self._binding.fingerprint, block_size=self._block_size,
                               layers=self._layers)
        decoded[key] = tensors
        return tensors

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole blocks, done before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved after the forward pass, all layers at once (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MemosdConnectorMetadata)
        binding = self._binding
        for _req_id, salt, block_id, key in meta.saves:
            blob = encode_block(self._block_views(block_id), key=key, fingerprint=binding.fingerprint,
                                block_size=self._block_size)
            binding.stores.for_salt(salt).put(key, blob)
            binding.stats.blocks_saved += 1

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
