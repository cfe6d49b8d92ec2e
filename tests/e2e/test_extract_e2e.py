"""Extract end to end through the session daemon, with the embedded SmolLM2-135M as the extractor.

What the 135M model says is not asserted (it extracts weakly); the mechanism is: the job runs on the
runtime worker to its end, WatchJob shows its progress, its counts add up, and whatever it committed is one
revision of parsed items the turns support, each naming its source turns and the job.
"""

from __future__ import annotations

from memosd_client import Client
from memosd_client.v1 import types_pb2 as t

from memosd.reader.support import refusal
from memosd.reader.types import Candidate, SourceTurn

TURNS = [{"speaker": "Caroline", "text": "I adopted a dog last week. His name is Max."},
         {"speaker": "Melanie", "text": "I love pottery and I paint every Sunday."}]


def test_extract_runs_the_embedded_model_and_commits_only_supported_items(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        ingested = client.ingest(m, TURNS, session_id="s1")
        turn_ids = list(ingested.item_ids)
        job = m.extract(max_tokens=96, message="read the chat")  # one item is ~50 tokens; the suite has little time
        assert job.kind == t.JOB_KIND_EXTRACT and job.extract.turns_total == 2
        seen: list[t.Job] = []
        final = client.wait_job(job.job_id, seen.append, timeout=300)
    assert final.state == t.JOB_STATE_SUCCEEDED, final.error
    assert any(j.state == t.JOB_STATE_RUNNING for j in seen)
    x = final.extract
    assert x.turns_read == 2 and final.step == final.total_steps == 1
    assert x.proposed == x.kept + x.dropped + x.refused
    assert x.dropped == sum(x.dropped_by_reason.values()) and x.refused == sum(x.refused_by_reason.values())
    assert x.added + x.updated + x.duplicates <= x.kept and x.retired == 0  # nothing derived before
    if not x.added:
        assert final.result_revision == 0
        return
    revision = final.result_revision
    assert revision == ingested.revision.number + 1
    [entry] = [r for r in client.log(cube_name) if r.number == revision]
    assert entry.message == "read the chat" and entry.added == x.added and entry.forgotten == 0
    added = [c.after for c in client.diff(cube_name, revision - 1, revision)]
    assert len(added) == x.added
    with client.mount(cube_name) as ro:
        by_id = {turn.item_id: turn for turn in ro.read(turn_ids)}
    for item in added:
        assert item.derived_job == final.job_id and item.source == "memosd:extract"
        assert item.derived_from and set(item.derived_from) <= set(by_id)
        [kind_tag] = [tag for tag in item.tags if tag.startswith("kind:")]
        sources = [SourceTurn("", i, by_id[i].speaker, by_id[i].text, by_id[i].event_time.ToNanoseconds())
                   for i in item.derived_from]
        # Supported, as the daemon checked it (its date is checked there too).
        assert refusal(Candidate(kind_tag.removeprefix("kind:"), item.text, None, tuple(item.derived_from)),  # type: ignore[arg-type]
                       sources) == ""
