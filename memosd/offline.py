"""The daemon never reaches a model hub: switch Hugging Face libraries offline.

Call before transformers, sentence_transformers or huggingface_hub is first
imported: they read these switches at import time.
"""

from __future__ import annotations

import os


def force_offline() -> None:
    # Forced, not setdefault: a stray HF_HUB_OFFLINE=0 in the environment must
    # not let a daemon reach the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Weight-loading progress bars would end up in the daemon's log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
