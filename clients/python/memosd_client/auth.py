"""Tokens and TLS for the client: where a token comes from, and how it rides on every call.

The token is sent as ``authorization: Bearer <token>`` metadata by a channel
interceptor, so unary and streaming calls carry it alike, over plain gRPC or TLS.
Without an explicit token the client looks, in order, at ``$MEMOS_TOKEN``,
the file named by ``$MEMOS_TOKEN_FILE``, and the admin token file of a memosd
running as this user on its default data dir (``$XDG_DATA_HOME/memosd/admin.token``,
readable only by its owner).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc

AUTH_METADATA = "authorization"


def default_token_file(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    base = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return base / "memosd" / "admin.token"


def read_token_file(path: str | os.PathLike[str]) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as error:
        raise ValueError(f"cannot read the token file {path}: {error.strerror}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


class FoundToken(NamedTuple):
    """A token and where it came from, in words for an error message ("" and "no token" when none)."""

    token: str
    source: str


def find_token(token: str | None = None, token_file: str | os.PathLike[str] | None = None, *,
               local_file: Path | None = None) -> FoundToken:
    """The token to send and its source: the argument, the file argument, $MEMOS_TOKEN, $MEMOS_TOKEN_FILE,
    then ``local_file`` (default: the local admin's token file) if it exists and is readable."""
    if token:
        return FoundToken(token, "the token argument")
    if token_file:
        return FoundToken(read_token_file(token_file), str(token_file))
    if os.environ.get("MEMOS_TOKEN"):
        return FoundToken(os.environ["MEMOS_TOKEN"].strip(), "$MEMOS_TOKEN")
    if os.environ.get("MEMOS_TOKEN_FILE"):
        path = os.environ["MEMOS_TOKEN_FILE"]
        return FoundToken(read_token_file(path), f"{path} ($MEMOS_TOKEN_FILE)")
    local = default_token_file() if local_file is None else local_file
    if local.is_file() and os.access(local, os.R_OK):
        return FoundToken(read_token_file(local), str(local))
    return FoundToken("", f"no token (none given, and no readable {local})")


def resolve_token(token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> str:
    """The token to send (see find_token); "" when there is none (calls then fail UNAUTHENTICATED)."""
    return find_token(token, token_file).token


def tls_credentials(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
                    ) -> grpc.ChannelCredentials:
    """TLS credentials: trust ``ca_file`` (system roots when None); present ``cert_file``/``key_file`` for mTLS."""
    def read(path: str | None) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path else None

    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_METADATA, f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)
