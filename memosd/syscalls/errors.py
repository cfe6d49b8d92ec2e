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


def to_status(error: MemosError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc.StatusCode[error.code]
    status = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def internal(method: str, exc: BaseException) -> MemosError:
    """Log an unexpected exception in full; tell the caller only where to look."""
    ref = secrets.token_hex(4)
    log_event(log, "internal_error", level=logging.ERROR, method=method, ref=ref, error=type(exc).__name__,
              exc_info=exc)
    return InternalError(f"internal error in {method} (ref {ref}); the daemon logged the details", ref=ref)
