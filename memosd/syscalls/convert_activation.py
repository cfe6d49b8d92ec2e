"""Activation-memory values <-> memos.v1 messages (Activate, Evict, Generate); Stats: convert_stats.py."""

from __future__ import annotations

import math

from memosd_client.v1 import memos_pb2 as pb
from memosd_client.v1 import types_pb2 as t

from memosd.activation.activator import ActivationOutcome, EvictOutcome
from memosd.activation.generator import GenerateParams, GenerationReport, MemoryUse, UsedItem
from memosd.activation.select import ALL, Selector
from memosd.errors import InvalidField
from memosd.kernel.requests import request_ref
from memosd.services.remember import Remember

BLOCK_REUSE = {"": t.BLOCK_REUSE_UNSPECIFIED, "exact": t.BLOCK_REUSE_EXACT, "composed": t.BLOCK_REUSE_COMPOSED}
COMPOSE_MODES = {t.COMPOSE_MODE_DEFAULT: "", t.COMPOSE_MODE_EXACT: "exact", t.COMPOSE_MODE_COMPOSED: "composed",
                 t.COMPOSE_MODE_AUTO: "auto"}
SOURCES = {"pool": t.ACTIVATION_SOURCE_POOL, "store": t.ACTIVATION_SOURCE_STORE,
           "computed": t.ACTIVATION_SOURCE_COMPUTED, "": t.ACTIVATION_SOURCE_UNSPECIFIED}
FINISH = {"end": t.FINISH_REASON_END, "length": t.FINISH_REASON_LENGTH, "stop": t.FINISH_REASON_STOP,
          "": t.FINISH_REASON_UNSPECIFIED}


def activation(outcome: ActivationOutcome) -> t.Activation:
    r = outcome.record
    return t.Activation(
        cube_id=r.cube_id, revision=r.revision, cache_key=r.cache_key, model_fingerprint=r.fingerprint,
        item_count=len(r.items), tokens=len(r.token_ids), tokens_computed=outcome.tokens_computed,
        tokens_reused=outcome.tokens_reused, pool_bytes=outcome.pool_bytes, persisted_bytes=r.persisted_bytes,
        source=SOURCES[outcome.source], took_us=outcome.took_us, pooled=outcome.pooled,
        adapter_digest=r.adapter_digest, selector=r.selector)


def selector(request: pb.ActivateRequest) -> Selector:
    """The ActivationSelector of a request (unset: all items)."""
    if not request.HasField("selector"):
        return ALL
    which = request.selector.WhichOneof("kind")
    if which == "items":
        return Selector("items", item_ids=tuple(request.selector.items.item_ids))
    if which == "tag":
        return Selector("tag", tag=request.selector.tag)
    if which == "working_set":
        return Selector("working_set", size=request.selector.working_set)
    return ALL


def evict_response(outcome: EvictOutcome) -> pb.EvictResponse:
    return pb.EvictResponse(
        header=t.ResponseHeader(cube_id=outcome.cube_id, head_revision=outcome.head),
        caches_dropped=outcome.caches_dropped, pool_bytes_freed=outcome.pool_bytes_freed,
        persisted_bytes_deleted=outcome.persisted_bytes_deleted, took_us=outcome.took_us,
        adapters_unloaded=outcome.adapters_unloaded)


def generate_params(req: pb.GenerateRequest) -> GenerateParams:
    options = req.options
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(options, name)):
            raise InvalidField(f"options.{name} must be a finite number", field=f"options.{name}")
    if options.compose not in COMPOSE_MODES:
        raise InvalidField(f"options.compose is {options.compose}, not a ComposeMode: DEFAULT, EXACT, COMPOSED or "
                           "AUTO", field="options.compose")
    recompute = options.compose_recompute if options.HasField("compose_recompute") else None
    if recompute is not None and not 0.0 <= recompute <= 1.0:  # NaN fails both
        raise InvalidField(f"options.compose_recompute is {recompute}; it is the share of each composed block's "
                           "tokens recomputed, from 0 to 1 (or unset for the daemon's runtime.compose_recompute)",
                           field="options.compose_recompute")
    return GenerateParams(
        messages=[(m.role, m.content) for m in req.messages], mount_ids=list(req.mount_ids),
        max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
        stop=tuple(options.stop), seed=options.seed, bypass_kv_cache=options.bypass_kv_cache,
        adapter_mount_id=options.adapter_mount_id, compose=COMPOSE_MODES[options.compose], compose_recompute=recompute,
        retrieve_k=req.retrieve_k if req.HasField("retrieve_k") else None)


def remember(req: pb.GenerateRequest, principal_id: str) -> Remember | None:
    """What the Generate asks to remember (options.remember_mount_id), or None. A request id is checked
    whether or not it is used; a session id without a remember mount is a mistake the caller should hear."""
    request = request_ref(principal_id, req.request_id)
    options = req.options
    if not options.remember_mount_id:
        if options.session_id:
            raise InvalidField("options.session_id names the session of remembered turns; set "
                               "options.remember_mount_id too, or leave it empty", field="options.session_id")
        return None
    return Remember(options.remember_mount_id, options.session_id, request)


def _used(items: list[UsedItem]) -> list[t.UsedItem]:
    return [t.UsedItem(item_id=u.item_id, born_revision=u.born, score=u.score) for u in items]


def _memory(use: MemoryUse) -> t.MemoryUse:
    return t.MemoryUse(
        mount_id=use.mount_id, cube_id=use.cube_id, revision=use.revision, activated=use.activated,
        cache_key=use.cache_key, cache_source=SOURCES[use.cache_source], block_items=_used(use.block_items),
        retrieved_items=_used(use.retrieved_items), block_tokens=use.block_tokens,
        block_reused_tokens=use.block_reused_tokens, block_computed_tokens=use.block_computed_tokens,
        block_reuse=BLOCK_REUSE[use.block_mode], block_note=use.block_note)


def summary(report: GenerationReport) -> t.GenerationSummary:
    return t.GenerationSummary(
        finish_reason=FINISH[report.finish_reason], prompt_tokens=report.prompt_tokens,
        reused_tokens=report.reused_tokens, prefilled_tokens=report.prefilled_tokens,
        completion_tokens=report.completion_tokens, ttft_us=report.ttft_us, total_us=report.total_us,
        memory=[_memory(u) for u in report.memory], model_fingerprint=report.model_fingerprint,
        token_ids=report.token_ids, token_logprobs=report.token_logprobs)
