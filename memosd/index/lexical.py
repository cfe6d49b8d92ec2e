"""Lexical (BM25) index of one cube, over tantivy.

Schema: ``text`` (tokenizer ``en_stem``, indexed with positions, not stored:
the store holds the text) and ``vkey`` (u64: stored, indexed for deletes,
fast for cheap retrieval of hit keys).

Durability contract: ``watermark`` is the highest vkey whose document is
durably committed. vkeys are assigned increasing in commit order, so after a
crash "everything <= watermark is in" and the caller re-adds the items above
it. The watermark lives in a small JSON sidecar written (atomically) only
*after* the tantivy commit returns; on open, documents above the watermark
(committed to tantivy but not yet recorded) are deleted, so the index holds
exactly the prefix the watermark promises. ``add`` is an upsert besides, so a
replayed add never duplicates a document.

A mount's staged (uncommitted) items are scored by a Python BM25 that
reproduces tantivy's (same analyzer, k1, b and idf): ``LexicalIndex.score_staged``
uses the cube's statistics so staged and committed scores merge by value;
``score_adhoc`` uses the staged items' own.

User queries are text, never tantivy query syntax: they are cut into word
tokens, run through the same analysis as ``en_stem`` and OR-ed as term
queries, so no input can raise a syntax error (``AND``, quotes, parentheses
and ``field:`` prefixes are just words or punctuation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy.typing as npt
import tantivy

from memosd.fsutil import fsync_path
from memosd.index.accept import Accept, Hits, take_accepted
from memosd.index.dense import as_keys

log = logging.getLogger(__name__)


TEXT = "text"
VKEY = "vkey"
WATERMARK_FILE = "watermark.json"
TANTIVY_DIR = "tantivy"
# Writer arena per index. Each open cube holds a writer for its whole life, so
# this is per-cube resident memory; 50 MB lets a bulk rebuild batch well.
WRITER_HEAP_BYTES = 50_000_000
# Documents per add() whose token count feeds the average-length estimate.
LENGTH_SAMPLE_PER_ADD = 64
# tantivy's BM25 parameters (tantivy::query::bm25), mirrored by the Python
# scorer for staged documents.
BM25_K1 = 1.2
BM25_B = 0.75

_WORD = re.compile(r"\w+")


def build_schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field(TEXT, stored=False, tokenizer_name="en_stem", index_option="position")
    sb.add_unsigned_field(VKEY, stored=True, indexed=True, fast=True)
    return sb.build()


# tantivy's built-in "en_stem" analyzer, rebuilt from the same parts (simple
# tokenizer, drop tokens >= 40 bytes, lowercase, English Snowball stemmer) so
# that query terms are exactly the terms the index stored. A unit test checks
# the two agree.
_EN_STEM = (
    tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    .filter(tantivy.Filter.remove_long(40))
    .filter(tantivy.Filter.lowercase())
    .filter(tantivy.Filter.stemmer("english"))
    .build()
)


def analyze(text: str) -> list[str]:
    """The terms the index stores for ``text``, in order (the ``en_stem`` analysis)."""
    tokens: list[str] = _EN_STEM.analyze(text)
    return tokens


def query_terms(text: str) -> Counter[str]:
    """The analyzed terms of a user query, with their counts."""
    terms: Counter[str] = Counter()
    for word in _WORD.findall(text.lower()):
        terms.update(_EN_STEM.analyze(word))
    return terms


def build_query(schema: tantivy.Schema, text: str) -> tantivy.Query | None:
    """A BM25 OR-query over the terms of ``text``, or None when it has none.

    A term repeated in the query is boosted by its count (the usual
    bag-of-words BM25 query, as Lucene/Anserini build it).
    """
    terms = query_terms(text)
    if not terms:
        return None
    clauses: list[tuple[tantivy.Occur, tantivy.Query]] = []
    for term, count in sorted(terms.items()):
        q = tantivy.Query.term_query(schema, TEXT, term)
        if count > 1:
            q = tantivy.Query.boost_query(q, float(count))
        clauses.append((tantivy.Occur.Should, q))
    return tantivy.Query.boolean_query(clauses)


def _make_doc(key: int, text: str) -> tantivy.Document:
    doc = tantivy.Document()
    doc.add_text(TEXT, text)
    doc.add_unsigned(VKEY, key)
    return doc


def _search(searcher: tantivy.Searcher, query: tantivy.Query, k: int, accept: Accept | None) -> Hits:
    """Top ``k`` accepted (vkey, bm25) hits, oversampling 4x and doubling like DenseIndex."""
    total = int(searcher.num_docs)
    if k <= 0 or total == 0:
        return []
    decided: dict[int, bool] = {}
    want = k if accept is None else 4 * k
    while True:
        limit = min(want, total)
        hits = searcher.search(query, limit, count=False).hits
        keys = searcher.fast_field_values(VKEY, [addr for _, addr in hits]) if hits else []
        ranked = ((int(key), float(score)) for (score, _), key in zip(hits, keys, strict=True)
                  if key is not None)
        out = take_accepted(ranked, k, accept, decided)
        if len(out) >= k or len(hits) < limit or limit >= total:
            return out
        want *= 2


def _write_json_atomic(path: Path, data: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class _WriterLRU:
    """Bounds how many lexical writers are open across all cubes.

    A tantivy writer holds ~6 OS threads and its indexing arena; one per cube
    that was ever written does not scale to thousands of cubes. The least
    recently written cubes give theirs back (after their merges finish)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._order: OrderedDict[int, LexicalIndex] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, index: LexicalIndex) -> None:
        with self._lock:
            self._order[id(index)] = index
            self._order.move_to_end(id(index))
            victims = list(self._order.values())[: max(0, len(self._order) - self.capacity)]
        for victim in victims:
            # Never block on a victim that is mid-write (and never on ourselves):
            # it stays open a little longer and is evicted on a later touch.
            if victim is not index and victim.release_writer(blocking=False):
                self.forget(victim)

    def forget(self, index: LexicalIndex) -> None:
        with self._lock:
            self._order.pop(id(index), None)

    def __len__(self) -> int:
        return len(self._order)


MAX_OPEN_WRITERS = 8
_open_writers = _WriterLRU(MAX_OPEN_WRITERS)


class LexicalIndex:
    """One cube's BM25 index in a directory. Writes are serialized; searches are not."""

    def __init__(self, directory: Path, index: tantivy.Index, sidecar: dict[str, int]) -> None:
        self.directory = directory
        self._index = index
        # tantivy allows one writer per index directory (a lock file), so the
        # writer, once taken, is kept for the index's lifetime. It is taken on
        # the first write, not at open: a writer costs ~6 OS threads, and a
        # cube that is only searched never needs one.
        self._writer: tantivy.IndexWriter | None = None
        self._closed = False
        self._watermark = sidecar.get("watermark", 0)
        # A running sample of document lengths (in tokens), for scoring staged
        # documents on this index's scale; tantivy does not expose its own.
        self._len_sum = sidecar.get("len_sum", 0)
        self._len_n = sidecar.get("len_n", 0)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path) -> LexicalIndex:
        """Open (or create) the index in ``directory``; see the module doc for recovery."""
        directory = Path(directory)
        tdir = directory / TANTIVY_DIR
        tdir.mkdir(parents=True, exist_ok=True)
        schema = build_schema()
        try:
            index = tantivy.Index(schema, path=str(tdir), reuse=True)
        except ValueError as exc:
            # Unreadable or written with another schema: derived data, so start
            # over; the watermark goes with it and the caller re-adds everything.
            log.warning("lexical index %s is unusable (%s); starting empty, caller must rebuild", tdir, exc)
            shutil.rmtree(tdir)
            (directory / WATERMARK_FILE).unlink(missing_ok=True)
            tdir.mkdir(parents=True)
            index = tantivy.Index(schema, path=str(tdir), reuse=True)
        lex = cls(directory, index, cls._read_sidecar(directory / WATERMARK_FILE))
        lex._drop_above_watermark()
        return lex

    @staticmethod
    def _read_sidecar(path: Path) -> dict[str, int]:
        try:
            data = json.loads(path.read_text())
            out = {"watermark": int(data["watermark"])}
            out.update({key: int(data[key]) for key in ("len_sum", "len_n") if key in data})
            return out
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("lexical watermark %s unreadable (%s); treating as 0", path, exc)
            return {}

    def _drop_above_watermark(self) -> None:
        index, schema = self._index, self._index.schema
        above = tantivy.Query.range_query(
            schema, VKEY, tantivy.FieldType.Unsigned, lower_bound=self._watermark, include_lower=False
        )
        index.reload()
        if index.searcher().search(above, 1, count=False).hits:
            writer = self._w()
            writer.delete_documents_by_query(above)
            writer.commit()
            index.reload()
            log.info(
                "lexical index %s: dropped documents above watermark %d", self.directory, self._watermark
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"lexical index {self.directory} is closed")

    def _w(self) -> tantivy.IndexWriter:
        """The writer, taken on first use (callers hold ``_lock``, or are ``open``)."""
        self._check_open()
        if self._writer is None:
            self._writer = self._index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
        _open_writers.touch(self)
        return self._writer

    def release_writer(self, *, blocking: bool = True) -> bool:
        """Let merges finish and drop the writer, freeing its threads and memory.

        The next write takes a new one. Returns False (and keeps the writer)
        when ``blocking`` is False and a write is in progress."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.wait_merging_threads()  # consumes it: releases the lock file
            return True
        finally:
            self._lock.release()

    # -- writes ------------------------------------------------------------

    def add(self, docs: Sequence[tuple[int, str]]) -> None:
        """Index ``docs`` (vkey, text), commit, and make them searchable at once.

        An upsert: any document already indexed under one of the vkeys is
        replaced, in the same commit. The watermark contract needs new vkeys
        to arrive in increasing order across calls (a batch may be unordered):
        once a call returns, every vkey up to its highest is expected in.
        """
        if not docs:
            return
        keys = [int(k) for k in as_keys([k for k, _ in docs]).tolist()]
        with self._lock:
            writer = self._w()
            writer.delete_documents_by_query(tantivy.Query.term_set_query(self._index.schema, VKEY, keys))
            last: dict[int, str] = {}
            for key, (_, text) in zip(keys, docs, strict=True):
                last[key] = text
            for key, text in last.items():
                writer.add_document(_make_doc(key, text))
            writer.commit()
            self._index.reload()
            # Analyzing costs ~20 us a document, as much as indexing it, so
            # only a bounded sample of each batch feeds the length estimate.
            for text in list(last.values())[:LENGTH_SAMPLE_PER_ADD]:
                self._len_sum += len(analyze(text))
                self._len_n += 1
            high = max(keys)
            if high > self._watermark:
                sidecar = {"watermark": high, "len_sum": self._len_sum, "len_n": self._len_n}
                _write_json_atomic(self.directory / WATERMARK_FILE, sidecar)
                self._watermark = high

    def remove(self, keys: npt.ArrayLike) -> None:
        """Delete the documents of ``keys`` (absent ones are ignored) and commit."""
        ks = [int(k) for k in as_keys(keys).tolist()]
        if not ks:
            return
        with self._lock:
            writer = self._w()
            writer.delete_documents_by_query(tantivy.Query.term_set_query(self._index.schema, VKEY, ks))
            writer.commit()
            self._index.reload()

    # -- reads -------------------------------------------------------------

    def search(
        self, query: str, k: int, accept: Accept | None = None, keys: npt.ArrayLike | None = None
    ) -> Hits:
        """Up to ``k`` accepted (vkey, BM25 score) pairs, best first; [] for a query with no words.

        ``keys`` restricts the search to those vkeys inside tantivy (a zero-score
        filter clause), so a selective filter whose few keys the caller knows
        costs no oversampling; ``accept`` still applies on top.
        """
        self._check_open()
        schema = self._index.schema
        q = build_query(schema, query)
        if q is None:
            return []
        if keys is not None:
            ks = [int(x) for x in as_keys(keys).tolist()]
            if not ks:
                return []
            only = tantivy.Query.const_score_query(tantivy.Query.term_set_query(schema, VKEY, ks), 0.0)
            q = tantivy.Query.boolean_query([(tantivy.Occur.Must, q), (tantivy.Occur.Must, only)])
        return _search(self._index.searcher(), q, k, accept)

    def score_staged(
        self, query: str, docs: Sequence[tuple[int, str]], k: int, accept: Accept | None = None
    ) -> Hits:
        """BM25 of uncommitted ``docs`` as if they were in this index, best first.

        idf uses this index's document frequencies plus the staged documents'
        own, so the scores are on the scale ``search`` returns and the two
        lists can be merged by score into one lexical ranking. Approximate:
        the average document length is estimated from a sample of added
        documents, and tantivy stores each document's length quantized, so
        expect agreement to a few percent, not to the last digit.
        """
        self._check_open()
        if k <= 0 or not docs:
            return []
        terms = query_terms(query)
        searcher = self._index.searcher()

        def doc_freq(term: str) -> int:
            return int(searcher.doc_freq(TEXT, term))

        avg_len = self._len_sum / self._len_n if self._len_n else None
        return _bm25_staged(terms, docs, k, accept, doc_freq, int(searcher.num_docs), avg_len)

    @property
    def watermark(self) -> int:
        """Highest vkey durably committed: every document with vkey <= it is in."""
        return self._watermark

    @property
    def num_docs(self) -> int:
        return int(self._index.searcher().num_docs)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Let background merges finish and release the writer (and its lock file)."""
        _open_writers.forget(self)
        with self._lock:
            self._closed = True
            writer, self._writer = self._writer, None
            if writer is not None:
                # Consumes the writer; this is what releases the directory lock.
                writer.wait_merging_threads()
                del writer


def _bm25_staged(
    terms: Counter[str],
    docs: Sequence[tuple[int, str]],
    k: int,
    accept: Accept | None,
    doc_freq: Callable[[str], int],
    num_docs: int,
    avg_len: float | None,
) -> Hits:
    """BM25 of ``docs`` for ``terms``, scored the way tantivy scores (see ``score_adhoc``).

    ``doc_freq``/``num_docs``/``avg_len`` are the background statistics
    *excluding* ``docs``; the staged documents' own are added here.
    """
    last: dict[int, list[str]] = {}
    for key, text in docs:
        last[int(key)] = analyze(text)
    if not last or not terms:
        return []
    n = num_docs + len(last)
    staged_len = sum(len(t) for t in last.values())
    if avg_len is None or num_docs == 0:
        avgdl = staged_len / len(last)
    else:
        avgdl = (avg_len * num_docs + staged_len) / n
    avgdl = max(avgdl, 1.0)
    tfs = {key: Counter(tokens) for key, tokens in last.items()}
    weights: dict[str, float] = {}
    for term, boost in terms.items():
        df = doc_freq(term) + sum(1 for tf in tfs.values() if term in tf)
        if df:
            weights[term] = boost * math.log(1.0 + (n - df + 0.5) / (df + 0.5)) * (1.0 + BM25_K1)
    scored: Hits = []
    for key, tf in tfs.items():
        norm = BM25_K1 * (1.0 - BM25_B + BM25_B * len(last[key]) / avgdl)
        score = sum(w * tf[t] / (tf[t] + norm) for t, w in weights.items() if t in tf)
        if score > 0.0:
            scored.append((key, score))
    scored.sort(key=lambda h: (-h[1], h[0]))
    out: Hits = []
    for key, score in scored:
        if accept is None or accept(key):
            out.append((key, score))
            if len(out) >= k:
                break
    return out


def score_adhoc(query: str, docs: Sequence[tuple[int, str]], k: int, accept: Accept | None = None) -> Hits:
    """BM25 over a few documents on their own (a mount's staged, uncommitted items).

    Same analysis and formula as tantivy (k1 = 1.2, b = 0.75, idf
    ln(1 + (N - df + 0.5) / (df + 0.5))), computed in Python: a throwaway
    in-RAM tantivy index costs ~13 ms per call in its commit, this ~0.1 ms for
    ten items. Statistics come from ``docs`` alone, so scores are comparable
    only among them; to merge staged items into a cube's results by score, use
    ``LexicalIndex.score_staged``.
    """
    if k <= 0:
        return []
    return _bm25_staged(query_terms(query), docs, k, accept, lambda _t: 0, 0, None)
