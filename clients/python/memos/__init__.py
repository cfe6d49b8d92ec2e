"""Deprecated import name of memosd's Python client: use ``memosd_client``.

``memos`` is also the import name of an unrelated package on PyPI, so the client moved to
``memosd_client`` (same modules, same classes). ``import memos`` and every ``memos.<module>`` keep working
for a deprecation period: this package warns once (DeprecationWarning) and then serves each
``memos.X`` as the very module object ``memosd_client.X``, not a copy. A copy would break ``isinstance``
against the client's error classes, monkeypatching, and above all the generated protobuf modules, whose
descriptors may be registered only once per process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import CodeType, ModuleType
from typing import TYPE_CHECKING

import memosd_client

if TYPE_CHECKING:
    from memosd_client import *  # noqa: F403  (what type checkers see: the same names)

_OLD = __name__
_NEW = "memosd_client"

warnings.warn(
    "the 'memos' import name is deprecated and will be removed: use 'memosd_client' "
    "(e.g. 'from memosd_client import Client'); 'memos' is also an unrelated package on PyPI",
    DeprecationWarning,
    stacklevel=2,
)


class _AliasLoader(importlib.abc.Loader):
    """Hands out memosd_client.X for memos.X; importlib then keeps that module as it is (its name and
    spec stay memosd_client's) and only records it under the old name too."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(_NEW + spec.name[len(_OLD):])

    def exec_module(self, module: ModuleType) -> None:
        """Already executed by its own import."""

    def get_code(self, fullname: str) -> CodeType | None:
        """For ``python -m memos.cli.main`` (runpy runs the module's code as __main__)."""
        real = importlib.util.find_spec(_NEW + fullname[len(_OLD):])
        loader = real.loader if real is not None else None
        return loader.get_code(real.name) if isinstance(loader, importlib.abc.InspectLoader) and real else None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_OLD + "."):
            return None
        real = importlib.util.find_spec(_NEW + fullname[len(_OLD):])
        if real is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(),
                                              is_package=real.submodule_search_locations is not None)


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def __getattr__(name: str) -> object:
    """``memos.Client`` and every other name of memosd_client, looked up there."""
    try:
        return getattr(memosd_client, name)
    except AttributeError:
        raise AttributeError(f"module {_OLD!r} has no attribute {name!r}") from None


__all__ = list(getattr(memosd_client, "__all__", []))
