"""The model runtime: the in-process model and the one worker thread that owns it.

Only this package imports torch and transformers, and only lazily, so that
importing it (or the kernel) stays cheap. See ``worker`` for the threading rule:
torch is touched only from the runtime worker thread.
"""

from memosd.runtime.kvcache import (
    BLOCK,
    CacheMismatch,
    ComputeCancelled,
    ComputeStats,
    CorruptCache,
    EmptyPrefix,
    KVCache,
    KVCacheError,
    PrefixTooLong,
    UnsupportedModel,
    block_hashes,
    compute_prefix_cache,
    from_chunks,
    prepare_generation,
    read_chunk_metadata,
    to_chunks,
)
from memosd.runtime.kvpool import KVPool, PoolStats, PoolTooSmall
from memosd.runtime.model import (
    BUILTIN_MODEL,
    LoadedModel,
    ModelLoadError,
    ModelSpec,
    load_model,
    model_fingerprint,
)
from memosd.runtime.worker import RuntimeWorker, WorkerClosedError

__all__ = [
    "BLOCK",
    "BUILTIN_MODEL",
    "CacheMismatch",
    "ComputeCancelled",
    "ComputeStats",
    "CorruptCache",
    "EmptyPrefix",
    "KVCache",
    "KVCacheError",
    "KVPool",
    "LoadedModel",
    "ModelLoadError",
    "ModelSpec",
    "PoolStats",
    "PoolTooSmall",
    "PrefixTooLong",
    "RuntimeWorker",
    "UnsupportedModel",
    "WorkerClosedError",
    "block_hashes",
    "compute_prefix_cache",
    "from_chunks",
    "load_model",
    "model_fingerprint",
    "prepare_generation",
    "read_chunk_metadata",
    "to_chunks",
]
