"""TransformersEngine: generation on the runtime worker as a TokenStream (the contract vLLM's stream keeps).

A tiny randomly initialised Llama; greedy decoding, so every run is deterministic.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from tiny_llama import save_tiny_llama

from memosd.runtime import LoadedModel, ModelSpec, load_model
from memosd.runtime.engine import Finished, Sampling, StreamEvent, Token
from memosd.runtime.kvcache import compute_prefix_cache
from memosd.runtime.transformers_engine import TransformersEngine
from memosd.runtime.worker import RuntimeWorker

PROMPT = [5, 9, 17, 3, 11, 40, 2, 8, 13, 21, 34, 7, 6, 30, 19, 12] * 5  # 80 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=512)
    return load_model(ModelSpec(source=str(path), device="cpu"), tmp_path_factory.mktemp("cache"))


@pytest.fixture
def worker() -> Iterator[RuntimeWorker]:
    w = RuntimeWorker()
    yield w
    w.shutdown(wait=True, cancel_pending=True)


def _reference(tiny: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from plain full forward passes, no cache at all."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
            ids.append(out[-1])
    return out


def _events(engine: TransformersEngine, tiny: LoadedModel, prompt: list[int], sampling: Sampling,
            **kw: object) -> list[StreamEvent]:
    stream = engine.generate(tiny, prompt, sampling, prefix=kw.get("prefix"),  # type: ignore[arg-type]
                             prepare=kw.get("prepare", lambda: None),  # type: ignore[arg-type]
                             cancel=threading.Event())
    return stream.events(timeout=60)


def test_greedy_tokens_equal_full_forward_passes_with_and_without_a_prefix(
        tiny: LoadedModel, worker: RuntimeWorker) -> None:
    engine = TransformersEngine(worker, prefill_chunk=24)  # the prompt is prefilled in four chunks
    sampling = Sampling(max_tokens=6, ignore_eos=True)
    expected = _reference(tiny, PROMPT, 6)
    plain = _events(engine, tiny, PROMPT, sampling)
    prefix, _ = compute_prefix_cache(tiny, PROMPT[:64], salt=b"cube")
    reused = _events(engine, tiny, PROMPT, sampling, prefix=prefix)
    for events, cached in ((plain, 0), (reused, 64)):
        tokens = [e for e in events if isinstance(e, Token)]
        end = events[-1]
        assert [t.token_id for t in tokens] == expected and not any(t.end for t in tokens)  # ignore_eos
        assert isinstance(end, Finished) and end.reason == "length"
        assert end.prompt_tokens == len(PROMPT) and end.cached_tokens == cached and end.completion_tokens == 6
        assert all(t.logprob is not None and t.logprob <= 0 for t in tokens)
    assert prefix.n_tokens == 64  # the prefix the stream extended is unchanged


def test_an_error_in_the_model_work_reaches_the_caller_as_itself(tiny: LoadedModel, worker: RuntimeWorker) -> None:
    class AdapterRefused(Exception):
        pass

    def prepare() -> None:
        raise AdapterRefused("the adapter does not fit")

    engine = TransformersEngine(worker, prefill_chunk=64)
    events = _events(engine, tiny, PROMPT, Sampling(max_tokens=4), prepare=prepare)
    assert len(events) == 1 and isinstance(events[0], Finished)
    assert events[0].reason == "error" and isinstance(events[0].exception, AdapterRefused)
    assert "does not fit" in events[0].error


def test_a_step_is_queued_only_when_the_reader_asks(tiny: LoadedModel, worker: RuntimeWorker) -> None:
    """No reply runs ahead of its reader: an unread stream leaves nothing queued, and abort ends it."""
    engine = TransformersEngine(worker, prefill_chunk=64)
    stream = engine.generate(tiny, PROMPT, Sampling(max_tokens=50, ignore_eos=True), prefix=None,
                             prepare=lambda: None, cancel=threading.Event())
    first = stream.next().result(60)
    assert isinstance(first, Token)
    worker.submit(lambda: None).result(10)  # the worker has drained: no step was queued behind the first token
    assert worker.queue_depth == 0
    stream.abort()
    last = stream.next().result(60)  # the owed step runs, sees the abort and ends the stream
    assert isinstance(last, Finished) and last.reason == "aborted"
    assert worker.queue_depth == 0


def test_a_stopped_worker_ends_the_stream(tiny: LoadedModel) -> None:
    worker = RuntimeWorker()
    engine = TransformersEngine(worker, prefill_chunk=64)
    stream = engine.generate(tiny, PROMPT, Sampling(max_tokens=50, ignore_eos=True), prefix=None,
                             prepare=lambda: None, cancel=threading.Event())
    assert isinstance(stream.next().result(60), Token)
    worker.shutdown(wait=True, cancel_pending=True)
    last = stream.next().result(10)  # the next step cannot be queued: the stream says so instead of hanging
    assert isinstance(last, Finished) and last.reason == "error"
