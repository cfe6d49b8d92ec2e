"""Generate remembers (options.remember_mount_id), through the session daemon's embedded SmolLM2 over gRPC.

A reply that ends is ingested into the remember mount's cube as two turns in one revision, whose Log entry
carries the generation's provenance; remember off writes nothing; a cancelled stream writes nothing; a
retry with the same request id records once; a read-only remember mount is refused before any work.
Replies are a few tokens: the model is slow on a small CPU.
"""

from __future__ import annotations

import time

import pytest
from memos import Client
from memos.errors import MountReadOnly, RequestIdReused

MODEL_LOAD_SECONDS = 300.0
FACTS = ["My car is a red Volvo.", "I live in Lisbon."]
QUESTION = "What colour is my car?"


def wait_ready(client: Client) -> None:
    deadline = time.monotonic() + MODEL_LOAD_SECONDS
    while (state := client.stats().model.state) == "loading" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state == "ready", client.stats().model


def seeded(client: Client, cube: str) -> list[str]:
    client.alloc_cube(cube)
    with client.mount(cube, writable=True) as m:
        ids = m.write(FACTS)
        assert m.commit().revision.number == 1
    return ids


def test_a_finished_reply_is_remembered_with_its_provenance(client: Client, cube_name: str) -> None:
    wait_ready(client)
    facts = seeded(client, cube_name)
    notes = f"{cube_name}-notes"
    client.alloc_cube(notes)
    before = time.time_ns()
    with client.mount(cube_name) as memory, client.mount(notes, writable=True) as remember:
        gen = client.generate(QUESTION, memory, max_tokens=6, retrieve_k=2, remember_mount=remember,
                              session_id="chat-1", request_id="remember-on-1")
        reply = gen.text()
        summary = gen.summary
        assert summary is not None and reply
        # The summary names the revision it made and the two turns, in order: the question, then the reply.
        assert summary.remembered.number == 1 and summary.remembered.added == 2
        assert len(summary.remembered_item_ids) == 2
        user, assistant = client.read(remember, list(summary.remembered_item_ids))
    after = time.time_ns()
    assert (user.speaker, user.text, user.session_id) == ("user", QUESTION, "chat-1")
    assert (assistant.speaker, assistant.text, assistant.session_id) == ("assistant", reply, "chat-1")
    assert user.source == assistant.source == "memosd:generate" and user.born_revision == 1
    assert user.next_item_id == assistant.item_id  # one session, linked in time order
    # Times: the request's arrival, then the reply's end.
    assert before <= user.event_time.ToNanoseconds() <= assistant.event_time.ToNanoseconds() <= after

    [revision, *_] = client.log(notes)
    assert revision.number == 1 and revision.request_id == "remember-on-1"
    g = revision.generation
    assert g.model_fingerprint == summary.model_fingerprint != "" and g.adapter_digest == ""
    [source] = g.sources
    assert source.cube_id == client.stat_cube(cube_name).cube_id and source.revision == 1
    [use] = summary.memory
    assert list(source.retrieved_item_ids) == [u.item_id for u in use.retrieved_items]
    assert set(source.retrieved_item_ids) <= set(facts) and len(source.retrieved_item_ids) == 2
    assert g.hidden_sources == 0
    # The memory cube itself is untouched: remembering writes only where it was asked to.
    assert client.stat_cube(cube_name).head_revision == 1
    # The audit record of the notes cube names what the Generate wrote there, and only that.
    [audited] = [r for r in client.audit(cube=notes, method="Generate") if r.code == "OK"]
    assert list(audited.item_ids) == list(summary.remembered_item_ids)
    assert "remembered:1" in audited.artifacts
    # A reader of the notes who may not read the memory cube learns only that one source was left out.
    _principal, token = client.create_principal(f"{cube_name}-reader")
    client.grant(notes, f"{cube_name}-reader", ["read"])
    with Client(client.target, token=token, timeout=60) as reader:
        [seen, *_] = reader.log(notes)
    assert seen.generation.hidden_sources == 1 and not seen.generation.sources
    assert seen.generation.model_fingerprint == g.model_fingerprint


def test_remember_off_writes_nothing_and_a_cancelled_reply_records_nothing(client: Client,
                                                                           cube_name: str) -> None:
    wait_ready(client)
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as remember:
        assert client.generate("Say hello.", remember, max_tokens=4, retrieve_k=0).text()
        gen = client.generate("Write a long story about a lighthouse keeper.", max_tokens=300, retrieve_k=0,
                              remember_mount=remember)
        assert next(gen)
        gen.cancel()
        assert gen.cancelled and gen.summary is None
        deadline = time.monotonic() + 300  # bounds a hang only: the stream stops at its next token
        while (model := client.stats().model).active_generations or model.queue_depth:
            assert time.monotonic() < deadline, model
            time.sleep(0.05)
        assert remember.base_revision == 0
    cube = client.stat_cube(cube_name)
    assert cube.head_revision == 0 and cube.item_count == 0


def test_a_retry_with_the_same_request_id_records_once(client: Client, cube_name: str) -> None:
    wait_ready(client)
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as remember:
        first = client.generate("Say hello.", max_tokens=4, retrieve_k=0, remember_mount=remember,
                                session_id="s", request_id="retry-1")
        first.text()
    # The retry mounts again, as a client that lost its answer (or the OpenAI endpoint) does.
    with client.mount(cube_name, writable=True) as again:
        retry = client.generate("Say hello.", max_tokens=4, retrieve_k=0, remember_mount=again,
                                session_id="s", request_id="retry-1")
        retry.text()
        assert first.summary is not None and retry.summary is not None
        assert retry.summary.remembered.number == first.summary.remembered.number == 1
        assert list(retry.summary.remembered_item_ids) == list(first.summary.remembered_item_ids)
        # The same id with another request is refused, and records nothing either.
        with pytest.raises(RequestIdReused):
            client.generate("Say goodbye.", max_tokens=4, retrieve_k=0, remember_mount=again,
                            session_id="s", request_id="retry-1").text()
    cube = client.stat_cube(cube_name)
    assert cube.head_revision == 1 and cube.item_count == 2


def test_a_read_only_remember_mount_is_refused_before_generating(client: Client, cube_name: str) -> None:
    wait_ready(client)
    client.alloc_cube(cube_name)
    jobs = client.stats().model.worker_jobs_started
    with client.mount(cube_name) as read_only:
        gen = client.generate("Say hello.", max_tokens=4, retrieve_k=0, remember_mount=read_only)
        with pytest.raises(MountReadOnly):
            gen.text()
    assert client.stats().model.worker_jobs_started == jobs  # refused before any model work
    assert client.stat_cube(cube_name).head_revision == 0
