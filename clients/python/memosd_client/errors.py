"""Exceptions raised by :class:`memosd_client.Client`, one class per daemon error reason.

memosd attaches a ``google.rpc.ErrorInfo`` (domain ``memosd.v1``) with a stable
``reason`` to every failure; :func:`from_rpc_error` picks the class by that
reason. Errors with no reason (the daemon is unreachable, a proxy failed, a
deadline passed) map by gRPC status code to the generic classes, so callers
can catch broadly (``except NotFound``) or narrowly (``except CubeNotFound``).
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "memosd.v1"
# The trailer grpc-status carries the google.rpc.Status in.
_DETAILS_KEY = "grpc-status-details-bin"


class MemosError(Exception):
    """A failed call. ``reason`` is empty when the failure carried no ErrorInfo."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason: str = reason if reason is not None else self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return f"{self.reason or self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"


# Group bases, one per gRPC status code. A reason-less error of that code is raised as the base itself.
class Cancelled(MemosError):
    default_code = grpc.StatusCode.CANCELLED


class Unknown(MemosError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(MemosError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(MemosError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(MemosError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemosError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(MemosError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MemosError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(MemosError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MemosError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRange(MemosError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(MemosError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(MemosError):
    default_code = grpc.StatusCode.INTERNAL


class Unavailable(MemosError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(MemosError):
    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(MemosError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


# One class per memos.v1.ErrorReason, under the base of the code the reason always comes with.
class CubeNotFound(NotFound):
    default_reason = "CUBE_NOT_FOUND"


class MountNotFound(NotFound):
    default_reason = "MOUNT_NOT_FOUND"


class RevisionNotFound(NotFound):
    default_reason = "REVISION_NOT_FOUND"


class ItemNotFound(NotFound):
    default_reason = "ITEM_NOT_FOUND"


class CubeNameTaken(AlreadyExists):
    default_reason = "CUBE_NAME_TAKEN"


class InvalidField(InvalidArgument):
    default_reason = "INVALID_FIELD"


class TextEmpty(InvalidArgument):
    default_reason = "TEXT_EMPTY"


class TextTooLarge(InvalidArgument):
    default_reason = "TEXT_TOO_LARGE"


class TooManyItems(InvalidArgument):
    default_reason = "TOO_MANY_ITEMS"


class InvalidPageToken(InvalidArgument):
    default_reason = "INVALID_PAGE_TOKEN"


class MalformedRequest(InvalidArgument):
    default_reason = "MALFORMED_REQUEST"


class MountReadOnly(FailedPrecondition):
    default_reason = "MOUNT_READ_ONLY"


class CommitConflict(Aborted):
    default_reason = "COMMIT_CONFLICT"


class StagingFull(ResourceExhausted):
    default_reason = "STAGING_FULL"


class ShuttingDown(Unavailable):
    default_reason = "SHUTTING_DOWN"


class ClusterUnavailable(Unavailable):
    """The cluster directory (etcd) has no quorum: cube creation and removal are refused until it is back."""

    default_reason = "CLUSTER_UNAVAILABLE"


class CubeUnavailable(Unavailable):
    """The cube's owner node is down or unreachable; the message and metadata name it."""

    default_reason = "CUBE_UNAVAILABLE"


class CubeMoving(Unavailable):
    """The cube is moving to another cluster node (MoveCube): changes are refused until the move ends
    (seconds); a retry then reaches the new owner. metadata["to"] names it."""

    default_reason = "CUBE_MOVING"


class MoveRefused(FailedPrecondition):
    """MoveCube cannot be made as asked; the message says why."""

    default_reason = "MOVE_REFUSED"


class InternalError(Internal):
    default_reason = "INTERNAL_ERROR"


class CubeEmpty(FailedPrecondition):
    default_reason = "CUBE_EMPTY"


class ContextExceeded(OutOfRange):
    default_reason = "CONTEXT_EXCEEDED"


class PoolTooSmall(ResourceExhausted):
    default_reason = "POOL_TOO_SMALL"


class ModelUnavailable(FailedPrecondition):
    default_reason = "MODEL_UNAVAILABLE"


class AdapterInvalid(InvalidArgument):
    default_reason = "ADAPTER_INVALID"


class AdapterTooLarge(ResourceExhausted):
    default_reason = "ADAPTER_TOO_LARGE"


class AdapterMismatch(FailedPrecondition):
    default_reason = "ADAPTER_MISMATCH"


class AdapterNotFound(NotFound):
    default_reason = "ADAPTER_NOT_FOUND"


class JobNotFound(NotFound):
    default_reason = "JOB_NOT_FOUND"


class TrainingInProgress(FailedPrecondition):
    default_reason = "TRAINING_IN_PROGRESS"


class ExtractionInProgress(FailedPrecondition):
    default_reason = "EXTRACTION_IN_PROGRESS"


class JobFinished(FailedPrecondition):
    default_reason = "JOB_FINISHED"


class AuthenticationFailed(Unauthenticated):
    """No token, a wrong one, or the token of a disabled principal."""

    default_reason = "UNAUTHENTICATED"


class AccessDenied(PermissionDenied):
    """The caller sees the cube but lacks a right the call needs."""

    default_reason = "PERMISSION_DENIED"


class PrincipalNotFound(NotFound):
    default_reason = "PRINCIPAL_NOT_FOUND"


class PrincipalNameTaken(AlreadyExists):
    default_reason = "PRINCIPAL_NAME_TAKEN"


class CubeFrozen(FailedPrecondition):
    """The cube is frozen (read-only) until ThawCube: nothing can be committed to it."""

    default_reason = "CUBE_FROZEN"


class RevisionCompacted(OutOfRange):
    """The revision was compacted by the cube's retention policy; the message names the revisions left."""

    default_reason = "REVISION_COMPACTED"


class DiskFull(ResourceExhausted):
    """The daemon's disk is full: writes are refused (reads still work) until space is freed."""

    default_reason = "DISK_FULL"


class QuotaExceeded(ResourceExhausted):
    """A per-principal limit was reached; the message and metadata name it."""

    default_reason = "QUOTA_EXCEEDED"


class StreamIdle(DeadlineExceeded):
    """A client stream sent nothing for longer than the daemon's idle timeout."""

    default_reason = "STREAM_IDLE"


class RequestIdReused(InvalidArgument):
    """A request id was reused for a different request."""

    default_reason = "REQUEST_ID_REUSED"


class ArchiveInvalid(InvalidArgument):
    """A cube archive (ImportCube) is truncated, corrupt, inconsistent or of an unknown format version."""

    default_reason = "ARCHIVE_INVALID"


_BY_CODE: dict[grpc.StatusCode, type[MemosError]] = {
    cls.default_code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}

_BY_REASON: dict[str, type[MemosError]] = {
    cls.default_reason: cls
    for cls in (
        CubeNotFound, MountNotFound, RevisionNotFound, ItemNotFound, CubeNameTaken,
        InvalidField, TextEmpty, TextTooLarge, TooManyItems, InvalidPageToken,
        MalformedRequest, MountReadOnly, CommitConflict, StagingFull, ShuttingDown,
        InternalError, CubeEmpty, ContextExceeded, PoolTooSmall, ModelUnavailable,
        AdapterInvalid, AdapterTooLarge, AdapterMismatch, AdapterNotFound, JobNotFound,
        TrainingInProgress, JobFinished, AuthenticationFailed, AccessDenied, PrincipalNotFound,
        PrincipalNameTaken, CubeFrozen, RevisionCompacted, DiskFull, QuotaExceeded, StreamIdle,
        RequestIdReused, ArchiveInvalid, ExtractionInProgress, ClusterUnavailable, CubeUnavailable,
        CubeMoving, MoveRefused,
    )
}


def error_class(code: grpc.StatusCode, reason: str = "") -> type[MemosError]:
    """The class raised for a status code and ErrorInfo reason."""
    return _BY_REASON.get(reason) or _BY_CODE.get(code, MemosError)


def _rich_status(call: grpc.Call) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
        return status
    except ValueError:
        # from_call refuses a Status whose code/message differ from the call's
        # (e.g. rewritten by a proxy); the reason inside is still worth having.
        for key, value in call.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                return status_pb2.Status.FromString(value)
        return None


def _error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_rpc_error(e: grpc.RpcError) -> MemosError:
    """Convert a failed gRPC call into the matching :class:`MemosError` subclass."""
    # Every RpcError the grpc runtime raises for a call is also a grpc.Call;
    # other RpcErrors (interceptors, tests) may not be.
    code = grpc.StatusCode.UNKNOWN
    message = str(e)
    info = None
    if isinstance(e, grpc.Call):
        code = e.code() or grpc.StatusCode.UNKNOWN
        message = e.details() or ""
        info = _error_info(_rich_status(e))
    if info is None:
        return error_class(code)(message, code=code, reason="")
    # Reasons of other domains (a proxy, a future auth layer) keep their code's class.
    reason = info.reason if info.domain in (DOMAIN, "") else ""
    return error_class(code, reason)(message, code=code, reason=info.reason, metadata=dict(info.metadata))
