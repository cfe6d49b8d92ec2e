"""The client's public names: exactly what ``memosd_client`` and ``memosd_client.client`` export, that each is importable from
where the code and the docs import it, and that MountHandle's calls are the Client's, bound to the mount.

A name added, removed or moved fails here first, so a change of the public surface is a decision and not an
accident of a refactor.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import memosd_client
import memosd_client.client
import memosd_client.errors
import pytest
from memosd_client import Client, MountHandle
from memosd_client.client.mount import MountCall
from memosd_client.v1 import types_pb2

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PACKAGE = ROOT / "clients" / "python" / "memosd_client"
DOCS = [ROOT / "README.md", ROOT / "clients" / "python" / "README.md", ROOT / "docs" / "ARCHITECTURE.md"]

# What ``memosd_client`` re-exports of the client (the rest of memosd_client.__all__ is memosd_client.errors).
PACKAGE_CLIENT_NAMES = {
    "DEFAULT_TARGET", "NO_RETRY", "AdapterSource", "Client", "ConversationLike", "Deadlines", "DiffChanges",
    "Generation", "ItemLike", "MessageLike", "MountHandle", "RetryPolicy", "SearchResults", "TimeLike",
    "new_request_id", "parse_time", "to_timestamp",
}
PACKAGE_ERROR_NAMES = {
    "Aborted", "AdapterInvalid", "AdapterMismatch", "ArchiveInvalid", "AdapterNotFound", "AdapterTooLarge", "AlreadyExists",
    "Cancelled", "ClusterUnavailable", "CommitConflict", "ContextExceeded", "CubeEmpty", "CubeFrozen", "CubeNameTaken", "CubeNotFound", "CubeUnavailable", "CubeMoving", "MoveRefused",
    "DataLoss", "ExtractionInProgress", "DeadlineExceeded", "FailedPrecondition", "Internal", "InternalError", "InvalidArgument",
    "InvalidField", "InvalidPageToken", "ItemNotFound", "JobFinished", "JobNotFound", "MalformedRequest",
    "MemosError", "ModelUnavailable", "MountNotFound", "MountReadOnly", "NotFound", "OutOfRange",
    "PermissionDenied", "PoolTooSmall", "RequestIdReused", "ResourceExhausted", "RevisionCompacted",
    "RevisionNotFound", "ShuttingDown", "StagingFull", "TextEmpty", "TextTooLarge", "TooManyItems",
    "TrainingInProgress", "Unauthenticated", "Unavailable", "Unimplemented", "Unknown", "from_rpc_error",
}
# memosd_client.client's own: all of the above, and what the CLI and the tests take from it.
CLIENT_NAMES = PACKAGE_CLIENT_NAMES | {
    "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "DEFAULT_INGEST_BATCH", "DEFAULT_MAX_TOKENS",
    "JOB_TERMINAL_STATES", "MAX_MESSAGE_BYTES", "RIGHTS", "adapter_digest", "load_adapter_dir",
}
# The Client's calls on a mount that a MountHandle carries, bound to itself.
BOUND_CALLS = {
    "write", "write_many", "read", "iter_items", "forget", "search", "ingest", "ingest_many", "commit",
    "activate", "import_adapter", "export_adapter", "train", "extract",
}


def test_package_exports_exactly_the_client_and_error_names() -> None:
    assert set(memosd_client.__all__) == PACKAGE_CLIENT_NAMES | PACKAGE_ERROR_NAMES
    assert len(memosd_client.__all__) == len(set(memosd_client.__all__))


def test_package_client_exports_exactly_its_names() -> None:
    assert set(memosd_client.client.__all__) == CLIENT_NAMES
    assert len(memosd_client.client.__all__) == len(set(memosd_client.client.__all__))


@pytest.mark.parametrize("name", sorted(PACKAGE_CLIENT_NAMES))
def test_package_reexports_the_client_objects_themselves(name: str) -> None:
    assert getattr(memosd_client, name) is getattr(memosd_client.client, name)


@pytest.mark.parametrize("name", sorted(PACKAGE_ERROR_NAMES))
def test_package_reexports_the_error_objects_themselves(name: str) -> None:
    assert getattr(memosd_client, name) is getattr(memosd_client.errors, name)


@pytest.mark.parametrize("name", sorted(CLIENT_NAMES))
def test_each_client_name_is_defined_in_one_of_its_modules(name: str) -> None:
    value = getattr(memosd_client.client, name)
    module = getattr(value, "__module__", None)
    # Constants and type aliases carry no module of their own; classes and functions name theirs.
    if inspect.isclass(value) or inspect.isfunction(value):
        assert module is not None and module.startswith("memosd_client.client."), module


def _imports_of(tree: ast.AST, module_prefix: str) -> set[tuple[str, str]]:
    return {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module is not None and node.module.startswith(module_prefix) for alias in node.names}


def test_every_name_the_cli_imports_from_the_client_is_exported() -> None:
    imported: set[tuple[str, str]] = set()
    for path in sorted((CLIENT_PACKAGE / "cli").glob("*.py")):
        imported |= _imports_of(ast.parse(path.read_text()), "memosd_client")
    from_client = {name for module, name in imported if module == "memosd_client.client"}
    assert from_client, "the CLI imports nothing from memosd_client.client: this test reads the wrong files"
    assert from_client <= set(memosd_client.client.__all__)
    # The CLI's imports of the client's submodules (if any) still resolve too.
    for module, name in imported:
        if module.startswith("memosd_client.client."):
            assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


def test_every_name_the_docs_import_or_name_exists() -> None:
    imports: set[tuple[str, str]] = set()
    dotted: set[str] = set()
    for doc in DOCS:
        text = doc.read_text()
        for module, names in re.findall(r"^from (memosd_client(?:\.\w+)*) import ([\w, ]+)$", text, re.MULTILINE):
            imports |= {(module, name.strip()) for name in names.split(",")}
        dotted |= set(re.findall(r"\bmemosd_client\.([A-Z]\w*)", text))
    assert ("memosd_client", "Client") in imports and "Client" in dotted, "the docs' examples were not found"
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"
    assert {name for name in dotted if not hasattr(memosd_client, name)} == set()


def test_mount_handle_binds_exactly_the_calls_on_a_mount() -> None:
    bound = {name for name, value in vars(MountHandle).items() if isinstance(value, MountCall)}
    assert bound == BOUND_CALLS


@pytest.mark.parametrize("name", sorted(BOUND_CALLS))
def test_a_bound_call_has_the_client_signature_less_the_mount(name: str) -> None:
    method = getattr(Client, name)
    handle = MountHandle(Client("127.0.0.1:1"), types_pb2.Mount(mount_id="mnt_1"))
    call = getattr(handle, name)
    client_params = list(inspect.signature(method).parameters.values())
    # The parameter the handle fills is the mount, and takes a MountHandle (annotations are strings here).
    assert client_params[0].name == "self" and client_params[1].name.startswith("mount")
    assert "MountHandle" in str(client_params[1].annotation)
    assert inspect.signature(call) == inspect.signature(method).replace(parameters=client_params[2:])
    assert (call.__name__, call.__qualname__, call.__doc__) == (name, f"MountHandle.{name}", method.__doc__)
    handle.client.close()


# -- the deprecated import name ``memos``: the same modules, a warning once ---------------------------------

SHIM_PROBE = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import memos
    from memos import Client
    import memos.errors, memos.v1.memos_pb2, memos.cli.main
    import memos.client
import memosd_client, memosd_client.errors, memosd_client.v1.memos_pb2, memosd_client.cli.main
deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and "memosd_client" in str(w.message)]
assert len(deprecations) == 1, [str(w.message) for w in caught]
assert deprecations[0].filename == "<string>", deprecations[0].filename  # the importer's line, not the shim's
assert Client is memosd_client.Client
assert memos.errors is memosd_client.errors and memos.cli.main is memosd_client.cli.main
assert memos.v1.memos_pb2 is memosd_client.v1.memos_pb2  # one descriptor registration, not two
assert sorted(memos.__all__) == sorted(memosd_client.__all__)
print("ok")
"""


def test_memos_is_a_deprecated_alias_serving_the_same_module_objects() -> None:
    # A fresh interpreter: in this one memos may already be imported (and its warning spent) by others.
    done = subprocess.run([sys.executable, "-c", SHIM_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_python_dash_m_memos_cli_still_runs_memosctl() -> None:
    done = subprocess.run([sys.executable, "-m", "memos.cli.main", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
