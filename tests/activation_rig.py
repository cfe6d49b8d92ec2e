"""An in-process kernel with activation and parametric memory, wired as the daemon wires it, for tests.

The model is whatever directory a test gives (usually the tiny random Llama);
the embedder is a deterministic stand-in, since search quality is not what
these tests check.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hash_embedder import HashEmbedder

from memosd.activation.activator import Activator
from memosd.activation.generator import GenerateParams, GenerationReport, Generator
from memosd.config import LimitsConfig, RuntimeConfig, SearchConfig
from memosd.daemon import make_ranker
from memosd.index.cube_index import CubeIndex
from memosd.kernel.kernel import Kernel
from memosd.kernel.search import Searcher, SearchSettings
from memosd.kernel.types import ItemInput
from memosd.kernel.usage import UsageTracker
from memosd.parametric.adapters import AdapterService
from memosd.parametric.jobs import JobManager
from memosd.runtime.host import ModelHost
from memosd.runtime.model import LoadedModel
from memosd.store.blocks import RocksBlockStores
from memosd.store.rocks import Store


@dataclass
class Rig:
    """A kernel with activation memory, as the daemon wires it."""

    kernel: Kernel
    host: ModelHost
    activator: Activator
    generator: Generator
    adapters: AdapterService
    jobs: JobManager

    @property
    def loaded(self) -> LoadedModel:
        return self.host.model()

    def close(self) -> None:
        self.jobs.close()
        self.host.close()
        self.kernel.close()


def open_rig(data: Path, model: str, limits: LimitsConfig | None = None, *, sync_commits: bool = False,
             **runtime: Any) -> Rig:
    """Commits are unsynced unless ``sync_commits`` (as the daemon runs): no test but the durability one
    needs the fsyncs, and they are slow on a shared disk."""
    store = Store(data / "store")
    kernel = Kernel(store, HashEmbedder(), CubeIndex.open, data / "index", limits or LimitsConfig(),
                    sync_commits=sync_commits)
    kernel.open()
    # The transformers engine unless a test names another: the rig is the one-layer harness of activation/,
    # and the vLLM engine is tested through the daemon (tests/e2e/test_vllm_engine.py).
    runtime.setdefault("engine", "transformers")
    host = ModelHost(RuntimeConfig(model=model, device="cpu", retrieve_k=0, **runtime), data,
                     block_stores=lambda fingerprint: RocksBlockStores(store, fingerprint))
    # Wait for the background load (a no-op queued behind it; a failed load is the test's to see): tests load
    # models on their own thread too (make_adapter), and transformers' meta-device init during one
    # from_pretrained is process-global, so a load racing it gets meta tensors ("Cannot copy out of meta
    # tensor"). The daemon never races: every model load runs on its one worker.
    host.run(lambda: None)
    adapters = AdapterService(kernel, host, spool=data / "uploads")
    usage = UsageTracker(store)
    activator = Activator(kernel, host, adapters, usage, store=store)
    searcher = Searcher(kernel, make_ranker(SearchConfig()), SearchSettings())
    return Rig(kernel, host, activator, Generator(host, activator, searcher), adapters,
               JobManager(kernel, host, store=store, extract_endpoints=("http://127.0.0.1:",)))  # test doubles


def commit_items(rig: Rig, cube: str, texts: Sequence[str]) -> str:
    """Write and commit ``texts`` through a fresh read-write mount; returns the mount id."""
    mount = rig.kernel.mount(cube, 0, True).record.mount_id
    rig.kernel.write(mount, [ItemInput(text=t) for t in texts])
    rig.kernel.commit(mount, "add", "test")
    return mount


def run_generation(rig: Rig, params: GenerateParams) -> tuple[str, GenerationReport]:
    text, report = "", None
    for event in rig.generator.generate(params, threading.Event()):
        if isinstance(event, GenerationReport):
            report = event
        else:
            text += event
    assert report is not None
    return text, report
