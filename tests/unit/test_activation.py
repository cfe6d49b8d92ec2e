"""Activation memory in process: Activate, Evict and Generate over a real kernel and RocksDB store.

The model is a tiny randomly initialised Llama (fast); the embedder is a
deterministic stand-in (search quality is not what is tested here). The
correctness points of the issue are checked on the last-position logits: with
the injected cache they match a full prefill of the same tokens, for a fresh
activation, after a restart (from the stored fp16 blobs), and after an
incremental activation; and greedy generation gives the same tokens with and
without the cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from activation_rig import Rig, commit_items, open_rig, run_generation
from tiny_llama import save_tiny_llama

from memosd.activation import render
from memosd.activation.activator import cube_salt
from memosd.activation.generator import GenerateParams, GenerationReport
from memosd.errors import (
    ContextExceeded,
    CubeEmpty,
    InvalidField,
    ModelUnavailable,
    MountNotFound,
    PoolTooSmall,
)
from memosd.kernel.types import ItemInput
from memosd.runtime import tokens
from memosd.runtime.kvcache import BLOCK, ComputeCancelled, KVCache, prepare_generation
from memosd.runtime.model import LoadedModel

CONTEXT = 1024
FACTS = [
    "The capital of France is Paris.",
    "Memory cubes hold plaintext, activations and adapters.",
    "A KV cache is reusable only as an exact token prefix.",
    "The lighthouse keeper feeds the cat at noon.",
    "Paris has a river called the Seine.",
    "Adapters are trained from the text of a cube.",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=CONTEXT)


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


def prompt_for(rig: Rig, cache: KVCache, question: str) -> list[int]:
    tail = render.tail_token_ids(rig.loaded.tokenizer, [], [{"role": "user", "content": question}])
    return [*cache.token_ids, *tail]


def full_logits(lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    logits: torch.Tensor = out.logits[0, -1]
    return logits


def cached_logits(lm: LoadedModel, cache: KVCache, ids: Sequence[int]) -> torch.Tensor:
    dyn, rest = prepare_generation(lm, cache, ids)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([rest]), past_key_values=dyn, use_cache=True)
    logits: torch.Tensor = out.logits[0, -1]
    return logits


def pooled(rig: Rig, key: str) -> KVCache:
    cache = rig.host.pool.get(key)
    assert cache is not None
    return cache


# --- Activate --------------------------------------------------------------------------------------


def test_fresh_activation_matches_full_prefill(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    outcome = rig.activator.activate(mount)
    assert outcome.source == "computed" and outcome.pooled
    record = outcome.record
    assert outcome.tokens_computed == len(record.token_ids) and outcome.tokens_reused == 0
    assert record.revision == 1 and len(record.items) == len(FACTS)
    assert record.persisted_bytes > 0 and record.stored_dtype == "float16"
    cache = pooled(rig, record.cache_key)
    # The block is the items in commit order, in one system message of the chat template.
    text = rig.loaded.tokenizer.decode(cache.token_ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
    assert [text.index(f) for f in FACTS] == sorted(text.index(f) for f in FACTS)
    ids = prompt_for(rig, cache, "Where is the Seine?")
    torch.testing.assert_close(cached_logits(rig.loaded, cache, ids), full_logits(rig.loaded, ids),
                               atol=1e-4, rtol=1e-4)


def test_reactivation_after_restart_loads_the_stored_blobs(tmp_path: Path, tiny_dir: Path) -> None:
    first = open_rig(tmp_path, str(tiny_dir))
    first.kernel.alloc_cube("facts", "", {})
    mount = commit_items(first, "facts", FACTS)
    key = first.activator.activate(mount).record.cache_key
    first.close()

    second = open_rig(tmp_path, str(tiny_dir))
    try:
        outcome = second.activator.activate(mount)  # mounts survive restarts
        assert outcome.source == "store" and outcome.tokens_computed == 0
        assert outcome.record.cache_key == key
        cache = pooled(second, key)
        ids = prompt_for(second, cache, "What does the keeper feed?")
        # The stored copy is fp16: equal within half-precision rounding.
        torch.testing.assert_close(cached_logits(second.loaded, cache, ids), full_logits(second.loaded, ids),
                                   atol=2e-3, rtol=2e-3)
    finally:
        second.close()


def test_incremental_activation_computes_only_the_new_tokens(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    first = rig.activator.activate(mount)
    rig.kernel.write(mount, [ItemInput(text="Rome is the capital of Italy."), ItemInput(text="Owls hunt at night.")])
    rig.kernel.commit(mount, "append", "test")
    second = rig.activator.activate(mount)
    n_old, n_new = len(first.record.token_ids), len(second.record.token_ids)
    assert second.source == "computed" and second.record.revision == 2
    # Everything up to the last full block before the old closing tag is reused.
    assert second.tokens_reused > 0 and second.tokens_reused % BLOCK == 0
    assert n_old - BLOCK - 3 < second.tokens_reused <= n_old
    assert second.tokens_computed == n_new - second.tokens_reused
    assert second.record.cache_key != first.record.cache_key
    assert first.record.cache_key not in rig.host.pool  # the old cache is no longer current
    assert rig.kernel.store.get_kv_chunks(first.record) is None  # ... and its blobs are gone
    cache = pooled(rig, second.record.cache_key)
    ids = prompt_for(rig, cache, "What hunts at night?")
    torch.testing.assert_close(cached_logits(rig.loaded, cache, ids), full_logits(rig.loaded, ids),
                               atol=1e-4, rtol=1e-4)


def test_activate_refuses_an_empty_cube_and_an_oversized_block(rig: Rig) -> None:
    rig.kernel.alloc_cube("empty", "", {})
    mount = rig.kernel.mount("empty", 0, True).record.mount_id
    with pytest.raises(CubeEmpty, match="Write and commit items first"):
        rig.activator.activate(mount)
    rig.kernel.alloc_cube("huge", "", {})
    huge = commit_items(rig, "huge", [" ".join(["lighthouse keeper"] * 400)])
    with pytest.raises(ContextExceeded, match=f"context is {CONTEXT}"):
        rig.activator.activate(huge)
    assert list(rig.kernel.store.iter_activations()) == []


def test_pool_too_small_is_refused_before_any_work(tmp_path: Path, tiny_dir: Path) -> None:
    small = open_rig(tmp_path, str(tiny_dir), pool_bytes=1000)
    try:
        small.kernel.alloc_cube("facts", "", {})
        mount = commit_items(small, "facts", FACTS)
        per_token = small.loaded.kv_bytes_per_token
        assert per_token == 2 * 2 * 2 * 16 * 4  # k+v, 2 layers, 2 KV heads, head_dim 16, fp32
        with pytest.raises(PoolTooSmall, match=r"runtime\.pool_bytes"):
            small.activator.activate(mount)
        assert list(small.kernel.store.iter_activations()) == [] and len(small.host.pool) == 0
    finally:
        small.close()


def test_pool_evicts_least_recently_used_and_evicted_caches_reload_from_the_store(
    tmp_path: Path, tiny_dir: Path
) -> None:
    probe = open_rig(tmp_path / "probe", str(tiny_dir))
    probe.kernel.alloc_cube("a", "", {})
    size = probe.activator.activate(commit_items(probe, "a", FACTS)).pool_bytes
    probe.close()
    # Room for one cache of this size, not two.
    r = open_rig(tmp_path / "data", str(tiny_dir), pool_bytes=int(size * 1.5))
    try:
        for name in ("a", "b"):
            r.kernel.alloc_cube(name, "", {})
        mount_a, mount_b = commit_items(r, "a", FACTS), commit_items(r, "b", FACTS)
        key_a = r.activator.activate(mount_a).record.cache_key
        key_b = r.activator.activate(mount_b).record.cache_key
        assert key_a != key_b  # same text, different cubes: the salt keeps them apart
        assert key_a not in r.host.pool and key_b in r.host.pool
        again = r.activator.activate(mount_a)
        assert again.source == "store" and again.tokens_computed == 0
        assert key_a in r.host.pool and key_b not in r.host.pool
    finally:
        r.close()


def test_evict_drops_the_pool_entry_and_optionally_the_blobs(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    record = rig.activator.activate(mount).record
    assert rig.activator.persisted_bytes() == record.persisted_bytes
    kept = rig.activator.evict("facts", delete_persisted=False)
    assert kept.caches_dropped == 1 and kept.pool_bytes_freed > 0 and kept.persisted_bytes_deleted == 0
    assert record.cache_key not in rig.host.pool
    assert rig.kernel.store.get_kv_chunks(record) is not None
    deleted = rig.activator.evict("facts", delete_persisted=True)
    assert deleted.caches_dropped == 0 and deleted.persisted_bytes_deleted == record.persisted_bytes
    assert rig.kernel.store.get_kv_chunks(record) is None
    assert list(rig.kernel.store.iter_activations(record.cube_id)) == []
    assert rig.activator.persisted_bytes() == 0
    assert rig.activator.activate(mount).source == "computed"


def test_a_cache_of_another_model_is_never_loaded(tmp_path: Path, tiny_dir: Path) -> None:
    first = open_rig(tmp_path / "data", str(tiny_dir))
    first.kernel.alloc_cube("facts", "", {})
    mount = commit_items(first, "facts", FACTS)
    record = first.activator.activate(mount).record
    first.close()
    other_dir = save_tiny_llama(tmp_path / "other", seed=1, context=CONTEXT)
    other = open_rig(tmp_path / "data", str(other_dir))
    try:
        assert other.loaded.fingerprint != record.fingerprint
        # Generate does not treat the cube as activated for this model ...
        _, report = run_generation(other, GenerateParams([("user", "hi")], [mount], max_tokens=2))
        assert not report.memory[0].activated and report.reused_tokens == 0
        # ... a forged record under this model's fingerprint, pointing at the other model's blobs, is refused ...
        forged = replace(record, fingerprint=other.loaded.fingerprint)
        assert other.activator.load(forged, other.loaded) is None
        # ... and Activate computes its own cache, leaving the first model's activation alone.
        outcome = other.activator.activate(mount)
        assert outcome.source == "computed" and outcome.record.cache_key != record.cache_key
        assert other.kernel.store.get_activation(record.cube_id, record.fingerprint) == record
    finally:
        other.close()


def test_a_cache_of_an_older_revision_is_not_served_as_current(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    activated = rig.activator.activate(mount).record
    old_mount = rig.kernel.mount("facts", 1, False).record.mount_id
    rig.kernel.write(mount, [ItemInput(text="Rome is the capital of Italy.")])
    rig.kernel.commit(mount, "append", "test")  # the writer's mount moves to revision 2
    _, report = run_generation(rig, GenerateParams([("user", "hi")], [mount], max_tokens=2))
    assert not report.memory[0].activated and report.reused_tokens == 0
    _, report = run_generation(rig, GenerateParams([("user", "hi")], [old_mount], max_tokens=2))
    assert report.memory[0].activated and report.memory[0].cache_key == activated.cache_key
    assert report.reused_tokens == len(activated.token_ids)


# --- Generate --------------------------------------------------------------------------------------


def test_greedy_generation_is_the_same_with_and_without_the_cache(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    record = rig.activator.activate(mount).record
    params = GenerateParams([("user", "Tell me about Paris.")], [mount], max_tokens=24)
    cached_text, cached = run_generation(rig, params)
    full_text, full = run_generation(rig, replace(params, bypass_kv_cache=True))
    assert cached.reused_tokens == len(record.token_ids) and full.reused_tokens == 0
    assert cached.prompt_tokens == full.prompt_tokens == full.prefilled_tokens
    assert cached.memory[0].cache_source == "pool" and full.memory[0].cache_key == ""
    assert cached_text == full_text and cached.completion_tokens == full.completion_tokens
    # The same tokens with the same log-probabilities: text alone can hide a cache that shifts the logits.
    assert cached.token_ids == full.token_ids and len(cached.token_ids) == cached.completion_tokens
    torch.testing.assert_close(torch.tensor(cached.token_logprobs), torch.tensor(full.token_logprobs),
                               atol=1e-4, rtol=0)  # fp32 on CPU: chunked and whole prefills differ by ~1e-6
    assert [(u.item_id, u.born) for u in cached.memory[0].block_items] == [tuple(i) for i in record.items]


MORE_FACTS = [
    "The observatory opens its dome at dusk.",
    "Owls nest in the old bell tower.",
    "The ferry leaves the harbour every hour.",
]


def _two_activated(rig: Rig) -> tuple[str, str, int, int]:
    rig.kernel.alloc_cube("facts", "", {})
    rig.kernel.alloc_cube("more", "", {})
    first, second = commit_items(rig, "facts", FACTS), commit_items(rig, "more", MORE_FACTS)
    a = len(rig.activator.activate(first).record.token_ids)
    b = len(rig.activator.activate(second).record.token_ids)
    return first, second, a, b


def _blocks(report: GenerationReport) -> list[tuple[int, int, int, str]]:
    return [(u.block_tokens, u.block_reused_tokens, u.block_computed_tokens, u.block_mode) for u in report.memory]


def test_a_recurring_combination_of_blocks_is_reused_whole_and_exactly(rig: Rig) -> None:
    """Issue 13, point 1: the second block is prefilled once; the same ordered set of cubes at the same
    revisions then reuses both blocks, and the reply is the full prefill's."""
    first, second, a, b = _two_activated(rig)
    params = GenerateParams([("user", "When does the ferry leave?")], [first, second], max_tokens=12)
    _, seen = run_generation(rig, params)
    assert seen.reused_tokens == a and _blocks(seen) == [(a, a, 0, "exact"), (b, 0, b, "exact")]
    _, again = run_generation(rig, params)
    assert again.reused_tokens == a + b and _blocks(again) == [(a, a, 0, "exact"), (b, b, 0, "exact")]
    assert again.memory[0].cache_key == again.memory[1].cache_key != seen.memory[0].cache_key
    assert again.memory[1].cache_source == "pool"
    _, full = run_generation(rig, replace(params, bypass_kv_cache=True))
    assert full.reused_tokens == 0 and _blocks(full) == [(a, 0, a, "exact"), (b, 0, b, "exact")]
    assert seen.token_ids == again.token_ids == full.token_ids
    torch.testing.assert_close(torch.tensor(again.token_logprobs), torch.tensor(full.token_logprobs),
                               atol=1e-4, rtol=0)
    # Another order is another combination: only its first block is reused.
    _, swapped = run_generation(rig, replace(params, mount_ids=[second, first]))
    assert _blocks(swapped) == [(b, b, 0, "exact"), (a, 0, a, "exact")]


def test_a_combination_whose_last_cube_changed_reuses_what_it_shares(rig: Rig) -> None:
    """The session cube changes after every exchange: the blocks before it, and its unchanged tokens, are
    reused from the last combination (cropped at a 64-token block), and the reply is the full prefill's."""
    first, second, a, b = _two_activated(rig)
    rig.kernel.alloc_cube("session", "", {})
    session = commit_items(rig, "session", ["The user asked about the ferry."])
    rig.activator.activate(session)
    params = GenerateParams([("user", "When does the ferry leave?")], [first, second, session], max_tokens=6)
    run_generation(rig, params)
    rig.kernel.write(session, [ItemInput(text="Then the user asked about owls.")])
    rig.kernel.commit(session, "turn", "test")
    c = len(rig.activator.activate(session).record.token_ids)
    _, changed = run_generation(rig, params)
    blocks = _blocks(changed)
    assert blocks[:2] == [(a, a, 0, "exact"), (b, b, 0, "exact")]
    shared = changed.reused_tokens - a - b
    assert blocks[2] == (c, shared, c - shared, "exact") and 0 <= shared < c
    assert changed.reused_tokens % 64 == 0  # a cropped combination ends on a full block
    _, full = run_generation(rig, replace(params, bypass_kv_cache=True))
    assert changed.token_ids == full.token_ids
    assert _blocks(run_generation(rig, params)[1])[2] == (c, c, 0, "exact")  # the new combination was kept


def test_a_combination_goes_with_any_of_its_cubes(rig: Rig) -> None:
    """Evicting the second cube drops every combination that holds its block; after a Purge of one of its
    items, a generation that computed the combination before cannot pool it again."""
    first, second, a, b = _two_activated(rig)
    params = GenerateParams([("user", "Where do owls nest?")], [first, second], max_tokens=4)
    run_generation(rig, params)
    again = run_generation(rig, params)[1]
    assert _blocks(again)[1] == (b, b, 0, "exact")
    facts, more = (rig.kernel.cube_of(rig.kernel.mount_state(m)) for m in (first, second))
    rig.activator.evict(more.cube_id, delete_persisted=False)
    assert _blocks(run_generation(rig, params)[1])[1] == (b, 0, b, "exact")  # computed again, then kept
    assert _blocks(run_generation(rig, params)[1])[1] == (b, b, 0, "exact")

    key = again.memory[1].cache_key
    combined = rig.host.pool.peek(key)
    assert combined is not None and combined.n_tokens == a + b
    fingerprint = rig.loaded.fingerprint
    records = [rig.kernel.store.get_activation(c.cube_id, fingerprint) for c in (facts, more)]
    assert all(r is not None for r in records)
    owls = rig.kernel.visible_items(more.cube_id, more.head, time.time_ns())[1].item_id
    rig.kernel.purge(more.cube_id, [owls], "", [])
    rig.activator.drop_pooled(more.cube_id)  # what Erasure does after the kernel's purge
    assert key not in rig.host.pool
    assert not rig.activator.keep_combination([facts, more], records, combined)  # type: ignore[arg-type]
    assert key not in rig.host.pool


def test_generation_never_changes_the_pooled_or_stored_cache(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    record = rig.activator.activate(mount).record
    cache = pooled(rig, record.cache_key)
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    blobs = rig.kernel.store.get_kv_chunks(record)
    params = GenerateParams([("user", "What is a KV cache?")], [mount], max_tokens=16, temperature=0.8, seed=7)
    first = run_generation(rig, params)
    second = run_generation(rig, params)
    assert first[0] == second[0] and first[1].completion_tokens == second[1].completion_tokens
    assert all(torch.equal(a, b) for a, b in zip(before, (*cache.keys, *cache.values), strict=True))
    assert cache.n_tokens == len(record.token_ids)
    assert rig.kernel.store.get_kv_chunks(record) == blobs


def test_generate_cold_loads_an_evicted_cache(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    record = rig.activator.activate(mount).record
    rig.activator.evict("facts", delete_persisted=False)
    _, report = run_generation(rig, GenerateParams([("user", "hi")], [mount], max_tokens=2))
    assert report.memory[0].cache_source == "store" and report.reused_tokens == len(record.token_ids)
    assert record.cache_key in rig.host.pool


def test_stop_strings_and_max_tokens(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    params = GenerateParams([("user", "Say something.")], [mount], max_tokens=40, retrieve_k=0)
    text, report = run_generation(rig, params)
    assert report.finish_reason in ("length", "end") and report.completion_tokens <= 40
    if len(text) < 6:
        pytest.skip("the random model ended its turn too soon to pick a stop string")
    stop = text[3:6]
    cut, stopped = run_generation(rig, replace(params, stop=(stop,)))
    assert stopped.finish_reason == "stop" and cut == text[: text.index(stop)]


def test_retrieval_adds_items_not_already_in_a_block(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    rig.kernel.alloc_cube("notes", "", {})
    facts = commit_items(rig, "facts", FACTS)
    notes = commit_items(rig, "notes", ["Owls hunt at night.", "Rome is the capital of Italy."])
    rig.activator.activate(facts)
    params = GenerateParams([("user", "Paris?")], [facts, notes], max_tokens=2, retrieve_k=3)
    _, report = run_generation(rig, params)
    facts_use, notes_use = report.memory
    assert facts_use.activated and not notes_use.activated
    assert facts_use.retrieved_items == []  # every facts item is already in the block
    assert len(notes_use.retrieved_items) == 2
    _, none = run_generation(rig, replace(params, retrieve_k=0))
    assert none.prompt_tokens < report.prompt_tokens
    assert all(not u.retrieved_items for u in none.memory)


def test_generate_rejects_bad_input(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    user = [("user", "hi")]
    bad = [
        (GenerateParams([], [mount]), "messages"),
        (GenerateParams([("user", "hi"), ("assistant", "hello")], [mount]), "last message"),
        (GenerateParams([("robot", "hi")], [mount]), "role"),
        (GenerateParams(user, [mount], temperature=-1), "temperature"),
        (GenerateParams(user, [mount], top_p=1.5), "top_p"),
        (GenerateParams(user, [mount], max_tokens=10**6), "max_tokens"),
        (GenerateParams(user, [mount], stop=("",)), "stop"),
    ]
    for params, field in bad:
        with pytest.raises(InvalidField, match=field):
            run_generation(rig, params)
    with pytest.raises(MountNotFound):
        run_generation(rig, GenerateParams(user, ["mnt_nope"]))
    with pytest.raises(ContextExceeded, match=f"context is {CONTEXT}"):
        run_generation(rig, GenerateParams([("user", "lighthouse keeper " * 600)], [mount]))
    assert rig.host.active_generations == 0


def test_cancelled_generation_stops_and_frees_its_work(rig: Rig) -> None:
    rig.kernel.alloc_cube("facts", "", {})
    mount = commit_items(rig, "facts", FACTS)
    cancel = threading.Event()
    cancel.set()  # the caller is gone before the prefill starts
    with pytest.raises(ComputeCancelled):
        list(rig.generator.generate(GenerateParams([("user", "hi")], [mount]), cancel))
    assert rig.host.active_generations == 0
    # Cancelled mid-stream: no more text after the event, no report (a cancelled reply never ends), and
    # the count drops when the stream closes, with no step of it left queued on the worker.
    cancel = threading.Event()
    stream = rig.generator.generate(GenerateParams([("user", "hi")], [mount], max_tokens=200), cancel)
    events: list[Any] = []
    with pytest.raises(ComputeCancelled):
        for event in stream:
            events.append(event)
            if len(events) == 1:
                assert rig.host.active_generations == 1
                cancel.set()
    assert len(events) == 1 and isinstance(events[0], str)
    assert rig.host.active_generations == 0 and rig.host.worker.queue_depth == 0


def test_a_daemon_without_a_model_says_so(tmp_path: Path) -> None:
    r = open_rig(tmp_path, "none")
    try:
        r.kernel.alloc_cube("facts", "", {})
        mount = commit_items(r, "facts", FACTS)
        with pytest.raises(ModelUnavailable, match=r"runtime\.model"):
            r.activator.activate(mount)
        assert r.host.state == "disabled"
    finally:
        r.close()


def test_salt_is_the_cube_id() -> None:
    assert cube_salt("cube_a") != cube_salt("cube_b")


def test_the_model_sees_who_said_each_turn(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory block and the retrieved items carry a turn's speaker (kernel/memory_text.py)."""
    rig.kernel.alloc_cube("chat", "", {})
    mount = rig.kernel.mount("chat", 0, True).record.mount_id
    rig.kernel.write(mount, [ItemInput("I adopted a dog", speaker="Caroline", session_id="s"),
                             ItemInput("A plain note")])
    rig.kernel.commit(mount, "add", "test")
    cube = rig.kernel.cube("chat")
    _, texts, _ = rig.activator.block_items(cube, cube.head)
    assert texts == ["Caroline: I adopted a dog", "A plain note"]

    shown: list[list[str]] = []
    real = render.tail_token_ids

    def spy(tokenizer: Any, retrieved: Sequence[str], *args: Any, **kw: Any) -> list[int]:
        shown.append(list(retrieved))
        return real(tokenizer, retrieved, *args, **kw)

    monkeypatch.setattr(render, "tail_token_ids", spy)
    run_generation(rig, GenerateParams([("user", "Caroline adopted a dog?")], [mount], max_tokens=1, retrieve_k=2))
    assert shown and set(shown[-1]) == {"Caroline: I adopted a dog", "A plain note"}


def test_no_text_is_fewer_tokens_than_its_bytes_over_the_longest_token() -> None:
    """The bound Generate refuses huge prompts by: B bytes of text are at least B / longest_token_bytes
    tokens, for ordinary text, runs of one character and the vocabulary's own longest tokens."""
    from tiny_llama import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    longest = tokens.longest_token_bytes(tokenizer)
    vocab_texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    longest_texts = sorted(vocab_texts, key=lambda text: len(text.encode()))[-20:]
    assert max(len(text.encode()) for text in vocab_texts) <= longest
    for text in ["The capital of France is Paris. " * 50, " " * 5000, "é" * 3000, "".join(longest_texts) * 20,
                 "<|im_start|>user\nhi<|im_end|>" * 100]:
        assert len(tokens.encode(tokenizer, text)) * longest >= len(text.encode()), text[:40]
