"""The services layer's place (memosd/services/__init__.py): plain values below the gRPC layer, and used
only by syscalls/ and daemon.py. Read from the imports in the source, so a new module is checked too."""

from __future__ import annotations

import ast
from pathlib import Path

import memosd

PACKAGE = Path(memosd.__file__).parent
WIRE = ("grpc", "google.protobuf", "memos.v1")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as a.b and a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def test_services_import_nothing_of_grpc_or_protobuf() -> None:
    modules = sorted((PACKAGE / "services").glob("*.py"))
    assert modules, "memosd/services/ has no modules"
    wired = {m.name: sorted(n for n in _imports(m) if any(_is_under(n, w) for w in WIRE)) for m in modules}
    assert wired == {m.name: [] for m in modules}


def test_only_syscalls_and_the_daemon_import_services() -> None:
    allowed = {PACKAGE / "daemon.py"}
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if path.parent.name not in ("services", "syscalls") and path not in allowed
                   and any(_is_under(n, "memosd.services") for n in _imports(path)))
    assert users == []
