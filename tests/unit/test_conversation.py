"""Conversation ingest in process: items with speaker and session, turns linked at read time (across Ingest
calls, following Forget and the revision read), search filters by speaker and session, context turns.

A kernel over a real RocksDB store and real indexes with a deterministic embedder; searches that check
which item is found are lexical (the stand-in embedder knows no meaning).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig, SearchConfig
from memosd.daemon import make_ranker
from memosd.errors import InvalidField, MountReadOnly, TextEmpty, TooManyItems
from memosd.index.cube_index import CubeIndex
from memosd.kernel.conversation import ingest_order
from memosd.kernel.kernel import Kernel
from memosd.kernel.memory_text import MEMORY_TEXT_RECIPE, memory_text
from memosd.kernel.search import Searcher, SearchSettings
from memosd.kernel.session_match import session_scores, turn_terms
from memosd.kernel.types import ItemInput, ItemView, Message, SearchFilter, SearchHit
from memosd.store import schema
from memosd.store.rocks import Store

S = 1_000_000_000  # one second in ns
T0 = 1_700_000_000 * S


def open_kernel(data: Path, limits: LimitsConfig | None = None) -> Kernel:
    kernel = Kernel(Store(data / "store"), HashEmbedder(), CubeIndex.open, data / "index", limits or LimitsConfig(),
                    sync_commits=False)
    kernel.open()
    return kernel


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = open_kernel(tmp_path / "data", LimitsConfig(max_items_per_write=8))
    k.alloc_cube("c", "", {})
    yield k
    if k.store._cfs:  # not closed by the test
        k.close()


def searcher(kernel: Kernel) -> Searcher:
    return Searcher(kernel, make_ranker(SearchConfig()), SearchSettings())


def rw(kernel: Kernel) -> str:
    return kernel.mount("c", 0, True).record.mount_id


def chat(session: str, *turns: tuple[str, str], start: int = 0) -> list[Message]:
    """Turns one second apart from T0 + ``start`` seconds."""
    return [Message(speaker, text, session, T0 + (start + i) * S) for i, (speaker, text) in enumerate(turns)]


def by_text(views: Sequence[ItemView]) -> dict[str, ItemView]:
    return {v.text: v for v in views}


def read_all(kernel: Kernel, mount_id: str) -> dict[str, ItemView]:
    return by_text(kernel.list_items(mount_id, 1000, "")[0].entries)


def chain(items: dict[str, ItemView], first: str) -> list[str]:
    """The texts of a session followed from ``first`` along next links, checking prev links agree."""
    ids = {v.item_id: v for v in items.values()}
    out, view = [first], items[first]
    assert view.prev_item_id == ""
    while view.next_item_id:
        nxt = ids[view.next_item_id]
        assert nxt.prev_item_id == view.item_id
        out.append(nxt.text)
        view = nxt
    return out


def test_commit_order_groups_sessions_in_order_of_appearance_then_time_then_given_order() -> None:
    messages = [Message("u", "b2", "b", 5), Message("u", "a1", "a", 9), Message("u", "b1", "b", 1),
                Message("u", "b0", "b", 0), Message("u", "a0", "a", 9)]
    # "b0" has no time: it is the ingest time (100), after b's timed turns.
    assert [messages[i].text for i in ingest_order(messages, now=100)] == ["b1", "b2", "b0", "a1", "a0"]


def test_ingest_commits_one_revision_of_turns_with_speaker_session_and_links(kernel: Kernel) -> None:
    mount = rw(kernel)
    [staged] = kernel.write(mount, [ItemInput("a note staged before the ingest")])[0]
    conversation = [*chat("s1", ("user", "hello there"), ("assistant", "hi, how can I help"), ("user", "book a table")),
                    *chat("s2", ("user", "what is the weather"), ("assistant", "sunny"))]
    # Given out of time order within s1: committed and linked in time order.
    given = [conversation[2], conversation[0], conversation[3], conversation[1], conversation[4]]
    result = kernel.ingest(mount, given, tags=("chat",), source="test", message="", author="me")
    assert result.revision.number == 1 and result.revision.added == 5
    assert result.revision.message == "ingest 5 messages" and result.revision.author == "me"
    assert len(result.item_ids) == 5 and result.mount.record.base == 1
    assert result.mount.staged_adds == 1  # the staged note is neither committed nor dropped

    items = read_all(kernel, mount)
    assert items["a note staged before the ingest"].item_id == staged and items["sunny"].session_id == "s2"
    assert chain(items, "hello there") == ["hello there", "hi, how can I help", "book a table"]
    assert chain(items, "what is the weather") == ["what is the weather", "sunny"]
    hello = items["hello there"]
    assert (hello.speaker, hello.session_id, hello.tags, hello.source, hello.event_ns) == (
        "user", "s1", ("chat",), "test", T0)
    # Item ids come back in request order.
    assert [kernel.read(mount, [i])[0][0].text for i in result.item_ids] == [m.text for m in given]
    # Read by id links too, and so does an item staged by Write with a session: it joins the session.
    kernel.write(mount, [ItemInput("a late staged turn", speaker="user", session_id="s2", event_ns=T0 + 9 * S)])
    [sunny] = kernel.read(mount, [items["sunny"].item_id])[0]
    assert sunny.next_item_id == read_all(kernel, mount)["a late staged turn"].item_id
    kernel.commit(mount, "the staged turns", "me")  # Write's speaker and session are committed with it
    late = read_all(kernel, mount)["a late staged turn"]
    assert (late.speaker, late.session_id, late.born, late.prev_item_id) == ("user", "s2", 2, sunny.item_id)


def test_a_later_ingest_continues_the_session_and_old_revisions_keep_their_links(kernel: Kernel) -> None:
    mount = rw(kernel)
    kernel.ingest(mount, chat("s", ("user", "first question"), ("assistant", "first answer")))
    kernel.ingest(mount, chat("s", ("user", "second question"), ("assistant", "second answer"), start=10))
    now = read_all(kernel, mount)
    assert chain(now, "first question") == ["first question", "first answer", "second question", "second answer"]
    # The old item was not rewritten to link it: still one version, born at revision 1.
    assert now["first answer"].born == 1 and kernel.cube("c").record.version_count == 4
    at_one = kernel.mount("c", 1, False).record.mount_id
    assert chain(read_all(kernel, at_one), "first question") == ["first question", "first answer"]


def test_links_skip_a_forgotten_turn(kernel: Kernel) -> None:
    mount = rw(kernel)
    kernel.ingest(mount, chat("s", ("a", "one"), ("b", "two"), ("a", "three")))
    kernel.forget(mount, [read_all(kernel, mount)["two"].item_id])
    assert chain(read_all(kernel, mount), "one") == ["one", "three"]  # staged forget
    kernel.commit(mount, "forget", "me")
    assert chain(read_all(kernel, mount), "one") == ["one", "three"]


def test_search_filters_by_speaker_session_and_time(kernel: Kernel) -> None:
    mount = rw(kernel)
    kernel.ingest(mount, [*chat("s1", ("alice", "pizza tonight"), ("bob", "pizza sounds good")),
                          *chat("s2", ("alice", "pizza again"), ("carol", "no more pizza"), start=100)])
    kernel.write(mount, [ItemInput("staged pizza from carol", speaker="carol", session_id="s3")])
    search = searcher(kernel)

    def texts(filt: SearchFilter, mode: str = "lexical") -> set[str]:
        return {h.item.text for h in search.search([mount], "pizza", 10, filt, mode).hits}

    assert texts(SearchFilter(speakers=("alice",))) == {"pizza tonight", "pizza again"}
    assert texts(SearchFilter(speakers=("carol",)), "dense") == {"no more pizza", "staged pizza from carol"}
    assert texts(SearchFilter(session_ids=("s1",))) == {"pizza tonight", "pizza sounds good"}
    assert texts(SearchFilter(speakers=("alice", "bob"), session_ids=("s2",)), "hybrid") == {"pizza again"}
    assert texts(SearchFilter(start_ns=T0 + 100 * S, session_ids=("s1", "s2"))) == {"pizza again", "no more pizza"}
    assert texts(SearchFilter(speakers=("nobody",))) == set()


def hit_for(hits: list[SearchHit], text: str) -> SearchHit:
    [hit] = [h for h in hits if h.item.text == text]
    return hit


def test_search_returns_the_turns_around_each_hit_in_order(kernel: Kernel) -> None:
    mount = rw(kernel)
    turns = [("user" if i % 2 == 0 else "assistant", f"turn {i} " + ("zebra" if i == 4 else "plain")) for i in range(8)]
    kernel.ingest(mount, chat("s", *turns))
    search = searcher(kernel)
    [hit] = search.search([mount], "zebra", 1, SearchFilter(), "lexical", context_turns=2).hits
    assert [v.text for v in hit.context_before] == ["turn 2 plain", "turn 3 plain"]
    assert [v.text for v in hit.context_after] == ["turn 5 plain", "turn 6 plain"]
    assert hit.item.prev_item_id == hit.context_before[-1].item_id
    assert hit.item.next_item_id == hit.context_after[0].item_id
    assert hit.context_after[0].prev_item_id == hit.item.item_id  # context turns are linked too
    # Context ignores the filters (the other speaker's turns are the context), and stops at the session's end.
    [hit] = search.search([mount], "zebra", 1, SearchFilter(speakers=("user",)), "lexical", context_turns=10).hits
    assert [v.text for v in hit.context_before] == [f"turn {i} plain" for i in range(4)]
    assert [v.text for v in hit.context_after] == [f"turn {i} plain" for i in range(5, 8)]
    [plain] = search.search([mount], "zebra", 1, SearchFilter(), "lexical").hits
    assert plain.context_before == () and plain.context_after == () and plain.item.next_item_id
    with pytest.raises(InvalidField, match="context_turns"):
        search.search([mount], "zebra", 1, SearchFilter(), "lexical", context_turns=11)


def test_bad_conversations_are_refused_whole(kernel: Kernel) -> None:
    mount = rw(kernel)
    ok = chat("s", ("user", "fine"))[0]
    cases = [
        ([ok, Message("", "no speaker", "s")], InvalidField, "messages\\[1\\].speaker"),
        ([ok, Message("   ", "blank speaker", "s")], InvalidField, "messages\\[1\\].speaker"),
        ([ok, Message("user", " ", "s")], TextEmpty, "messages\\[1\\].text"),
        ([ok, Message("user", "no session", "")], InvalidField, "messages\\[1\\].session_id"),
        ([ok] * 9, TooManyItems, "max_items_per_write"),
        ([], InvalidField, "messages is empty"),
    ]
    for messages, error, match in cases:
        with pytest.raises(error, match=match):
            kernel.ingest(mount, messages)
    with pytest.raises(MountReadOnly):
        kernel.ingest(kernel.mount("c", 0, False).record.mount_id, [ok])
    assert kernel.cube("c").head == 0 and len(kernel.cube("c").catalog) == 0


def test_turns_survive_a_restart_and_a_purge_leaves_no_link(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path / "data")
    kernel.alloc_cube("c", "", {})
    mount = rw(kernel)
    kernel.ingest(mount, chat("s", ("a", "alpha"), ("b", "bravo secret"), ("a", "charlie")))
    kernel.close()
    kernel = open_kernel(tmp_path / "data")
    try:
        mount = rw(kernel)
        items = read_all(kernel, mount)
        assert chain(items, "alpha") == ["alpha", "bravo secret", "charlie"]
        assert items["bravo secret"].speaker == "b"
        hits = searcher(kernel).search([mount], "charlie", 5, SearchFilter(session_ids=("s",)), "lexical").hits
        assert [h.item.text for h in hits] == ["charlie"]
        kernel.purge("c", [items["bravo secret"].item_id])
        assert chain(read_all(kernel, mount), "alpha") == ["alpha", "charlie"]
        assert kernel.cube("c").catalog.vkeys_with_tags((), (), speakers=("b",)) == set()
    finally:
        kernel.close()


def test_a_question_that_names_the_speaker_finds_their_turns(kernel: Kernel) -> None:
    """Turns are indexed as "<speaker>: <text>" (kernel/memory_text.py); Search and Read return the words alone."""
    mount = rw(kernel)
    kernel.ingest(mount, chat("s", ("Caroline", "I adopted a dog last week"), ("Melanie", "I painted a lake")))
    kernel.write(mount, [ItemInput("I still have not committed this", speaker="Gustavo", session_id="s")])
    search = searcher(kernel)

    def top(query: str) -> str:
        return search.search([mount], query, 1, SearchFilter(), "lexical").hits[0].item.text

    assert top("And Caroline?") == "I adopted a dog last week"
    assert top("what did melanie do") == "I painted a lake"
    assert top("Gustavo") == "I still have not committed this"  # a staged turn, scored outside the index
    kernel.commit(mount, "", "")
    assert top("Gustavo") == "I still have not committed this"  # and the same turn in the index
    cube = kernel.cube("c")
    metas = sorted(cube.catalog.by_vkey.values(), key=lambda m: m.vkey)
    stored = kernel.store.get_vectors(cube.cube_id, [m.vkey for m in metas])
    want = HashEmbedder().embed([memory_text("I adopted a dog last week", "Caroline", T0),
                                 "Melanie: I painted a lake", "Gustavo: I still have not committed this"])
    for got, expected in zip(stored, want, strict=True):
        assert got is not None and np.allclose(got, expected, atol=1e-3)


def test_a_store_indexed_under_another_memory_text_recipe_is_reindexed_at_start(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path / "data")
    kernel.alloc_cube("c", "", {})
    mount = rw(kernel)
    kernel.ingest(mount, chat("s", ("Caroline", "I adopted a dog")))
    kernel.write(mount, [ItemInput("a note with no speaker")])
    kernel.commit(mount, "", "")
    cube = kernel.cube("c")
    turn, note = sorted(cube.catalog.by_vkey)
    # What an older daemon left: another recipe's stamp and bare-text vectors and indexes. The note's vector
    # is a marker: items without a speaker read the same under every recipe, so it must be left alone.
    marker = np.zeros(HashEmbedder.dim, np.float32)
    marker[0] = 1.0
    batch = kernel.store.batch()
    batch.put_vector(cube.cube_id, turn, HashEmbedder().embed(["I adopted a dog"])[0])
    batch.put_vector(cube.cube_id, note, marker)
    kernel.store.write(batch, sync=True)
    kernel.store.put_meta(schema.KEY_MEMORY_TEXT, b"bare-text/0")
    kernel.close()
    kernel = open_kernel(tmp_path / "data")
    try:
        cube = kernel.cube("c")
        vector, kept = kernel.store.get_vectors(cube.cube_id, [turn, note])
        assert vector is not None and np.allclose(vector, HashEmbedder().embed(["Caroline: I adopted a dog"])[0],
                                                  atol=1e-3)
        assert kept is not None and np.allclose(kept, marker, atol=1e-3)
        stamp = kernel.store.get_meta(schema.KEY_MEMORY_TEXT)
        assert stamp is not None and stamp.decode() == MEMORY_TEXT_RECIPE
        hits = searcher(kernel).search([rw(kernel)], "caroline", 1, SearchFilter(), "lexical").hits
        assert [h.item.text for h in hits] == ["I adopted a dog"]
    finally:
        kernel.close()


def test_context_turns_leave_out_what_search_leaves_out(kernel: Kernel) -> None:
    mount = rw(kernel)
    result = kernel.ingest(mount, chat("s", ("a", "turn zero"), ("b", "turn one archived"), ("a", "turn two zebra"),
                                       ("b", "turn three")))
    kernel.set_item_state("c", [result.item_ids[1]], "archived", "", "")
    mount = rw(kernel)  # at the new head
    kernel.write(mount, [ItemInput("turn four expiring", session_id="s", speaker="a", ttl_seconds=1,
                                   event_ns=T0 + 10 * S)])
    time.sleep(1.1)
    search = searcher(kernel)

    def around(include_archived: bool) -> tuple[list[str], list[str]]:
        [hit] = search.search([mount], "zebra", 1, SearchFilter(include_archived=include_archived), "lexical",
                              context_turns=3).hits
        return [v.text for v in hit.context_before], [v.text for v in hit.context_after]

    assert around(False) == (["turn zero"], ["turn three"])  # archived left out; the expired turn never shows
    assert around(True) == (["turn zero", "turn one archived"], ["turn three"])
    # Read still links every turn the mount sees, the archived one included.
    items = read_all(kernel, mount)
    assert items["turn two zebra"].prev_item_id == items["turn one archived"].item_id


def test_hybrid_search_lifts_the_reply_to_a_matching_question_within_the_filters(kernel: Kernel) -> None:
    """The answer is often the turn after the one the question matches (kernel/turn_rank.py): the reply
    enters the hits though it shares no word with the query, unless a filter leaves it out."""
    mount = rw(kernel)
    kernel.ingest(mount, [*chat("s1", ("Melanie", "which shelter did the puppy come from"),
                                ("Caroline", "the one on Elm Street, she is three months old"),
                                ("Melanie", "lovely")),
                          *chat("s2", ("Melanie", "weather is grey"), ("Caroline", "rain all week"), start=100)])
    search = searcher(kernel)
    hits = [h.item.text for h in search.search([mount], "puppy shelter", 3, SearchFilter(), "hybrid").hits]
    assert hits[:2] == ["which shelter did the puppy come from", "the one on Elm Street, she is three months old"]
    lexical = [h.item.text for h in search.search([mount], "puppy shelter", 3, SearchFilter(), "lexical").hits]
    assert "the one on Elm Street, she is three months old" not in lexical  # found by the lift alone
    only_melanie = search.search([mount], "puppy shelter", 3, SearchFilter(speakers=("Melanie",)), "hybrid").hits
    assert {h.item.speaker for h in only_melanie} == {"Melanie"}


def test_a_query_that_names_a_period_ranks_the_turns_of_that_time_first(kernel: Kernel) -> None:
    """Search reads the dates a query names (kernel/timeref.py) and boosts the turns said then; a turn
    that says "yesterday" is found by the date it means."""
    may, june = 1_683_504_000 * S, 1_686_182_400 * S  # 8 May 2023, 8 June 2023 (00:00 UTC)
    mount = rw(kernel)
    kernel.ingest(mount, [Message("Maria", "I went hiking in the hills", "s1", may),
                          Message("John", "nice", "s1", may + S),
                          Message("Maria", "I went hiking in the hills", "s2", june),
                          Message("John", "cool", "s2", june + S),
                          Message("Maria", "we baked bread yesterday", "s3", june + 3600 * S)])
    search = searcher(kernel)

    def top(query: str, mode: str = "hybrid") -> ItemView:
        return search.search([mount], query, 1, SearchFilter(), mode).hits[0].item

    def hike(query: str) -> str:
        """The session of the first of the two identical hiking turns."""
        hits = search.search([mount], query, 5, SearchFilter(), "hybrid").hits
        return next(h.item.session_id for h in hits if h.item.text == "I went hiking in the hills")

    assert hike("Where did Maria go hiking in May 2023?") == "s1"
    assert hike("Where did Maria go hiking in June 2023?") == "s2"
    assert hike("Where did Maria go hiking?") == "s1"  # no period named: the tie breaks by key
    # "yesterday" said on 8 June is indexed as 7 June 2023 (the stand-in embedder knows no meaning: BM25).
    assert top("What did Maria do on 7 June, 2023?", "lexical").text == "we baked bread yesterday"


def test_a_session_held_on_the_date_the_query_names_is_lifted_as_a_whole(kernel: Kernel) -> None:
    """search.period_lift: after the lifts, every hit whose time is in a period the query names gains 0.2
    (a constant, so a session of that day that matches weakly still comes first), the others nothing; a
    reply the lift brought in gains it too. At 0 it is off, and a query naming no period is untouched."""
    june3, july10 = 1_685_750_400 * S, 1_688_947_200 * S  # 3 June 2023, 10 July 2023 (00:00 UTC)
    mount = rw(kernel)
    kernel.ingest(mount, [Message("Maria", "I signed up for a pottery class", "s1", june3),
                          Message("John", "nice, tell me more", "s1", june3 + S),
                          Message("Maria", "I started a new activity: kickboxing", "s2", july10),
                          Message("John", "wow", "s2", july10 + S)])
    on = searcher(kernel)
    off = Searcher(kernel, make_ranker(SearchConfig()), SearchSettings(period_lift=0.0))

    def scores(search: Searcher, query: str) -> dict[str, tuple[str, float]]:
        hits = search.search([mount], query, 10, SearchFilter(), "hybrid").hits
        return {h.item.text: (h.item.session_id, h.score) for h in hits}

    query = "What new activity did Maria start, as she mentioned on 3 June, 2023?"
    base, lifted = scores(off, query), scores(on, query)
    assert set(lifted) == set(base) and len(lifted) == 4
    for text, (session, score) in lifted.items():
        assert score - base[text][1] == pytest.approx(0.2 if session == "s1" else 0.0)
    assert max(base, key=lambda t: base[t][1]) == "I started a new activity: kickboxing"
    assert lifted[max(lifted, key=lambda t: lifted[t][1])][0] == "s1"
    assert scores(on, "What new activity did Maria start?") == scores(off, "What new activity did Maria start?")


def test_hybrid_search_lifts_each_turn_by_its_sessions_bm25_as_one_document(kernel: Kernel) -> None:
    """kernel/session_match.py through Search: every turn gains 0.2 x its session's BM25 (the session's
    turns the mount sees, as one document, against the other candidate sessions) over the best session's;
    with the weight at 0 it gains nothing. A staged turn's words count for the mount that staged it only."""
    mount = rw(kernel)
    trip = [("Sam", "we drove north to the ridge"), ("Ana", "how was it"), ("Sam", "the lake was frozen"),
            ("Ana", "brr"), ("Sam", "the dog slept all the way")]
    park = [("Ana", "a dog ran on the frozen lake at the park"), ("Sam", "ha"), ("Ana", "we had pizza"),
            ("Sam", "which one"), ("Ana", "the usual"), ("Sam", "ok")]
    kernel.ingest(mount, chat("trip", *trip))
    kernel.ingest(mount, chat("park", *park, start=100))
    query = "north ridge frozen lake dog"
    on = searcher(kernel)
    off = Searcher(kernel, make_ranker(SearchConfig()), SearchSettings(session_match_weight=0.0))

    def scores(search: Searcher, mount_id: str = mount) -> dict[str, tuple[str, float]]:
        hits = search.search([mount_id], query, 20, SearchFilter(), "hybrid").hits
        return {h.item.text: (h.item.session_id, h.score) for h in hits}

    def expected(sessions: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
        docs = {sid: [turn_terms(memory_text(text, speaker, T0)) for speaker, text in turns]
                for sid, turns in sessions.items()}
        return {sid: 0.2 * v for sid, v in session_scores(query, docs).items()}

    base, lifted = scores(off), scores(on)
    assert set(base) == set(lifted) == {text for _, text in trip + park}
    want = expected({"trip": trip, "park": park})
    assert want["trip"] == pytest.approx(0.2) and 0.0 < want["park"] < 0.2  # trip holds every query word
    for text, (session, score) in lifted.items():
        assert score - base[text][1] == pytest.approx(want[session])

    # A second mount stages a turn into "park" with the words it lacks; its scores see it, the first's not.
    other = rw(kernel)
    kernel.write(other, [ItemInput("north to the ridge next time", session_id="park", speaker="Ana",
                                   event_ns=T0 + 200 * S)])
    staged = expected({"trip": trip, "park": [*park, ("Ana", "north to the ridge next time")]})
    assert staged["park"] > want["park"]
    base_other, lifted_other = scores(off, other), scores(on, other)
    for text, (session, score) in lifted_other.items():
        assert score - base_other[text][1] == pytest.approx(staged[session])
    assert scores(on) == lifted

    # Forgetting a turn takes its words out of its session's document at the new revision (the merged
    # terms cached for the old turns are not reused); a mount still at the old base keeps them.
    kernel.forget(mount, [read_all(kernel, mount)["the dog slept all the way"].item_id])
    kernel.commit(mount, "forget", "me")
    fresh = rw(kernel)
    after = expected({"trip": trip[:4], "park": park})
    base_fresh, lifted_fresh = scores(off, fresh), scores(on, fresh)
    for text, (session, score) in lifted_fresh.items():
        assert score - base_fresh[text][1] == pytest.approx(after[session])
    assert after["trip"] != want["trip"] or after["park"] != want["park"]
    assert scores(on, other) == lifted_other
