"""Helpers the benchmarks that run a daemon share: the shared BEIR passages and filling a cube with them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from memosd_client import Client, MountHandle

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "retrieval"


def load_passages() -> list[str]:
    """The msmarco then dbpedia passages of ../shared/data/retrieval, as "title. text"."""
    passages: list[str] = []
    for name in ("msmarco", "dbpedia"):
        with open(DATA / name / "corpus.jsonl") as f:
            for line in f:
                doc = json.loads(line)
                passages.append(f"{doc['title']}. {doc['text']}" if doc.get("title") else doc["text"])
    return passages


def fill(client: Client, name: str, texts: Sequence[str]) -> MountHandle:
    """A new cube ``name`` holding ``texts`` in one commit (in that order); its read-write mount."""
    client.alloc_cube(name)
    mount = client.mount(name, writable=True)
    mount.write(list(texts))
    mount.commit("bench")
    return mount
