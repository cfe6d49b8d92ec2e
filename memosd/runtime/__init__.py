"""The model runtime: the in-process model and the one worker thread that owns it.

Only this package imports torch and transformers, and only lazily, so that
importing it (or the kernel) stays cheap. See ``worker`` for the threading rule:
torch is touched only from the runtime worker thread.
"""

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
    "BUILTIN_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "ModelSpec",
    "RuntimeWorker",
    "WorkerClosedError",
    "load_model",
    "model_fingerprint",
]
