// Typed errors, one class per memos.v1 ErrorReason (as the Python client's memos.errors), each under the
// class of the gRPC status code that reason always comes with. memosd attaches a google.rpc.ErrorInfo
// (domain "memosd.v1") to every failure in the grpc-status-details-bin trailer; fromServiceError picks the
// class by its reason. Failures without one (unreachable daemon, deadline, a proxy) map by status code, so
// callers catch broadly (`instanceof NotFound`) or narrowly (`instanceof CubeNotFound`).
import { Metadata, status as Status } from "@grpc/grpc-js";

import { loadContract } from "./proto.js";

export const DOMAIN = "memosd.v1";
const DETAILS_KEY = "grpc-status-details-bin";
const ERROR_INFO_URL = "type.googleapis.com/google.rpc.ErrorInfo";

/** The name of each gRPC status code, by number ("NOT_FOUND" for 5). */
const CODE_NAMES = /** @type {Record<number, string>} */ (Object.fromEntries(
  Object.entries(Status).filter(([, v]) => typeof v === "number").map(([k, v]) => [v, k])));

/** A failed call. `reason` is "" when the failure carried no ErrorInfo. */
export class MemosError extends Error {
  /** @type {number} */
  static defaultCode = Status.UNKNOWN;
  /** @type {string} */
  static defaultReason = "";

  /**
   * @param {string} message
   * @param {{code?: number, reason?: string, metadata?: Record<string, string>, cause?: unknown}} [options]
   */
  constructor(message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    const cls = /** @type {typeof MemosError} */ (new.target);
    this.name = cls.name;
    /** The gRPC status code (a number of grpc.status). */
    this.code = options.code ?? cls.defaultCode;
    /** The ErrorInfo reason ("CUBE_NOT_FOUND"), or "" when there was none. */
    this.reason = options.reason ?? cls.defaultReason;
    /** The ErrorInfo metadata (e.g. {field: "name"} for INVALID_FIELD). */
    this.metadata = { ...(options.metadata ?? {}) };
  }

  /** The status code's name ("NOT_FOUND"). */
  get codeName() {
    return CODE_NAMES[this.code] ?? String(this.code);
  }

  toString() {
    return `${this.name}: ${this.reason || this.codeName}: ${this.message}`;
  }
}

// Group bases, one per gRPC status code; a reason-less error of that code is raised as the base itself.

export class Cancelled extends MemosError { static defaultCode = Status.CANCELLED; }
export class Unknown extends MemosError { static defaultCode = Status.UNKNOWN; }
export class InvalidArgument extends MemosError { static defaultCode = Status.INVALID_ARGUMENT; }
export class DeadlineExceeded extends MemosError { static defaultCode = Status.DEADLINE_EXCEEDED; }
export class NotFound extends MemosError { static defaultCode = Status.NOT_FOUND; }
export class AlreadyExists extends MemosError { static defaultCode = Status.ALREADY_EXISTS; }
export class PermissionDenied extends MemosError { static defaultCode = Status.PERMISSION_DENIED; }
export class ResourceExhausted extends MemosError { static defaultCode = Status.RESOURCE_EXHAUSTED; }
export class FailedPrecondition extends MemosError { static defaultCode = Status.FAILED_PRECONDITION; }
export class Aborted extends MemosError { static defaultCode = Status.ABORTED; }
export class OutOfRange extends MemosError { static defaultCode = Status.OUT_OF_RANGE; }
export class Unimplemented extends MemosError { static defaultCode = Status.UNIMPLEMENTED; }
export class Internal extends MemosError { static defaultCode = Status.INTERNAL; }
export class Unavailable extends MemosError { static defaultCode = Status.UNAVAILABLE; }
export class DataLoss extends MemosError { static defaultCode = Status.DATA_LOSS; }
export class Unauthenticated extends MemosError { static defaultCode = Status.UNAUTHENTICATED; }

// One class per memos.v1.ErrorReason, under the base of the code the reason always comes with.
export class CubeNotFound extends NotFound { static defaultReason = "CUBE_NOT_FOUND"; }
export class MountNotFound extends NotFound { static defaultReason = "MOUNT_NOT_FOUND"; }
export class RevisionNotFound extends NotFound { static defaultReason = "REVISION_NOT_FOUND"; }
export class ItemNotFound extends NotFound { static defaultReason = "ITEM_NOT_FOUND"; }
export class CubeNameTaken extends AlreadyExists { static defaultReason = "CUBE_NAME_TAKEN"; }
export class InvalidField extends InvalidArgument { static defaultReason = "INVALID_FIELD"; }
export class TextEmpty extends InvalidArgument { static defaultReason = "TEXT_EMPTY"; }
export class TextTooLarge extends InvalidArgument { static defaultReason = "TEXT_TOO_LARGE"; }
export class TooManyItems extends InvalidArgument { static defaultReason = "TOO_MANY_ITEMS"; }
export class InvalidPageToken extends InvalidArgument { static defaultReason = "INVALID_PAGE_TOKEN"; }
export class MalformedRequest extends InvalidArgument { static defaultReason = "MALFORMED_REQUEST"; }
export class MountReadOnly extends FailedPrecondition { static defaultReason = "MOUNT_READ_ONLY"; }
export class CommitConflict extends Aborted { static defaultReason = "COMMIT_CONFLICT"; }
export class StagingFull extends ResourceExhausted { static defaultReason = "STAGING_FULL"; }
export class ShuttingDown extends Unavailable { static defaultReason = "SHUTTING_DOWN"; }
export class InternalError extends Internal { static defaultReason = "INTERNAL_ERROR"; }
export class CubeEmpty extends FailedPrecondition { static defaultReason = "CUBE_EMPTY"; }
export class ContextExceeded extends OutOfRange { static defaultReason = "CONTEXT_EXCEEDED"; }
export class PoolTooSmall extends ResourceExhausted { static defaultReason = "POOL_TOO_SMALL"; }
export class ModelUnavailable extends FailedPrecondition { static defaultReason = "MODEL_UNAVAILABLE"; }
export class AdapterInvalid extends InvalidArgument { static defaultReason = "ADAPTER_INVALID"; }
export class AdapterTooLarge extends ResourceExhausted { static defaultReason = "ADAPTER_TOO_LARGE"; }
export class AdapterMismatch extends FailedPrecondition { static defaultReason = "ADAPTER_MISMATCH"; }
export class AdapterNotFound extends NotFound { static defaultReason = "ADAPTER_NOT_FOUND"; }
export class JobNotFound extends NotFound { static defaultReason = "JOB_NOT_FOUND"; }
export class TrainingInProgress extends FailedPrecondition { static defaultReason = "TRAINING_IN_PROGRESS"; }
export class JobFinished extends FailedPrecondition { static defaultReason = "JOB_FINISHED"; }
/** No token, a wrong one, or the token of a disabled principal. */
export class AuthenticationFailed extends Unauthenticated { static defaultReason = "UNAUTHENTICATED"; }
/** The caller sees the cube but lacks a right the call needs. */
export class AccessDenied extends PermissionDenied { static defaultReason = "PERMISSION_DENIED"; }
export class PrincipalNotFound extends NotFound { static defaultReason = "PRINCIPAL_NOT_FOUND"; }
export class PrincipalNameTaken extends AlreadyExists { static defaultReason = "PRINCIPAL_NAME_TAKEN"; }
/** The cube is frozen (read-only) until ThawCube: nothing can be committed to it. */
export class CubeFrozen extends FailedPrecondition { static defaultReason = "CUBE_FROZEN"; }
/** The revision was compacted by the cube's retention policy; the message names the revisions left. */
export class RevisionCompacted extends OutOfRange { static defaultReason = "REVISION_COMPACTED"; }
/** The daemon's disk is full: writes are refused (reads still work) until space is freed. */
export class DiskFull extends ResourceExhausted { static defaultReason = "DISK_FULL"; }
/** A per-principal limit was reached; the message and metadata name it. */
export class QuotaExceeded extends ResourceExhausted { static defaultReason = "QUOTA_EXCEEDED"; }
/** A client stream sent nothing for longer than the daemon's idle timeout. */
export class StreamIdle extends DeadlineExceeded { static defaultReason = "STREAM_IDLE"; }
/** A request id was reused for a different request. */
export class RequestIdReused extends InvalidArgument { static defaultReason = "REQUEST_ID_REUSED"; }
/** A cube archive (ImportCube) is truncated, corrupt, inconsistent or of an unknown format version. */
export class ArchiveInvalid extends InvalidArgument { static defaultReason = "ARCHIVE_INVALID"; }
export class ExtractionInProgress extends FailedPrecondition { static defaultReason = "EXTRACTION_IN_PROGRESS"; }

/** The cluster directory (etcd) has no quorum: cube creation and removal are refused until it is back. */
export class ClusterUnavailable extends Unavailable { static defaultReason = "CLUSTER_UNAVAILABLE"; }
/** The cube's owner node is down or unreachable; the message and metadata name it. */
export class CubeUnavailable extends Unavailable { static defaultReason = "CUBE_UNAVAILABLE"; }
/** The cube is moving to another cluster node (MoveCube): changes are refused until the move ends; retry. */
export class CubeMoving extends Unavailable { static defaultReason = "CUBE_MOVING"; }
/** MoveCube cannot be made as asked; the message says why. */
export class MoveRefused extends FailedPrecondition { static defaultReason = "MOVE_REFUSED"; }

/** @type {Map<number, typeof MemosError>} */
const BY_CODE = new Map([
  Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
  ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable, DataLoss,
  Unauthenticated,
].map((c) => [c.defaultCode, c]));

/** @type {Map<string, typeof MemosError>} */
export const BY_REASON = new Map([
  CubeNotFound,
  MountNotFound,
  RevisionNotFound,
  ItemNotFound,
  CubeNameTaken,
  InvalidField,
  TextEmpty,
  TextTooLarge,
  TooManyItems,
  InvalidPageToken,
  MalformedRequest,
  MountReadOnly,
  CommitConflict,
  StagingFull,
  ShuttingDown,
  InternalError,
  CubeEmpty,
  ContextExceeded,
  PoolTooSmall,
  ModelUnavailable,
  AdapterInvalid,
  AdapterTooLarge,
  AdapterMismatch,
  AdapterNotFound,
  JobNotFound,
  TrainingInProgress,
  JobFinished,
  AuthenticationFailed,
  AccessDenied,
  PrincipalNotFound,
  PrincipalNameTaken,
  CubeFrozen,
  RevisionCompacted,
  DiskFull,
  QuotaExceeded,
  StreamIdle,
  RequestIdReused,
  ArchiveInvalid,
  ExtractionInProgress,
  ClusterUnavailable,
  CubeUnavailable,
  CubeMoving,
  MoveRefused,
].map((c) => [c.defaultReason, c]));

/**
 * The class raised for a status code and ErrorInfo reason.
 * @param {number} code
 * @param {string} [reason]
 * @returns {typeof MemosError}
 */
export function errorClass(code, reason = "") {
  return BY_REASON.get(reason) ?? BY_CODE.get(code) ?? MemosError;
}

/**
 * The ErrorInfo in a call's trailers, if any.
 * @param {Metadata | undefined} metadata
 * @returns {{reason: string, domain: string, metadata: Record<string, string>} | null}
 */
export function errorInfo(metadata) {
  if (!metadata) return null;
  const { status, errorInfo: infoType } = loadContract();
  for (const raw of metadata.get(DETAILS_KEY)) {
    if (typeof raw === "string") continue;
    let decoded;
    try {
      decoded = /** @type {{details: {type_url: string, value: Uint8Array}[]}} */ (
        /** @type {unknown} */ (status.toObject(status.decode(raw), { defaults: true })));
    } catch {
      return null; // not a google.rpc.Status: keep the code's class
    }
    for (const detail of decoded.details) {
      if (detail.type_url === ERROR_INFO_URL) {
        return /** @type {{reason: string, domain: string, metadata: Record<string, string>}} */ (
          /** @type {unknown} */ (infoType.toObject(infoType.decode(detail.value), { defaults: true })));
      }
    }
  }
  return null;
}

/**
 * Convert a failed grpc-js call (a ServiceError) into the matching MemosError subclass.
 * @param {unknown} error
 * @returns {MemosError}
 */
export function fromServiceError(error) {
  if (error instanceof MemosError) return error;
  const e = /** @type {{code?: unknown, details?: unknown, message?: unknown, metadata?: unknown}} */ (
    typeof error === "object" && error !== null ? error : {});
  const code = typeof e.code === "number" ? e.code : Status.UNKNOWN;
  const message = typeof e.details === "string" ? e.details : String(e.message ?? error);
  const info = errorInfo(e.metadata instanceof Metadata ? e.metadata : undefined);
  if (!info) return new (errorClass(code))(message, { code, reason: "", cause: error });
  // Reasons of other domains (a proxy, a future auth layer) keep their code's class.
  const reason = info.domain === DOMAIN || info.domain === "" ? info.reason : "";
  return new (errorClass(code, reason))(message, { code, reason: info.reason, metadata: info.metadata, cause: error });
}
