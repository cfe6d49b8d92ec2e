"""The daemon's layering, checked on the source: every import of every module under memosd/.

The rules (each has its own test below, and each is shown to fail on a planted
violation in a tiny synthetic package, ``test_each_rule_catches_a_planted_violation``):

(a) no import cycle between modules;
(b) no arrow back up the layer order of ``LAYERS`` (a module imports only from
    its own layer or below), and every module has a layer;
(c) grpc, google.rpc / google.protobuf and the generated ``memosd_client.v1`` (the
    client package ``memosd_client`` too, and its deprecated alias ``memos``) only in syscalls/ and the wiring (daemon.py);
(d) torch and its API (transformers, peft, safetensors.torch,
    sentence-transformers, accelerate) only in runtime/ and index/embedder.py + bert.py;
(e) kernel internals only inside kernel/: ``kernel.cubes`` / ``.mounts`` /
    ``.store`` reached through a Kernel, the insides of a ``CubeState`` /
    ``MountState`` handle (catalog, staging, purge marks, its lock), and the
    part modules kernel.py is split into (import the facade instead).

Every import counts, wherever it is written: at the top, inside a function (a
lazy import is still a dependency) or under ``if TYPE_CHECKING:`` (a type-only
arrow back up is still an arrow). One exception, for rule (a) only: an import
under ``if TYPE_CHECKING:`` is never executed, so it cannot make an import
cycle; a part module of the kernel naming the ``Kernel`` it is handed (a
parameter's type) is the one use, and it keeps the part a plain function of
the kernel instead of a second owner of its state.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "memosd"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# The layer order, top to bottom; a module may import only from its own layer or below. Entries are
# module names relative to the package ("__init__" is the package itself); a module belongs to the entry
# that is its longest prefix. docs/ARCHITECTURE.md (Layers) links here.
LAYERS: dict[str, tuple[str, ...]] = {
    # The wiring: builds every part and starts it (config -> store -> kernel -> host -> gate -> server);
    # the event loop thread, the /metrics endpoint and systemd notification serve only it.
    "wiring": ("daemon", "__main__", "eventloop", "metrics", "sdnotify"),
    # The syscall line: gRPC, the generated protobuf, the gate (auth, rights, audit, error mapping),
    # wire shape (convert*.py) and the adapter streams. Nothing below sees a protobuf message.
    "syscalls": ("syscalls",),
    # The use cases that span subsystems, in plain values: FreeCube's cleanup, erasure (Purge and the
    # lifecycle loop's purge), the lifecycle loop, Stats. Only syscalls/ and the wiring import them.
    "services": ("services",),
    # Memory as KV caches: Activate, Evict, Generate, the scheduler.
    "activation": ("activation",),
    # Memory as LoRA adapters: import/export of plain files, residency, training jobs.
    "parametric": ("parametric",),
    # The MemReader's pure core: the extraction prompt, strict parsing, the support check, reconcile
    # planning (conversation turns -> derived memory items); its job runs in parametric/jobs.py.
    "reader": ("reader",),
    # The cluster's shared state in etcd (membership, the cube directory, placement), over HTTP: it may
    # use the kernel's plain values and the leaves, never the wire (etcd's JSON gateway, not grpc).
    "cluster": ("cluster",),
    # The kernel (cubes, mounts, commits, search, validation of every semantic bound) and governance
    # (principals, access control, audit), side by side.
    "kernel": ("kernel", "governance"),
    # What the kernel and the model work run on: RocksDB, the indexes, and the torch runtime (the worker
    # thread, the model, KV caches, adapters, training, token-level rendering, ModelHost).
    "storage": ("store", "index", "runtime"),
    # Shared leaves: errors, config, small helpers anyone may use.
    "leaves": ("__init__", "errors", "config", "config_toml", "fsutil", "listen_check", "logfmt", "park", "periodic", "offline"),
}

WIRE = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.rpc", "google.protobuf", "memosd_client", "memos")
WIRE_ALLOWED = ("syscalls", "daemon")

TORCH = ("torch", "transformers", "peft", "safetensors.torch", "sentence_transformers", "accelerate")
TORCH_ALLOWED = ("runtime", "index.embedder", "index.bert")

# Rule (e): what only kernel/ may touch. KERNEL_ATTRS are the kernel's own tables, reached through an
# expression ending in "kernel" (self.kernel.cubes, rig.kernel.store). CubeState and MountState are the
# handles the facade hands out (Kernel.cube, Kernel.mount_state) and may be named as types, imported from
# the facade; STATE_ATTRS are their insides (the catalog, staging, purge marks), which only kernel/ reads,
# and a handle's lock is reached only through Kernel.write_unless_gone. The private modules are the parts
# kernel.py is split into: kernel.py is their only importer outside the parts themselves.
KERNEL_ATTRS = frozenset({"cubes", "mounts", "store"})
STATE_ATTRS = frozenset({"catalog", "freed", "purged", "purging", "index_dirty", "staging"})  # MountInfo has its own staged_adapter
HANDLE_LOCK_OWNERS = ("cube", "mount")  # x.lock where x names a cube or a mount
KERNEL_PRIVATE_MODULES = ("kernel.table", "kernel.state", "kernel.indexes", "kernel.cubes", "kernel.staging",
                          "kernel.revisions", "kernel.item_states", "kernel.reads", "kernel.compact",
                          "kernel.purge", "kernel.checks", "kernel.clock", "kernel.totals")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, relative to the package ("kernel.kernel")
    line: int
    target: str  # the absolute module (or name) imported: "memosd.kernel.state", "torch.nn"
    names: tuple[str, ...]  # for "from x import a, b": ("a", "b")
    type_only: bool  # under ``if TYPE_CHECKING:``
    text: str  # as it would be written, absolute: "from memosd.kernel.state import CubeState"


@dataclass(frozen=True)
class Finding:
    module: str
    line: int
    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what} ({self.why})"


@dataclass
class Scan:
    package: str
    modules: dict[str, ast.Module]  # relative name -> parsed source
    imports: list[Import]

    def internal(self, target: str) -> str | None:
        """The module of ours an import target is (its longest prefix among our modules), or None."""
        prefix = self.package + "."
        if target == self.package:
            return "__init__"
        if not target.startswith(prefix):
            return None
        parts = target[len(prefix):].split(".")
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if name in self.modules:
                return name
        return "__init__"


def scan(root: Path, package: str) -> Scan:
    modules: dict[str, ast.Module] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts) or "__init__"
        modules[name] = ast.parse(path.read_text(), filename=str(path))
    result = Scan(package, modules, [])
    for name, tree in modules.items():
        is_package = name == "__init__" or (root / name.replace(".", "/") / "__init__.py").exists()
        result.imports.extend(_imports(result, name, tree, is_package))
    return result


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node, with whether it sits in the body of an ``if TYPE_CHECKING:``."""
    yield node, type_only
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _walk(child, True)
        for child in node.orelse:
            yield from _walk(child, type_only)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, type_only)


def _imports(result: Scan, name: str, tree: ast.Module, is_package: bool) -> Iterator[Import]:
    own = [] if name == "__init__" else name.split(".")
    here = [result.package, *(own if is_package else own[:-1])]  # the package a relative import starts from
    for node, type_only in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, node.lineno, alias.name, (), type_only, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                start = here[: len(here) - (node.level - 1)]
                base = ".".join([*start, *([base] if base else [])])
            names = tuple(alias.name for alias in node.names)
            for alias_name in names:
                full = f"{base}.{alias_name}"
                # "from memosd.kernel import ids" imports the module memosd.kernel.ids; "from
                # memosd.kernel.kernel import Kernel" a name of the module memosd.kernel.kernel.
                target = full if result.internal(full) == full.removeprefix(result.package + ".") else base
                yield Import(name, node.lineno, target, (alias_name,), type_only,
                             f"from {base} import {alias_name}")


def layer_of(module: str) -> int | None:
    """The index of the module's layer in LAYERS (0 = top), by its longest matching entry."""
    best: tuple[int, int] | None = None  # (entry length, layer index)
    for index, entries in enumerate(LAYERS.values()):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def _in(module: str, places: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in places)


def _matches(imp: Import, roots: Iterable[str]) -> bool:
    # "from safetensors import torch" imports safetensors.torch: the names count as well as the module.
    targets = [imp.target, *(f"{imp.target}.{name}" for name in imp.names)]
    return any(t == r or t.startswith(r + ".") for t in targets for r in roots)


# -- the rules ---------------------------------------------------------------------------------------------

def cycles(result: Scan) -> list[list[str]]:
    """Every import cycle (rule a), one per strongly connected group of modules, as a path that closes."""
    graph: dict[str, set[str]] = {m: set() for m in result.modules}
    for imp in result.imports:
        target = result.internal(imp.target)
        if target is not None and not imp.type_only and target != imp.module:
            graph[imp.module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(min(group), group, graph) for group in groups]


def _cycle_through(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside ``group`` (one exists: it is strongly connected)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def unplaced(result: Scan) -> list[str]:
    return sorted(m for m in result.modules if layer_of(m) is None)


def upward_arrows(result: Scan) -> list[Finding]:
    """Imports of a module in a higher layer than the importer's (rule b), type-only ones included."""
    names = list(LAYERS)
    found = []
    for imp in result.imports:
        target = result.internal(imp.target)
        if target is None:
            continue
        mine, theirs = layer_of(imp.module), layer_of(target)
        if mine is not None and theirs is not None and theirs < mine:
            found.append(Finding(imp.module, imp.line, imp.text,
                                 f"{names[mine]} imports {names[theirs]}, a layer above it"))
    return found


def wire_outside_syscalls(result: Scan) -> list[Finding]:
    """grpc / google.rpc / memosd_client.v1 imported outside syscalls/ and the wiring (rule c)."""
    return [Finding(imp.module, imp.line, imp.text, "the wire stays in syscalls/")
            for imp in result.imports if _matches(imp, WIRE) and not _in(imp.module, WIRE_ALLOWED)]


def vllm_outside_its_engine(result: Scan) -> list[Finding]:
    """vllm imported anywhere but runtime/vllm_*.py (rule d: the engine is one room's business)."""
    return [Finding(imp.module, imp.line, imp.text, "vllm stays in runtime/vllm_*.py")
            for imp in result.imports
            if _matches(imp, ("vllm",)) and not imp.module.startswith("runtime.vllm_")]


def torch_outside_runtime(result: Scan) -> list[Finding]:
    """torch or its API imported outside runtime/, the embedder (index/embedder.py, bert.py) (rule d)."""
    return [Finding(imp.module, imp.line, imp.text, "torch stays in runtime/")
            for imp in result.imports
            if _matches(imp, TORCH) and not _in(imp.module, TORCH_ALLOWED)]


def kernel_internals_outside(result: Scan) -> list[Finding]:
    """Kernel internals used outside kernel/ (rule e): its tables reached through a kernel, a handle's
    insides, its part modules."""
    prefix = result.package + "."
    private = {prefix + m for m in KERNEL_PRIVATE_MODULES}
    found = []
    for imp in result.imports:
        if not _in(imp.module, ("kernel",)) and imp.target in private:
            found.append(Finding(imp.module, imp.line, imp.text, "import the facade (kernel.kernel) instead"))
    for module, tree in result.modules.items():
        if _in(module, ("kernel",)):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            if ((node.attr in KERNEL_ATTRS and _names_a_kernel(node.value)) or node.attr in STATE_ATTRS
                    or (node.attr == "lock" and _names_one_of(node.value, HANDLE_LOCK_OWNERS))):
                found.append(Finding(module, node.lineno, ast.unparse(node), "kernel internals stay in kernel/"))
    return found


def _names_one_of(node: ast.expr, suffixes: tuple[str, ...]) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_").endswith(suffixes)


def _names_a_kernel(node: ast.expr) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_").endswith("kernel")


# -- the tests on memosd -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def memosd() -> Scan:
    return scan(ROOT, PACKAGE)


def test_no_import_cycles(memosd: Scan) -> None:
    found = cycles(memosd)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_module_has_a_layer(memosd: Scan) -> None:
    assert not unplaced(memosd), f"modules in no layer (add them to LAYERS): {unplaced(memosd)}"


def test_no_arrow_runs_back_up(memosd: Scan) -> None:
    found = upward_arrows(memosd)
    assert not found, "imports back up the layers:\n" + "\n".join(map(str, found))


def test_grpc_and_the_protobuf_stay_in_syscalls(memosd: Scan) -> None:
    found = wire_outside_syscalls(memosd)
    assert not found, "the wire outside syscalls/:\n" + "\n".join(map(str, found))


def test_torch_stays_in_the_runtime(memosd: Scan) -> None:
    found = torch_outside_runtime(memosd)
    assert not found, "torch outside runtime/:\n" + "\n".join(map(str, found))


def test_vllm_stays_in_the_engine(memosd: Scan) -> None:
    found = vllm_outside_its_engine(memosd)
    assert not found, "vllm outside runtime/vllm_*.py:\n" + "\n".join(map(str, found))


def test_kernel_internals_stay_in_the_kernel(memosd: Scan) -> None:
    found = kernel_internals_outside(memosd)
    assert not found, "kernel internals outside kernel/:\n" + "\n".join(map(str, found))


# -- each rule fails on a planted violation --------------------------------------------------------------

PLANTED = {
    "__init__.py": "",
    "errors.py": "",
    "daemon.py": "import grpc\nfrom pkg.syscalls import gate\n",  # the wiring may import grpc
    "syscalls/__init__.py": "",
    "syscalls/gate.py": "import grpc\nfrom memosd_client.v1 import memos_pb2\nfrom pkg.kernel import core\n",
    "kernel/__init__.py": "",
    "kernel/core.py": "from pkg.kernel import part\nfrom pkg.errors import *\nfrom pkg.kernel.state import CubeState\n",
    "kernel/part.py": "from . import core\n",  # (a) core -> part -> core
    "kernel/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.kernel.core import X\n",
    "kernel/state.py": "class CubeState: ...\n",
    "kernel/wire.py": "from google.rpc import status_pb2\n",  # (c)
    "store/__init__.py": "",
    "store/rows.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..kernel import core\n",  # (b)
    "runtime/__init__.py": "",
    "runtime/model.py": "import torch\nfrom safetensors.torch import save\n",  # allowed
    "runtime/vllm_engine.py": "def f():\n    from vllm import LLMEngine\n",  # allowed
    "runtime/host.py": "from vllm.config import KVTransferConfig\n",  # (d): vllm outside vllm_*.py
    "activation/__init__.py": "",
    "activation/generator.py": "import torch\n",  # (d)
    "activation/helper.py": "def f():\n    from transformers import AutoTokenizer\n",  # (d), lazily
    "parametric/__init__.py": "",
    "parametric/jobs.py": (  # (e), five ways; and (b): parametric imports activation
        "from pkg.kernel.state import CubeState\nfrom pkg.activation import helper\n"
        "from pkg.kernel.kernel import MountState\n"  # the facade's handle type: allowed
        "def f(self, cube):\n    return self.kernel.cubes, self._kernel.store, cube.catalog, cube.lock\n"
    ),
    "stray.py": "",  # in no layer
}


def test_each_rule_catches_a_planted_violation(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    for rel, source in PLANTED.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    planted = scan(root, "pkg")

    assert cycles(planted) == [["kernel.core", "kernel.part", "kernel.core"]]  # typed.py's import is no cycle
    assert unplaced(planted) == ["stray"]
    assert {(f.module, f.what) for f in upward_arrows(planted)} == {
        ("store.rows", "from pkg.kernel import core"),
        ("parametric.jobs", "from pkg.activation import helper"),
    }
    assert {(f.module, f.what) for f in wire_outside_syscalls(planted)} == {
        ("kernel.wire", "from google.rpc import status_pb2"),
    }
    assert {(f.module, f.what) for f in torch_outside_runtime(planted)} == {
        ("activation.generator", "import torch"),
        ("activation.helper", "from transformers import AutoTokenizer"),
    }
    assert {(f.module, f.what) for f in vllm_outside_its_engine(planted)} == {
        ("runtime.host", "from vllm.config import KVTransferConfig"),
    }
    assert {(f.module, f.what) for f in kernel_internals_outside(planted)} == {
        ("parametric.jobs", "from pkg.kernel.state import CubeState"),
        ("parametric.jobs", "self.kernel.cubes"),
        ("parametric.jobs", "self._kernel.store"),
        ("parametric.jobs", "cube.catalog"),
        ("parametric.jobs", "cube.lock"),
    }
