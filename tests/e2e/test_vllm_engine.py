"""The vLLM engine end to end: one daemon on the default engine (vllm where installed), over real gRPC.

Every test here shares the module's daemon: vLLM takes ~30-60 s to start on 2 cores and ~3 GB, so the
restart test is the only other start. The correctness checks are the transformers engine's
(tests/e2e/test_activation_smollm2.py) restated for paged blocks:

* greedy tokens with the stored (or engine-cached) KV equal those of a full prefill (``bypass_kv_cache``),
  and so do their logprobs, within ``LOGPROB_TOL``: the stored blocks are the engine's own float32 values
  and the rest of the prompt runs through the same kernels, so they come out bit-equal in practice
  (docs/engine-notes.md, 4); the tolerance only allows for a reordered reduction;
* the same after a restart, from the blocks in RocksDB, and after an incremental activation;
* generating twice gives identical results.

Against the transformers engine (the session daemon) greedy tokens are compared too: the two run different
kernels (vLLM's CPU attention, paged; transformers' SDPA), so logprobs agree only to ``CROSS_ENGINE_TOL``.

Reuse is block-granular on vLLM: the tokens after the memory block's last full KV block (``BLOCK`` tokens on
CPU; and the block holding the prompt's last token) are computed with the conversation, so ``reused_tokens``
is a multiple of ``BLOCK`` here, where transformers reuses the whole block.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess
from memos import Client, InvalidField, MountHandle
from memos.v1 import types_pb2 as t

from memosd.runtime.vllm_engine import engine_block_size, vllm_importable

pytestmark = pytest.mark.skipif(not vllm_importable(), reason="vLLM is not installed (MEMOSD_VLLM=none)")

BLOCK = engine_block_size("cpu")  # the module daemon serves on the CPU build (the stats test checks it)
# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, float32 on CPU. vLLM's CPU cache keeps K and V of a block
# together: one stored blob is 30 x [3, BLOCK, 128] float32 plus its safetensors header.
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4
BLOCK_TENSOR_BYTES = KV_BYTES_PER_TOKEN * BLOCK
LOGPROB_TOL = 1e-3
CROSS_ENGINE_TOL = 5e-2
READY_SECONDS = 600.0
QUESTION = "What colour is my car? Answer in one sentence."
# ~60 facts: a memory block of ~800 tokens, eleven full blocks and a tail.
FACTS = [f"Note {i}: the {kind} of parcel {i} is {i * 7 + 3}." for i, kind in
         enumerate(["weight", "colour code", "size", "price"] * 15)] + ["My car is a red Volvo."]
MORE_FACTS = [f"Later note {i}: shelf {i} holds {i + 2} boxes." for i in range(12)]


def wait_ready(client: Client) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while (state := client.stats().model.state) == "loading" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state == "ready", client.stats().model


@pytest.fixture(scope="module")
def vdaemon(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> Iterator[DaemonProcess]:
    # runtime.engine = auto, the daemon's default (test daemons are on transformers unless they say).
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__CACHE_DIR": str(smollm2_cache),
           "MEMOSD_RUNTIME__ENGINE": "auto"}
    proc = DaemonProcess(tmp_path_factory.mktemp("vllm") / "data", env=env).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.log()}"


@pytest.fixture
def vc(vdaemon: DaemonProcess) -> Iterator[Client]:
    with Client(vdaemon.address, token=vdaemon.token, timeout=600) as c:
        wait_ready(c)
        yield c


def seed(client: Client, name: str, texts: list[str]) -> MountHandle:
    client.alloc_cube(name)
    mount = client.mount(name, writable=True)
    mount.write(texts)
    mount.commit("facts")
    return mount


def ask(client: Client, mount: MountHandle, question: str = QUESTION, **options: object) -> t.GenerationSummary:
    gen = client.generate(question, mount, max_tokens=12, retrieve_k=0, **options)  # type: ignore[arg-type]
    text = gen.text()
    assert gen.summary is not None
    assert text, "a reply"
    return gen.summary


def assert_same_reply(a: t.GenerationSummary, b: t.GenerationSummary, tol: float = LOGPROB_TOL) -> None:
    assert list(a.token_ids) == list(b.token_ids)
    assert a.completion_tokens == b.completion_tokens == len(a.token_ids)
    worst = max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True))
    assert worst <= tol, f"logprobs differ by {worst}"


def full_blocks(tokens: int) -> int:
    """Blocks the engine stores and reuses of a block of ``tokens``: every full one before the last token."""
    return (tokens - 1) // BLOCK


def test_the_default_engine_is_vllm_and_its_kv_cache_is_the_pool_budget(vc: Client) -> None:
    model = vc.stats().model
    assert model.engine == "vllm"
    assert model.engine_stats.block_size == BLOCK
    # runtime.pool_bytes (1 GiB) of KV, in whole blocks.
    assert model.engine_stats.kv_cache_tokens == (1 << 30) // BLOCK_TENSOR_BYTES * BLOCK


def test_stored_blocks_give_the_tokens_of_a_full_prefill(vc: Client, cube_name: str) -> None:
    mount = seed(vc, cube_name, FACTS)
    saved_before = vc.stats().model.engine_stats.blocks_saved
    first = vc.activate(mount)
    assert first.source == t.ACTIVATION_SOURCE_COMPUTED
    assert first.tokens_computed == first.tokens and first.tokens_reused == 0
    blocks = full_blocks(first.tokens)
    assert blocks >= 10
    assert vc.stats().model.engine_stats.blocks_saved - saved_before == blocks
    assert blocks * BLOCK_TENSOR_BYTES <= first.persisted_bytes < blocks * (BLOCK_TENSOR_BYTES + 16384)

    again = vc.activate(mount)  # every full block is in the engine's cache: only the tail is computed
    assert again.source == t.ACTIVATION_SOURCE_POOL
    assert (again.tokens_reused, again.tokens_computed) == (blocks * BLOCK, again.tokens - blocks * BLOCK)

    reused = ask(vc, mount)
    full = ask(vc, mount, bypass_kv_cache=True)
    assert_same_reply(reused, full)
    assert reused.prompt_tokens == full.prompt_tokens
    assert reused.reused_tokens >= blocks * BLOCK and reused.reused_tokens % BLOCK == 0
    assert reused.prefilled_tokens == reused.prompt_tokens - reused.reused_tokens
    assert (full.reused_tokens, full.prefilled_tokens) == (0, full.prompt_tokens)
    [use] = reused.memory
    assert use.activated and use.cache_key == first.cache_key
    assert use.cache_source == t.ACTIVATION_SOURCE_POOL
    assert full.memory[0].cache_key == ""  # bypassed: nothing reused

    twice = ask(vc, mount)
    assert_same_reply(reused, twice, tol=0.0)


def test_evict_drops_the_engine_cache_and_generate_loads_the_stored_blocks(vc: Client, cube_name: str) -> None:
    mount = seed(vc, cube_name, FACTS[:30] + FACTS[-1:])
    activation = vc.activate(mount)
    hot = ask(vc, mount)
    evicted = vc.evict(cube_name)
    assert evicted.caches_dropped == 1 and evicted.pool_bytes_freed == activation.tokens * KV_BYTES_PER_TOKEN
    loaded_before = vc.stats().model.engine_stats.blocks_loaded
    cold = ask(vc, mount)
    assert_same_reply(hot, cold)
    assert cold.memory[0].cache_source == t.ACTIVATION_SOURCE_STORE
    assert cold.reused_tokens == full_blocks(activation.tokens) * BLOCK
    assert vc.stats().model.engine_stats.blocks_loaded - loaded_before == full_blocks(activation.tokens)

    deleted = vc.evict(cube_name, delete_persisted=True)
    assert deleted.persisted_bytes_deleted == activation.persisted_bytes
    after = ask(vc, mount)
    assert not after.memory[0].activated and after.reused_tokens == 0


def test_a_cube_restored_from_an_archive_brings_its_stored_blocks(vc: Client, cube_name: str,
                                                                  tmp_path: Path) -> None:
    """ExportCube with KV, FreeCube, ImportCube under the same id: Generate loads the imported blocks."""
    mount = seed(vc, cube_name, FACTS[:30] + FACTS[-1:])
    activation = vc.activate(mount)
    hot = ask(vc, mount)
    mount.unmount()
    archive = vc.export_cube(cube_name, tmp_path / "kv.memcube", with_kv=True)
    assert archive.kv_records >= 1 + full_blocks(activation.tokens)  # the activation and its blocks
    vc.free_cube(cube_name)
    restored = vc.import_cube(tmp_path / "kv.memcube", cube_name)
    assert restored.kept_cube_id and (restored.kv_loaded, restored.kv_skipped) == (archive.kv_records, 0)
    vc.evict(cube_name)  # nothing of the freed cube may still be in the engine's cache
    loaded_before = vc.stats().model.engine_stats.blocks_loaded
    with vc.mount(cube_name) as again:
        cold = ask(vc, again)
    assert_same_reply(hot, cold)
    assert cold.memory[0].cache_source == t.ACTIVATION_SOURCE_STORE
    assert vc.stats().model.engine_stats.blocks_loaded - loaded_before == full_blocks(activation.tokens)


def test_an_append_only_commit_computes_only_its_new_blocks(vc: Client, cube_name: str) -> None:
    mount = seed(vc, cube_name, FACTS)
    first = vc.activate(mount)
    mount.write(MORE_FACTS)
    mount.commit("more")
    writer = mount
    grown = vc.activate(writer)
    assert grown.source == t.ACTIVATION_SOURCE_COMPUTED and grown.tokens > first.tokens
    # The old block's full blocks are found by key; only what follows them is computed.
    assert grown.tokens_reused >= full_blocks(first.tokens) * BLOCK - BLOCK
    assert grown.tokens_computed == grown.tokens - grown.tokens_reused
    assert grown.tokens_computed < grown.tokens - first.tokens + 2 * BLOCK
    assert_same_reply(ask(vc, writer), ask(vc, writer, bypass_kv_cache=True))


def test_a_recurring_combination_of_cubes_reuses_the_second_block(vc: Client, cube_name: str) -> None:
    """Issue 13, point 1, on vLLM: the engine's prefix cache chains the second block after the first, so the
    same ordered cubes at the same revisions reuse it; the summary says so per block, and the reply is the
    full prefill's."""
    one, two = seed(vc, cube_name + "-1", FACTS[:20]), seed(vc, cube_name + "-2", MORE_FACTS)
    a, b = vc.activate(one).tokens, vc.activate(two).tokens
    first, again = ask(vc, [one, two]), ask(vc, [one, two])  # type: ignore[arg-type]
    full = ask(vc, [one, two], bypass_kv_cache=True)  # type: ignore[arg-type]
    assert_same_reply(again, full)
    for summary in (first, again, full):
        assert [(u.block_tokens, u.block_reuse) for u in summary.memory] == [(a, t.BLOCK_REUSE_EXACT),
                                                                              (b, t.BLOCK_REUSE_EXACT)]
        assert all(u.block_reused_tokens + u.block_computed_tokens == u.block_tokens for u in summary.memory)
    assert first.memory[1].block_reused_tokens == 0  # seen for the first time: computed after the first block
    assert first.memory[0].block_reused_tokens == full_blocks(a) * BLOCK
    assert b - BLOCK <= again.memory[1].block_reused_tokens <= b  # reused up to the last full KV block
    assert again.memory[0].block_reused_tokens == a
    assert [u.block_reused_tokens for u in full.memory] == [0, 0]


def composed_counts(n_a: int, n_b: int, fraction: float) -> tuple[int, int]:
    """(first block reused, second block placed) of a first composed Generate over blocks of n_a then n_b
    tokens: the first block's stored engine blocks; the second's engine blocks after its recomputed head (its
    first ceil(f x n_b) tokens, rounded up to a whole engine block) to the end of its own stored blocks."""
    head_end = math.ceil((n_a + math.ceil(n_b * fraction)) / BLOCK) * BLOCK
    placed_end = (n_a + n_b // BLOCK * BLOCK) // BLOCK * BLOCK
    return n_a // BLOCK * BLOCK, max(0, placed_end - head_end)


def test_composed_blocks_on_vllm_are_placed_from_each_cubes_own_blocks(vc: Client, cube_name: str) -> None:
    """Issue 13, point 2, on vLLM: a later block is loaded from its own cube's stored blocks at its offset
    (keys turned), after its first tokens are recomputed; the summary counts per block; recomputing every
    token gives the full prefill's reply; a twin cube (same facts) is placed from its own blocks; exact mode
    stays exact, and a composed Generate leaves nothing behind that an exact one would reuse."""
    facts = [f"{cube_name} fact {i}: bin {i} holds {i * 3 + 1} bolts." for i in range(14)]
    one, two = seed(vc, cube_name + "-1", FACTS[:20]), seed(vc, cube_name + "-2", facts)
    twin = seed(vc, cube_name + "-t", facts)
    acts = {m.mount_id: vc.activate(m) for m in (one, two, twin)}
    n_a, n_b = acts[one.mount_id].tokens, acts[two.mount_id].tokens
    loaded_before = vc.stats().model.engine_stats.blocks_loaded
    composed = ask(vc, [one, two], compose="composed", compose_recompute=0.01)  # type: ignore[arg-type]
    reused_a, placed = composed_counts(n_a, n_b, 0.01)
    assert placed > 0
    assert [(u.block_reuse, u.block_reused_tokens, u.block_computed_tokens, u.block_note)
            for u in composed.memory] == [(t.BLOCK_REUSE_EXACT, reused_a, n_a - reused_a, ""),
                                          (t.BLOCK_REUSE_COMPOSED, placed, n_b - placed, "")]
    assert composed.reused_tokens == reused_a + placed
    assert composed.memory[1].cache_key == acts[two.mount_id].cache_key
    # Loaded from the store: the first block's blocks and the placed ones (nothing of them was cached).
    assert vc.stats().model.engine_stats.blocks_loaded - loaded_before == (reused_a + placed) // BLOCK
    again = ask(vc, [one, two], compose="composed", compose_recompute=0.01)  # type: ignore[arg-type]
    assert list(again.token_ids) == list(composed.token_ids)  # the same composition, the same reply
    # Twin: the same facts in another cube, placed from the twin's own blocks.
    twinned = ask(vc, [one, twin], compose="composed", compose_recompute=0.01)  # type: ignore[arg-type]
    assert twinned.memory[1].block_reuse == t.BLOCK_REUSE_COMPOSED
    assert twinned.memory[1].cache_key == acts[twin.mount_id].cache_key != acts[two.mount_id].cache_key
    # Exact mode after composing: exact, the second block computed (the composed KV, salted apart, is not
    # reused as this combination's), and the full prefill's reply (checked below).
    exact = ask(vc, [one, two], compose="exact")  # type: ignore[arg-type]
    assert [(u.block_reuse, u.block_note) for u in exact.memory] == [(t.BLOCK_REUSE_EXACT, ""),
                                                                      (t.BLOCK_REUSE_EXACT, "")]
    assert exact.memory[1].block_reused_tokens == 0
    # Every token recomputed (the same chain of requests, nothing placed): the full prefill's reply.
    whole = ask(vc, [one, two], compose="composed", compose_recompute=1.0)  # type: ignore[arg-type]
    full = ask(vc, [one, two], bypass_kv_cache=True)  # type: ignore[arg-type]
    assert_same_reply(whole, full)
    assert_same_reply(exact, full)
    assert [(u.block_reuse, u.block_reused_tokens) for u in whole.memory] == [
        (t.BLOCK_REUSE_EXACT, reused_a), (t.BLOCK_REUSE_COMPOSED, 0)]


def test_auto_on_vllm_composes_a_new_combination_then_reuses_it_exactly(vc: Client, cube_name: str) -> None:
    one, two = seed(vc, cube_name + "-1", FACTS[:15]), seed(vc, cube_name + "-2", MORE_FACTS)
    n_b = vc.activate(two).tokens
    vc.activate(one)
    first = ask(vc, [one, two], compose="auto")  # type: ignore[arg-type]
    assert [u.block_reuse for u in first.memory] == [t.BLOCK_REUSE_EXACT, t.BLOCK_REUSE_COMPOSED]
    deadline = time.monotonic() + 120
    while True:  # the exact combination is computed behind the reply, at background priority
        later = ask(vc, [one, two], compose="auto")  # type: ignore[arg-type]
        if later.memory[1].block_reuse == t.BLOCK_REUSE_EXACT or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert later.memory[1].block_reuse == t.BLOCK_REUSE_EXACT
    assert n_b - BLOCK <= later.memory[1].block_reused_tokens <= n_b  # from vLLM's prefix cache
    assert_same_reply(later, ask(vc, [one, two], bypass_kv_cache=True))  # type: ignore[arg-type]


def test_the_same_text_in_another_cube_shares_no_blocks(vc: Client, cube_name: str) -> None:
    texts = [f"{cube_name} private note {i}: locker {i} code {i * 13}." for i in range(20)]
    first = vc.activate(seed(vc, cube_name + "-a", texts))
    other = vc.activate(seed(vc, cube_name + "-b", texts))
    assert first.source == other.source == t.ACTIVATION_SOURCE_COMPUTED
    assert other.tokens_reused == 0 and other.tokens_computed == other.tokens


def test_a_block_shorter_than_one_kv_block_is_computed_each_time(vc: Client) -> None:
    mount = seed(vc, "c", ["Red."])  # a short name: the block is the template, the header and one line
    for _ in range(2):
        activation = vc.activate(mount)
        assert activation.tokens < BLOCK and activation.source == t.ACTIVATION_SOURCE_COMPUTED
        assert (activation.tokens_computed, activation.tokens_reused) == (activation.tokens, 0)


def test_a_cancelled_stream_is_aborted_in_the_engine(vc: Client, cube_name: str) -> None:
    mount = seed(vc, cube_name, FACTS[:10])
    gen = vc.generate("Count from one to five hundred, one number per line.", mount, max_tokens=400,
                      retrieve_k=0)
    for _ in gen:
        break  # the first delta: the request is decoding in the engine
    gen.cancel()
    deadline = time.monotonic() + 30
    while vc.stats().model.engine_stats.generations and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vc.stats().model.engine_stats.generations == 0
    assert vc.stats().model.active_generations == 0
    assert ask(vc, mount).completion_tokens > 0  # the engine serves on


def test_concurrent_streams_are_batched_and_each_gets_its_own_reply(vc: Client, cube_name: str) -> None:
    mounts = [seed(vc, f"{cube_name}-{i}", [f"My locker number is {100 + i}."]) for i in range(4)]
    alone = [ask(vc, m, "What is my locker number?") for m in mounts]
    together: list[t.GenerationSummary | None] = [None] * len(mounts)

    def run(i: int) -> None:
        together[i] = ask(vc, mounts[i], "What is my locker number?")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mounts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for a, b in zip(alone, together, strict=True):
        assert b is not None
        assert list(a.token_ids) == list(b.token_ids)
    assert vc.stats().model.engine_stats.max_requests_per_step >= 2


def test_the_engines_agree_on_greedy_tokens(vc: Client, client: Client, cube_name: str) -> None:
    """vLLM against the transformers engine (the session daemon), same cube content, full prefill."""
    wait_ready(client)
    assert client.stats().model.engine == "transformers"
    served = ask(vc, seed(vc, cube_name, FACTS[:20] + FACTS[-1:]), bypass_kv_cache=True)
    reference = ask(client, seed(client, cube_name, FACTS[:20] + FACTS[-1:]), bypass_kv_cache=True)
    assert served.prompt_tokens == reference.prompt_tokens
    assert_same_reply(served, reference, tol=CROSS_ENGINE_TOL)


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    with torch.no_grad():  # peft's random init barely moves a greedy reply: make this adapter's effect plain
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    peft_model.save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_an_adapter_is_a_lora_request_and_its_blocks_are_its_own(
    vc: Client, client: Client, cube_name: str, smollm2_cache: Path, tmp_path: Path
) -> None:
    """vLLM's LoRA against peft on the transformers engine (the session daemon), same adapter and prompt."""
    wait_ready(client)
    [model_dir] = [p for p in (smollm2_cache / "models").iterdir() if not p.name.startswith(".")]
    adapter = make_adapter(model_dir, tmp_path / "adapter", seed=7)
    mount = seed(vc, cube_name, FACTS[:20] + FACTS[-1:])
    mount.import_adapter(adapter)
    mount.commit("adapter")
    tuned_mount = mount
    activation = vc.activate(tuned_mount)  # under the adapter: its digest is in every block's key
    assert activation.source == t.ACTIVATION_SOURCE_COMPUTED and activation.tokens_reused == 0
    tuned = ask(vc, tuned_mount, adapter_mount=tuned_mount)
    full = ask(vc, tuned_mount, adapter_mount=tuned_mount, bypass_kv_cache=True)
    assert_same_reply(tuned, full)
    assert tuned.reused_tokens == full_blocks(activation.tokens) * BLOCK
    # The base model never reuses blocks computed under the adapter, and gives the base model's reply.
    plain = ask(vc, tuned_mount)
    assert plain.reused_tokens == 0 and plain.memory[0].cache_key == ""
    assert_same_reply(plain, ask(vc, tuned_mount, bypass_kv_cache=True))
    assert list(tuned.token_ids) != list(plain.token_ids)
    reference_mount = seed(client, cube_name, FACTS[:20] + FACTS[-1:])
    reference_mount.import_adapter(adapter)
    reference_mount.commit("adapter")
    client.activate(reference_mount)
    reference = ask(client, reference_mount, adapter_mount=reference_mount, bypass_kv_cache=True)
    assert reference.prompt_tokens == full.prompt_tokens
    assert_same_reply(full, reference, tol=CROSS_ENGINE_TOL)


def test_train_refuses_a_rank_the_engine_cannot_serve(vc: Client, cube_name: str) -> None:
    mount = seed(vc, cube_name, FACTS[:3])
    with pytest.raises(InvalidField, match="max_lora_rank = 16") as refused:
        vc.train(mount, steps=1, rank=32)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not vc.list_jobs(cube_name), "refused before any job starts"


def test_the_weights_are_not_loaded_beside_the_engine_and_the_fingerprint_is_the_transformers_one(
    vc: Client, client: Client, vdaemon: DaemonProcess
) -> None:
    """The vllm daemon names the model by the fingerprint stored with the cache (the session daemon, on
    transformers, computes it from the weights it loads): the same value, so every key made from it agrees."""
    wait_ready(client)
    assert vc.stats().model.fingerprint == client.stats().model.fingerprint != ""
    [loaded] = [line for line in vdaemon.full_log().splitlines() if "event=model_loaded" in line][:1]
    assert "weights=false" in loaded and "fingerprint_stored=true" in loaded, loaded


def test_train_loads_a_transformers_copy_for_the_job_and_its_adapter_is_served_as_a_lora(
    vc: Client, vdaemon: DaemonProcess, cube_name: str, tmp_path: Path
) -> None:
    mount = seed(vc, cube_name, ["Q: What is the capital of Vellmora?\nA: Quistarn", *FACTS[:4]])
    before = vdaemon.full_log().count("event=train_model_loaded")
    final = vc.wait_job(vc.train(mount, steps=2, rank=4).job_id)
    assert final.state == t.JOB_STATE_SUCCEEDED, final.error
    log = vdaemon.full_log()
    assert log.count("event=train_model_loaded") == before + 1
    assert log.count("event=train_model_dropped") == log.count("event=train_model_loaded")  # none left held
    trained = vc.mount(cube_name)
    adapter, _, _ = vc.export_adapter(trained, tmp_path / "trained")
    assert adapter.lineage.origin == "trained"
    assert adapter.lineage.model_fingerprint == vc.stats().model.fingerprint
    tuned = ask(vc, trained, adapter_mount=trained)
    assert_same_reply(tuned, ask(vc, trained, adapter_mount=trained, bypass_kv_cache=True))
    base = ask(vc, trained)
    # Two steps may not change a greedy token: the adapter applied shows in the logprobs.
    assert (list(tuned.token_ids), list(tuned.token_logprobs)) != (list(base.token_ids), list(base.token_logprobs))


def test_extract_decodes_on_the_engine_under_the_answer_schema(
    vc: Client, vdaemon: DaemonProcess, cube_name: str
) -> None:
    """On vllm the MemReader's prompts are generations of the serving engine, constrained by vLLM's
    structured outputs (reader/schema.py): no transformers copy is loaded for them, and the 135M model's
    answer is a JSON array (unconstrained it was not, 13-15 of 16 times: BENCHMARKS.md)."""
    vc.alloc_cube(cube_name)
    before = vdaemon.full_log().count("event=train_model_loaded")
    with vc.mount(cube_name, writable=True) as m:
        vc.ingest(m, [{"speaker": "Caroline", "text": "I adopted a dog last week. His name is Max."},
                      {"speaker": "Melanie", "text": "I love pottery and I paint every Sunday."}], session_id="s1")
        final = vc.wait_job(m.extract(max_tokens=256).job_id, timeout=600)
    assert final.state == t.JOB_STATE_SUCCEEDED, final.error
    x = final.extract
    assert x.answers_dropped == 0, dict(x.answers_dropped_by_reason)  # the one answer parsed as an array
    assert x.proposed == x.kept + x.dropped + x.refused  # "[]" is an answer too
    assert set(x.dropped_by_reason) <= {"bad_text", "bad_date"}  # the rest the schema cannot write
    assert vdaemon.full_log().count("event=train_model_loaded") == before


def test_after_a_restart_generate_loads_the_blocks_from_the_store(vdaemon: DaemonProcess, cube_name: str) -> None:
    """Stops and starts the module's daemon on its data dir (the other tests reconnect per test). Composed
    reuse (issue 13, point 3: restarts) is checked on the same restart: two cubes' blocks, composed before
    it and after it from the store, give the same per-block counts and the same reply."""
    pair = [f"{cube_name}-pair-{i}" for i in (1, 2)]
    with Client(vdaemon.address, token=vdaemon.token, timeout=600) as before:
        wait_ready(before)
        mount = seed(before, cube_name, FACTS)
        activation = before.activate(mount)
        hot = ask(before, mount)
        mounts = [seed(before, pair[0], FACTS[:20]), seed(before, pair[1], MORE_FACTS * 2)]
        for m in mounts:
            before.activate(m)
        composed_hot = ask(before, mounts, compose="composed")  # type: ignore[arg-type]
    assert vdaemon.stop() == 0
    vdaemon.start()
    with Client(vdaemon.address, token=vdaemon.token, timeout=600) as after:
        wait_ready(after)
        mount = after.mount(cube_name)
        cold = ask(after, mount)
        assert after.stats().model.engine_stats.blocks_loaded == full_blocks(activation.tokens)
        composed_cold = ask(after, [after.mount(n) for n in pair], compose="composed")  # type: ignore[arg-type]
    assert_same_reply(hot, cold)
    assert [u.block_reuse for u in composed_cold.memory] == [t.BLOCK_REUSE_EXACT, t.BLOCK_REUSE_COMPOSED]
    assert composed_cold.memory[1].block_reused_tokens > 0  # placed from the second cube's stored blocks
    assert [(u.block_reused_tokens, u.block_computed_tokens, u.cache_key) for u in composed_cold.memory] == [
        (u.block_reused_tokens, u.block_computed_tokens, u.cache_key) for u in composed_hot.memory]
    assert list(composed_cold.token_ids) == list(composed_hot.token_ids)
    assert cold.memory[0].cache_source == t.ACTIVATION_SOURCE_STORE
    assert cold.reused_tokens == full_blocks(activation.tokens) * BLOCK
