"""LoRA adapters: parsing and checking an uploaded peft adapter, and the resident-adapter pool.

Adapters are loaded into the one in-process model with transformers' PEFT
integration (``load_adapter`` with a state dict, ``set_adapter``,
``disable_adapters``, ``delete_adapter``): each resident adapter's LoRA
weights sit beside the base weights, and switching is a flag per LoRA layer,
not a copy of weights, so requests with different adapters interleave at the
cost of a switch (~1 ms). ``AdapterPool.use`` is called at the start of every
piece of model work (activation, prefill, decode step) with the adapter that
work needs, or None for the base model.

Threading: everything that touches the model or tensors runs on the runtime
worker thread. ``adapter_digest`` is pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memosd.logfmt import log_event
from memosd.runtime.eviction import coldest
from memosd.runtime.model import base_name, base_tensors

if TYPE_CHECKING:
    import torch

    from memosd.runtime.model import LoadedModel

log = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the keys

MAX_CONFIG_BYTES = 64 << 10  # peft writes ~1.5 KB; checked at the upload's header
MAX_CONFIG_DEPTH = 4  # the allow-list's deepest value is a list (target_modules) in the top object
MAX_RANK = 1024
WEIGHT_DTYPES = ("float16", "bfloat16", "float32")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<part>[AB])\.weight")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


class AdapterError(ValueError):
    """Base of what this module refuses."""


class AdapterInvalid(AdapterError):
    """The files are not a readable peft LoRA adapter the runtime supports (truncated, corrupt, wrong kind,
    unsupported setting). ``key``: the config key or tensor at fault, when there is one."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class AdapterMismatch(AdapterError):
    """The adapter is a LoRA adapter, but not for this model (modules, shapes, base model)."""


class BaseModelChanged(AdapterError):
    """Loading an adapter changed the base model's modules or weights: the model serves nothing more."""


def adapter_digest(config: bytes, weights: bytes) -> str:
    """sha256 over the config bytes, then the weights bytes (64 hex): what clients compute too."""
    h = hashlib.sha256(config)
    h.update(weights)
    return h.hexdigest()


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA settings of an ``adapter_config.json`` that passed the allow-list: all the runtime uses."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # sorted plain module names (q_proj, ...)
    use_rslora: bool
    base_model: str
    task_type: str | None


@dataclass(frozen=True)
class ParsedAdapter:
    digest: str
    settings: LoraSettings
    shapes: dict[str, tuple[int, ...]]  # keys without the PeftModel prefix
    tensors: dict[str, torch.Tensor] = field(repr=False)  # the same keys; empty when only checked

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def target_modules(self) -> list[str]:
        return list(self.settings.target_modules)

    @property
    def base_model(self) -> str:
        return self.settings.base_model


# -- the allow-list of adapter_config.json -------------------------------------------------------------
# Every key peft (0.21) writes, and what the runtime supports for it. A key not here is refused (so a
# setting a later peft adds is refused until it is looked at), and so is any value but the listed ones.
# Most keys are supported only at their "off" default: they would compute weights at load
# (init_lora_weights variants, loftq, eva, corda, ...), change modules beside the LoRA layers
# (layer_replication rebuilds the layer stack, modules_to_save, trainable_token_indices,
# target_parameters) or need a forward the pool does not switch (DoRA, lora_bias, patterns).

def _expect(key: str, value: Any, expected: str) -> AdapterInvalid:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return AdapterInvalid(f"adapter_config.json: {key} = {shown} is not supported; expected {expected}", key=key)


def _only(*allowed: Any) -> Callable[[str, Any], Any]:
    """A key supported only at these values (compared with their JSON type: false is not 0)."""
    expected = " or ".join(json.dumps(a) for a in allowed)

    def check(key: str, value: Any) -> Any:
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise _expect(key, value, expected)
        return value
    return check


def _text_or_null(key: str, value: Any) -> Any:
    if value is not None and not (isinstance(value, str) and len(value) <= 256):
        raise _expect(key, value, "a string (at most 256 characters) or null")
    return value


def _flag(key: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _expect(key, value, "true or false")
    return value


def _auto_mapping(key: str, value: Any) -> Any:
    # What save_pretrained records for AutoPeftModel (the base model's class and library); never read here.
    if value is not None and not (isinstance(value, dict) and set(value) <= {"base_model_class", "parent_library"}
                                  and all(isinstance(v, str) and len(v) <= 256 for v in value.values())):
        raise _expect(key, value, "null or {\"base_model_class\": ..., \"parent_library\": ...} (strings)")
    return value


def _int_in(low: int, high: int) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        # bool is an int in Python: "r": true must not pass as rank 1.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _expect(key, value, f"an integer from {low} to {high}")
        return value
    return check


def _number(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Callable[[str, Any], Any]:
    expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _expect(key, value, expected)
        if value < low or value > high or (high_open and value == high) or (low_open and value == low):
            raise _expect(key, value, expected)
        return value
    return check


def _module_names(key: str, value: Any) -> Any:
    # A list only: peft reads a string as a regular expression over every module name (or "all-linear").
    if (not isinstance(value, list) or not value or len(value) > 64
            or not all(isinstance(n, str) and _MODULE_NAME.fullmatch(n) for n in value)
            or len(set(value)) != len(value)):
        raise _expect(key, value, "a non-empty list of distinct module names such as [\"q_proj\", \"v_proj\"] "
                      "(no patterns, no paths)")
    return value


CONFIG_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "peft_type": _only("LORA"),
    "r": _int_in(1, MAX_RANK),
    "target_modules": _module_names,
    "lora_alpha": _number(0, 65536, low_open=True),
    "lora_dropout": _number(0, 1, high_open=True),  # inactive at inference; accepted as trained
    "use_rslora": _flag,
    "bias": _only("none"),
    "fan_in_fan_out": _only(False),
    "task_type": _only(None, "CAUSAL_LM"),
    "base_model_name_or_path": _text_or_null,  # checked against the model by check_fits
    "revision": _text_or_null,
    "peft_version": _text_or_null,
    "inference_mode": _flag,  # the runtime always loads for inference
    "init_lora_weights": _flag,  # the weights come from the file: the runtime never initialises them
    "auto_mapping": _auto_mapping,
    "exclude_modules": _only(None),
    "modules_to_save": _only(None, []),
    "layers_to_transform": _only(None),
    "layers_pattern": _only(None),
    "rank_pattern": _only(None, {}),
    "alpha_pattern": _only(None, {}),
    "megatron_config": _only(None),
    "megatron_core": _only(None, "megatron.core"),  # the module name peft writes; unused without megatron_config
    "trainable_token_indices": _only(None),
    "loftq_config": _only(None, {}),
    "eva_config": _only(None),
    "corda_config": _only(None),
    "lora_ga_config": _only(None),
    "velora_config": _only(None),
    "monteclora_config": _only(None),
    "arrow_config": _only(None),
    "kasa_config": _only(None),
    "use_dora": _only(False),
    "alora_invocation_tokens": _only(None),
    "use_qalora": _only(False),
    "qalora_group_size": _int_in(1, 1 << 20),  # unused without use_qalora
    "layer_replication": _only(None),
    "lora_bias": _only(False),
    "target_parameters": _only(None),
    "use_bdlora": _only(None),
    "ensure_weight_tying": _only(False),
}
_REQUIRED = ("peft_type", "r", "target_modules")


def parse_config(config: bytes) -> LoraSettings:
    """Check ``adapter_config.json`` against the allow-list (``CONFIG_KEYS``). Raises ``AdapterInvalid``
    naming the key at fault and what is expected."""
    if len(config) > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"adapter_config.json is {len(config)} bytes; at most {MAX_CONFIG_BYTES} are accepted")
    # json.loads recurses once per nesting level: bound the depth before it runs (no RecursionError).
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b'""', config)):
        depth += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    if deepest > MAX_CONFIG_DEPTH:
        raise AdapterInvalid(f"adapter_config.json nests {deepest} levels deep; at most {MAX_CONFIG_DEPTH} "
                             "are accepted")
    try:
        cfg = json.loads(config.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise AdapterInvalid(f"adapter_config.json is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterInvalid("adapter_config.json must be a JSON object")
    for key in cfg:
        if key not in CONFIG_KEYS:
            shown = key if len(key) <= 60 else key[:57] + "..."
            raise AdapterInvalid(f"adapter_config.json has {shown!r}, which the runtime does not support: "
                                 "only plain LoRA settings are accepted (remove the key)", key=shown)
    for key in _REQUIRED:
        if key not in cfg:
            raise AdapterInvalid(f"adapter_config.json needs {key!r}", key=key)
    values = {key: CONFIG_KEYS[key](key, value) for key, value in cfg.items()}
    return LoraSettings(
        rank=values["r"], alpha=float(values.get("lora_alpha", 8)), dropout=float(values.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(values["target_modules"])), use_rslora=bool(values.get("use_rslora", False)),
        base_model=str(values.get("base_model_name_or_path") or ""), task_type=values.get("task_type"))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct (a repeated key would let one reading differ from another)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key[:60]!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_adapter(config: bytes, weights: bytes | Path, *, keep_tensors: bool = True,
                  digest: str = "") -> ParsedAdapter:
    """Read and check the two files of a peft LoRA adapter (the weights as bytes, or a file read tensor by
    tensor). Raises ``AdapterInvalid``.

    The config must pass the allow-list; the weights must be exactly the
    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` pairs of its target
    modules, 2-D, float16/bfloat16/float32, of rank ``r``, with finite values.
    ``keep_tensors=False`` checks without keeping them (an upload). ``digest``:
    the digest if the caller has it (a file is not hashed here).
    """
    import torch

    settings = parse_config(config)
    shapes: dict[str, tuple[int, ...]] = {}
    kept: dict[str, torch.Tensor] = {}
    parts: dict[str, set[str]] = {}
    for raw_key, tensor in _read_tensors(weights):
        key = raw_key.removeprefix(_PEFT_PREFIX)
        shown = key if len(key) <= 120 else key[:117] + "..."
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterInvalid(f"adapter_model.safetensors holds {shown!r}; only LoRA weights "
                                 "(<module>.lora_A.weight, <module>.lora_B.weight) are accepted", key=shown)
        path, part = match["path"], match["part"]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in WEIGHT_DTYPES:
            raise AdapterInvalid(f"{shown} is {dtype}; LoRA weights must be one of {', '.join(WEIGHT_DTYPES)}",
                                 key=shown)
        shape = tuple(tensor.shape)
        if len(shape) != 2 or shape[0 if part == "A" else 1] != settings.rank:
            want = "(r, in_features)" if part == "A" else "(out_features, r)"
            raise AdapterInvalid(f"{shown} has shape {shape}; a LoRA {part} matrix is {want} with r = "
                                 f"{settings.rank}", key=shown)
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterInvalid(f"{shown} holds NaN or infinite values", key=shown)
        parts.setdefault(path, set()).add(part)
        shapes[key] = shape
        if keep_tensors:
            kept[key] = tensor
    if not shapes:
        raise AdapterInvalid("adapter_model.safetensors holds no LoRA weights")
    for path, have in sorted(parts.items()):
        if have != {"A", "B"}:
            missing = f"{path}.lora_{({'A', 'B'} - have).pop()}.weight"
            raise AdapterInvalid(f"adapter_model.safetensors lacks {missing}: every adapted module needs both "
                                 "LoRA matrices", key=missing)
    if not digest:
        if not isinstance(weights, bytes):
            raise ValueError("the digest of an adapter read from a file must be given")
        digest = adapter_digest(config, weights)
    return ParsedAdapter(digest, settings, shapes, kept)


def _read_tensors(weights: bytes | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, one at a time for a file. Raises ``AdapterInvalid``."""
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        if isinstance(weights, bytes):
            yield from load(weights).items()
            return
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                yield key, f.get_tensor(key)
    except AdapterInvalid:
        raise
    except Exception as e:  # safetensors raises its own untyped errors (and torch, on dtypes it lacks)
        raise AdapterInvalid(f"adapter_model.safetensors is unreadable (truncated or corrupt?): {e}") from None


def check_fits(loaded: LoadedModel, adapter: ParsedAdapter) -> None:
    """Refuse an adapter made for another model, naming the mismatch. Raises ``AdapterMismatch``.

    Every target must name linear layers of the model (not its output head),
    and the weights must cover each of them with the shapes the layer needs;
    weights of a module no target names are ``AdapterInvalid``.
    """
    import torch

    if adapter.base_model:
        made_for = adapter.base_model.rstrip("/").rsplit("/", 1)[-1]
        if made_for.lower() != loaded.name.lower():
            raise AdapterMismatch(f"the adapter was made for base model {adapter.base_model!r}; the runtime "
                                  f"runs {loaded.name!r}")
    # The live model's, or its meta-device copy's (on the vllm engine): module classes and shapes are all
    # this looks at, never the weights.
    structure = loaded.structure
    modules = {name: module for name, module in structure.named_modules()
               if name and base_name(name) == name}  # the base model's modules (LoRA wrappers in their place)
    head = structure.get_output_embeddings()  # type: ignore[no-untyped-call]
    adapted: set[str] = set()
    for target in adapter.target_modules:
        matched = [n for n in modules if n == target or n.endswith("." + target)]
        if not matched:
            raise AdapterMismatch(f"the adapter targets module {target!r}, which {loaded.name} does not have")
        for path in matched:
            module = modules[path]
            linear = getattr(module, "base_layer", module)  # a LoRA wrapper from an earlier adapter
            if type(linear) is not torch.nn.Linear or linear is head:
                raise AdapterMismatch(f"{path!r} in {loaded.name} is not a linear layer of its blocks; LoRA "
                                      "cannot adapt it here")
            for part, want in (("A", (adapter.rank, linear.in_features)), ("B", (linear.out_features, adapter.rank))):
                key = f"{path}.lora_{part}.weight"
                have = adapter.shapes.get(key)
                if have is None:
                    raise AdapterMismatch(f"the adapter targets {target!r} but has no {key}: {loaded.name} "
                                          f"would run {path!r} with an uninitialised LoRA layer")
                if have != want:
                    raise AdapterMismatch(f"{key} has shape {have}; {loaded.name} needs {want} "
                                          f"(rank {adapter.rank})")
        adapted.update(matched)
    for key in adapter.shapes:
        path = key.rpartition(".lora_")[0]
        if path not in modules:
            raise AdapterMismatch(f"the adapter has weights for {path!r}, which {loaded.name} does not have")
        if path not in adapted:
            raise AdapterInvalid(f"adapter_model.safetensors holds {key}, but the config's target_modules do not "
                                 f"name {path.rsplit('.', 1)[-1]!r}", key=key)


def lora_config(settings: LoraSettings) -> Any:
    """The peft ``LoraConfig`` the pool loads an adapter with: built from the checked settings alone, never
    from the uploaded JSON, so no other peft option can reach the model."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha,  # type: ignore[arg-type]  # any number works
                      lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), use_rslora=settings.use_rslora, bias="none",
                      fan_in_fan_out=False, task_type=settings.task_type, inference_mode=True,
                      # The weights come from the file: no initialisation. (peft's default, True, would zero
                      # lora_B in update_layer, over the tensors handed to it: the adapter would do nothing.)
                      init_lora_weights=False)


@dataclass(frozen=True)
class BaseStructure:
    """What loading an adapter must never change: the base model's modules (name -> class) and its tensors
    (name -> storage address, shape, dtype), by their base names (LoRA wrappers and tensors left out).

    Cheap (one walk of the modules, no bytes read: ~ms on SmolLM2) so it is
    checked after every load. Comparing tensor bytes would cost the whole
    fingerprint (~0.45 s) per load; what it would add is an in-place write
    into a base weight, and the only code that could do one at load is peft's
    weight initialisation (PiSSA, OLoRA, LoftQ rewrite the base weight), which
    ``lora_config`` never asks for (init_lora_weights=False).
    """

    modules: dict[str, str]
    tensors: dict[str, tuple[int, tuple[int, ...], str]]

    @staticmethod
    def of(model: Any) -> BaseStructure:
        from peft.tuners.tuners_utils import BaseTunerLayer

        modules = {}
        for name, module in model.named_modules():
            base = base_name(name)
            if base is not None and not isinstance(module, BaseTunerLayer):
                modules[base] = type(module).__qualname__
        tensors = {name: (t.data_ptr(), tuple(t.shape), str(t.dtype)) for name, t in base_tensors(model).items()}
        return BaseStructure(modules, tensors)

    def difference(self, other: BaseStructure) -> str:
        """What differs from ``other``, in words ("" if nothing)."""
        for kind, mine, theirs in (("module", self.modules, other.modules), ("tensor", self.tensors, other.tensors)):
            for name in sorted(mine.keys() | theirs.keys()):
                if mine.get(name) != theirs.get(name):
                    state = "added" if name not in mine else "removed" if name not in theirs else "replaced"
                    return f"{kind} {name or '(model)'} {state}"
        return ""


def _add_to_existing_layers(model: Any, name: str, adapter: ParsedAdapter, config: Any) -> bool:
    """Add ``adapter`` to LoRA layers already in the model (an adapter, resident or unloaded since, put them
    there).

    transformers' ``load_adapter`` re-walks and re-matches every module of the
    model (~200 ms on SmolLM2) even when each target already is a LoRA layer;
    here each layer just gets the new adapter's tensors as its weights
    (peft's ``tied_adapter`` path, the new Linear modules made on the meta
    device so nothing is initialised only to be overwritten). Returns False,
    changing nothing, when some target is not a LoRA layer yet.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        path, _, rest = key.partition(".lora_")
        pairs.setdefault(path, {})["lora_A" if rest.startswith("A.") else "lora_B"] = tensor
    modules = dict(model.named_modules())
    layers = {path: modules.get(path) for path in pairs}
    if not all(isinstance(layers[p], LoraLayer) and len(pair) == 2 for p, pair in pairs.items()):
        return False
    if not getattr(model, "_hf_peft_config_loaded", False) or not hasattr(model, "peft_config"):
        # The last adapter was deleted: its LoRA wrappers stay in the model (empty), but transformers
        # forgot its PEFT state. Register it again, as its load_adapter would, and reuse the wrappers.
        model.peft_config = {}
        model._hf_peft_config_loaded = True
    with torch.device("meta"), _no_linear_init():
        for path, pair in pairs.items():
            layer: Any = layers[path]
            layer.update_layer(name, adapter.rank, config.lora_alpha, config, tied_adapter=pair)
    model.peft_config[name] = config
    return True


@contextmanager
def _no_linear_init() -> Iterator[None]:
    """nn.Linear without its random initialisation (~30 ms for 420 layers even on the meta device):
    the weights are replaced right away. Only the runtime worker creates modules, so the swap is safe."""
    import torch

    original = torch.nn.Linear.reset_parameters
    torch.nn.Linear.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters = original  # type: ignore[method-assign]


def pool_key(cube_id: str, digest: str) -> str:
    """What the pool keys a resident adapter by: the cube and the digest. Two cubes holding the same
    adapter bytes each get their own copy: nothing loaded for one cube is ever used for another."""
    return f"{cube_id}/{digest}"


def _name(key: str) -> str:
    return f"m_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class AdapterPool:
    """The adapters loaded into the model now: at most ``max_resident``, least recently used unloaded first."""

    def __init__(self, max_resident: int) -> None:
        self.max_resident = max_resident
        self._resident: OrderedDict[str, str] = OrderedDict()  # digest -> adapter name, oldest first
        self._active: str | None = None  # the adapter the model runs with now (None: the base model)
        self._layers: list[Any] = []  # the model's LoRA layers (peft BaseTunerLayer), set on load/unload
        self.loads = 0
        self.evictions = 0
        self.switches = 0
        self.switch_seconds = 0.0
        self.load_seconds = 0.0
        # Eviction order: None is least recently used; the scheduler installs a rank (the heat of the key's
        # cube) so the coldest cube's adapter is unloaded first.
        self.rank: Callable[[str], float] | None = None
        # Set when a load changed the base model: from then on every use() refuses (see _refuse_changed_model).
        self.broken = ""
        self._base: tuple[Any, BaseStructure] | None = None  # (the model, its structure before any load)

    def __contains__(self, digest: object) -> bool:
        return digest in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def resident(self) -> list[str]:
        return list(self._resident)

    def ensure(self, loaded: LoadedModel, adapter: ParsedAdapter, key: str = "") -> list[str]:
        """Make ``adapter`` resident under ``key`` (``pool_key``; its digest when empty), most recently used;
        returns the keys unloaded for room."""
        key = key or adapter.digest
        if key in self._resident:
            self._resident.move_to_end(key)
            return []
        dropped = []
        while len(self._resident) >= self.max_resident:
            victim = self._victim()
            self.unload(loaded, victim)
            dropped.append(victim)
        started = time.perf_counter()
        config = lora_config(adapter.settings)
        name = _name(key)
        model: Any = loaded.model
        # The file may hold float16/bfloat16 on the CPU: the LoRA layers run in the model's dtype on its device
        # (peft's tied_adapter path takes the tensors as they are).
        base = next(model.parameters())
        adapter = replace(adapter, tensors={k: v.to(device=base.device, dtype=base.dtype)
                                            for k, v in adapter.tensors.items()})
        before = self._base_structure(loaded)
        try:
            if not _add_to_existing_layers(model, name, adapter, config):
                # The first adapter on these modules: transformers' PEFT integration injects the LoRA layers.
                model.load_adapter(adapter_name=name, peft_config=config,
                                   adapter_state_dict=dict(adapter.tensors))
        finally:  # a load that failed half way is checked too
            self._refresh_layers(loaded)
            changed = before.difference(BaseStructure.of(model))
            if changed:
                self._refuse_changed_model(loaded, name, changed)
        self._resident[key] = name
        self.loads += 1
        self.load_seconds += time.perf_counter() - started
        return dropped

    def _base_structure(self, loaded: LoadedModel) -> BaseStructure:
        """The base model's structure, taken before the first load into this model (and kept: the pool
        checks every later load against the model as it was first seen)."""
        if self.broken:
            raise BaseModelChanged(self.broken)
        if self._base is None or self._base[0] is not loaded.model:
            self._base = (loaded.model, BaseStructure.of(loaded.model))
        return self._base[1]

    def _refuse_changed_model(self, loaded: LoadedModel, name: str, changed: str) -> None:
        """A load changed the base model (the allow-list should make this impossible): unload what can be
        unloaded and serve nothing more, rather than answer anyone with a corrupted model."""
        with suppress(Exception):  # the model is refused from now on anyway
            loaded.model.delete_adapter(name)
        self._refresh_layers(loaded)
        self.broken = (f"loading an adapter changed the base model ({changed}); memosd must be restarted to "
                       "serve the model again")
        log_event(log, "base_model_changed", level=logging.ERROR, change=changed)
        raise BaseModelChanged(self.broken)

    def _victim(self) -> str:
        """The least recently used adapter, or with ``rank`` set, the lowest ranked (ties: least recent)."""
        return coldest(self._resident, self.rank)

    def touch(self, digest: str) -> bool:
        """Mark a resident adapter as used; False if it is not resident."""
        if digest not in self._resident:
            return False
        self._resident.move_to_end(digest)
        return True

    def use(self, loaded: LoadedModel, digest: str | None) -> None:
        """Run the model with ``digest``'s adapter (which must be resident), or the base model for None.

        Sets each LoRA layer's active adapter and its on/off flag directly: the
        same two attributes peft's ``set_adapter`` and ``disable_adapter_layers``
        end up setting, without their walk over every module and their
        requires_grad bookkeeping (inference needs no gradients). ~0.6 ms
        instead of ~19 ms on SmolLM2 with 210 LoRA layers; the interleaving tests
        check the outputs.
        """
        if self.broken:
            raise BaseModelChanged(self.broken)
        want = None if digest is None else self._resident[digest]
        if want == self._active:
            return
        started = time.perf_counter()
        for layer in self._layers:
            layer._disable_adapters = want is None
            if want is not None:
                layer._active_adapter = [want]
        self._active = want
        self.switches += 1
        self.switch_seconds += time.perf_counter() - started

    def _refresh_layers(self, loaded: LoadedModel) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in loaded.model.modules() if isinstance(m, BaseTunerLayer)]
        self._active = "?"  # adding or removing an adapter may have changed the active one

    def invalidate(self, loaded: LoadedModel) -> None:
        """Someone else (a training step) changed the model's LoRA layers or which adapter runs:
        find the layers again and set the state afresh next time."""
        self._refresh_layers(loaded)

    def unload(self, loaded: LoadedModel, digest: str) -> bool:
        name = self._resident.pop(digest, None)
        if name is None:
            return False
        model: Any = loaded.model
        model.delete_adapter(name)
        self._refresh_layers(loaded)
        self.evictions += 1
        return True
