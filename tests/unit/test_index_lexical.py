"""LexicalIndex: tantivy BM25 keyed by vkey, with a durable watermark."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tantivy

from memosd.index.lexical import (
    TANTIVY_DIR,
    WATERMARK_FILE,
    LexicalIndex,
    build_query,
    build_schema,
    query_terms,
    score_adhoc,
)

DOCS = [
    (1, "The cat sat on the mat."),
    (2, "Dogs are running in the park with other dogs."),
    (3, "Caroline went to the LGBTQ support group on 7 May 2023."),
    (4, "Melanie painted a sunrise over the lake."),
    (5, 'A recipe: (flour AND sugar) OR "butter" -- NOT eggs'),
    (6, "Straße und Café in München"),
]


@pytest.fixture
def lex(tmp_path: Path) -> Iterator[LexicalIndex]:
    ix = LexicalIndex.open(tmp_path / "lexical")
    ix.add(DOCS)
    yield ix
    ix.close()


def keys(hits: list[tuple[int, float]]) -> list[int]:
    return [k for k, _ in hits]


def test_basic_bm25_with_stemming(lex: LexicalIndex) -> None:
    assert lex.num_docs == len(DOCS)
    hits = lex.search("running dog", 10)
    assert keys(hits)[0] == 2
    assert hits[0][1] > 0
    assert keys(lex.search("paint sunrise", 3))[0] == 4  # "painted" stems to "paint"
    assert keys(lex.search("support groups", 3))[0] == 3


def test_visible_immediately_after_add(lex: LexicalIndex) -> None:
    lex.add([(7, "zebra crossing")])
    assert keys(lex.search("zebra", 5)) == [7]


@pytest.mark.parametrize(
    "query",
    [
        'he said "hello',
        "(unbalanced",
        "a) b] c} {d [e",
        "AND",
        "OR NOT AND",
        "flour AND sugar",
        "text:cat",
        "vkey:3",
        "cat^10",
        "ca*",
        "-cat +dog",
        "IN [a b]",
        "~ ! @ # $ % ^ & * \\ / |",
        "' OR 1=1 --",
        "Straße Café 東京 😀",
        "x" * 200,
        "",
        "   ",
        "...",
    ],
)
def test_sanitized_queries_never_raise(lex: LexicalIndex, query: str) -> None:
    hits = lex.search(query, 5)
    # Whatever the query, only indexed documents come back, ranked, with positive BM25 scores, at most k.
    assert len(hits) <= 5 and set(keys(hits)) <= {k for k, _ in DOCS}
    assert all(score > 0 for _, score in hits) and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    if not any(ch.isalnum() for ch in query):
        assert hits == []  # no word in it: nothing matches


def test_operators_are_just_words(lex: LexicalIndex) -> None:
    # "AND" is not a tantivy operator here: it is the (lowercased) word "and".
    assert 5 in keys(lex.search("AND", 5))
    assert keys(lex.search("text:cat", 5))[0] == 1
    assert keys(lex.search("Straße", 5)) == [6]
    assert keys(lex.search("CAFÉ", 5)) == [6]


def test_no_tokens_returns_empty(lex: LexicalIndex) -> None:
    assert lex.search("", 5) == []
    assert lex.search("?!  ...", 5) == []
    assert lex.search("cat", 0) == []


def test_query_analysis_matches_en_stem(tmp_path: Path) -> None:
    """The Python-side analyzer must produce exactly the terms en_stem indexed."""
    words = ["Running", "dogs", "happily", "generalization", "Straße", "naïve", "ÉCOLE", "foo_bar", "x" * 45]
    schema = build_schema()
    ix = tantivy.Index(schema)
    w = ix.writer(15_000_000, 1)
    doc = tantivy.Document()
    doc.add_text("text", " ".join(words))
    doc.add_unsigned("vkey", 1)
    w.add_document(doc)
    w.commit()
    ix.reload()
    searcher = ix.searcher()
    for word in words[:-1]:
        terms = query_terms(word)
        assert terms, word
        for term in terms:
            assert searcher.doc_freq("text", term) == 1, (word, term)
        parsed = ix.parse_query(word.lower().replace("_", " "), ["text"])
        assert searcher.search(parsed, 1).hits, word
    # Tokens of 40+ bytes are dropped at index time by en_stem, and so here.
    assert not query_terms("x" * 45)


def test_repeated_query_terms_boost() -> None:
    assert query_terms("cat cat dog") == {"cat": 2, "dog": 1}


def test_filtering_with_accept(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    ix.add([(i, f"common word filler {i}") for i in range(1, 301)])
    asked: list[int] = []

    def accept(k: int) -> bool:
        asked.append(k)
        return k % 50 == 0

    hits = ix.search("common word", 4, accept)
    assert sorted(keys(hits)) == [50, 100, 150, 200]
    assert len(asked) == len(set(asked))
    assert sorted(keys(ix.search("common", 10, lambda k: k in (7, 8)))) == [7, 8]
    assert ix.search("common", 10, lambda k: False) == []
    ix.close()


def test_remove_and_upsert(lex: LexicalIndex) -> None:
    lex.remove([1, 999])
    assert lex.search("cat mat", 5) == []
    lex.add([(4, "replaced text about volcanoes")])
    assert lex.search("sunrise", 5) == []
    assert keys(lex.search("volcano", 5)) == [4]
    assert lex.num_docs == len(DOCS) - 1
    lex.add([(8, "first"), (8, "second version")])  # same key twice: last wins
    assert keys(lex.search("second", 5)) == [8]
    assert lex.search("first", 5) == []


def test_watermark_and_persistence(tmp_path: Path) -> None:
    d = tmp_path / "lex"
    ix = LexicalIndex.open(d)
    assert ix.watermark == 0
    ix.add([(3, "alpha"), (5, "beta")])
    assert ix.watermark == 5
    ix.add([(4, "gamma")])  # a lower key does not move it back
    assert ix.watermark == 5
    ix.remove([5])
    assert ix.watermark == 5
    ix.close()
    assert json.loads((d / WATERMARK_FILE).read_text())["watermark"] == 5

    ix2 = LexicalIndex.open(d)
    assert ix2.watermark == 5
    assert ix2.num_docs == 2
    assert keys(ix2.search("gamma", 3)) == [4]
    assert ix2.search("beta", 3) == []
    ix2.close()


def test_documents_above_watermark_dropped_on_open(tmp_path: Path) -> None:
    """A crash after tantivy's commit but before the sidecar write: the caller
    re-adds everything above the watermark, so the index must not hold it."""
    d = tmp_path / "lex"
    ix = LexicalIndex.open(d)
    ix.add([(1, "one"), (2, "two")])
    ix.add([(3, "three")])
    ix.close()
    (d / WATERMARK_FILE).write_text(json.dumps({"watermark": 2}))  # as if the last write was lost
    ix2 = LexicalIndex.open(d)
    assert ix2.watermark == 2
    assert ix2.search("three", 3) == []
    assert ix2.num_docs == 2
    ix2.add([(3, "three")])  # catch-up
    assert keys(ix2.search("three", 3)) == [3]
    ix2.close()


def test_missing_or_bad_watermark_means_rebuild(tmp_path: Path) -> None:
    d = tmp_path / "lex"
    ix = LexicalIndex.open(d)
    ix.add([(1, "one")])
    ix.close()
    (d / WATERMARK_FILE).write_text("{not json")
    ix2 = LexicalIndex.open(d)
    assert ix2.watermark == 0
    assert ix2.num_docs == 0
    ix2.close()


def test_corrupt_index_starts_empty(tmp_path: Path) -> None:
    d = tmp_path / "lex"
    ix = LexicalIndex.open(d)
    ix.add([(1, "one")])
    ix.close()
    (d / TANTIVY_DIR / "meta.json").write_text("garbage")
    ix2 = LexicalIndex.open(d)
    assert ix2.num_docs == 0
    assert ix2.watermark == 0
    ix2.add([(1, "one")])
    assert keys(ix2.search("one", 1)) == [1]
    ix2.close()


def test_one_writer_per_directory(tmp_path: Path) -> None:
    d = tmp_path / "lex"
    ix = LexicalIndex.open(d)
    ix.add([(1, "one")])  # the writer (and the directory lock) is taken on first write
    other = LexicalIndex.open(d)  # reading is fine
    assert keys(other.search("one", 1)) == [1]
    with pytest.raises(ValueError):
        other.add([(2, "two")])  # a second writer is refused
    other.close()
    ix.close()
    again = LexicalIndex.open(d)  # released by close
    again.add([(2, "two")])
    again.close()


def test_closed_index_raises(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    ix.close()
    ix.close()  # idempotent
    with pytest.raises(RuntimeError):
        ix.search("x", 1)
    with pytest.raises(RuntimeError):
        ix.add([(1, "x")])


def test_score_adhoc() -> None:
    docs = [(10, "staged note about the dentist appointment"), (11, "staged note about groceries"), (12, "")]
    hits = score_adhoc("dentist?", docs, 5)
    assert keys(hits) == [10]
    assert keys(score_adhoc("staged note", docs, 5, accept=lambda k: k == 11)) == [11]
    assert score_adhoc("", docs, 5) == []
    assert score_adhoc("x", [], 5) == []
    assert score_adhoc('"AND (', docs, 5) == []
    assert score_adhoc("dentist", docs, 0) == []


@pytest.mark.parametrize("query", ["cat", "cats and dogs", "the cat the cat", "words", "park dog"])
def test_score_adhoc_equals_tantivy_bm25(query: str) -> None:
    """The Python scorer reproduces tantivy's BM25 on an index of the same documents."""
    docs = [
        (1, "The cat sat on the mat with another cat."),
        (2, "Dogs chase cats in the park."),
        (3, "A cat."),
        (4, "Nothing relevant here at all, just words words words"),
        (5, "cat cat cat dog"),
    ]
    schema = build_schema()
    index = tantivy.Index(schema)
    w = index.writer(15_000_000, 1)
    for key, text in docs:
        doc = tantivy.Document()
        doc.add_text("text", text)
        doc.add_unsigned("vkey", key)
        w.add_document(doc)
    w.commit()
    index.reload()
    searcher = index.searcher()
    q = build_query(schema, query)
    assert q is not None
    want = {
        int(searcher.fast_field_values("vkey", [addr])[0] or 0): score
        for score, addr in searcher.search(q, 10).hits
    }
    got = dict(score_adhoc(query, docs, 10))
    assert got.keys() == want.keys()
    for key, score in got.items():
        assert score == pytest.approx(want[key], rel=1e-4)


def test_score_staged_matches_committed_scale(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    background = [
        (i, f"background note {i} about weather" + (" and cats" if i % 3 == 0 else "")) for i in range(1, 301)
    ]
    ix.add(background)
    staged = [(1000, "background note 1000 about weather and cats"), (1001, "nothing to see")]
    staged_hits = ix.score_staged("cats", staged, 5)
    assert keys(staged_hits) == [1000]
    assert ix.score_staged("cats", staged, 5, accept=lambda k: k != 1000) == []
    ix.add(staged[:1])  # now commit it: its score should barely move
    committed = dict(ix.search("cats", 200))
    assert staged_hits[0][1] == pytest.approx(committed[1000], rel=0.05)
    ix.close()
    with pytest.raises(RuntimeError):
        ix.score_staged("cats", staged, 5)


def test_concurrent_search_and_writes(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    ix.add([(i, f"shared words document {i}") for i in range(1, 201)])
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                assert ix.search("shared words", 10, lambda k: k % 2 == 0)
                ix.score_staged("shared", [(10_000, "shared staged")], 3)
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            for i in range(40):
                ix.add([(1000 + i, f"shared words later {i}")])
                if i % 4 == 0:
                    ix.remove([1000 + i])
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=searcher) for _ in range(3)]
    w = threading.Thread(target=writer)
    for t in ts:
        t.start()
    w.start()
    w.join()
    stop.set()
    for t in ts:
        t.join()
    assert not errors
    assert ix.num_docs == 200 + 40 - 10
    ix.close()


def test_search_restricted_to_keys(tmp_path: Path) -> None:
    ix = LexicalIndex.open(tmp_path / "lex")
    ix.add([(i, f"common word filler {i}" + (" rare" if i % 10 == 0 else "")) for i in range(1, 301)])
    full = dict(ix.search("common rare", 300))
    hits = ix.search("common rare", 5, keys=[3, 20, 7, 999])
    assert keys(hits) == [20, 3, 7]
    for k, s in hits:
        assert s == pytest.approx(full[k], rel=1e-6)  # the filter adds nothing to the score
    assert keys(ix.search("common", 5, accept=lambda k: k != 3, keys=[3, 7])) == [7]
    assert ix.search("common", 5, keys=[]) == []
    ix.close()


def test_open_writers_are_bounded_across_indexes(tmp_path: Path) -> None:
    """Writing many cubes must not keep a writer (threads, arena) per cube forever."""
    from memosd.index import lexical as lexical_module

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    before = threads()
    indexes = [LexicalIndex.open(tmp_path / f"cube{i}") for i in range(3 * lexical_module.MAX_OPEN_WRITERS)]
    for i, index in enumerate(indexes):
        index.add([(1, f"document number {i} about owls")])
    assert len(lexical_module._open_writers) <= lexical_module.MAX_OPEN_WRITERS
    # Far fewer threads than one writer (~6 threads) per index would hold.
    assert threads() - before < 2 * 6 * lexical_module.MAX_OPEN_WRITERS
    for i, index in enumerate(indexes):
        assert [key for key, _ in index.search("owls", 5)] == [1]
        index.add([(2, f"second document {i} about owls")])  # a released index writes again
        assert index.watermark == 2
    for index in indexes:
        index.close()
    assert len(lexical_module._open_writers) == 0
