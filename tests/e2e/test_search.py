"""Hybrid search through the real daemon: relevance, filters, revisions, staging, several mounts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from memos import Client, MountHandle

FACTS = [
    ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", ["travel", "europe"]),
    ("Mount Fuji is the highest mountain in Japan.", ["travel", "asia"]),
    ("Photosynthesis converts light energy into chemical energy in plants.", ["science"]),
    ("The mitochondria is the powerhouse of the cell.", ["science", "biology"]),
    ("Alan Turing formalised computation with the Turing machine.", ["people", "computing"]),
    ("Ada Lovelace wrote the first published algorithm for a machine.", ["people", "computing"]),
    ("Zanzibar-7 is the access code for the blue server room.", ["secrets"]),
]
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def facts(client: Client, cube_name: str) -> MountHandle:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        for day, (text, tags) in enumerate(FACTS):
            m.write([text], tags=tags, source="test", event_time=T0 + timedelta(days=day))
        m.commit("facts")
    return client.mount(cube_name)


def test_hybrid_search_ranks_the_relevant_item_first(facts: MountHandle) -> None:
    hits = facts.search("Which tower stands in Paris?", k=3)
    assert hits[0].item.text.startswith("The Eiffel Tower")
    top = hits[0]
    assert top.score > 0 and top.dense_score > 0 and top.lexical_score > 0
    assert (top.dense_rank, top.lexical_rank) == (1, 1)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits.response.headers[0].read_revision == 1
    assert hits.embed_us > 0 and hits.took_us >= hits.embed_us


def test_lexical_finds_rare_token_and_modes_report_their_own_scores(facts: MountHandle) -> None:
    lexical = facts.search("Zanzibar-7", k=2, mode="lexical")
    assert lexical[0].item.text.startswith("Zanzibar-7")
    assert lexical[0].dense_score == 0 and lexical[0].lexical_score > 0
    dense = facts.search("cellular energy organelle", k=2, mode="dense")
    assert dense[0].item.text.startswith("The mitochondria")
    assert dense[0].lexical_score == 0 and dense[0].dense_score == pytest.approx(dense[0].score)


def test_tag_filters(facts: MountHandle) -> None:
    hits = facts.search("famous things", k=10, tags_all=["people", "computing"])
    assert {h.item.text.split()[0] for h in hits} == {"Alan", "Ada"}
    hits = facts.search("famous things", k=10, tags_any=["asia", "biology"])
    assert {h.item.text.split()[0] for h in hits} == {"Mount", "The"}
    hits = facts.search("famous things", k=10, tags_none=["travel", "science", "secrets"])
    assert len(hits) == 2 and all("people" in h.item.tags for h in hits)


def test_time_range_filter(facts: MountHandle) -> None:
    hits = facts.search("anything", k=10, since=T0 + timedelta(days=2), until=T0 + timedelta(days=4))
    assert sorted(h.item.text.split()[0] for h in hits) == ["Photosynthesis", "The"]
    assert all(T0 + timedelta(days=2) <= h.item.event_time.ToDatetime(UTC) < T0 + timedelta(days=4)
               for h in hits)


def test_search_sees_the_mount_revision_plus_its_staging(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        [old] = m.write(["The meeting is on Monday."])
        m.commit()
    with client.mount(cube_name, writable=True) as editor, client.mount(cube_name) as reader:
        editor.write([{"item_id": old, "text": "The meeting moved to Thursday."}])
        editor.write(["Bring the quarterly report to the meeting."])
        mine = [h.item.text for h in editor.search("when is the meeting", k=5)]
        theirs = [h.item.text for h in reader.search("when is the meeting", k=5)]
        assert sorted(mine) == ["Bring the quarterly report to the meeting.", "The meeting moved to Thursday."]
        assert theirs == ["The meeting is on Monday."]
        assert all(h.item.staged for h in editor.search("meeting", k=5))
        editor.commit()
    with client.mount(cube_name, revision=1) as past:
        assert [h.item.text for h in past.search("meeting", k=5)] == ["The meeting is on Monday."]
    with client.mount(cube_name) as head:
        texts = [h.item.text for h in head.search("meeting", k=5)]
        assert "The meeting is on Monday." not in texts and len(texts) == 2


def test_forgotten_items_leave_search(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        [gone, kept] = m.write(["purple elephants dance", "grey elephants walk"])
        m.commit()
        m.forget([gone])
        assert [h.item.item_id for h in m.search("elephants", k=5)] == [kept]
        m.commit()
        assert [h.item.item_id for h in m.search("purple elephants dance", k=5)] == [kept]


def test_search_across_several_cubes(client: Client, cube_name: str) -> None:
    names = [f"{cube_name}-a", f"{cube_name}-b"]
    for name, text in zip(names, ["Cats purr when content.", "Dogs wag their tails."], strict=True):
        client.alloc_cube(name)
        with client.mount(name, writable=True) as m:
            m.write([text])
            m.commit()
    mounts = [client.mount(n) for n in names]
    hits = client.search([m.mount_id for m in mounts], "pets and their habits", k=5)
    assert {h.cube_id for h in hits} == {m.cube_id for m in mounts}
    assert len(hits.response.headers) == 2
    assert client.search([m.mount_id for m in mounts], "purring cat", k=1)[0].cube_id == mounts[0].cube_id
    for m in mounts:
        m.unmount()


def test_filtered_search_in_a_larger_cube_returns_k_matches(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        m.write_many(({"text": f"note number {i} about topic {i % 10}", "tags": [f"t{i % 50}"]}
                      for i in range(1500)), batch_size=500)
        m.commit()
        hits = m.search("note about topic 3", k=20, tags_all=["t3"])
        assert len(hits) == 20 and all(h.item.tags == ["t3"] for h in hits)
        hits = m.search("note about topic", k=30, tags_none=["t1"])
        assert len(hits) == 30 and all(h.item.tags != ["t1"] for h in hits)
