"""Adapters as the vLLM engine loads them: a PEFT directory per adapter digest.

vLLM loads a LoRA from a directory (``adapter_config.json`` and
``adapter_model.safetensors``), not from memory, so the stored files of an
adapter (exactly as imported or trained: peft's own format, checked at import
by ``runtime.adapters``) are written out once under ``<root>/<digest>/``. The
digest names the bytes, so a directory is never rewritten, two cubes with the
same adapter share it, and a half-written one is never seen: it is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def peft_dir(root: Path, digest: str, config: bytes, weights: bytes) -> Path:
    """The PEFT directory of the adapter ``digest``, written from its files if it is not there yet."""
    if not digest or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"an adapter digest is lower-case hex, not {digest!r}")
    final = root / digest
    if (final / WEIGHTS_FILE).is_file() and (final / CONFIG_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:16]}-", dir=root))
    try:
        (tmp / CONFIG_FILE).write_bytes(config)
        (tmp / WEIGHTS_FILE).write_bytes(weights)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / WEIGHTS_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another thread wrote the same bytes first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
