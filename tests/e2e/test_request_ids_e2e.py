"""Request ids through a real daemon: an Ingest whose client deadline expired while the daemon went on
committing is retried with its id and commits nothing twice; a Commit and a Write likewise; another request
under a used id is REQUEST_ID_REUSED; a bad id is INVALID_FIELD; and the client's own retries, after a lost
answer, apply a call once."""

from __future__ import annotations

import time

import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import (
    NO_RETRY,
    Client,
    DeadlineExceeded,
    Deadlines,
    InvalidField,
    RequestIdReused,
    RetryPolicy,
    new_request_id,
)
from memos.v1 import types_pb2

# Long enough that embedding them takes far longer than the tiny client deadline below (seconds on two
# cores; the deadline is a fraction of one).
MESSAGES = [{"speaker": "user" if i % 2 else "assistant", "session_id": "s1",
             "text": f"turn {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(60))}
            for i in range(400)]
TINY = 0.3  # seconds: the first call's deadline, sure to expire while the daemon embeds


daemon = daemon_fixture("request-ids")
client = client_fixture(timeout=120)


def impatient(daemon: DaemonProcess, retry: RetryPolicy = NO_RETRY) -> Client:
    """A client whose deadline is TINY whatever the call's size (and which does not retry by default)."""
    return Client(daemon.address, token=daemon.token, timeout=TINY, retry=retry, deadlines=Deadlines(0, 0, 0))


def wait_for_head(client: Client, cube: str, head: int) -> list[types_pb2.Revision]:
    """The cube's log once it reaches ``head``: the daemon finishing a call whose client gave up."""
    deadline = time.monotonic() + 300  # generous: 400 embeddings on two cores shared with other work
    while client.stat_cube(cube).head_revision < head:
        assert time.monotonic() < deadline, f"cube {cube} never reached revision {head}"
        time.sleep(0.2)
    return list(client.log(cube))


def test_ingest_retried_after_its_deadline_expired_commits_once(client: Client, daemon: DaemonProcess,
                                                               cube_name: str) -> None:
    client.alloc_cube(cube_name)
    mount = client.mount(cube_name, writable=True)
    request_id = new_request_id()
    with impatient(daemon) as hasty:
        hasty.stat_cube(cube_name)  # connected, so the Ingest itself reaches the daemon
        with pytest.raises(DeadlineExceeded):
            hasty.ingest(mount, MESSAGES, request_id=request_id)
    [revision] = wait_for_head(client, cube_name, 1)  # the daemon committed it anyway
    assert revision.request_id == request_id and revision.added == len(MESSAGES)

    retry = client.ingest(mount, MESSAGES, request_id=request_id)
    assert retry.revision.number == 1 and retry.revision.request_id == request_id
    assert len(retry.item_ids) == len(MESSAGES)
    assert sorted(retry.item_ids) == sorted(i.item_id for i in mount.iter_items())
    assert [r.number for r in client.log(cube_name)] == [1]
    assert client.stat_cube(cube_name).item_count == len(MESSAGES)
    # The same id with other contents is refused, and commits nothing either.
    with pytest.raises(RequestIdReused) as info:
        client.ingest(mount, MESSAGES[:3], request_id=request_id)
    assert request_id in info.value.message
    assert client.stat_cube(cube_name).head_revision == 1
    mount.unmount()


def test_the_clients_own_retry_after_a_lost_answer_applies_the_ingest_once(
        client: Client, daemon: DaemonProcess, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    mount = client.mount(cube_name, writable=True)
    # Every attempt times out until the first one has committed; then a retry finds its result. Enough
    # attempts, with waits up to 5 s between them, to outlast the embedding (minutes at most here).
    patient = RetryPolicy(attempts=200, backoff=0.5, max_backoff=5.0)
    with impatient(daemon, retry=patient) as hasty:
        hasty.stat_cube(cube_name)
        resp = hasty.ingest(mount, MESSAGES[:200])
    assert resp.revision.number == 1 and resp.revision.request_id  # the id the client chose
    assert [r.number for r in client.log(cube_name)] == [1]
    assert client.stat_cube(cube_name).item_count == 200
    mount.unmount()


def test_write_and_commit_retried_with_their_ids_apply_once(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as mount:
        ids = mount.write(["alpha", "beta"], request_id="w-1")
        assert mount.write(["alpha", "beta"], request_id="w-1") == ids
        assert mount.info.staged_adds == 2
        first = mount.commit("m", request_id="c-1")
        mount.write(["gamma"])
        again = mount.commit("m", request_id="c-1")
        assert again.revision == first.revision and again.mount.staged_adds == 1
        assert client.stat_cube(cube_name).item_count == 2
        with pytest.raises(RequestIdReused):
            mount.write(["other"], request_id="c-1")


def test_a_bad_request_id_is_invalid_field(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as mount:
        with pytest.raises(InvalidField) as info:
            mount.write(["text"], request_id="not valid/id")
        assert info.value.metadata["field"] == "request_id" and "request id" in info.value.message
        assert mount.info.staged_adds == 0
        with pytest.raises(InvalidField):
            mount.commit(request_id="x" * 129)
