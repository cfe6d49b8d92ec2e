"""Which daemon memosctl talks to, with which token, and where each came from.

A daemon started with its own ``--data-dir`` (a second daemon, a test, a port-0 daemon) writes its address
to ``<data dir>/daemon.json`` and its admin's token to ``<data dir>/admin.token``. Given that dir
(``--data-dir`` or ``$MEMOSD_DATA_DIR``, the daemon's own variable), memosctl reads both from there instead
of guessing the default port and sending the default data dir's token to the wrong daemon. An explicit
target or token (flag or environment) still wins. The token's source is kept, so an UNAUTHENTICATED
answer can say which token was refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from memosd_client.auth import find_token
from memosd_client.cli.inputs import UsageError
from memosd_client.client import DEFAULT_TARGET

DATA_DIR_ENV = "MEMOSD_DATA_DIR"


@dataclass(frozen=True)
class Connection:
    target: str
    token: str
    token_source: str  # "the token argument", a file's path, "$MEMOS_TOKEN", or "no token (...)"


class DaemonNotFound(Exception):
    """The data dir names no running daemon (no or unreadable daemon.json)."""


def _daemon_address(data_dir: Path) -> str:
    info = data_dir / "daemon.json"
    try:
        address = json.loads(info.read_text()).get("address", "")
    except FileNotFoundError:
        raise DaemonNotFound(f"no memosd is running on data dir {data_dir} (no {info}); start it with "
                             f"memosd --data-dir {data_dir}") from None
    except (OSError, ValueError, AttributeError) as error:
        raise DaemonNotFound(f"cannot read {info}: {error}") from None
    if not isinstance(address, str) or not address:
        raise DaemonNotFound(f"{info} names no address")
    return address


def connection(target: str | None, token: str | None, token_file: str | None, data_dir: str | None
               ) -> Connection:
    """The target: ``target`` (--target), $MEMOS_TARGET, the data dir's daemon.json, then the default.
    The token: --token, --token-file, $MEMOS_TOKEN, $MEMOS_TOKEN_FILE, then the data dir's admin.token
    (without a data dir: the default data dir's, as the client does)."""
    env = os.environ
    directory = data_dir or env.get(DATA_DIR_ENV) or None
    root = Path(directory).expanduser() if directory else None
    chosen = target or env.get("MEMOS_TARGET") or None
    if chosen is None:
        chosen = _daemon_address(root) if root is not None else DEFAULT_TARGET
    try:
        found = find_token(token, token_file, local_file=root / "admin.token" if root is not None else None)
        if not found.token and root is not None:
            # No admin.token there (a daemon without auth writes none): what the client would send anyway,
            # so the source named in an error is the token actually sent.
            found = find_token()
    except ValueError as error:
        raise UsageError(str(error)) from None
    return Connection(chosen, found.token, found.source)


def refused_token_hint(conn: Connection) -> str:
    """What to add to an UNAUTHENTICATED error: which token was sent, and how to send another."""
    if not conn.token:
        return (f"; memosctl sent {conn.token_source}: pass --token-file FILE, or --data-dir DIR of the daemon "
                f"(its admin.token)")
    return (f"; the token from {conn.token_source} was refused by {conn.target}: pass --token-file FILE, or "
            "--data-dir DIR (or $MEMOSD_DATA_DIR) of the daemon you mean, to use its admin.token and address")
