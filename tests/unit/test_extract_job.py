"""The Extract job in process: a job kind of JobManager (progress in WatchJob, cancel, ListJobs, one commit).

The extractor is a test double here, an OpenAI-compatible endpoint served on localhost by stdlib http.server
(scripted answers), so reconcile's outcomes can be steered: add, update and retire, each visible in Diff.
One test runs the in-process path on the tiny random Llama (its answers are noise: the safeguards must drop
all of it). The real model runs end to end in tests/e2e/test_extract_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from activation_rig import Rig, open_rig
from tiny_llama import save_tiny_llama

from memosd.errors import CubeEmpty, ExtractionInProgress, InvalidField, MountReadOnly, TooManyItems
from memosd.kernel import validate
from memosd.kernel.types import ItemInput, Message
from memosd.parametric.extract import Cancelled, EndpointError, EndpointExtractor, ModelExtractor
from memosd.reader.parse import parse_answer
from memosd.reader.prompt import extraction_messages
from memosd.reader.schema import answer_schema
from memosd.reader.types import SourceTurn
from memosd.runtime import complete
from memosd.runtime.engine import PRIORITY_BACKGROUND as ENGINE_BACKGROUND
from memosd.runtime.engine import Finished, Sampling, Token, TokenStream
from memosd.runtime.worker import PRIORITY_INTERACTIVE
from memosd.store.records import JobRecord

MAY8 = int(datetime(2023, 5, 8, 14, 0, tzinfo=UTC).timestamp() * 1e9)


class Endpoint:
    """A scripted OpenAI-compatible chat endpoint: answers each POST with the next answer; keeps requests."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self.raw: bytes | None = None  # set: answered as the whole HTTP body instead of a chat completion
        self.requests: list[dict[str, Any]] = []
        self.headers: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                endpoint.gate.wait(30)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                endpoint.headers.append(self.headers.get("Authorization", ""))
                answer = endpoint.answers.pop(0) if endpoint.answers else "[]"
                raw = endpoint.raw if endpoint.raw is not None else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=4096)


@pytest.fixture
def rig(tmp_path: Path, tiny_dir: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path, str(tiny_dir))
    yield r
    r.close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.close()


def ingest(rig: Rig, cube: str, turns: list[tuple[str, str]], at: int = MAY8) -> tuple[str, list[str]]:
    """A read-write mount (left open) after ingesting ``turns`` (speaker, text); the turns' item ids."""
    if cube not in {r.name for r in rig.kernel.cube_records()}:
        rig.kernel.alloc_cube(cube, "", {})
    mount = rig.kernel.mount(cube, 0, True).record.mount_id
    messages = [Message(speaker, text, "s1", at + i) for i, (speaker, text) in enumerate(turns)]
    return mount, rig.kernel.ingest(mount, messages).item_ids


def final_state(rig: Rig, job_id: str) -> JobRecord:
    last = list(rig.jobs.watch(job_id, threading.Event()))[-1]
    assert isinstance(last, JobRecord)  # not parked: watch(park=False) waits on its own
    return last


def run(rig: Rig, mount: str, endpoint: Endpoint | None = None, **kw: Any) -> JobRecord:
    url = endpoint.url if endpoint is not None else ""
    job = rig.jobs.extract(mount, url, kw.pop("token", ""), "", 0, kw.pop("message", "read"), "tester",
                           reread=kw.pop("reread", False))
    final = final_state(rig, job.job_id)
    assert final.state == "succeeded", final.error
    return final


def item(kind: str, text: str, sources: list[str], date: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "text": text, "date": date, "sources": sources}


def test_reconcile_adds_updates_and_retires_and_diff_shows_it(rig: Rig, endpoint: Endpoint) -> None:
    mount, turns = ingest(rig, "c", [("Caroline", "My favourite colour is blue"),
                                     ("Caroline", "I adopted a dog last Friday")])
    endpoint.answers = [json.dumps([item("preference", "Caroline's favourite colour is blue.", ["t1"]),
                                    item("event", "Caroline adopted a dog.", ["t2"], "2023-05-05")])]
    first = run(rig, mount, endpoint, token="sk-test")
    assert endpoint.headers == ["Bearer sk-test"] and endpoint.requests[0]["temperature"] == 0
    assert "sk-test" not in json.dumps(first.settings)  # the token is never in the record
    assert (first.result_revision, first.kind, first.step, first.total_steps) == (2, "extract", 1, 1)
    assert first.progress["kept"] == 2 and first.progress["added"] == 2
    changes = rig.kernel.diff("c", 1, 2, 0, "")[0].entries
    assert [c.kind for c in changes] == ["added", "added"]
    added = {c.after.text: c.after for c in changes if c.after is not None}
    dog = added["Caroline adopted a dog."]
    assert dog.derived_from == (turns[1],) and dog.derived_job == first.job_id and dog.tags == ("kind:event",)
    assert dog.event_ns == int(datetime(2023, 5, 5, tzinfo=UTC).timestamp()) * 10**9
    [revision] = rig.kernel.log("c", 1, "")[0].entries
    assert (revision.number, revision.message, revision.author, revision.added) == (2, "read", "tester", 2)

    # The next read: a restatement (more detail), a contradiction and a duplicate.
    rig.kernel.unmount(mount)
    mount, more = ingest(rig, "c", [("Caroline", "Actually my favourite colour is green now"),
                                    ("Caroline", "The dog I adopted last Friday is named Max")], at=MAY8 + 10)
    endpoint.answers = [json.dumps([
        item("preference", "Caroline's favourite colour is green.", ["t3"]),
        item("event", "Caroline adopted a dog named Max.", ["t2", "t4"], "2023-05-05"),
        item("event", "Caroline adopted a dog.", ["t2"]),
    ])]
    second = run(rig, mount, endpoint, reread=True)  # every turn, so an item can name an old and a new one
    assert second.progress["kept"] == 3
    assert (second.progress["added"], second.progress["updated"], second.progress["retired"],
            second.progress["duplicates"]) == (1, 1, 1, 1)
    head = second.result_revision
    changes = rig.kernel.diff("c", head - 1, head, 0, "")[0].entries
    kinds = sorted((c.kind, (c.after or c.before).text) for c in changes)  # type: ignore[union-attr]
    assert kinds == [("added", "Caroline's favourite colour is green."),
                     ("changed", "Caroline adopted a dog named Max."),
                     ("forgotten", "Caroline's favourite colour is blue.")]
    changed = next(c for c in changes if c.kind == "changed")
    assert changed.after is not None and set(changed.after.derived_from) == {turns[1], more[1]}
    # The retired preference is still readable at the revision before.
    old = rig.kernel.mount("c", head - 1, False).record.mount_id
    assert "Caroline's favourite colour is blue." in {v.text for v in rig.kernel.list_items(old, 0, "")[0].entries}
    # Purging the dog turn takes the dog item (derived from it and, since its update, from the Max turn too).
    receipt = rig.kernel.purge("c", [turns[1]])
    assert receipt.derived_item_ids == [changed.item_id]


def test_a_run_reads_only_the_turns_born_since_the_last_successful_one_unless_asked_to_reread(
        rig: Rig, endpoint: Endpoint) -> None:
    mount, _ = ingest(rig, "c", [("Caroline", "My favourite colour is blue"), ("Melanie", "I love pottery")])
    first = run(rig, mount, endpoint)
    assert first.progress["turns_total"] == 2 and first.settings["since"] == 0
    rig.kernel.unmount(mount)
    mount, _ = ingest(rig, "c", [("Caroline", "I adopted a dog last Friday")], at=MAY8 + 10)
    second = run(rig, mount, endpoint)
    assert second.progress["turns_total"] == 1 and second.settings["since"] == first.revision
    prompt = endpoint.requests[1]["messages"][-1]["content"]  # the turns it read (before it: the example)
    assert "adopted a dog" in prompt and "pottery" not in prompt and "[t2]" not in prompt
    with pytest.raises(CubeEmpty, match="nothing new to read"):  # the same revision again: nothing new
        rig.jobs.extract(mount, endpoint.url, "", "", 0, "", "t")
    everything = run(rig, mount, endpoint, reread=True)
    assert everything.progress["turns_total"] == 3 and everything.settings["since"] == 0


def test_reconcile_sees_a_derived_item_committed_while_the_job_ran(rig: Rig, endpoint: Endpoint) -> None:
    """The job reconciles with the cube at HEAD when it commits, not as of its start: a client's structured
    Write of the same fact, committed while the extractor was still answering, makes the job's item a
    duplicate (nothing added) rather than a second copy."""
    mount, turns = ingest(rig, "c", [("Caroline", "My favourite colour is blue")])
    endpoint.answers = [json.dumps([item("preference", "Caroline's favourite colour is blue.", ["t1"])])]
    endpoint.gate.clear()  # the extractor's answer waits until the client's commit is in
    job = rig.jobs.extract(mount, endpoint.url, "", "", 0, "read", "tester")
    writer = rig.kernel.mount("c", 0, True).record.mount_id
    [written] = rig.kernel.write(writer, [ItemInput("Caroline's favourite colour is blue.", tags=("kind:preference",),
                                                    derived_from=(turns[0],))])[0]
    assert rig.kernel.commit(writer, "client", "tester").revision is not None
    endpoint.gate.set()
    final = final_state(rig, job.job_id)
    assert final.state == "succeeded", final.error
    assert (final.progress["kept"], final.progress["added"], final.progress["duplicates"]) == (1, 0, 1)
    assert final.result_revision == 0  # nothing to commit
    texts = [v.text for v in rig.kernel.list_items(writer, 0, "")[0].entries]
    assert texts.count("Caroline's favourite colour is blue.") == 1 and written


def test_unparseable_and_unsupported_output_is_counted_never_stored(rig: Rig, endpoint: Endpoint) -> None:
    mount, _turns = ingest(rig, "c", [("Melanie", "I love pottery")])
    endpoint.answers = [json.dumps([
        item("preference", "Melanie loves pottery.", ["t1"]),
        item("fact", "Melanie lives in Paris with three cats.", ["t1"]),  # unsupported
        item("fact", "Melanie loves pottery.", ["t7"]),  # no such turn
        {"kind": "fact", "text": "Melanie pots."},  # missing keys
    ])]
    job = run(rig, mount, endpoint)
    p = job.progress
    assert (p["proposed"], p["kept"], p["refused"], p["dropped"]) == (
        4, 1, {"unsupported": 1}, {"unknown_source": 1, "missing_key": 1})
    texts = {v.text for v in rig.kernel.list_items(rig.kernel.mount("c", 0, False).record.mount_id, 0, "")[0].entries}
    assert texts == {"I love pottery", "Melanie loves pottery."}

    endpoint.answers = ["Sure! Here is the JSON you asked for: []"]
    job = run(rig, mount, endpoint, reread=True)  # the same turn again
    assert job.result_revision == 0 and job.progress["answers_dropped"] == {"not_json": 1}


def test_an_endpoint_that_does_not_answer_a_chat_completion_fails_the_job(rig: Rig, endpoint: Endpoint) -> None:
    mount, _ = ingest(rig, "c", [("Melanie", "I love pottery")])
    endpoint.raw = b"<html>a proxy's error page</html>"
    job = rig.jobs.extract(mount, endpoint.url, "", "", 0, "", "t")
    final = final_state(rig, job.job_id)
    assert final.state == "failed" and "not a chat completion" in final.error
    assert rig.kernel.cube_info(rig.kernel.cube("c")).record.head == 1


def test_refusals_before_the_job_starts(rig: Rig, endpoint: Endpoint) -> None:
    rig.kernel.alloc_cube("empty", "", {})
    with pytest.raises(CubeEmpty):
        rig.jobs.extract(rig.kernel.mount("empty", 0, True).record.mount_id, "", "", "", 0, "", "t")
    mount, _ = ingest(rig, "c", [("Melanie", "I love pottery")])
    with pytest.raises(MountReadOnly):
        rig.jobs.extract(rig.kernel.mount("c", 0, False).record.mount_id, "", "", "", 0, "", "t")
    for url, max_tokens in (("ftp://x", 0), ("", 99_999), ("http://127.0.0.1:abc/v1", 0),
                            ("http://127.0.0.1:80@evil.example/v1", 0), ("http://127.0.0.1:8/v1?key=sk", 0),
                            ("https://api.example.com/v1", 0)):  # the last: a fine URL, not an allowed one
        with pytest.raises(InvalidField):
            rig.jobs.extract(mount, url, "", "", max_tokens, "", "t")


def test_a_cube_past_the_turn_bound_is_refused_with_the_limit(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    mount, _ = ingest(rig, "c", [("Melanie", f"I love pottery number {i}") for i in range(3)])
    monkeypatch.setattr(validate, "MAX_EXTRACT_TURNS", 2)  # the bound is kernel/validate's (rule 5)
    with pytest.raises(TooManyItems) as refused:
        rig.jobs.extract(mount, "", "", "", 0, "", "t")
    assert refused.value.metadata == {"count": "3", "limit": "2"} and "at most 2" in refused.value.message
    assert rig.jobs.list_jobs() == [] and len(rig.kernel.mounts_of(rig.kernel.cube("c").cube_id)) == 1  # no job, no mount


def test_a_redirect_is_an_error_and_the_token_never_leaves_for_another_host(rig: Rig, endpoint: Endpoint) -> None:
    """An allowed endpoint that redirects elsewhere must not get the job to send the token (or the turns)
    there: the redirect fails the job, naming the HTTP status."""
    elsewhere = Endpoint()
    try:
        class Redirect(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                self.send_response(307)
                self.send_header("Location", elsewhere.url + "/chat/completions")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        endpoint.server.RequestHandlerClass = Redirect
        mount, _ = ingest(rig, "c", [("Melanie", "I love pottery")])
        job = rig.jobs.extract(mount, endpoint.url, "sk-secret", "", 0, "", "t")
        final = final_state(rig, job.job_id)
        assert final.state == "failed" and "HTTP 307" in final.error
        assert elsewhere.requests == [] and elsewhere.headers == []
    finally:
        elsewhere.close()


def test_a_second_extraction_is_refused_while_the_first_runs_and_cancel_ends_it(rig: Rig, endpoint: Endpoint) -> None:
    mount, _ = ingest(rig, "c", [("Melanie", f"I love pottery number {i}") for i in range(20)])
    endpoint.gate.clear()  # the first prompt hangs until the test lets it answer
    job = rig.jobs.extract(mount, endpoint.url, "", "", 0, "", "t")
    with pytest.raises(ExtractionInProgress):
        rig.jobs.extract(mount, endpoint.url, "", "", 0, "", "t")
    assert [j.job_id for j in rig.jobs.list_jobs(rig.kernel.cube("c").cube_id)] == [job.job_id]
    started = time.monotonic()
    final = rig.jobs.cancel(job.job_id)  # the endpoint never answers (until the fixture closes it)
    assert final.state == "cancelled" and final.step == 0 and final.total_steps == 2  # no prompt was answered
    assert time.monotonic() - started < 5  # the cancel stopped the wait for the endpoint (review M6)
    assert rig.kernel.cube_info(rig.kernel.cube("c")).record.head == 1  # nothing committed
    assert [m.record.mount_id for m in rig.kernel.mounts_of(rig.kernel.cube("c").cube_id)] == [mount]  # its own closed


def test_the_in_process_model_path_drops_noise(rig: Rig) -> None:
    mount, _ = ingest(rig, "c", [("Caroline", "I adopted a dog last week")] * 16
                      + [("Melanie", "pottery " * 2000)])  # the second prompt is past the 4096-token context
    job = rig.jobs.extract(mount, "", "", "", 24, "", "t")
    final = final_state(rig, job.job_id)
    assert final.state == "succeeded", final.error
    p = final.progress
    assert p["turns_read"] == 17 and final.step == final.total_steps == 2
    assert p["answers_dropped"].get("prompt_too_long") == 1  # counted, and the read went on
    assert p["proposed"] == p["kept"] + sum(p["dropped"].values()) + sum(p["refused"].values())
    assert p["kept"] == 0 and final.result_revision == 0  # a random model's 24 tokens are no JSON array


def test_the_in_process_model_decodes_under_the_answer_schema(rig: Rig) -> None:
    """Schema-constrained decoding on the transformers path (xgrammar's mask in GreedyDecode): even the random
    model's answer is a JSON array of whole items naming shown refs, so the strict parse drops no answer;
    without the schema the same model writes no JSON at all."""
    turns = [SourceTurn("t1", "itm_a", "Caroline", "I adopted a dog last week", MAY8),
             SourceTurn("t2", "itm_b", "Melanie", "I love pottery", MAY8)]
    refs = {t.ref: t.item_id for t in turns}
    extractor = ModelExtractor(rig.host, rig.loaded, 1024)  # the schema's bounds fit well within it
    constrained = extractor.complete(extraction_messages(turns), answer_schema(list(refs)))
    parsed = parse_answer(constrained, refs)
    assert parsed.answer_dropped == "", constrained
    assert set(parsed.dropped) <= {"bad_text", "bad_date"}, parsed.dropped  # what a grammar cannot say: checked
    free = parse_answer(extractor.complete(extraction_messages(turns)), refs)
    assert free.answer_dropped == "not_json"


def test_a_job_whose_mount_is_closed_commits_nothing(rig: Rig, endpoint: Endpoint) -> None:
    """A Revoke or DisablePrincipal closes the principal's mounts of the cube (AccessControl.close_mounts),
    the job's own commit mount among them: the job then fails and commits nothing."""
    mount, _ = ingest(rig, "c", [("Melanie", "I love pottery")])
    endpoint.answers = [json.dumps([item("preference", "Melanie loves pottery.", ["t1"])])]
    endpoint.gate.clear()
    job = rig.jobs.extract(mount, endpoint.url, "", "", 0, "", "t")
    cube_id = rig.kernel.cube("c").cube_id
    [job_mount] = [m.record.mount_id for m in rig.kernel.mounts_of(cube_id) if m.record.mount_id != mount]
    rig.kernel.unmount(job_mount)  # what close_mounts does
    endpoint.gate.set()
    final = final_state(rig, job.job_id)
    assert final.state == "failed" and "was closed" in final.error
    assert rig.kernel.cube_info(rig.kernel.cube("c")).record.head == 1


def test_a_job_cut_short_by_a_stop_fails_at_the_next_start_and_its_mount_is_closed(rig: Rig) -> None:
    """Mounts outlive a restart (they are persisted); the job's own commit mount must not."""
    from memosd.parametric.jobs import JobManager

    mount, _ = ingest(rig, "c", [("Melanie", "I love pottery")])
    cube_id = rig.kernel.cube("c").cube_id
    job_mount = rig.kernel.mount("c", 0, True).record.mount_id  # as a job opens it
    running = JobRecord("job_cutshort", cube_id, 1, {"extractor": "model", "url": "", "model": "",
                                                     "max_tokens": 256, "commit_mount": job_mount},
                        "", "t", 1, state="running", kind="extract")
    rig.kernel.store.put_job(running, sync=True)
    again = JobManager(rig.kernel, rig.host, store=rig.kernel.store)  # what the next start builds
    assert again.get("job_cutshort").state == "failed"
    assert [m.record.mount_id for m in rig.kernel.mounts_of(cube_id)] == [mount]


def test_a_job_that_cannot_be_recorded_leaves_no_mount_behind(rig: Rig, endpoint: Endpoint,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's commit mount is opened before its record is saved: if the save fails (a full disk), the
    mount must be closed, or it would be persisted in no job and pin its revision against compaction."""
    mount, _ = ingest(rig, "c", [("Melanie", "I love pottery")])

    def full_disk(job: JobRecord) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rig.jobs, "_save", full_disk)
    with pytest.raises(OSError):
        rig.jobs.extract(mount, endpoint.url, "", "", 0, "", "t")
    assert [m.record.mount_id for m in rig.kernel.mounts_of(rig.kernel.cube("c").cube_id)] == [mount]


def test_an_endpoint_call_is_bounded_in_time(endpoint: Endpoint) -> None:
    endpoint.gate.clear()  # it never answers
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"did not answer within 0\.5 s"):
        EndpointExtractor(endpoint.url, "", "", 16, timeout=0.5).complete([("user", "hi")])
    assert time.monotonic() - started < 3


def test_a_stop_ends_the_wait_for_an_endpoint(endpoint: Endpoint) -> None:
    endpoint.gate.clear()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        EndpointExtractor(endpoint.url, "", "", 16, stop=stop).complete([("user", "hi")])
    assert time.monotonic() - started < 3


def test_an_abandoned_endpoint_call_ends_its_request_thread_at_once(endpoint: Endpoint) -> None:
    """A cancel stops the job's wait, and the request thread with it: its blocked read is ended (the socket
    shut down), not left to run to the call's 300 s deadline."""
    endpoint.gate.clear()  # the endpoint never answers
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Cancelled):
        EndpointExtractor(endpoint.url, "", "", 16, stop=stop).complete([("user", "hi")])
    [request] = [th for th in threading.enumerate() if th.name == "extract-endpoint"] or [None]
    if request is not None:
        request.join(10)  # before the endpoint answers (its gate waits 30 s), and well under the 300 s deadline
        assert not request.is_alive()


class FakeEngine:
    """A stand-in for the vllm engine's generate (the real one runs in tests/e2e/test_vllm_engine.py):
    keeps each request's sampling and stream, and aborts into a list."""

    def __init__(self) -> None:
        self.sampling: list[Sampling] = []
        self.streams: list[TokenStream] = []
        self.aborted: list[str] = []

    def generate(self, token_ids: Any, sampling: Sampling, **kw: Any) -> TokenStream:
        assert kw["priority"] == ENGINE_BACKGROUND and kw["reuse"] is False
        self.sampling.append(sampling)
        stream = TokenStream(f"g{len(self.streams)}", self.aborted.append)
        self.streams.append(stream)
        return stream


def test_on_the_vllm_engine_a_prompt_is_one_constrained_generation_and_a_stop_aborts_it(rig: Rig) -> None:
    engine = FakeEngine()
    stop = threading.Event()
    extractor = ModelExtractor(rig.host, rig.loaded, 64, stop, engine=engine)  # type: ignore[arg-type]
    schema = answer_schema(["t1"])
    answer: list[str] = []
    first = threading.Thread(target=lambda: answer.append(extractor.complete([("user", "hi")], schema)))
    first.start()
    while not engine.streams:
        time.sleep(0.01)
    engine.streams[0].push(Token(1, None, "[]"))
    engine.streams[0].push(Finished("end", 3, 0, 1, 0, 0))
    first.join(30)
    assert answer == ["[]"] and json.loads(engine.sampling[0].json_schema) == schema
    assert engine.sampling[0].temperature == 0.0 and engine.sampling[0].max_tokens == 64
    stopped: list[BaseException] = []

    def second() -> None:
        try:
            extractor.complete([("user", "hi")], schema)
        except Cancelled as error:
            stopped.append(error)

    waiter = threading.Thread(target=second)
    waiter.start()
    while len(engine.streams) < 2:
        time.sleep(0.01)
    stop.set()  # the engine never answers this one: the stop aborts it there
    waiter.join(30)
    assert stopped and engine.aborted == ["g1"]


def test_the_in_process_model_decodes_in_short_worker_tasks_that_a_chat_can_come_between(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review M5: one prompt is many worker tasks (prefill chunks, a few tokens each), so an interactive task
    queued meanwhile runs between two of them, not after the whole prompt."""
    events: list[str] = []
    step = complete.GreedyDecode.step

    def counted(self: complete.GreedyDecode) -> None:
        events.append("step")
        step(self)

    monkeypatch.setattr(complete.GreedyDecode, "step", counted)
    turns = [SourceTurn("t1", "itm_a", "Caroline", "I adopted a dog last week. " * 120, MAY8)]  # ~1500 tokens
    extractor = ModelExtractor(rig.host, rig.loaded, 24)
    answer: list[str] = []
    reader = threading.Thread(target=lambda: answer.append(extractor.complete(extraction_messages(turns))))
    reader.start()
    while reader.is_alive():
        rig.host.run(lambda: events.append("chat"), priority=PRIORITY_INTERACTIVE)
    reader.join()
    assert answer and answer[0].startswith("[")
    steps = [i for i, e in enumerate(events) if e == "step"]
    assert len(steps) > 5  # the prefill alone is several chunks
    assert "chat" in events[steps[0]:steps[-1]]  # a chat ran while the prompt was being decoded


def test_a_stop_ends_the_in_process_decode_between_steps(rig: Rig) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        ModelExtractor(rig.host, rig.loaded, 24, stop).complete([("user", "hi")])


def test_the_stepped_decode_is_the_greedy_answer(rig: Rig) -> None:
    """Stepping changes when the work runs, not what it computes: the answer is transformers' own greedy one."""
    import torch

    from memosd.runtime.tokens import chat_token_ids

    loaded = rig.loaded
    messages = [("user", "Caroline adopted a dog. Melanie paints.")]

    def both() -> tuple[list[int], list[int], int]:
        decode = complete.GreedyDecode(loaded, messages, 16, prefill_chunk=1 << 16, tokens_per_step=3)
        while not decode.done:
            decode.step()
        ids = chat_token_ids(loaded.tokenizer, [{"role": r, "content": c} for r, c in messages],
                             generation_prompt=True)
        eos = loaded.tokenizer.eos_token_id
        with torch.inference_mode():
            out = loaded.model.generate(  # type: ignore[operator]  # transformers' generate is untyped here
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=16,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=eos, eos_token_id=eos)
        return decode.new_tokens, [t for t in out[0, len(ids):].tolist() if t != eos], decode.steps

    stepped, generated, steps = rig.host.run(both)
    assert len(stepped) == 16 and stepped == generated  # the same 16 tokens (the random model writes no end)
    assert steps == 1 + 5  # the prefill picks the first token; then 15 more, 3 a step
