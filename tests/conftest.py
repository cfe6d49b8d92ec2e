"""Shared fixtures: one real daemon for the session, reached only through the client."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon_proc import DaemonProcess
from memos import Client
from smollm2_build import SmolLM2Build

_names = itertools.count()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model cache the SmolLM2 daemons share: the first to start dequantizes the GGUF, the others find it
    (the cache is written to a temporary directory and renamed, so two building it at once is safe)."""
    return tmp_path_factory.mktemp("daemon-model-cache")


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> Iterator[DaemonProcess]:
    """The session daemon, with the embedded SmolLM2 (loaded in the background after start), on the
    transformers engine (the vLLM engine's daemon is tests/e2e/test_vllm_engine.py's)."""
    env = {"MEMOSD_RUNTIME__MODEL": "SmolLM2-135M-Instruct", "MEMOSD_RUNTIME__CACHE_DIR": str(smollm2_cache)}
    proc = DaemonProcess(tmp_path_factory.mktemp("memosd") / "data", env=env).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"daemon exited with {code} on SIGTERM:\n{proc.log()}"


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.address, token=daemon.token, timeout=60) as c:
        yield c


@pytest.fixture
def cube_name(request: pytest.FixtureRequest) -> str:
    """A fresh, unique cube name per test."""
    return f"t{next(_names)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")


@pytest.fixture(scope="session")
def smollm2_build(tmp_path_factory: pytest.TempPathFactory) -> SmolLM2Build:
    """Real-model tests are few and share this one cold load (~15-20 s on 2 cores)."""
    import memosd.runtime.model as runtime_model

    raw: list[tuple[Any, Any]] = []
    real_dequantize = runtime_model.dequantize_gguf

    def spy(path: Path) -> tuple[Any, Any]:
        out = real_dequantize(path)
        raw.append(out)
        return out

    cache_dir = tmp_path_factory.mktemp("smollm2-cache")
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime_model, "dequantize_gguf", spy)
        loaded = runtime_model.load_model(runtime_model.ModelSpec(device="cpu"), cache_dir)
    [(gguf_model, gguf_tokenizer)] = raw
    return SmolLM2Build(loaded, cache_dir, gguf_model, gguf_tokenizer, time.perf_counter() - started)
