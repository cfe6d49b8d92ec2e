"""The syscall layer's error mapping, with a stand-in kernel (a unit test of one layer)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from memos import Client, CubeNotFound, InternalError

from memosd.errors import CubeNotFound as DomainCubeNotFound
from memosd.errors import CubeUnavailable, MemosError, RevisionNotFound
from memosd.eventloop import EventLoopThread
from memosd.governance.access import AccessControl
from memosd.governance.audit import AuditLog
from memosd.governance.principals import Principals
from memosd.store.rocks import Store
from memosd.syscalls.errors import from_rpc_error, to_status
from memosd.syscalls.gate import Gate
from memosd.syscalls.registry import generic_handler
from memosd.syscalls.servicer import MemOSServicer


class ExplodingKernel:
    store: Store
    cubes: dict[str, Any] = {}  # noqa: RUF012

    def alloc_cube(self, *args: Any) -> Any:
        raise RuntimeError("disk path /secret/internal/detail exploded")

    def cube_info(self, cube: Any) -> Any:
        raise AssertionError("unreachable: cube() raises first")

    def cube(self, ref: str) -> Any:
        raise DomainCubeNotFound(f"no cube with id or name {ref!r}", cube=ref)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    loop = EventLoopThread()
    kernel = ExplodingKernel()
    kernel.store = Store(tmp_path / "store")
    principals = Principals(kernel.store)
    gate = Gate(principals, AccessControl(kernel, principals), AuditLog(kernel.store), None,  # type: ignore[arg-type]
                auth=False)
    servicer = MemOSServicer(kernel, None, None, None, None, None, lambda: None, gate)  # type: ignore[arg-type]

    async def make() -> tuple[grpc.aio.Server, int]:  # the daemon's server: asyncio, made on its loop
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((generic_handler(servicer),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.call(make())
    with Client(f"127.0.0.1:{port}", timeout=10) as c:
        yield c
    loop.call(server.stop(0))
    gate.close()
    loop.close()


def test_unexpected_exception_is_internal_logged_and_not_leaked(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="memosd.syscalls"), pytest.raises(InternalError) as caught:
        client.alloc_cube("x")
    error = caught.value
    assert error.code == grpc.StatusCode.INTERNAL and error.reason == "INTERNAL_ERROR"
    assert "secret" not in error.message and "exploded" not in error.message
    ref = error.metadata["ref"]
    assert ref in error.message
    logged = [r for r in caplog.records if ref in str(getattr(r, "__dict__", {}))]
    assert logged and logged[0].exc_info is not None
    # The server goes on serving, and domain errors keep their reason.
    with pytest.raises(CubeNotFound) as missing:
        client.stat_cube("ghost")
    assert missing.value.metadata == {"cube": "ghost"}


def _answered(error: Exception) -> grpc.aio.AioRpcError:
    """The error another node's gRPC server would send for ``error``, as this node's channel raises it."""
    assert isinstance(error, MemosError)
    status = to_status(error)
    return grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
                                status.details)


def test_an_owners_answer_is_the_error_it_carries() -> None:
    """The HTTP surface on a cluster node reports an owner's refusal as its own (syscalls/openai_owner.py)."""
    for sent in (RevisionNotFound("cube 'x' has no revision 9", cube="x", revision=9),
                 CubeUnavailable("served by 'beta' at 127.0.0.1:1, which is down", owner="beta", address="127.0.0.1:1")):
        back = from_rpc_error(_answered(sent))
        assert type(back) is type(sent) and back.message == sent.message and back.metadata == sent.metadata
    # A reason this node does not know (a newer owner's) keeps its code and reason.
    newer = type("Newer", (MemosError,), {"code": "FAILED_PRECONDITION", "reason": "SOMETHING_NEW"})("later")
    back = from_rpc_error(_answered(newer))
    assert back is not None and (back.code, back.reason, back.message) == ("FAILED_PRECONDITION", "SOMETHING_NEW",
                                                                           "later")
    # No ErrorInfo: nobody answered (a refused connection); the caller words that itself.
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused")
    assert from_rpc_error(bare) is None
