"""Retrieval indexes of memosd: embedder, dense (USearch), lexical (tantivy BM25), fusion.

One ``CubeIndex`` per cube bundles a ``DenseIndex`` and a ``LexicalIndex``
keyed by vkey (the store's uint64 id of one item version). This layer knows
nothing of revisions or mounts: visibility is the caller's ``accept`` predicate.
"""

from memosd.index.cube_index import CubeIndex, StagedItems, default_depth
from memosd.index.dense import DenseIndex
from memosd.index.embedder import BUILTIN_MODEL, Embedder
from memosd.index.fusion import FusedHit, fuse
from memosd.index.lexical import LexicalIndex, score_adhoc

__all__ = [
    "BUILTIN_MODEL",
    "CubeIndex",
    "DenseIndex",
    "Embedder",
    "FusedHit",
    "LexicalIndex",
    "StagedItems",
    "default_depth",
    "fuse",
    "score_adhoc",
]
