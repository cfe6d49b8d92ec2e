"""Activation memory's bad inputs, through a real daemon running a tiny random Llama.

Each bad input is a clear gRPC error with a stable reason and a message that
says what to do; the daemon serves on and no item is lost. The tiny model
(context 256, 2 layers) makes every call take milliseconds, so the same daemon
also checks persisted activations across a restart and a daemon with no model.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import (
    Client,
    ContextExceeded,
    CubeEmpty,
    CubeNotFound,
    InvalidField,
    MemosError,
    ModelUnavailable,
    MountNotFound,
    PoolTooSmall,
)
from memos.v1 import types_pb2 as t
from tiny_llama import save_tiny_llama

CONTEXT = 256
POOL_TOKENS = 100  # a ~60-token block fits in the pool, a ~150-token one does not
MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 64
FACT = "The capital of France is Paris."  # in the tiny tokenizer's corpus: ~10 tokens a line
ODD = "fact {}: the harbour freezes in January"  # mostly out of the corpus: 33 tokens a line
# A block is ~47 tokens of chat template and header (which names the cube) plus its lines, so cubes
# here get short names: one FACT line is ~57 tokens, 3 ODD lines ~147, 8 ODD lines ~311.
_names = itertools.count()


def kv_bytes_per_token(model_dir: Path) -> int:
    """K and V bytes per token over all layers, from the tiny config, at float32 (the cpu dtype)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    return 2 * int(config["num_hidden_layers"]) * int(config["num_key_value_heads"]) * head_dim * 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0, context=CONTEXT)
    return path


@pytest.fixture(scope="module")
def bytes_per_token(tiny_model: Path) -> int:
    return kv_bytes_per_token(tiny_model)


def tiny_env(model_dir: Path) -> dict[str, str]:
    return {
        "MEMOSD_RUNTIME__MODEL": str(model_dir),
        "MEMOSD_RUNTIME__DEVICE": "cpu",
        "MEMOSD_RUNTIME__POOL_BYTES": str(POOL_TOKENS * kv_bytes_per_token(model_dir)),
        "MEMOSD_RUNTIME__MAX_TOKENS": str(MAX_TOKENS),
        "MEMOSD_RUNTIME__MAX_TOKENS_LIMIT": str(MAX_TOKENS_LIMIT),
    }


tiny_daemon = daemon_fixture("memosd-tiny", lambda request: tiny_env(request.getfixturevalue("tiny_model")))


@pytest.fixture
def cube_name() -> str:
    """Short (the cube name is in the block header, and the sizes above count on it) and unique."""
    return f"e{next(_names)}"


tc = client_fixture("tiny_daemon")


def expect(call: Callable[[], Any], cls: type[MemosError], code: grpc.StatusCode, *words: str) -> MemosError:
    """``call`` fails with exactly ``cls`` and ``code``, and its message holds each of ``words``."""
    with pytest.raises(MemosError) as caught:
        call()
    error = caught.value
    assert type(error) is cls, repr(error)
    assert error.code == code, repr(error)
    assert error.reason == cls.default_reason, repr(error)
    for word in words:
        assert word in error.message, error.message
    return error


def seed_cube(client: Client, name: str, texts: list[str]) -> list[str]:
    client.alloc_cube(name)
    with client.mount(name, writable=True) as m:
        ids = m.write(texts)
        m.commit()
    return ids


def assert_serving(client: Client, cube: str, texts: list[str]) -> None:
    """The daemon answers, its model is still up, and the cube's items are all there."""
    stats = client.stats()
    assert stats.model.state == "ready", stats.model
    assert stats.model.active_generations == 0 and stats.model.queue_depth == 0
    with client.mount(cube) as m:
        assert sorted(i.text for i in m.iter_items()) == sorted(texts)


def generate_text(client: Client, mounts: Any = (), prompt: str = "hello", **options: Any) -> t.GenerationSummary:
    gen = client.generate(prompt, mounts, **options)
    gen.text()
    assert gen.summary is not None
    return gen.summary


# -- sanity: the daemon runs the model the sizes below are computed for ------------------------------


def test_tiny_daemon_runs_the_tiny_model(tc: Client, cube_name: str, bytes_per_token: int) -> None:
    seed_cube(tc, cube_name, [FACT])
    with tc.mount(cube_name) as m:
        activation = m.activate()
    stats = tc.stats()
    assert (stats.model.state, stats.model.device, stats.model.dtype) == ("ready", "cpu", "float32")
    assert stats.model.context_length == CONTEXT
    assert stats.kv_pool.budget_bytes == POOL_TOKENS * bytes_per_token
    # A one-line block is ~60 tokens: it fits, and holds exactly its tokens' K and V.
    assert activation.source == t.ACTIVATION_SOURCE_COMPUTED and activation.pooled
    assert 0 < activation.tokens < POOL_TOKENS
    assert activation.pool_bytes == activation.tokens * bytes_per_token
    assert activation.model_fingerprint == stats.model.fingerprint


# -- Activate --------------------------------------------------------------------------------------


def test_activate_empty_cube_is_cube_empty(tc: Client, cube_name: str) -> None:
    tc.alloc_cube(cube_name)
    with tc.mount(cube_name, writable=True) as m:
        m.write(["staged, not committed"])  # Activate encodes the base revision: staged items do not count
        expect(m.activate, CubeEmpty, grpc.StatusCode.FAILED_PRECONDITION, cube_name, "revision 0",
               "Write and commit items first")
        assert [(i.text, i.staged) for i in m.iter_items()] == [("staged, not committed", True)]
        assert m.commit().revision.added == 1  # the refused Activate left the staging area alone
    # Every item forgotten: the new revision is empty too, and the old one still holds the item.
    with tc.mount(cube_name, writable=True) as m:
        m.forget([i.item_id for i in m.iter_items()])
        assert m.commit().revision.number == 2
        expect(m.activate, CubeEmpty, grpc.StatusCode.FAILED_PRECONDITION, "revision 2")
    with tc.mount(cube_name, revision=1) as old:
        assert [i.text for i in old.iter_items()] == ["staged, not committed"]
        assert old.activate().tokens > 0  # the daemon serves on: revision 1 activates
    assert tc.stat_cube(cube_name).head_revision == 2


def test_activate_block_longer_than_context_is_context_exceeded(tc: Client, cube_name: str) -> None:
    texts = [ODD.format(i) for i in range(8)]
    seed_cube(tc, cube_name, texts)
    before = tc.stats().kv_pool
    with tc.mount(cube_name) as m:
        error = expect(m.activate, ContextExceeded, grpc.StatusCode.OUT_OF_RANGE, cube_name,
                       f"context is {CONTEXT}", "Forget items, or split them over several cubes")
        assert int(error.metadata["tokens"]) >= CONTEXT
        assert error.metadata["context"] == str(CONTEXT)
    after = tc.stats().kv_pool
    assert (after.entries, after.persisted_bytes, after.evictions) == (
        before.entries, before.persisted_bytes, before.evictions)
    assert_serving(tc, cube_name, texts)
    # Forgetting items, as the message says, makes it fit.
    with tc.mount(cube_name, writable=True) as m:
        m.forget([i.item_id for i in m.iter_items()][1:])
        m.commit()
        activation = m.activate()
        assert activation.item_count == 1 and activation.tokens < POOL_TOKENS


def test_activate_cache_larger_than_pool_is_pool_too_small(tc: Client, cube_name: str,
                                                           bytes_per_token: int) -> None:
    texts = [ODD.format(i) for i in range(3)]  # ~150 tokens: inside the context, not the pool
    seed_cube(tc, cube_name, texts)
    before = tc.stats().kv_pool
    with tc.mount(cube_name) as m:
        error = expect(m.activate, PoolTooSmall, grpc.StatusCode.RESOURCE_EXHAUSTED, cube_name,
                       str(POOL_TOKENS * bytes_per_token), "Raise runtime.pool_bytes")
    needed, budget = int(error.metadata["needed"]), int(error.metadata["budget"])
    assert budget == POOL_TOKENS * bytes_per_token < needed < CONTEXT * bytes_per_token
    assert needed % bytes_per_token == 0
    after = tc.stats().kv_pool
    # Refused before any work: nothing was pooled, persisted or evicted for it.
    assert (after.entries, after.persisted_bytes, after.evictions) == (
        before.entries, before.persisted_bytes, before.evictions)
    assert_serving(tc, cube_name, texts)
    with tc.mount(cube_name) as m:  # not activated: Generate simply does not use a block
        summary = generate_text(tc, m, "harbour", retrieve_k=0)
        assert not summary.memory[0].activated and summary.reused_tokens == 0


# -- Generate --------------------------------------------------------------------------------------


def test_generate_unknown_mount_is_mount_not_found(tc: Client, cube_name: str) -> None:
    seed_cube(tc, cube_name, [FACT])
    unknown = "mnt_aaaaaaaaaaaaaaaaaaaa"
    expect(lambda: tc.generate("hello", unknown).text(), MountNotFound, grpc.StatusCode.NOT_FOUND, unknown)
    with tc.mount(cube_name) as m:
        # One unknown mount among good ones fails the whole call.
        expect(lambda: tc.generate("hello", [m, unknown]).text(), MountNotFound, grpc.StatusCode.NOT_FOUND,
               unknown)
        assert generate_text(tc, m).completion_tokens > 0
        closed = m.mount_id
    expect(lambda: tc.generate("hello", closed).text(), MountNotFound, grpc.StatusCode.NOT_FOUND, closed)
    assert_serving(tc, cube_name, [FACT])


@pytest.mark.parametrize(
    ("messages", "options", "field", "words"),
    [
        ("hello", {"temperature": -1.0}, "options.temperature", ["options.temperature", "-1", "use 0 (greedy) to 5"]),
        ("hello", {"temperature": 9.0}, "options.temperature", ["options.temperature", "9", "use 0 (greedy) to 5"]),
        ([("user", "hi"), ("assistant", "hello")], {}, "messages[1]",
         ["the last message must be a non-empty user message"]),
        ([("user", "   ")], {}, "messages[0]", ["the last message must be a non-empty user message"]),
        ([("robot", "beep"), ("user", "hi")], {}, "messages[0].role",
         ["messages[0].role", "'robot'", "use one of system, user, assistant"]),
        ([], {}, "messages", ["messages is empty", "ending with a user message"]),
        ("hello", {"max_tokens": MAX_TOKENS_LIMIT + 1}, "options.max_tokens",
         ["options.max_tokens", str(MAX_TOKENS_LIMIT + 1), f"at most {MAX_TOKENS_LIMIT}", "runtime.max_tokens_limit"]),
    ],
    ids=["temperature-negative", "temperature-above-5", "last-not-user", "last-blank", "unknown-role",
         "no-messages", "max-tokens-above-limit"],
)
def test_generate_bad_options_are_invalid_field(tc: Client, cube_name: str, messages: Any,
                                                options: dict[str, Any], field: str, words: list[str]) -> None:
    seed_cube(tc, cube_name, [FACT])
    with tc.mount(cube_name) as m:
        error = expect(lambda: tc.generate(messages, m, **options).text(), InvalidField,
                       grpc.StatusCode.INVALID_ARGUMENT, *words)
        assert error.metadata["field"] == field
        # The daemon serves on, and the limits are inclusive: the largest valid values work.
        summary = generate_text(tc, m, max_tokens=MAX_TOKENS_LIMIT, temperature=5.0, seed=7, retrieve_k=0)
        assert summary.completion_tokens > 0
    assert_serving(tc, cube_name, [FACT])


def test_generate_prompt_longer_than_context_is_context_exceeded(tc: Client, cube_name: str) -> None:
    seed_cube(tc, cube_name, [FACT])
    long_prompt = " ".join(f"word{i}" for i in range(200))  # several tokens a word: far past 256
    with tc.mount(cube_name) as m:
        m.activate()
        error = expect(lambda: tc.generate(long_prompt, m).text(), ContextExceeded, grpc.StatusCode.OUT_OF_RANGE,
                       f"context is {CONTEXT}", "Shorten the conversation")
        assert int(error.metadata["tokens"]) >= CONTEXT
        expect(lambda: tc.generate(long_prompt).text(), ContextExceeded, grpc.StatusCode.OUT_OF_RANGE)
        summary = generate_text(tc, m, "short question")
        assert summary.memory[0].activated and summary.reused_tokens > 0
    assert_serving(tc, cube_name, [FACT])


def test_a_huge_prompt_is_refused_by_its_bytes_before_the_worker_sees_it(tc: Client, tiny_daemon: DaemonProcess,
                                                                         cube_name: str) -> None:
    """16 MiB of conversation is refused at once: no worker job starts for it (tokenizing it there would
    hold up every other generation), and another principal's generation, streaming meanwhile, completes."""
    seed_cube(tc, cube_name, [FACT])
    huge = "owls hunt at night " * ((16 << 20) // 19)
    before = tc.stats().model
    assert before.queue_depth == 0 and before.active_generations == 0  # nothing else uses the worker now
    error = expect(lambda: tc.generate(huge).text(), ContextExceeded, grpc.StatusCode.OUT_OF_RANGE,
                   f"context is {CONTEXT} tokens", "Shorten the conversation")
    assert int(error.metadata["bytes"]) == len(huge) > int(error.metadata["limit"])
    assert tc.stats().model.worker_jobs_started == before.worker_jobs_started
    # Several messages count together, whatever their roles.
    pieces = [("user", huge[:len(huge) // 2]), ("assistant", "ok"), ("user", huge[len(huge) // 2:])]
    expect(lambda: tc.generate(pieces).text(), ContextExceeded, grpc.StatusCode.OUT_OF_RANGE)
    _, token = tc.create_principal(f"{cube_name}-other", kind="agent")
    with Client(tiny_daemon.address, token=token, timeout=60) as other:
        stream = other.generate("short question", max_tokens=MAX_TOKENS)
        next(stream, None)  # it is streaming now
        with tc.mount(cube_name) as m:
            expect(lambda: tc.generate(huge, m).text(), ContextExceeded, grpc.StatusCode.OUT_OF_RANGE)
        stream.text()
        assert stream.summary is not None and stream.summary.completion_tokens > 0
    assert_serving(tc, cube_name, [FACT])


# -- Evict -----------------------------------------------------------------------------------------


def test_evict_unknown_cube_is_cube_not_found(tc: Client, cube_name: str) -> None:
    seed_cube(tc, cube_name, [FACT])
    expect(lambda: tc.evict("no-such-cube"), CubeNotFound, grpc.StatusCode.NOT_FOUND, "no-such-cube")
    expect(lambda: tc.evict("cube_aaaaaaaaaaaaaaaaaaaa", delete_persisted=True), CubeNotFound,
           grpc.StatusCode.NOT_FOUND, "cube_aaaaaaaaaaaaaaaaaaaa")
    # A cube that was never activated evicts to nothing, without error.
    response = tc.evict(cube_name, delete_persisted=True)
    assert (response.caches_dropped, response.pool_bytes_freed, response.persisted_bytes_deleted) == (0, 0, 0)
    assert_serving(tc, cube_name, [FACT])


# -- persisted activations across a restart --------------------------------------------------------


def test_activation_survives_restart_and_delete_persisted_deactivates(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    texts = [FACT, "A KV cache is reusable only as an exact token prefix of the same model."]
    first = DaemonProcess(data, env=tiny_env(tiny_model)).start()
    try:
        with Client(first.address, token=first.token, timeout=60) as c:
            seed_cube(c, "restart", texts)
            with c.mount("restart") as m:
                before = m.activate()
            assert before.source == t.ACTIVATION_SOURCE_COMPUTED and before.persisted_bytes > 0
    finally:
        assert first.stop() == 0, first.log()

    second = DaemonProcess(data, env=tiny_env(tiny_model)).start()
    try:
        with Client(second.address, token=second.token, timeout=60) as c:
            assert c.stats().kv_pool.persisted_bytes == before.persisted_bytes
            with c.mount("restart") as m:
                after = m.activate()
                # Loaded from the store: no model work, the same cache.
                assert after.source == t.ACTIVATION_SOURCE_STORE
                assert (after.tokens_computed, after.tokens_reused) == (0, 0)
                assert (after.cache_key, after.tokens, after.revision, after.model_fingerprint) == (
                    before.cache_key, before.tokens, before.revision, before.model_fingerprint)
                assert after.pooled and after.persisted_bytes == before.persisted_bytes
                summary = generate_text(c, m, "Where is Paris?")
                use = summary.memory[0]
                assert use.activated and use.cache_key == before.cache_key
                assert use.cache_source == t.ACTIVATION_SOURCE_POOL
                assert summary.reused_tokens == before.tokens

                evicted = c.evict("restart", delete_persisted=True)
                assert evicted.caches_dropped == 1
                assert evicted.pool_bytes_freed == after.pool_bytes
                assert evicted.persisted_bytes_deleted == before.persisted_bytes > 0
                assert c.stats().kv_pool.persisted_bytes == 0
                # Deactivated: Generate no longer uses a block.
                summary = generate_text(c, m, "Where is Paris?", retrieve_k=0)
                assert not summary.memory[0].activated and summary.reused_tokens == 0
                again = m.activate()
                assert again.source == t.ACTIVATION_SOURCE_COMPUTED
                assert (again.tokens_computed, again.tokens_reused) == (again.tokens, 0)
                assert again.cache_key == before.cache_key  # the same tokens, model and cube: the same key
            with c.mount("restart") as m:
                assert sorted(i.text for i in m.iter_items()) == sorted(texts)
    finally:
        assert second.stop() == 0, second.log()


def test_composed_blocks_after_a_restart_are_placed_from_the_store(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 13, point 3 (restarts): after a restart a later block's own cache is loaded from the store and
    composed (never recomputed whole, never another cube's), on the transformers engine, which composes."""
    data, env = tmp_path / "data", {**tiny_env(tiny_model), "MEMOSD_RUNTIME__ENGINE": "transformers"}
    first = DaemonProcess(data, env=env).start()
    try:
        with Client(first.address, token=first.token, timeout=60) as c:
            seed_cube(c, "lead", [FACT])
            seed_cube(c, "later", ["A KV cache is reusable only as an exact token prefix of the same model."])
            with c.mount("lead") as lead, c.mount("later") as later:
                lead.activate()
                before = later.activate()
    finally:
        assert first.stop() == 0, first.log()

    second = DaemonProcess(data, env=env).start()
    try:
        with Client(second.address, token=second.token, timeout=60) as c, c.mount("lead") as lead, \
                c.mount("later") as later:
            lead.activate()  # the first block's cache from the store; "later" is left where it is
            composed = generate_text(c, [lead, later], "Where is Paris?", retrieve_k=0, compose="composed",
                                     compose_recompute=0.25)
            whole = generate_text(c, [lead, later], "Where is Paris?", retrieve_k=0, compose="composed",
                                  compose_recompute=1.0)
            full = generate_text(c, [lead, later], "Where is Paris?", retrieve_k=0, bypass_kv_cache=True)
    finally:
        assert second.stop() == 0, second.log()
    use = composed.memory[1]
    recomputed = -(-before.tokens // 4)  # ceil(0.25 x tokens)
    assert (use.block_reuse, use.block_reused_tokens, use.block_computed_tokens, use.block_note) == (
        t.BLOCK_REUSE_COMPOSED, before.tokens - recomputed, recomputed, "")
    assert use.cache_key == before.cache_key and use.cache_source == t.ACTIVATION_SOURCE_STORE
    assert list(whole.token_ids) == list(full.token_ids)  # every token recomputed: the full prefill's reply


# -- no model --------------------------------------------------------------------------------------


def test_no_model_is_model_unavailable_while_plaintext_works(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data", env={"MEMOSD_RUNTIME__MODEL": "none"}).start()
    try:
        with Client(daemon.address, token=daemon.token, timeout=60) as c:
            stats = c.stats()
            assert stats.model.state == "disabled" and stats.model.fingerprint == ""
            ids = seed_cube(c, "plain", ["the harbour freezes in January", "owls hunt at night"])
            with c.mount("plain") as m:
                expect(m.activate, ModelUnavailable, grpc.StatusCode.FAILED_PRECONDITION,
                       "runtime.model = none", "set runtime.model")
                expect(lambda: c.generate("when does the harbour freeze?", m).text(), ModelUnavailable,
                       grpc.StatusCode.FAILED_PRECONDITION, "set runtime.model")
                # Plaintext memory is unaffected.
                assert m.search("harbour", k=1)[0].item.item_id == ids[0]
                assert [i.text for i in m.read(ids)] == ["the harbour freezes in January", "owls hunt at night"]
            with c.mount("plain", writable=True) as m:
                m.write(["the bakery opens at seven"])
                assert m.commit().revision.number == 2
            assert c.evict("plain").caches_dropped == 0  # nothing is ever pooled without a model
            assert c.stat_cube("plain").item_count == 3
            assert c.stats().calls["Activate"] == 1
    finally:
        assert daemon.stop() == 0, daemon.log()
