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
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memosd.runtime.eviction import coldest

if TYPE_CHECKING:
    import torch

    from memosd.runtime.model import LoadedModel

_PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the keys


class AdapterError(ValueError):
    """Base of what this module refuses."""


class AdapterInvalid(AdapterError):
    """The files are not a readable peft LoRA adapter (truncated, corrupt, wrong kind)."""


class AdapterMismatch(AdapterError):
    """The adapter is a LoRA adapter, but not for this model (modules, shapes, base model)."""


def adapter_digest(config: bytes, weights: bytes) -> str:
    """sha256 over the config bytes, then the weights bytes (64 hex): what clients compute too."""
    h = hashlib.sha256(config)
    h.update(weights)
    return h.hexdigest()


@dataclass(frozen=True)
class ParsedAdapter:
    digest: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)  # keys without the PeftModel prefix
    rank: int
    target_modules: list[str]
    base_model: str


def parse_adapter(config: bytes, weights: bytes) -> ParsedAdapter:
    """Read the two files of a peft LoRA adapter. Raises ``AdapterInvalid``."""
    from safetensors.torch import load

    try:
        cfg = json.loads(config)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterInvalid(f"adapter_config.json is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterInvalid("adapter_config.json must be a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterInvalid(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterInvalid(f"adapter_config.json has r = {rank!r}; expected a positive integer")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterInvalid("adapter_config.json needs target_modules: a list of module names")
    try:
        raw = load(weights)
    except Exception as e:  # safetensors raises its own untyped errors
        raise AdapterInvalid(f"adapter_model.safetensors is unreadable (truncated or corrupt?): {e}") from None
    tensors = {k.removeprefix(_PEFT_PREFIX): v for k, v in raw.items()}
    lora = [k for k in tensors if ".lora_A." in k or ".lora_B." in k]
    if not lora or len(lora) != len(tensors):
        raise AdapterInvalid("adapter_model.safetensors must hold LoRA weights only (*.lora_A.weight, "
                             "*.lora_B.weight)")
    return ParsedAdapter(adapter_digest(config, weights), cfg, tensors, rank, sorted(targets),
                         str(cfg.get("base_model_name_or_path") or ""))


def check_fits(loaded: LoadedModel, adapter: ParsedAdapter) -> None:
    """Refuse an adapter made for another model, naming the mismatch. Raises ``AdapterMismatch``."""
    if adapter.base_model:
        made_for = adapter.base_model.rstrip("/").rsplit("/", 1)[-1]
        if made_for.lower() != loaded.name.lower():
            raise AdapterMismatch(f"the adapter was made for base model {adapter.base_model!r}; the runtime "
                                  f"runs {loaded.name!r}")
    modules = dict(loaded.model.named_modules())
    names = [n for n in modules if n]
    for target in adapter.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise AdapterMismatch(f"the adapter targets module {target!r}, which {loaded.name} does not have")
    for key, tensor in adapter.tensors.items():
        path, _, rest = key.partition(".lora_")
        module = modules.get(path)
        if module is None:
            raise AdapterMismatch(f"the adapter has weights for {path!r}, which {loaded.name} does not have")
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if in_features is None or out_features is None:
            raise AdapterMismatch(f"{path!r} in {loaded.name} is not a linear layer; LoRA cannot adapt it")
        want = (adapter.rank, in_features) if rest.startswith("A.") else (out_features, adapter.rank)
        if tuple(tensor.shape) != want:
            raise AdapterMismatch(f"{key} has shape {tuple(tensor.shape)}; {loaded.name} needs {want} "
                                  f"(rank {adapter.rank})")


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
        from peft import LoraConfig

        dropped = []
        while len(self._resident) >= self.max_resident:
            victim = self._victim()
            self.unload(loaded, victim)
            dropped.append(victim)
        started = time.perf_counter()
        known = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in adapter.config.items() if k in known and k != "peft_type"})
        config.inference_mode = True
        # The weights come from the file: no initialisation. (peft's default, True, would zero
        # lora_B in update_layer, over the tensors handed to it: the adapter would do nothing.)
        config.init_lora_weights = False
        name = _name(key)
        model: Any = loaded.model
        if not _add_to_existing_layers(model, name, adapter, config):
            # The first adapter on these modules: transformers' PEFT integration injects the LoRA layers.
            model.load_adapter(adapter_name=name, peft_config=config, adapter_state_dict=dict(adapter.tensors))
        self._resident[key] = name
        self._refresh_layers(loaded)
        self.loads += 1
        self.load_seconds += time.perf_counter() - started
        return dropped

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
