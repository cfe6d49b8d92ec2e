"""``MountHandle``: an open mount, with the Client's calls on a mount bound to it.

Each of those calls is written once, on :class:`~memosd_client.client.client.Client`, taking the mount as its first
argument (an id or a handle). The handle does not repeat them: :class:`MountCall` turns ``Client.write``
into ``handle.write``, the same call with the mount filled in. Its type is the Client method's less its
first two parameters (through ``ParamSpec``/``Concatenate``), so mypy checks ``handle.write(...)`` against
``Client.write``'s own signature, and a parameter added there is at once on the handle too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Concatenate, Generic, ParamSpec, TypeVar, overload

from memosd_client.client.client import Client
from memosd_client.errors import MountNotFound
from memosd_client.v1 import types_pb2

_P = ParamSpec("_P")
_R = TypeVar("_R")


class MountCall(Generic[_P, _R]):
    """``Client.method`` read from a MountHandle: the call with the handle's client and the handle first.

    The Client refreshes the handle's ``info`` from each response that carries the mount, so the bound
    call needs nothing of its own. Read from the class, it is this descriptor (for introspection)."""

    def __init__(self, method: Callable[Concatenate[Client, MountHandle, _P], _R]) -> None:
        self.method = method
        self.name = method.__name__
        self.__doc__ = method.__doc__
        # What inspect and help() show for the bound call: the method's parameters after self and the mount.
        signature = inspect.signature(method)
        self.signature = signature.replace(parameters=list(signature.parameters.values())[2:])

    def __set_name__(self, owner: type[MountHandle], name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<MountHandle.{self.name}: Client.{self.method.__name__} on the handle's mount>"

    @overload
    def __get__(self, handle: None, owner: type[MountHandle] | None = None) -> MountCall[_P, _R]: ...

    @overload
    def __get__(self, handle: MountHandle, owner: type[MountHandle] | None = None) -> Callable[_P, _R]: ...

    def __get__(
        self, handle: MountHandle | None, owner: type[MountHandle] | None = None
    ) -> MountCall[_P, _R] | Callable[_P, _R]:
        if handle is None:
            return self
        method = self.method

        @functools.wraps(method)
        def bound(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            return method(handle.client, handle, *args, **kwargs)

        bound.__qualname__ = f"MountHandle.{self.name}"
        # Set, not unwrapped: inspect.signature would otherwise follow __wrapped__ to the Client method.
        bound.__signature__ = self.signature  # type: ignore[attr-defined]  # functions take any attribute
        return bound


class MountHandle:
    """An open mount, with the item and history calls bound to it.

    ``info`` is the Mount message, refreshed from each response that carries it
    (staging counts; the base revision after a commit). As a context manager it
    unmounts on exit, discarding whatever is still staged. Its ``write``,
    ``search``, ``commit``... are the Client's, with this mount as the first
    argument: see :class:`~memosd_client.client.client.Client` for each.
    """

    def __init__(self, client: Client, info: types_pb2.Mount) -> None:
        self.client = client
        self.info = info

    @property
    def mount_id(self) -> str:
        return self.info.mount_id

    @property
    def cube_id(self) -> str:
        return self.info.cube_id

    @property
    def base_revision(self) -> int:
        return self.info.base_revision

    def __repr__(self) -> str:
        return f"MountHandle(mount_id={self.mount_id!r}, cube_id={self.cube_id!r}, base={self.base_revision})"

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()

    def unmount(self) -> int:
        """Close the mount; returns the number of staged changes discarded (0 if already closed)."""
        try:
            discarded: int = self.client.unmount(self.mount_id).discarded_changes
        except MountNotFound:
            return 0
        return discarded

    # Items.
    write = MountCall(Client.write)
    write_many = MountCall(Client.write_many)
    read = MountCall(Client.read)
    iter_items = MountCall(Client.iter_items)
    forget = MountCall(Client.forget)
    search = MountCall(Client.search)
    ingest = MountCall(Client.ingest)
    ingest_many = MountCall(Client.ingest_many)
    # History.
    commit = MountCall(Client.commit)
    # Activation and parametric memory.
    activate = MountCall(Client.activate)
    import_adapter = MountCall(Client.import_adapter)
    export_adapter = MountCall(Client.export_adapter)
    train = MountCall(Client.train)
    extract = MountCall(Client.extract)

