"""Domain errors: each has one gRPC status code and one stable reason.

The reasons are the names of the protocol's ``ErrorReason`` enum; the client maps them
back to exception classes. ``syscalls/errors.py`` is the one place that turns
these into gRPC statuses. The kernel raises them and knows nothing of gRPC, so
codes are named here as strings of ``grpc.StatusCode`` member names.
"""

from __future__ import annotations

from typing import ClassVar


class MemosError(Exception):
    """Base of every error a syscall reports to its caller."""

    code: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL_ERROR"

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        # Sent as ErrorInfo.metadata: machine-readable context (ids, limits).
        self.metadata = {k: str(v) for k, v in metadata.items()}


class CubeNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "CUBE_NOT_FOUND"


class MountNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "MOUNT_NOT_FOUND"


class RevisionNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "REVISION_NOT_FOUND"


class ItemNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "ITEM_NOT_FOUND"


class CubeNameTaken(MemosError):
    code = "ALREADY_EXISTS"
    reason = "CUBE_NAME_TAKEN"


class InvalidField(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_FIELD"


class TextEmpty(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "TEXT_EMPTY"


class TextTooLarge(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "TEXT_TOO_LARGE"


class TooManyItems(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "TOO_MANY_ITEMS"


class InvalidPageToken(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_PAGE_TOKEN"


class MalformedRequest(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "MALFORMED_REQUEST"


class MountReadOnly(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "MOUNT_READ_ONLY"


class CommitConflict(MemosError):
    code = "ABORTED"
    reason = "COMMIT_CONFLICT"


class StagingFull(MemosError):
    code = "RESOURCE_EXHAUSTED"
    reason = "STAGING_FULL"


class ShuttingDown(MemosError):
    code = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"


class CubeEmpty(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "CUBE_EMPTY"


class ContextExceeded(MemosError):
    code = "OUT_OF_RANGE"
    reason = "CONTEXT_EXCEEDED"


class PoolTooSmall(MemosError):
    code = "RESOURCE_EXHAUSTED"
    reason = "POOL_TOO_SMALL"


class ModelUnavailable(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "MODEL_UNAVAILABLE"


class AdapterInvalid(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "ADAPTER_INVALID"


class AdapterTooLarge(MemosError):
    code = "RESOURCE_EXHAUSTED"
    reason = "ADAPTER_TOO_LARGE"


class AdapterMismatch(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "ADAPTER_MISMATCH"


class AdapterNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "ADAPTER_NOT_FOUND"


class JobNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "JOB_NOT_FOUND"


class TrainingInProgress(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "TRAINING_IN_PROGRESS"


class ExtractionInProgress(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "EXTRACTION_IN_PROGRESS"


class JobFinished(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "JOB_FINISHED"


class Unauthenticated(MemosError):
    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(MemosError):
    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class PrincipalNotFound(MemosError):
    code = "NOT_FOUND"
    reason = "PRINCIPAL_NOT_FOUND"


class PrincipalNameTaken(MemosError):
    code = "ALREADY_EXISTS"
    reason = "PRINCIPAL_NAME_TAKEN"


class CubeFrozen(MemosError):
    code = "FAILED_PRECONDITION"
    reason = "CUBE_FROZEN"


class RevisionCompacted(MemosError):
    code = "OUT_OF_RANGE"
    reason = "REVISION_COMPACTED"


class DiskFull(MemosError):
    code = "RESOURCE_EXHAUSTED"
    reason = "DISK_FULL"


class QuotaExceeded(MemosError):
    code = "RESOURCE_EXHAUSTED"
    reason = "QUOTA_EXCEEDED"


class StreamIdle(MemosError):
    code = "DEADLINE_EXCEEDED"
    reason = "STREAM_IDLE"


class RequestIdReused(MemosError):
    code = "INVALID_ARGUMENT"
    reason = "REQUEST_ID_REUSED"


class ArchiveInvalid(MemosError):
    """A cube archive that cannot be imported; ``problem`` (metadata) is truncated, corrupt, version or
    inconsistent."""

    code = "INVALID_ARGUMENT"
    reason = "ARCHIVE_INVALID"


class ClusterUnavailable(MemosError):
    """The cluster directory (etcd) cannot be changed: no quorum, or no endpoint answers."""

    code = "UNAVAILABLE"
    reason = "CLUSTER_UNAVAILABLE"


class CubeUnavailable(MemosError):
    """The cube's owner node is down or unreachable; ``owner`` and ``address`` (metadata) name it."""

    code = "UNAVAILABLE"
    reason = "CUBE_UNAVAILABLE"


class CubeMoving(MemosError):
    """The cube is being moved between cluster nodes (MoveCube): what would change it is refused until the
    move ends, in seconds; a retry then reaches the new owner. ``to`` or ``from`` (metadata) names the node."""

    code = "UNAVAILABLE"
    reason = "CUBE_MOVING"


class MoveRefused(MemosError):
    """MoveCube cannot be made as asked (not a cluster node, the target is not a live member, open
    read-write mounts stayed open, the directory changed meanwhile); the message says which."""

    code = "FAILED_PRECONDITION"
    reason = "MOVE_REFUSED"


class InternalError(MemosError):
    code = "INTERNAL"
    reason = "INTERNAL_ERROR"


ALL_ERRORS: tuple[type[MemosError], ...] = (
    CubeNotFound, MountNotFound, RevisionNotFound, ItemNotFound, CubeNameTaken,
    InvalidField, TextEmpty, TextTooLarge, TooManyItems, InvalidPageToken,
    MalformedRequest, MountReadOnly, CommitConflict, StagingFull, ShuttingDown,
    InternalError, CubeEmpty, ContextExceeded, PoolTooSmall, ModelUnavailable, AdapterInvalid, AdapterTooLarge,
    AdapterMismatch, AdapterNotFound, JobNotFound, TrainingInProgress, JobFinished, Unauthenticated,
    PermissionDenied, PrincipalNotFound, PrincipalNameTaken, CubeFrozen, RevisionCompacted, ArchiveInvalid,
    ExtractionInProgress, ClusterUnavailable, CubeUnavailable, CubeMoving, MoveRefused,
)
