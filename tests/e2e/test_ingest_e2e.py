"""Conversation ingest through a real daemon: Ingest, search by speaker / session / time with context turns,
turns linked across Ingest calls, refusals that lose nothing, and `memosctl ingest` with a JSONL file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import Client, InvalidField, MountReadOnly, TextEmpty, TooManyItems
from memos.v1 import types_pb2

LIMIT = 16  # the daemon's limits.max_items_per_write here
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

TRIP = [  # session "trip"
    ("user", "I want to plan a trip to Kyoto in the spring."),
    ("assistant", "Spring is cherry blossom season; book hotels early."),
    ("user", "What should I eat there?"),
    ("assistant", "Try yudofu, a simmered tofu dish, and matcha sweets."),
    ("user", "Thanks, and how do I get from Osaka?"),
    ("assistant", "The JR Special Rapid train takes about 30 minutes."),
]
CODE = [  # session "code"
    ("user", "My Python script raises a KeyError on the config dict."),
    ("assistant", "Use dict.get with a default, or check the key first."),
    ("user", "It still fails when the file is empty."),
]


daemon = daemon_fixture("ingest", {"MEMOSD_LIMITS__MAX_ITEMS_PER_WRITE": str(LIMIT)})
client = client_fixture()


def turns(session: str, pairs: list[tuple[str, str]], start: datetime) -> list[dict[str, object]]:
    return [{"speaker": s, "text": t, "time": start + timedelta(minutes=i), "session_id": session}
            for i, (s, t) in enumerate(pairs)]


def follow(items: list[types_pb2.Item], first: str) -> list[str]:
    """A session's texts from ``first`` along the next links, checking each prev link agrees."""
    by_id = {i.item_id: i for i in items}
    [item] = [i for i in items if i.text == first]
    assert item.prev_item_id == ""
    out = [item.text]
    while item.next_item_id:
        nxt = by_id[item.next_item_id]
        assert nxt.prev_item_id == item.item_id
        out.append(nxt.text)
        item = nxt
    return out


def test_ingest_search_filters_context_and_links_across_calls(client: Client) -> None:
    client.alloc_cube("conv")
    with client.mount("conv", writable=True) as m:
        first = m.ingest([*turns("trip", TRIP[:4], T0), *turns("code", CODE, T0 + timedelta(days=1))],
                         tags=["chat"], source="e2e")
        assert first.revision.number == 1 and first.revision.added == 7 and len(first.item_ids) == 7
        assert m.base_revision == 1
        # The same session, later: linked to the turns of the first call.
        second = m.ingest(turns("trip", TRIP[4:], T0 + timedelta(minutes=10)), commit_message="more trip")
        assert second.revision.number == 2 and second.revision.message == "more trip"
        items = list(m.iter_items())
        assert follow(items, TRIP[0][1]) == [t for _, t in TRIP]
        assert follow(items, CODE[0][1]) == [t for _, t in CODE]
        osaka = next(i for i in items if i.text.startswith("Thanks, and how"))
        assert (osaka.speaker, osaka.session_id, list(osaka.tags)) == ("user", "trip", [])
        assert osaka.born_revision == 2

        hits = m.search("food to eat", k=10, speakers=["assistant"], session_ids=["trip"])
        assert hits and {h.item.session_id for h in hits} == {"trip"}
        assert {h.item.speaker for h in hits} == {"assistant"}
        assert hits[0].item.text.startswith("Try yudofu")
        assert {h.item.session_id for h in m.search("error in my script", k=10, session_ids=["code"])} == {"code"}
        # Turns are indexed as "<speaker>: <text>": naming the speaker finds their turns, with no filter.
        named = m.search("assistant", k=10, mode="lexical")
        assert sorted(h.item.text for h in named) == sorted(t for s, t in [*TRIP, *CODE] if s == "assistant")
        assert not any(h.item.text.startswith("assistant:") for h in named)  # the text is the words alone
        late = m.search("anything", k=20, since=T0 + timedelta(days=1))
        assert sorted(h.item.text for h in late) == sorted(t for _, t in CODE)

        [hit] = m.search("simmered tofu dish", k=1, context_turns=2)
        assert hit.item.text.startswith("Try yudofu")
        assert [c.text for c in hit.context_before] == [TRIP[1][1], TRIP[2][1]]
        assert [c.text for c in hit.context_after] == [TRIP[4][1], TRIP[5][1]]  # from the second Ingest
        assert hit.item.next_item_id == hit.context_after[0].item_id
        [bare] = m.search("simmered tofu dish", k=1)
        assert not bare.context_before and not bare.context_after
        # Write can add a turn too (staged here): the mount sees it at the end of the session.
        m.write([{"text": "One last question: is the rail pass worth it?", "speaker": "user", "session_id": "trip",
                  "event_time": T0 + timedelta(hours=1)}])
        assert follow(list(m.iter_items()), TRIP[0][1])[-2:] == [TRIP[5][1], "One last question: is the rail pass worth it?"]

    # An older revision sees the session as it was: the last turn of the first call has no next yet.
    with client.mount("conv", revision=1) as old:
        assert follow(list(old.iter_items()), TRIP[0][1]) == [t for _, t in TRIP[:4]]


def test_refusals_name_the_problem_and_lose_nothing(client: Client) -> None:
    client.alloc_cube("conv-bad")
    ok = {"speaker": "user", "text": "a fine message", "session_id": "s"}
    with client.mount("conv-bad", writable=True) as m:
        m.ingest([ok])
        staged = m.write(["a staged note"])
        bad = [
            ([ok, {**ok, "speaker": ""}], InvalidField, "messages[1].speaker"),
            ([ok, {**ok, "text": "  "}], TextEmpty, "messages[1].text"),
            ([{**ok, "session_id": ""}], InvalidField, "messages[0].session_id"),
            ([ok] * (LIMIT + 1), TooManyItems, "max_items_per_write"),
        ]
        for messages, error, needle in bad:
            with pytest.raises(error) as caught:
                m.ingest(messages)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in str(caught.value)
        with client.mount("conv-bad") as ro, pytest.raises(MountReadOnly) as refused:
            ro.ingest([ok])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        cube = client.stat_cube("conv-bad")
        assert (cube.head_revision, cube.item_count) == (1, 1)
        assert m.read(staged)[0].staged  # the refusals left the staging as it was

        # ingest_many splits a large conversation in batches of the daemon's limit: one revision each.
        many = [{"speaker": "user", "text": f"message {i}", "session_id": "long"} for i in range(40)]
        done: list[int] = []
        responses = m.ingest_many(many, batch_size=1000, progress=done.append)
        assert [len(r.item_ids) for r in responses] == [16, 16, 8] and sum(done) == 40
        assert [r.revision.number for r in responses] == [2, 3, 4]
        assert follow(list(m.iter_items()), "message 0") == [f"message {i}" for i in range(40)]


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEMOS_TARGET": daemon.address, "MEMOS_TOKEN_FILE": str(daemon.data_dir / "admin.token")}
    return subprocess.run([sys.executable, "-m", "memos.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_memosctl_ingest_a_jsonl_conversation(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert ctl(daemon, "cube", "alloc", "conv-cli").returncode == 0
    lines = [{"speaker": s, "text": t, "time": f"2024-05-01T12:{i:02d}:00Z", "session_id": "trip"}
             for i, (s, t) in enumerate(TRIP)]
    lines += [{"speaker": s, "text": t} for s, t in CODE]  # their session comes from --session
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    done = ctl(daemon, "ingest", "conv-cli", "--file", str(path), "--session", "code", "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    assert "ingesting" in done.stderr and "9/9" in done.stderr  # the progress bar
    assert "messages:  9" in done.stdout and "revisions: 1, 2, 3" in done.stdout

    found = ctl(daemon, "-o", "json", "mem", "search", "conv-cli", "-q", "tofu", "-k", "1", "--speaker", "assistant",
                "--session", "trip", "--context", "1")
    assert found.returncode == 0, found.stderr
    [hit] = json.loads(found.stdout)["hits"]
    assert hit["item"]["text"].startswith("Try yudofu") and hit["item"]["speaker"] == "assistant"
    assert [c["text"] for c in hit["context_before"]] == [TRIP[2][1]]
    assert [c["text"] for c in hit["context_after"]] == [TRIP[4][1]]
    table = ctl(daemon, "mem", "search", "conv-cli", "-q", "tofu", "-k", "1", "--context", "1").stdout
    assert "| user: What should I eat there?" in table and "assistant: Try yudofu" in table

    # A bad line is found before anything is sent: exit 2, and the cube is unchanged.
    path.write_text(json.dumps({"speaker": "user", "text": "no session"}) + "\n")
    refused = ctl(daemon, "ingest", "conv-cli", "--file", str(path))
    assert refused.returncode == 2 and "session_id" in refused.stderr
    stat = json.loads(ctl(daemon, "-o", "json", "cube", "stat", "conv-cli").stdout)
    assert int(stat["head_revision"]) == 3 and int(stat["item_count"]) == 9
