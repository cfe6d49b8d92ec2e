"""The one place where domain errors become gRPC statuses.

Every error carries a google.rpc.Status whose single detail is an ErrorInfo
with a stable reason (memos.v1.ErrorReason) and domain "memosd.v1".
Unexpected exceptions become INTERNAL with a reference id that points into
the daemon log, and never leak their text to the caller.
"""

from __future__ import annotations

import logging
import secrets

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from memosd.errors import InternalError, MemosError
from memosd.logfmt import log_event

DOMAIN = "memosd.v1"
log = logging.getLogger("memosd.syscalls")


# What a refusal may quote. Messages and metadata travel as trailers, and clients refuse trailers over
# 16 KiB (grpc-message percent-encodes, so one non-ASCII byte takes three): a huge name or id sent
# back whole would turn NOT_FOUND into RESOURCE_EXHAUSTED on the client.
MAX_QUOTED_BYTES = 200  # one client value inside a message, or one metadata value
MAX_MESSAGE_BYTES = 1024


def shorten(text: str, max_bytes: int) -> str:
    """``text`` if it fits in ``max_bytes`` of UTF-8; else its start and end around a note of what was cut."""
    if len(text.encode()) <= max_bytes:
        return text
    marker = f"...[{len(text)} characters, shortened]..."
    if len(marker.encode()) >= max_bytes:
        return text.encode()[:max_bytes].decode(errors="ignore")
    budget = (max_bytes - len(marker.encode())) // 2
    head = text.encode()[:budget].decode(errors="ignore")
    tail = text.encode()[-budget:].decode(errors="ignore") if budget else ""
    return head + marker + tail


def capped(message: str, metadata: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The message and metadata an error may send: long client values shortened wherever they are quoted."""
    short = {key: shorten(value, MAX_QUOTED_BYTES) for key, value in metadata.items()}
    for key, value in metadata.items():
        if short[key] != value:  # the message usually quotes the same value (as repr or as is)
            message = message.replace(repr(value), repr(short[key])).replace(value, short[key])
    return shorten(message, MAX_MESSAGE_BYTES), short


def to_status(error: MemosError) -> grpc.Status:
    message, metadata = capped(error.message, error.metadata)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc.StatusCode[error.code]
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def _declared(reason: str, code: str) -> type[MemosError]:
    """The MemosError class declared for ``reason`` (memosd/errors.py), or one made for a reason this node
    does not know (a newer owner's): the caller is told the owner's code and reason either way."""
    pending: list[type[MemosError]] = [MemosError]
    while pending:
        cls = pending.pop()
        if cls.reason == reason and cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return type("RelayedError", (MemosError,), {"code": code, "reason": reason})


def from_rpc_error(error: grpc.aio.AioRpcError) -> MemosError | None:
    """The MemosError another memosd node answered a call with (its status and ErrorInfo), so the HTTP
    surface can report an owner's refusal as its own; None when no node answered (no ErrorInfo: the
    connection failed, or the call was cancelled), which the caller words itself."""
    details = next((v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"), None)
    if not isinstance(details, bytes):
        return None
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    if not status.details or not status.details[0].Unpack(info) or info.domain != DOMAIN:
        return None
    return _declared(info.reason, error.code().name)(status.message, **dict(info.metadata))


def internal(method: str, exc: BaseException) -> MemosError:
    """Log an unexpected exception in full; tell the caller only where to look."""
    ref = secrets.token_hex(4)
    log_event(log, "internal_error", level=logging.ERROR, method=method, ref=ref, error=type(exc).__name__,
              exc_info=exc)
    return InternalError(f"internal error in {method} (ref {ref}); the daemon logged the details", ref=ref)
