"""Opaque page tokens: which list they belong to, and where it stopped.

A token is only valid for the call (and arguments) that produced it; anything
else is INVALID_PAGE_TOKEN rather than a silently wrong page.
"""

from __future__ import annotations

import base64
import json

from memosd.errors import InvalidField, InvalidPageToken

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidField(f"page_size must be >= 0, got {requested}", field="page_size")
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def encode_token(scope: str, cursor: str | int) -> str:
    raw = json.dumps({"s": scope, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: str) -> str | int | None:
    """The cursor of `token`, or None for an empty token (the first page)."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if data["s"] == scope and isinstance(data["c"], str | int):
            cursor: str | int = data["c"]
            return cursor
    except (ValueError, KeyError, TypeError):
        pass
    raise _invalid()


def decode_int_token(token: str, scope: str) -> int | None:
    """Like decode_token, for lists whose cursor is a number (Log's revision): a hand-made one is refused."""
    cursor = decode_token(token, scope)
    if cursor is None or (type(cursor) is int and 0 <= cursor < 2**63):
        return cursor
    raise _invalid()


def _invalid() -> InvalidPageToken:
    return InvalidPageToken("page_token was not returned by this call with these arguments; "
                            "start again with an empty page_token", field="page_token")
