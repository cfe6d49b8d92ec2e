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

User queries are text, never tantivy query syntax: they are cut into word
tokens, run through the same analysis as ``en_stem`` and OR-ed as term
queries, so no input can raise a syntax error (``AND``, quotes, parentheses
and ``field:`` prefixes are just words or punctuation).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy.typing as npt
import tantivy

from memosd.index.dense import as_keys

log = logging.getLogger(__name__)

Accept = Callable[[int], bool]
Hits = list[tuple[int, float]]

TEXT = "text"
VKEY = "vkey"
WATERMARK_FILE = "watermark.json"
TANTIVY_DIR = "tantivy"
# Writer arena per index. Each open cube holds a writer for its whole life, so
# this is per-cube resident memory; 50 MB lets a bulk rebuild batch well.
WRITER_HEAP_BYTES = 50_000_000
# The in-RAM index for staged items holds a handful of documents; tantivy's
# minimum arena per thread is 15 MB.
ADHOC_HEAP_BYTES = 15_000_000

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


def _search(index: tantivy.Index, query: tantivy.Query, k: int, accept: Accept | None, total: int) -> Hits:
    """Top ``k`` accepted (vkey, bm25) hits, oversampling 4x and doubling like DenseIndex."""
    if k <= 0 or total == 0:
        return []
    searcher = index.searcher()
    decided: dict[int, bool] = {}
    want = k if accept is None else 4 * k
    while True:
        limit = min(want, total)
        hits = searcher.search(query, limit, count=False).hits
        keys = searcher.fast_field_values(VKEY, [addr for _, addr in hits]) if hits else []
        out: Hits = []
        seen: set[int] = set()
        for (score, _), key_v in zip(hits, keys, strict=True):
            if key_v is None:
                continue
            key = int(key_v)
            if key in seen:
                continue
            seen.add(key)
            if accept is not None:
                ok = decided.get(key)
                if ok is None:
                    ok = decided[key] = bool(accept(key))
                if not ok:
                    continue
            out.append((key, float(score)))
            if len(out) >= k:
                break
        if len(out) >= k or len(hits) < limit or limit >= total:
            out.sort(key=lambda h: (-h[1], h[0]))
            return out
        want *= 2


def _write_json_atomic(path: Path, data: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LexicalIndex:
    """One cube's BM25 index in a directory. Writes are serialized; searches are not."""

    def __init__(self, directory: Path, index: tantivy.Index, writer: tantivy.IndexWriter, watermark: int):
        self.directory = directory
        self._index = index
        # tantivy allows one writer per index directory (a lock file), so the
        # writer is taken once at open and kept for the index's lifetime.
        self._writer: tantivy.IndexWriter | None = writer
        self._watermark = watermark
        self._lock = threading.Lock()
        self._closed = False

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
        writer = index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
        watermark = cls._read_watermark(directory / WATERMARK_FILE)
        lex = cls(directory, index, writer, watermark)
        lex._drop_above_watermark()
        return lex

    @staticmethod
    def _read_watermark(path: Path) -> int:
        try:
            return int(json.loads(path.read_text())["watermark"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("lexical watermark %s unreadable (%s); treating as 0", path, exc)
            return 0

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

    def _w(self) -> tantivy.IndexWriter:
        if self._writer is None:
            raise RuntimeError(f"lexical index {self.directory} is closed")
        return self._writer

    # -- writes ------------------------------------------------------------

    def add(self, docs: Sequence[tuple[int, str]]) -> None:
        """Index ``docs`` (vkey, text), commit, and make them searchable at once.

        An upsert: any document already indexed under one of the vkeys is
        replaced, in the same commit.
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
            high = max(keys)
            if high > self._watermark:
                _write_json_atomic(self.directory / WATERMARK_FILE, {"watermark": high})
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

    def search(self, query: str, k: int, accept: Accept | None = None) -> Hits:
        """Up to ``k`` accepted (vkey, BM25 score) pairs, best first; [] for a query with no words."""
        if self._writer is None:
            raise RuntimeError(f"lexical index {self.directory} is closed")
        q = build_query(self._index.schema, query)
        if q is None:
            return []
        return _search(self._index, q, k, accept, self.num_docs)

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
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                # Consumes the writer; this is what releases the directory lock.
                writer.wait_merging_threads()
                del writer


def score_adhoc(query: str, docs: Sequence[tuple[int, str]], k: int, accept: Accept | None = None) -> Hits:
    """BM25 over a few documents in a throwaway in-RAM index (a mount's staged items).

    The scores use these documents' own statistics (idf over len(docs)), so
    they are not comparable with a cube index's scores: fuse by rank, not score.
    """
    if k <= 0 or not docs:
        return []
    schema = build_schema()
    q = build_query(schema, query)
    if q is None:
        return []
    index = tantivy.Index(schema)
    writer = index.writer(heap_size=ADHOC_HEAP_BYTES, num_threads=1)
    last: dict[int, str] = {}
    for key, text in docs:
        last[int(key)] = text
    for key, text in last.items():
        writer.add_document(_make_doc(key, text))
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    return _search(index, q, k, accept, len(last))
