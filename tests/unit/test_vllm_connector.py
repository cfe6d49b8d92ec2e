"""The scheduler side of memosd's vLLM KV connector, on stand-in requests (runs only where vLLM is installed).

The worker side (copying blocks into the paged cache) needs a running engine:
scripts/spike_vllm_engine.py covers it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from memosd.runtime import vllm_compose
from memosd.runtime import vllm_connector as vc
from memosd.runtime.kvblocks import BlockStore, MemoryBlockStore, OneStore, block_keys
from memosd.store.blocks import RocksBlockStore, RocksBlockStores
from memosd.store.rocks import Store

B = 64
FP = "fp-test"


@pytest.fixture(params=["memory", "rocks"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockStore]:
    """The connector over each store; the RocksDB one is bound to the requests' cube ("cube-1")."""
    if request.param == "memory":
        yield MemoryBlockStore()
        return
    rocks = Store(tmp_path / "store")
    yield RocksBlockStore(rocks, "cube-1", FP)
    rocks.close()


@pytest.fixture
def connector(store: BlockStore) -> Iterator[Any]:
    # The daemon's stores are one RocksDB range per cube, picked by salt; the dict holds every cube's.
    stores = RocksBlockStores(store.store, FP) if isinstance(store, RocksBlockStore) else OneStore(store)
    vc.register_store("test", stores, FP)
    config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"memosd_store": "test"}),
        cache_config=SimpleNamespace(block_size=B))
    yield vc.MemosdKVConnector(config, KVConnectorRole.SCHEDULER, None)
    vc.unregister_store("test")


def _request(rid: str, tokens: list[int], *, salt: str | None = "cube-1", lora: str | None = None,
             persist: int = 0, load: bool = True) -> Any:
    return SimpleNamespace(
        request_id=rid, prompt_token_ids=tokens, num_prompt_tokens=len(tokens), cache_salt=salt,
        lora_request=SimpleNamespace(lora_name=lora) if lora else None,
        kv_transfer_params={vc.PARAMS_KEY: {"persist_tokens": persist, "load": load}})


def _stored(store: BlockStore, tokens: list[int], n: int, salt: bytes = b"cube-1", extra: bytes = b"") -> None:
    for key in block_keys(tokens, fingerprint=FP, salt=salt, extra=extra)[:n]:
        store.put(key, b"blob")


def _step(new: Sequence[tuple[str, list[int], int]] = (), cached: Sequence[tuple[str, list[int] | None, int]] = (),
          scheduled: dict[str, int] | None = None, resumed: Sequence[str] = ()) -> Any:
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(ids,), num_computed_tokens=c) for r, ids, c in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, _, _ in cached],
                                              new_block_ids=[(ids,) if ids is not None else None for _, ids, _ in cached],
                                              num_computed_tokens=[c for _, _, c in cached],
                                              resumed_req_ids=set(resumed)),
        num_scheduled_tokens=scheduled or {})


def test_offers_the_stored_blocks_after_the_engines_own_hit(connector: Any, store: BlockStore) -> None:
    tokens = list(range(4 * B + 5))
    _stored(store, tokens, 3)
    assert connector.get_num_new_matched_tokens(_request("r1", tokens), 0) == (3 * B, False)
    assert connector.get_num_new_matched_tokens(_request("r2", tokens), B) == (2 * B, False)


def test_offers_nothing_to_another_cube_adapter_or_an_unsalted_request(connector: Any, store: BlockStore) -> None:
    tokens = list(range(3 * B + 1))
    _stored(store, tokens, 3)
    assert connector.get_num_new_matched_tokens(_request("a", tokens, salt="cube-2"), 0) == (0, False)
    assert connector.get_num_new_matched_tokens(_request("b", tokens, lora="digest"), 0) == (0, False)
    assert connector.get_num_new_matched_tokens(_request("c", tokens, salt=None), 0) == (0, False)
    assert connector.get_num_new_matched_tokens(_request("d", tokens, load=False), 0) == (0, False)
    _stored(store, tokens, 3, extra=b"digest")
    assert connector.get_num_new_matched_tokens(_request("e", tokens, lora="digest"), 0) == (3 * B, False)


def test_never_offers_the_block_holding_the_last_prompt_token(connector: Any, store: BlockStore) -> None:
    tokens = list(range(2 * B))
    _stored(store, tokens, 2)
    assert connector.get_num_new_matched_tokens(_request("r", tokens), 0) == (B, False)


def test_loads_go_to_the_allocated_blocks(connector: Any, store: BlockStore) -> None:
    tokens = list(range(3 * B + 7))
    _stored(store, tokens, 2)
    request = _request("r", tokens)
    assert connector.get_num_new_matched_tokens(request, 0) == (2 * B, False)
    connector.update_state_after_alloc(request, None, 2 * B)
    meta = connector.build_connector_meta(_step(new=[("r", [40, 41, 42, 43], 2 * B)], scheduled={"r": B + 7}))
    keys = block_keys(tokens, fingerprint=FP, salt=b"cube-1")
    assert meta.loads == [vc.Load("r", 40, (("cube-1", keys[0], 0, B, 0),)),
                          vc.Load("r", 41, (("cube-1", keys[1], 0, B, 0),))] and meta.saves == []


def test_saves_each_block_to_persist_in_the_step_that_completes_it(connector: Any, store: BlockStore) -> None:
    tokens = list(range(4 * B + 10))
    keys = block_keys(tokens, fingerprint=FP, salt=b"cube-1")
    store.put(keys[1], b"already")  # stored blocks are not written again
    request = _request("r", tokens, persist=3 * B + 30)  # three full blocks to persist
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    first = connector.build_connector_meta(_step(new=[("r", [7, 8], 0)], scheduled={"r": 2 * B + 3}))
    assert first.saves == [("r", "cube-1", 7, keys[0])]
    second = connector.build_connector_meta(_step(cached=[("r", [9, 10, 11], 2 * B + 3)], scheduled={"r": 2 * B + 7}))
    assert second.saves == [("r", "cube-1", 9, keys[2])]  # block 3 is past persist_tokens; block 4 is partial
    assert connector.stats.blocks_skipped == 1
    connector.request_finished(request, [7, 8, 9, 10, 11])
    assert connector.build_connector_meta(_step(cached=[("r", None, 4 * B)], scheduled={"r": 1})).saves == []


def test_a_preempted_request_gets_its_loads_when_it_resumes(connector: Any, store: BlockStore) -> None:
    tokens = list(range(3 * B + 7))
    _stored(store, tokens, 2)
    request = _request("r", tokens)
    connector.get_num_new_matched_tokens(request, 0)
    connector.update_state_after_alloc(request, None, 2 * B)
    connector.build_connector_meta(_step(new=[("r", [1, 2, 3, 4], 2 * B)], scheduled={"r": B + 7}))
    # Preempted, its blocks freed; rescheduled with new blocks, it comes back as a cached request.
    assert connector.get_num_new_matched_tokens(request, 0) == (2 * B, False)
    connector.update_state_after_alloc(request, None, 2 * B)
    meta = connector.build_connector_meta(_step(cached=[("r", [8, 9, 10, 11], 2 * B)], scheduled={"r": B + 7},
                                                resumed=["r"]))
    keys = block_keys(tokens, fingerprint=FP, salt=b"cube-1")
    assert meta.loads == [vc.Load("r", 8, (("cube-1", keys[0], 0, B, 0),)),
                          vc.Load("r", 9, (("cube-1", keys[1], 0, B, 0),))]


def test_reuse_counts_what_the_request_really_did_not_compute(connector: Any, store: BlockStore) -> None:
    """vLLM's num_cached_tokens also counts offered blocks whose load failed; the connector's count does not."""
    tokens = list(range(5 * B + 3))
    _stored(store, tokens, 4)
    request = _request("r", tokens)
    assert connector.get_num_new_matched_tokens(request, B) == (3 * B, False)  # one block in vLLM's cache
    connector.update_state_after_alloc(request, None, 3 * B)
    reuse = vc.take_reuse("test", "r")
    assert reuse is not None and reuse.tokens(B) == (B, 3 * B)
    assert vc.take_reuse("test", "r") is None  # taken once
    reuse.failed_at = 1  # the second offered block failed its checks: vLLM recomputes from there
    assert reuse.tokens(B) == (B, B)


def test_a_composed_request_loads_each_block_only_from_its_own_cubes_blocks(connector: Any) -> None:
    """Issue 13 on vLLM: the later block's engine blocks come from its own cube's stored blocks of exactly its
    tokens (keys from the segment's tokens and salt), assembled across two stored blocks at an unaligned
    offset and turned by it; a twin cube's blocks of the very same tokens are never offered."""
    stores = vc.binding_of("test").stores
    a, b = list(range(1000, 1000 + 2 * B + 10)), list(range(5000, 5000 + 3 * B + 5))
    prompt = a + b + list(range(20))
    segments = [vllm_compose.Segment("cube-1", 0, len(a), 0), vllm_compose.Segment("cube-2", len(a), len(b), 2)]
    ranges = [vllm_compose.load_range(i, s, s.tokens // B * B, B, (len(prompt) - 1) // B * B)
              for i, s in enumerate(segments)]
    assert ranges == [vllm_compose.LoadRange(0, 0, 2 * B), vllm_compose.LoadRange(1, 3 * B, 5 * B)]

    def request(rid: str) -> Any:
        r = _request(rid, prompt, salt="memosd-composed:x")
        r.kv_transfer_params[vc.PARAMS_KEY]["compose"] = {
            "segments": [[s.salt, s.start, s.tokens, s.recompute] for s in segments],
            "ranges": [[r.segment, r.lo, r.hi] for r in ranges if r is not None]}
        return r

    def put(salt: str, tokens: list[int], n: int) -> list[str]:
        keys = block_keys(tokens, fingerprint=FP, salt=salt.encode())[:n]
        for key in keys:
            stores.for_salt(salt).put(key, b"blob")
        return keys

    a_keys = put("cube-1", a, 2)
    put("twin", b, 3)  # the same tokens in another cube
    assert connector.get_num_new_matched_tokens(request("r1"), 0) == (2 * B, False)  # the first block, exactly
    assert connector.get_num_new_matched_tokens(request("r2"), 3 * B) == (0, False)  # not the twin's
    b_keys = put("cube-2", b, 3)
    r3 = request("r3")
    assert connector.get_num_new_matched_tokens(r3, 3 * B) == (2 * B, False)
    assert connector.get_num_new_matched_tokens(request("r4"), 2 * B) == (0, False)  # b's head: computed
    connector.update_state_after_alloc(r3, None, 2 * B)
    meta = connector.build_connector_meta(_step(new=[("r3", [10, 11, 12, 13, 14, 15], 5 * B)], scheduled={"r3": 9}))
    skip = B - (len(a) - 2 * B)  # b's token at prompt position 3B
    assert meta.loads == [
        vc.Load("r3", 13, (("cube-2", b_keys[0], skip, B - skip, 0), ("cube-2", b_keys[1], 0, skip, B - skip)),
                offset=len(a)),
        vc.Load("r3", 14, (("cube-2", b_keys[1], skip, B - skip, 0), ("cube-2", b_keys[2], 0, skip, B - skip)),
                offset=len(a))]
    assert meta.saves == []  # a composed request saves nothing
    r1 = request("r5")
    connector.get_num_new_matched_tokens(r1, 0)
    connector.update_state_after_alloc(r1, None, 2 * B)
    first = connector.build_connector_meta(_step(new=[("r5", [1, 2, 3, 4], 0)], scheduled={"r5": 3 * B}))
    assert first.loads == [vc.Load("r5", 1, (("cube-1", a_keys[0], 0, B, 0),)),
                           vc.Load("r5", 2, (("cube-1", a_keys[1], 0, B, 0),))]
