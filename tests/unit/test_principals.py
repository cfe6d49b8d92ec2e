"""The admin bootstrap: a private token file, and no admin left without its token after a crash."""

from __future__ import annotations

import stat
from pathlib import Path

from memosd.governance.principals import ADMIN_TOKEN_FILE, Principals
from memosd.store.rocks import Store


def test_bootstrap_writes_a_private_token_that_authenticates(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    try:
        principals = Principals(store)
        path = principals.bootstrap_admin(tmp_path)
        assert path == tmp_path / ADMIN_TOKEN_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert principals.authenticate(path.read_text().strip()).admin
        assert principals.bootstrap_admin(tmp_path) is None  # principals exist: nothing again
        assert not (tmp_path / f"{ADMIN_TOKEN_FILE}.new").exists()
    finally:
        store.close()


def test_a_start_after_a_crash_between_saving_the_admin_and_the_rename_finishes_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    try:
        path = Principals(store).bootstrap_admin(tmp_path)
        assert path is not None
        pending = tmp_path / f"{ADMIN_TOKEN_FILE}.new"
        path.rename(pending)  # where the crash left it: saved admin, token still in the side file
        principals = Principals(store)  # the next start
        assert principals.bootstrap_admin(tmp_path) is None
        assert principals.authenticate(path.read_text().strip()).admin and not pending.exists()
    finally:
        store.close()
