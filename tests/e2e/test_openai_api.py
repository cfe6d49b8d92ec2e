"""The OpenAI-compatible HTTP API against a real daemon: the official ``openai`` SDK (plain and streaming, with
a cube's memory chosen by extra_body and by model name), /v1/models, the audit record, and the error shapes
with a plain HTTP client (urllib): no token 401, unknown cube 404, a bad field 400 naming the param."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import Client
from memos.errors import InvalidArgument
from memos.v1 import types_pb2 as t
from tiny_llama import save_tiny_llama

FACT = "The launch code for the red rocket is 4471."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 2048: room for the MemReader's prompt (test_extract_through_this_endpoint); 512 would do for the rest
    path: Path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-model", context=2048)
    return path


daemon = daemon_fixture("memosd-openai", lambda request: {
    "MEMOSD_RUNTIME__MODEL": str(request.getfixturevalue("tiny_model")), "MEMOSD_RUNTIME__DEVICE": "cpu",
    "MEMOSD_RUNTIME__MAX_TOKENS": "8", "MEMOSD_HTTP__LISTEN": "127.0.0.1:0",
    "MEMOSD_READER__ENDPOINTS": "http://127.0.0.1:"})  # Extract may call this daemon's own endpoint
client = client_fixture("daemon", scope="module")


@pytest.fixture(scope="module")
def base_url(daemon: DaemonProcess) -> str:
    address = json.loads((daemon.data_dir / "daemon.json").read_text())["http_address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    return f"http://{address}/v1"


@pytest.fixture(scope="module")
def notes(client: Client) -> Iterator[tuple[str, int, str]]:
    """A cube with one committed fact, activated at its head: (name, revision, the fact's item id)."""
    client.alloc_cube("notes")
    with client.mount("notes", writable=True) as m:
        [fact_id] = m.write([FACT])
        revision = m.commit().revision.number
    with client.mount("notes") as m:
        m.activate()
    yield "notes", revision, fact_id


@pytest.fixture(scope="module")
def sdk(base_url: str, daemon: DaemonProcess) -> Any:
    openai = pytest.importorskip("openai")  # in the dev extras; the plain-HTTP tests run without it
    return openai.OpenAI(base_url=base_url, api_key=daemon.token, max_retries=0, timeout=60)


def _post(url: str, body: Any, token: str | None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _assert_memos(memos: dict[str, Any], revision: int, fact_id: str) -> None:
    [cube] = memos["cubes"]
    assert cube["cube"] == "notes" and cube["revision"] == revision and cube["activated"] is True
    assert [item["item_id"] for item in cube["block_items"]] == [fact_id]
    assert memos["reused_tokens"] > 0


def test_chat_completion_uses_the_cube_chosen_by_extra_body(sdk: Any, client: Client,
                                                            notes: tuple[str, int, str]) -> None:
    name, revision, fact_id = notes
    messages = [{"role": "user", "content": "What is the launch code?"}]
    first = sdk.chat.completions.create(model="memosd", messages=messages,
                                        extra_body={"memos": {"cubes": [name], "revision": revision}})
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.usage.completion_tokens > 0
    memos = first.model_extra["memos"]
    _assert_memos(memos, revision, fact_id)
    assert first.usage.prompt_tokens_details.cached_tokens == memos["reused_tokens"]
    # The same memory named by the model instead: the block's KV is reused again, not recomputed.
    second = sdk.chat.completions.create(model=f"memos:{name}", messages=messages)
    assert second.model_extra["memos"]["reused_tokens"] == memos["reused_tokens"]
    assert second.model_extra["memos"]["cubes"][0]["cache_key"] == memos["cubes"][0]["cache_key"]


def test_streaming_chat_completion(sdk: Any, notes: tuple[str, int, str]) -> None:
    name, revision, fact_id = notes
    stream = sdk.chat.completions.create(model="memosd", stream=True, stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "The code?"}],
                                         extra_body={"memos": {"cubes": [name]}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0 and text
    memos = chunks[-1].model_extra["memos"]
    _assert_memos(memos, revision, fact_id)


def test_models_lists_the_model_and_each_visible_cube(sdk: Any, notes: tuple[str, int, str]) -> None:
    ids = [model.id for model in sdk.models.list()]
    assert ids[0] == "memosd" and f"memos:{notes[0]}" in ids


def test_the_chat_is_audited_and_its_mount_closed(sdk: Any, client: Client, notes: tuple[str, int, str]) -> None:
    name, _revision, fact_id = notes
    sdk.chat.completions.create(model=f"memos:{name}", messages=[{"role": "user", "content": "hi"}])
    records = [r for r in client.audit(method="OpenAI.ChatCompletions") if r.code == "OK"]
    assert records, "no audit record for OpenAI.ChatCompletions"
    cube = client.stat_cube(name)
    assert records[-1].cube_id == cube.cube_id and fact_id in records[-1].item_ids
    assert cube.mount_count == 0  # the request's read-only mount is gone


def test_memos_remember_records_the_exchange_in_that_cube(base_url: str, daemon: DaemonProcess, client: Client,
                                                         notes: tuple[str, int, str]) -> None:
    client.alloc_cube("openai-remembered")
    body = {"model": f"memos:{notes[0]}", "messages": [{"role": "user", "content": "Remember this."}],
            "memos": {"remember": "openai-remembered", "session_id": "web-1", "request_id": "openai-1"}}
    status, reply = _post(f"{base_url}/chat/completions", body, daemon.token)
    assert status == 200, reply
    remembered = reply["memos"]["remembered"]
    assert remembered["revision"] == 1 and 1 <= len(remembered["item_ids"]) <= 2  # the reply may be empty
    # A retry (a new request, new mounts) with the same request id records nothing more.
    status, again = _post(f"{base_url}/chat/completions", body, daemon.token)
    assert status == 200 and again["memos"]["remembered"] == remembered
    [revision] = list(client.log("openai-remembered"))
    assert revision.request_id == "openai-1"
    assert revision.generation.sources[0].cube_id == client.stat_cube(notes[0]).cube_id
    with client.mount("openai-remembered") as m:
        [user, *_] = client.read(m, remembered["item_ids"])
    assert (user.speaker, user.text, user.session_id) == ("user", "Remember this.", "web-1")
    assert client.stat_cube("openai-remembered").mount_count == 0  # the request's read-write mount is gone


def test_no_token_is_401_in_openai_shape(base_url: str) -> None:
    status, body = _post(f"{base_url}/chat/completions",
                         {"model": "memosd", "messages": [{"role": "user", "content": "hi"}]}, None)
    assert status == 401
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "UNAUTHENTICATED"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_unknown_cube_is_404_in_openai_shape(base_url: str, daemon: DaemonProcess) -> None:
    status, body = _post(f"{base_url}/chat/completions",
                         {"model": "memos:no-such-cube", "messages": [{"role": "user", "content": "hi"}]},
                         daemon.token)
    assert status == 404
    assert body["error"]["code"] == "CUBE_NOT_FOUND" and "no-such-cube" in body["error"]["message"]
    assert body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "memosd", "messages": []}, "messages"),
    ({"model": "memosd", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "memosd", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"model": "memosd", "messages": [{"role": "user", "content": "hi"}], "temperature": 9.0}, "temperature"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "memosd", "messages": [{"role": "user", "content": "hi"}], "memos": {"cube": ["x"]}}, "memos.cube"),
    ({"model": "memosd", "messages": [{"role": "user", "content": "hi"}], "memos": {"remember": 1}},
     "memos.remember"),
])
def test_a_bad_field_is_400_naming_the_param(base_url: str, daemon: DaemonProcess, body: dict[str, Any],
                                             param: str) -> None:
    status, reply = _post(f"{base_url}/chat/completions", body, daemon.token)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["code"] == "INVALID_FIELD"


def test_a_body_that_is_not_json_is_400(base_url: str, daemon: DaemonProcess) -> None:
    status, reply = _post(f"{base_url}/chat/completions", b"{not json", daemon.token)
    assert status == 400 and reply["error"]["param"] == "body"


def test_rights_are_the_gates_read_alone_is_403(base_url: str, client: Client, notes: tuple[str, int, str]) -> None:
    _principal, token = client.create_principal("reader-openai")
    body = {"model": f"memos:{notes[0]}", "messages": [{"role": "user", "content": "hi"}]}
    status, reply = _post(f"{base_url}/chat/completions", body, token)
    assert status == 404 and reply["error"]["code"] == "CUBE_NOT_FOUND"  # not granted: not even visible
    client.grant(notes[0], "reader-openai", ["read"])
    status, reply = _post(f"{base_url}/chat/completions", body, token)
    assert status == 403 and reply["error"]["code"] == "PERMISSION_DENIED", reply
    assert "activate" in reply["error"]["message"].lower()


def test_a_stream_the_client_leaves_closes_its_mount(base_url: str, daemon: DaemonProcess, client: Client,
                                                     notes: tuple[str, int, str]) -> None:
    host, port = base_url.removeprefix("http://").removesuffix("/v1").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": f"memos:{notes[0]}", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "tell a long story"}]}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {daemon.token}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # mid-stream
    deadline = time.monotonic() + 30
    while client.stat_cube(notes[0]).mount_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.stat_cube(notes[0]).mount_count == 0


def test_chats_are_counted_in_metrics_like_syscalls(sdk: Any, daemon: DaemonProcess, notes: tuple[str, int, str]) -> None:
    sdk.chat.completions.create(model=f"memos:{notes[0]}", messages=[{"role": "user", "content": "hi"}])
    address = json.loads((daemon.data_dir / "daemon.json").read_text())["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert 'memosd_syscalls_total{code="OK",method="OpenAI.ChatCompletions"}' in text
    assert "memosd_generate_ttft_seconds_count" in text


def test_a_call_during_the_shutdown_drain_is_refused_with_shutting_down(
        tiny_model: Path, tmp_path: Path) -> None:
    """After SIGTERM the daemon drains: calls in flight finish (here an Audit follow stream holds the drain
    open), and a call that arrives meanwhile is refused with SHUTTING_DOWN (HTTP 503), not served by a daemon
    that is closing its parts."""
    proc = DaemonProcess(tmp_path / "data", env={
        "MEMOSD_RUNTIME__MODEL": str(tiny_model), "MEMOSD_RUNTIME__DEVICE": "cpu",
        "MEMOSD_HTTP__LISTEN": "127.0.0.1:0",
        "MEMOSD_SERVER__GRACE_SECONDS": "120"}).start()  # the follow stream keeps the drain open until closed
    try:
        address = json.loads((proc.data_dir / "daemon.json").read_text())["http_address"]
        with Client(proc.address, token=proc.token, timeout=60) as c:
            c.whoami()  # one audited call, so the follow stream has a record to send at once
            follow = c.audit(follow=True)
            next(follow)  # the stream is open and served
            proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + 60  # a deadline for the daemon to log the drain, not a speed claim
            while "event=stopping" not in proc.full_log():
                assert time.monotonic() < deadline, proc.log()
                time.sleep(0.05)
            request = urllib.request.Request(f"http://{address}/v1/models",
                                             headers={"Authorization": f"Bearer {proc.token}"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            body = json.loads(refused.value.read())
            assert refused.value.code == 503 and body["error"]["code"] == "SHUTTING_DOWN", body
            follow.close()  # the last call in flight ends: the drain completes
        assert proc.proc.wait(60) == 0  # type: ignore[union-attr]
    finally:
        proc.kill()


def test_extract_through_this_endpoint(client: Client, daemon: DaemonProcess, base_url: str) -> None:
    """The MemReader's OpenAI-compatible extractor against memosd's own endpoint: the job asks it over HTTP
    with the token (its chat is audited as the token's principal) and the random model's answers are dropped
    by the strict parse, never stored."""
    client.alloc_cube("chat")
    with client.mount("chat", writable=True) as m:
        client.ingest(m, [{"speaker": "Melanie", "text": "I love pottery"}], session_id="s1")
        job = m.extract(url=base_url, token=daemon.token, model="memosd", max_tokens=8)
        final = client.wait_job(job.job_id, timeout=120)
    assert final.state == t.JOB_STATE_SUCCEEDED, final.error
    x = final.extract
    assert (x.turns_read, final.step, final.total_steps) == (1, 1, 1)
    assert x.proposed == x.kept + x.dropped + x.refused and x.kept == 0 and final.result_revision == 0
    assert x.answers_dropped + x.proposed >= 1  # it answered: the answer was read and refused, whatever it was
    chats = [r for r in client.audit(method="OpenAI.ChatCompletions") if r.outcome == t.AUDIT_OUTCOME_OK]
    assert chats, "the job's request went through the gate"
    with client.mount("chat", writable=True) as m:  # a wrong token: the endpoint refuses, the job fails and says so
        bad = m.extract(url=base_url, token="mtk.nobody.wrong", model="memosd", reread=True)  # the same turn
        failed = client.wait_job(bad.job_id, timeout=120)
    assert failed.state == t.JOB_STATE_FAILED and "HTTP 401" in failed.error
    with client.mount("chat", writable=True) as m, pytest.raises(InvalidArgument, match=r"\[reader\] endpoints"):
        m.extract(url="http://localhost:9/v1", token=daemon.token)  # not an endpoint the operator allowed
