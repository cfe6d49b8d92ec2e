"""Principals (users and agents) and their bearer tokens.

A token is ``mtk.{principal_id}.{secret}``: the id says whose it is, so
checking one is a dictionary lookup plus one constant-time comparison of
sha256(secret) against the stored hash, with no timing signal about other
principals' tokens. The secret (32 random bytes) is never stored; a lost
token cannot be recovered, only replaced by a new principal.

On first start, when there is no principal, the daemon creates ``admin``
and writes its token to a file only its owner can read (0600). Where principals live is the
GovernanceStore's business (governance/ports.py): this node's RocksDB, or etcd on a cluster node,
where the first node to start makes the admin and the others find it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from memosd.errors import PrincipalNameTaken, Unauthenticated
from memosd.fsutil import fsync_path
from memosd.governance.local import LocalGovernance, name_taken, principal_not_found
from memosd.governance.ports import GovernanceStore
from memosd.kernel import ids, validate
from memosd.kernel.paging import decode_token, encode_token, page_size
from memosd.kernel.types import Page
from memosd.store.records import PrincipalRecord
from memosd.store.rocks import Store

TOKEN_PREFIX = "mtk"
ADMIN_NAME = "admin"
ADMIN_TOKEN_FILE = "admin.token"
Kind = Literal["user", "agent"]

_NO_TOKEN = ("this call needs a token: send metadata 'authorization: Bearer <token>' (memosctl: --token, "
             "--token-file or MEMOS_TOKEN). The admin token is in the file memosd logged at first start")
_BAD_TOKEN = "the token is not valid (wrong, or of a disabled principal); ask an admin for a token"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_token(principal_id: str) -> tuple[str, str]:
    """A new token for the principal, and the hash to store."""
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}.{principal_id}.{secret}", _hash(secret)


class Principals:
    """Every principal, read from the GovernanceStore's memory; changes written through it."""

    def __init__(self, rows: Store | GovernanceStore) -> None:
        self.rows: GovernanceStore = LocalGovernance(rows) if isinstance(rows, Store) else rows
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows.principals())

    @property
    def lock(self) -> threading.Lock:
        """Held while principals change (create, disable): holding it keeps them as they are."""
        return self._lock

    # -- authentication -------------------------------------------------------
    def authenticate(self, token: str) -> PrincipalRecord:
        """The enabled principal a token belongs to. Raises ``Unauthenticated``."""
        if not token:
            raise Unauthenticated(_NO_TOKEN)
        prefix, _, rest = token.partition(".")
        principal_id, _, secret = rest.partition(".")
        principal = self.rows.principal(principal_id) if prefix == TOKEN_PREFIX else None
        # Compare even for an unknown id, so both refusals take the same time.
        expected = principal.token_hash if principal is not None else "0" * 64
        if not hmac.compare_digest(_hash(secret), expected) or principal is None or principal.disabled:
            raise Unauthenticated(_BAD_TOKEN)
        return principal

    # -- management -----------------------------------------------------------
    def create(self, name: str, kind: Kind, admin: bool, created_by: str) -> tuple[PrincipalRecord, str]:
        validate.principal_name(name)
        with self._lock:
            if any(p.name == name for p in self.rows.principals()):  # the store checks again, atomically
                raise name_taken(name)
            principal_id = ids.new_id(ids.PRINCIPAL_PREFIX)
            token, token_hash = mint_token(principal_id)
            record = PrincipalRecord(principal_id, name, kind, admin, token_hash, time.time_ns(), created_by)
            self.rows.add_principal(record)
        return record, token

    def get(self, ref: str) -> PrincipalRecord:
        """By id or name. Raises ``PrincipalNotFound``."""
        found = self.rows.principal(ref) or next((p for p in self.rows.principals() if p.name == ref), None)
        if found is None:
            raise principal_not_found(ref)
        return found

    def disable(self, ref: str) -> PrincipalRecord:
        with self._lock:
            record = replace(self.get(ref), disabled=True)
            self.rows.update_principal(record)
        return record

    def list(self, requested: int, token: str) -> Page[PrincipalRecord]:
        size = page_size(requested)
        after = str(decode_token(token, "principals") or "")
        rows = sorted((p for p in self.rows.principals() if p.principal_id > after), key=lambda p: p.principal_id)
        page = rows[:size]
        more = len(rows) > size
        return Page(page, encode_token("principals", page[-1].principal_id) if more else "")

    def bootstrap_admin(self, data_dir: Path) -> Path | None:
        """When there is no principal, create the admin principal and write its token to
        ``data_dir/admin.token`` (mode 0600, created exclusively). Returns the file's path, or None when
        principals exist (on a cluster node: another node made the admin first, even a moment ago).

        The token is written (to a side file, synced) before the principal is saved, and renamed into place
        after: a crash never leaves an admin whose token is nowhere. A start that finds the side file of an
        interrupted bootstrap finishes the rename if that admin was saved, and drops the file if not."""
        path, pending = data_dir / ADMIN_TOKEN_FILE, data_dir / f"{ADMIN_TOKEN_FILE}.new"
        if len(self):
            if pending.exists() and not path.exists():
                if self._saved(pending.read_text().strip()):
                    os.replace(pending, path)
                    fsync_path(data_dir)
                else:
                    pending.unlink()
            return None
        path.unlink(missing_ok=True)  # a stale file from a wiped store must not survive with an old token
        pending.unlink(missing_ok=True)
        principal_id = ids.new_id(ids.PRINCIPAL_PREFIX)
        token, token_hash = mint_token(principal_id)
        fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            with self._lock:
                self.rows.add_principal(PrincipalRecord(principal_id, ADMIN_NAME, "user", True, token_hash,
                                                        time.time_ns(), ""))
        except PrincipalNameTaken:  # a cluster node: another node's admin won the name
            pending.unlink()
            return None
        os.replace(pending, path)
        fsync_path(data_dir)
        return path

    def _saved(self, token: str) -> bool:
        try:
            self.authenticate(token)
        except Unauthenticated:
            return False
        return True
