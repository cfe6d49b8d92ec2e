"""memosd's errors in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` and a status.

The HTTP status follows the error's gRPC code (each reason has one, memosd/errors.py), so a reason added
later maps without an edit here; ``code`` is the stable reason itself (CUBE_NOT_FOUND, ...), which is what
a program branches on; ``param`` names the request field to fix when the error names one.
"""

from __future__ import annotations

from typing import Any

from memosd.errors import MemosError
from memosd.syscalls.errors import capped

# gRPC code -> (HTTP status, OpenAI error type). FAILED_PRECONDITION is 409: the request is well formed but
# the cube's state refuses it (empty, frozen, no adapter), as a conflict with the resource; OUT_OF_RANGE is
# the caller's value (a prompt past the context), so 400.
HTTP_BY_CODE: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "FAILED_PRECONDITION": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "api_error"),
    "INTERNAL": (500, "api_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
_FALLBACK = (500, "api_error")

# Generate's field names, as the HTTP request spells them (the chat request is converted to a Generate).
_PARAMS = {"retrieve_k": "memos.retrieve_k", "mount_ids": "memos.cubes", "options.adapter_mount_id": "memos.adapter"}


def openai_param(field: str) -> str | None:
    """The request field an error's ``field`` metadata names, in the chat request's terms."""
    if not field:
        return None
    return _PARAMS.get(field) or field.removeprefix("options.")


def http_status(error: MemosError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of ``error``."""
    return HTTP_BY_CODE.get(error.code, _FALLBACK)


def error_body(error: MemosError) -> dict[str, Any]:
    """The JSON body: the message (shortened as gRPC's is), the field to fix, the reason as ``code``."""
    message, metadata = capped(error.message, error.metadata)
    param = openai_param(metadata.get("field", ""))
    return {"error": {"message": message, "type": http_status(error)[1], "param": param, "code": error.reason}}
