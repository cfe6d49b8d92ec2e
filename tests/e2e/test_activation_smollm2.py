"""Activation memory end to end: the session daemon's embedded SmolLM2-135M over real gRPC.

The model is slow on a small CPU (~1 ms a token of prefill, 25-60 ms a token of
decode), so replies are short, blocks are a few facts, and only the
responsiveness test encodes a block of thousands of tokens.
"""

from __future__ import annotations

import random
import re
import threading
import time

from daemon_proc import DaemonProcess
from memos import Client
from memos.v1 import types_pb2 as t

# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims; K and V in float32 (the cpu dtype) in the pool,
# float16 (runtime.kv_dtype) in the store.
POOL_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4
STORED_BYTES_PER_TOKEN = POOL_BYTES_PER_TOKEN // 2
MODEL_LOAD_SECONDS = 300.0

FACTS = [
    "My name is Ada and I live in Lisbon.",
    "My car is a red Volvo.",
    "I am allergic to peanuts.",
    "My sister Maria is a pilot.",
    "I work as a marine biologist.",
    "My favourite food is grilled sardines.",
]
QUESTION = "What colour is my car? Answer in one sentence."


def wait_ready(client: Client) -> None:
    """The session daemon loads the model in the background after start (dequantizing it the first time)."""
    deadline = time.monotonic() + MODEL_LOAD_SECONDS
    while (state := client.stats().model.state) == "loading" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state == "ready", client.stats().model


def seed(client: Client, cube: str, texts: list[str]) -> list[str]:
    client.alloc_cube(cube)
    with client.mount(cube, writable=True) as m:
        ids = m.write(texts)
        assert m.commit().revision.number == 1
    return ids


def ask(client: Client, mounts: object, question: str = QUESTION, **options: object) -> tuple[str, t.GenerationSummary]:
    gen = client.generate(question, mounts, **options)  # type: ignore[arg-type]
    text = gen.text()
    assert gen.summary is not None, "a completed stream ends with its summary"
    return text, gen.summary


def token_counts(s: t.GenerationSummary) -> tuple[int, int, int, int]:
    return s.prompt_tokens, s.reused_tokens, s.prefilled_tokens, s.completion_tokens


def test_activate_generate_evict_end_to_end(client: Client, cube_name: str) -> None:
    wait_ready(client)
    cube = client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        ids = m.write(FACTS)
        m.commit()

        first = m.activate()
        assert first.source == t.ACTIVATION_SOURCE_COMPUTED
        assert (first.cube_id, first.revision, first.item_count) == (cube.cube_id, 1, len(FACTS))
        assert first.tokens > 0 and (first.tokens_computed, first.tokens_reused) == (first.tokens, 0)
        assert first.pooled and first.pool_bytes == first.tokens * POOL_BYTES_PER_TOKEN
        # Persisted as float16: half the pool's float32 bytes, plus the chunks' metadata.
        assert first.tokens * STORED_BYTES_PER_TOKEN <= first.persisted_bytes < first.pool_bytes
        assert re.fullmatch(r"[0-9a-f]{64}", first.cache_key)

        again = m.activate()
        assert again.source == t.ACTIVATION_SOURCE_POOL
        assert (again.tokens_computed, again.tokens_reused) == (0, 0)
        assert (again.cache_key, again.tokens, again.persisted_bytes) == (
            first.cache_key, first.tokens, first.persisted_bytes)
        assert again.pooled

        # Greedy decoding over the hot cache: the same input gives the same reply.
        text, summary = ask(client, m, max_tokens=24)
        text2, summary2 = ask(client, m, max_tokens=24)
        assert text.strip() and text == text2
        assert token_counts(summary) == token_counts(summary2)
        assert summary.reused_tokens == first.tokens
        assert summary.prompt_tokens == summary.reused_tokens + summary.prefilled_tokens
        assert summary.prefilled_tokens > 0 and 0 < summary.completion_tokens <= 24
        assert summary.model_fingerprint == first.model_fingerprint
        [use] = summary.memory
        assert (use.mount_id, use.cube_id, use.revision) == (m.mount_id, cube.cube_id, 1)
        assert use.activated and use.cache_key == first.cache_key
        assert use.cache_source == t.ACTIVATION_SOURCE_POOL
        # The block holds the committed items in commit order (write order within a commit).
        assert [u.item_id for u in use.block_items] == ids
        assert all(u.born_revision == 1 and u.score == 0 for u in use.block_items)
        assert not use.retrieved_items  # every item is in the block already

        # The same prompt prefilled in full gives the same reply, and reuses nothing.
        bypass_text, bypass = ask(client, m, max_tokens=24, bypass_kv_cache=True)
        assert bypass_text == text
        assert bypass.reused_tokens == 0 and bypass.prefilled_tokens == bypass.prompt_tokens == summary.prompt_tokens
        assert bypass.memory[0].activated and bypass.memory[0].cache_key == ""
        assert bypass.completion_tokens == summary.completion_tokens
        # Token by token the same, with the same log-probabilities: equal text can hide a shifted cache.
        assert list(bypass.token_ids) == list(summary.token_ids) and len(summary.token_ids) == summary.completion_tokens
        drift = max(abs(a - b) for a, b in zip(bypass.token_logprobs, summary.token_logprobs, strict=True))
        assert drift < 1e-3, drift  # fp32 on CPU: a cached and a whole prefill differ by rounding only

        evicted = client.evict(cube_name)
        assert (evicted.caches_dropped, evicted.pool_bytes_freed) == (1, first.pool_bytes)
        assert evicted.persisted_bytes_deleted == 0
        assert evicted.header.cube_id == cube.cube_id

        # Cold: the cache comes back from the store (float16). The reply was checked to be the same
        # as from the hot float32 cache for this prompt (greedy on CPU is deterministic), so it is asserted.
        cold_text, cold = ask(client, m, max_tokens=24)
        assert cold.memory[0].activated and cold.memory[0].cache_key == first.cache_key
        assert cold.memory[0].cache_source == t.ACTIVATION_SOURCE_STORE
        assert cold.reused_tokens == first.tokens
        assert cold_text == text

    stats = client.stats()
    assert stats.model.state == "ready" and stats.model.error == ""
    assert re.fullmatch(r"[0-9a-f]{16}", stats.model.fingerprint)
    assert stats.model.fingerprint == first.model_fingerprint
    assert stats.model.name == "SmolLM2-135M-Instruct" and stats.model.context_length > first.tokens
    assert stats.kv_pool.entries >= 1  # the cold Generate pooled the cache again
    assert stats.kv_pool.bytes_used >= first.pool_bytes
    assert stats.kv_pool.persisted_bytes >= first.persisted_bytes
    assert stats.kv_pool.hits >= 1 and stats.kv_pool.evictions >= 1
    assert stats.calls["Activate"] >= 2 and stats.calls["Generate"] >= 4 and stats.calls["Evict"] >= 1


def test_a_recurring_combination_of_cubes_is_reused_whole(client: Client, cube_name: str) -> None:
    """Issue 13, point 1, on the transformers engine through gRPC: the second block is computed once, then
    the same ordered cubes reuse both; the reply is the full prefill's, and the summary counts per block."""
    wait_ready(client)
    seed(client, cube_name + "-a", FACTS[:3])
    seed(client, cube_name + "-b", FACTS[3:])
    with client.mount(cube_name + "-a") as a, client.mount(cube_name + "-b") as b:
        n_a, n_b = a.activate().tokens, b.activate().tokens
        _, first = ask(client, [a, b], max_tokens=8, retrieve_k=0)
        _, again = ask(client, [a, b], max_tokens=8, retrieve_k=0)
        _, full = ask(client, [a, b], max_tokens=8, retrieve_k=0, bypass_kv_cache=True)
    counts = [[(u.block_tokens, u.block_reused_tokens, u.block_computed_tokens) for u in s.memory]
              for s in (first, again, full)]
    assert counts == [[(n_a, n_a, 0), (n_b, 0, n_b)], [(n_a, n_a, 0), (n_b, n_b, 0)],
                      [(n_a, 0, n_a), (n_b, 0, n_b)]]
    assert all(u.block_reuse == t.BLOCK_REUSE_EXACT for s in (first, again, full) for u in s.memory)
    assert again.reused_tokens == n_a + n_b and again.memory[1].cache_source == t.ACTIVATION_SOURCE_POOL
    assert list(first.token_ids) == list(again.token_ids) == list(full.token_ids)


def test_composed_blocks_reuse_each_cubes_own_cache_in_any_position(client: Client, cube_name: str) -> None:
    """Issue 13, point 2, on the transformers engine through gRPC: each later block is placed from its own
    cube's cache (whatever its position), its first tokens recomputed; the summary counts per block and
    names the mode; recomputing every token is the full prefill; a twin cube's block is its own."""
    import math

    wait_ready(client)
    seed(client, cube_name + "-a", FACTS[:3])
    seed(client, cube_name + "-b", FACTS[3:])
    seed(client, cube_name + "-twin", FACTS[3:])  # the same text as b, another cube
    with client.mount(cube_name + "-a") as a, client.mount(cube_name + "-b") as b, \
            client.mount(cube_name + "-twin") as twin:
        acts = {m: m.activate() for m in (a, b, twin)}
        _, composed = ask(client, [a, b], max_tokens=6, retrieve_k=0, compose="composed", compose_recompute=0.25)
        _, swapped = ask(client, [b, a], max_tokens=6, retrieve_k=0, compose="composed", compose_recompute=0.25)
        _, twinned = ask(client, [a, twin], max_tokens=6, retrieve_k=0, compose="composed")
        _, whole = ask(client, [a, b], max_tokens=6, retrieve_k=0, compose="composed", compose_recompute=1.0)
        _, full = ask(client, [a, b], max_tokens=6, retrieve_k=0, bypass_kv_cache=True)
        _, exact = ask(client, [a, twin], max_tokens=6, retrieve_k=0, compose="exact")
    n_a, n_b = acts[a].tokens, acts[b].tokens
    r_b, r_a = math.ceil(n_b * 0.25), math.ceil(n_a * 0.25)
    assert [(u.block_reuse, u.block_reused_tokens, u.block_computed_tokens) for u in composed.memory] == [
        (t.BLOCK_REUSE_EXACT, n_a, 0), (t.BLOCK_REUSE_COMPOSED, n_b - r_b, r_b)]
    assert composed.reused_tokens == n_a + n_b - r_b and composed.memory[1].cache_key == acts[b].cache_key
    assert [(u.block_reuse, u.block_reused_tokens) for u in swapped.memory] == [
        (t.BLOCK_REUSE_EXACT, n_b), (t.BLOCK_REUSE_COMPOSED, n_a - r_a)]  # b leads, a placed second
    assert swapped.memory[1].cache_key == acts[a].cache_key
    # Isolation: the twin's block is placed from the twin's cache, never b's (same tokens, another cube).
    assert twinned.memory[1].block_reuse == t.BLOCK_REUSE_COMPOSED
    assert twinned.memory[1].cache_key == acts[twin].cache_key != acts[b].cache_key
    # Every token recomputed: the full prefill's reply, the block still counted as composed (0 reused).
    assert list(whole.token_ids) == list(full.token_ids)
    assert (whole.memory[1].block_reuse, whole.memory[1].block_computed_tokens) == (t.BLOCK_REUSE_COMPOSED, n_b)
    # Exact mode computes a block no seen combination covers, and says nothing of composition.
    assert (exact.memory[1].block_reuse, exact.memory[1].block_computed_tokens, exact.memory[1].block_note) == (
        t.BLOCK_REUSE_EXACT, acts[twin].tokens, "")


def test_auto_composes_a_new_combination_then_reuses_it_exactly(client: Client, cube_name: str) -> None:
    """ComposeMode AUTO: a combination seen for the first time is composed, and computed exactly in the
    background; once that is pooled, the same ordered blocks are reused exactly (the full prefill's reply)."""
    wait_ready(client)
    seed(client, cube_name + "-a", FACTS[:2])
    seed(client, cube_name + "-b", FACTS[2:4])
    with client.mount(cube_name + "-a") as a, client.mount(cube_name + "-b") as b:
        n_a, n_b = a.activate().tokens, b.activate().tokens
        _, first = ask(client, [a, b], max_tokens=6, retrieve_k=0, compose="auto")
        assert [u.block_reuse for u in first.memory] == [t.BLOCK_REUSE_EXACT, t.BLOCK_REUSE_COMPOSED]
        deadline = time.monotonic() + 60
        while True:  # the background build is queued behind the reply: poll until a Generate finds it
            _, later = ask(client, [a, b], max_tokens=6, retrieve_k=0, compose="auto")
            if later.memory[1].block_reuse == t.BLOCK_REUSE_EXACT or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        _, full = ask(client, [a, b], max_tokens=6, retrieve_k=0, bypass_kv_cache=True)
    assert [(u.block_reuse, u.block_reused_tokens) for u in later.memory] == [
        (t.BLOCK_REUSE_EXACT, n_a), (t.BLOCK_REUSE_EXACT, n_b)]
    assert list(later.token_ids) == list(full.token_ids)


def test_a_bad_compose_option_is_refused_before_any_work(client: Client, cube_name: str) -> None:
    import grpc
    import pytest
    from memos.errors import InvalidField

    wait_ready(client)
    seed(client, cube_name, FACTS[:2])
    with client.mount(cube_name) as m:
        for bad in (1.5, -0.1, float("nan")):
            with pytest.raises(InvalidField) as refused:
                ask(client, m, compose="composed", compose_recompute=bad)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "options.compose_recompute" in str(refused.value)


def test_incremental_activation_and_old_revision_mount(client: Client, cube_name: str) -> None:
    wait_ready(client)
    old_ids = seed(client, cube_name, FACTS)
    with client.mount(cube_name, writable=True) as m:
        before = m.activate()
        assert before.source == t.ACTIVATION_SOURCE_COMPUTED and before.revision == 1
        new_ids = m.write(["My dog is called Biscuit.", "I play the cello on Sundays."])
        assert m.commit().revision.number == 2

        after = m.activate()
        assert after.source == t.ACTIVATION_SOURCE_COMPUTED and after.revision == 2
        assert after.item_count == len(FACTS) + 2 and after.tokens > before.tokens
        # An append-only commit: the old cache's full 64-token blocks are kept, only the rest is computed.
        assert after.tokens_reused > 0 and after.tokens_reused % 64 == 0
        assert after.tokens_reused <= before.tokens
        assert after.tokens_computed == after.tokens - after.tokens_reused
        assert after.cache_key != before.cache_key
        assert after.pooled

        # HEAD is served the new cache: the block is the items of both commits, in commit order.
        _, head = ask(client, m, "What is my dog called?", max_tokens=8)
        assert head.memory[0].activated and head.memory[0].cache_key == after.cache_key
        assert head.reused_tokens == after.tokens
        assert [u.item_id for u in head.memory[0].block_items] == old_ids + new_ids
        assert [u.born_revision for u in head.memory[0].block_items] == [1] * len(old_ids) + [2] * len(new_ids)

    # A mount at revision 1 is not served the revision-2 cache (nor the replaced revision-1 one):
    # the cube is activated at 2, so this mount's memory comes from retrieval at revision 1 only.
    with client.mount(cube_name, revision=1) as old:
        _, summary = ask(client, old, "What is my dog called?", max_tokens=8, retrieve_k=4)
    [use] = summary.memory
    assert use.revision == 1 and not use.activated
    assert use.cache_key == "" and not use.block_items
    assert summary.reused_tokens == 0 and summary.prefilled_tokens == summary.prompt_tokens
    assert len(use.retrieved_items) == 4
    assert {u.item_id for u in use.retrieved_items} <= set(old_ids)
    assert all(u.born_revision == 1 for u in use.retrieved_items)


def test_server_answers_while_a_long_activation_runs(client: Client, daemon: DaemonProcess, cube_name: str) -> None:
    wait_ready(client)
    rng = random.Random(7)
    words = ["harbour", "lighthouse", "keeper", "storm", "ship", "lantern", "rope", "gull", "tide", "reef",
             "captain", "island", "village", "winter", "bread", "fish", "net", "sail"]
    texts = []
    for i in range(48):
        line = f"Note {i}:"
        while len(line) < 300:
            line += " " + " ".join(rng.choice(words) for _ in range(6)) + "."
        texts.append(line[:300])
    seed(client, cube_name, texts)

    mount = client.mount(cube_name)
    done = threading.Event()
    result: dict[str, object] = {}

    def activate() -> None:
        try:
            with Client(daemon.address, token=daemon.token, timeout=120) as own:
                result["activation"] = own.activate(mount.mount_id)
        except BaseException as error:  # reported below
            result["error"] = error
        finally:
            done.set()

    worker = threading.Thread(target=activate)
    worker.start()
    latencies: list[float] = []
    during = 0
    try:
        while not done.is_set():
            for call in (client.stats, lambda: client.stat_cube(cube_name)):
                started = time.perf_counter()
                answer = call()
                latencies.append(time.perf_counter() - started)
                if not done.is_set():
                    during += 1
                assert answer is not None
            time.sleep(0.05)
    finally:
        worker.join(120)
        mount.unmount()
    assert "error" not in result, result.get("error")
    activation = result["activation"]
    assert isinstance(activation, t.Activation)
    assert activation.source == t.ACTIVATION_SOURCE_COMPUTED and activation.item_count == len(texts)
    assert activation.tokens > 2000 and activation.tokens_computed == activation.tokens
    # Answered while the Activate was still in flight (its thread had not finished): the property, with no
    # latency bound a loaded 2-core CI machine could break.
    assert during >= 1, f"no Stats/StatCube call completed while Activate was running ({len(latencies)} calls)"
    assert client.stat_cube(cube_name).item_count == len(texts)


def test_cancelled_stream_frees_the_runtime_at_once(client: Client) -> None:
    wait_ready(client)
    gen = client.generate("Write a long story about a lighthouse keeper.", max_tokens=400, retrieve_k=0)
    first = next(gen)
    assert first and gen.first_delta_seconds is not None
    gen.cancel()
    assert gen.cancelled and gen.summary is None
    assert list(gen) == []  # iteration ends quietly after cancel
    jobs_at_cancel = client.stats().model.worker_jobs_started
    # Freed is judged by the work done, not by how fast: each token is one worker job, and a stream that
    # ran on would start ~400 more. The deadline only bounds a hang (a loaded 2-core machine is slow).
    deadline = time.monotonic() + 300
    while True:
        model = client.stats().model
        if model.active_generations == 0 and model.queue_depth == 0:
            break
        assert time.monotonic() < deadline, f"still generating 300 s after cancel: {model}"
        time.sleep(0.05)
    # A few tokens may already be under way when the cancel lands; nowhere near the 400 asked for.
    assert model.worker_jobs_started - jobs_at_cancel < 50, model
    text, summary = ask(client, [], "Say hello.", max_tokens=8, retrieve_k=0)
    assert text.strip() and 0 < summary.completion_tokens <= 8
    assert summary.reused_tokens == 0 and not summary.memory


def test_retrieval_without_activation(client: Client, cube_name: str) -> None:
    wait_ready(client)
    ids = seed(client, cube_name, FACTS)
    car = ids[FACTS.index("My car is a red Volvo.")]
    with client.mount(cube_name) as m:
        _, summary = ask(client, m, max_tokens=8, retrieve_k=2)
        _, plain = ask(client, m, max_tokens=8, retrieve_k=0)
    [use] = summary.memory
    assert not use.activated and use.cache_key == "" and not use.block_items
    assert use.cache_source == t.ACTIVATION_SOURCE_UNSPECIFIED
    assert len(use.retrieved_items) == 2
    assert {u.item_id for u in use.retrieved_items} <= set(ids)
    assert car in [u.item_id for u in use.retrieved_items], "the car fact is relevant to the question"
    assert all(u.born_revision == 1 and u.score > 0 for u in use.retrieved_items)
    assert summary.prompt_tokens > 0 and summary.reused_tokens == 0
    assert summary.prefilled_tokens == summary.prompt_tokens

    [bare] = plain.memory
    assert not bare.activated and not bare.retrieved_items and not bare.block_items
    # The retrieved items were in the prompt: without them it is shorter.
    assert 0 < plain.prompt_tokens < summary.prompt_tokens
