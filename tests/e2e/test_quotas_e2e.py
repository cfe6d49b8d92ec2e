"""Per-principal quotas through a real daemon: open mounts and staged bytes, with small limits set by env.

Each refusal is RESOURCE_EXHAUSTED / QUOTA_EXCEEDED naming the limit, the use and the config key; another
principal is unaffected; Unmount, Commit and Revoke give the quota back; a restart keeps the counts (the
mounts and their staging are persisted). No model: quotas are plaintext memory's.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import Client, MemosError
from memos.errors import QuotaExceeded

MAX_MOUNTS = 3
VECTOR = 384 * 4  # all-MiniLM-L6-v2: 384 float32 dimensions
TEXT = "the owl that hunts at night " * 36  # 1008 bytes
ITEM = len(TEXT) + VECTOR
MAX_STAGED = 2 * ITEM + 100  # two such items fit, a third does not
ENV = {"MEMOSD_QUOTAS__MAX_MOUNTS_PER_PRINCIPAL": str(MAX_MOUNTS),
       "MEMOSD_QUOTAS__MAX_STAGED_BYTES_PER_PRINCIPAL": str(MAX_STAGED)}
_names = itertools.count()


daemon = daemon_fixture("quotas", ENV)
admin = client_fixture(scope="module")


def user(daemon: DaemonProcess, admin: Client) -> Client:
    _, token = admin.create_principal(f"p{next(_names)}", kind="agent")
    return Client(daemon.address, token=token, timeout=60)


def quota_error(call: object, key: str) -> QuotaExceeded:
    with pytest.raises(MemosError) as caught:
        call()  # type: ignore[operator]
    error = caught.value
    assert isinstance(error, QuotaExceeded), repr(error)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "QUOTA_EXCEEDED"
    assert f"quotas.{key}" in error.message and error.metadata["key"] == f"quotas.{key}"
    return error


def test_open_mounts_are_limited_per_principal_and_unmount_or_revoke_frees_them(daemon: DaemonProcess,
                                                                                admin: Client) -> None:
    with user(daemon, admin) as alice, user(daemon, admin) as bob:
        mine = alice.alloc_cube(f"q{next(_names)}").cube_id
        shared = bob.alloc_cube(f"q{next(_names)}").cube_id
        bob.grant(shared, alice.whoami().principal_id, ["read"])
        first = alice.mount(mine)
        alice.mount(mine)
        alice.mount(shared)
        error = quota_error(lambda: alice.mount(mine), "max_mounts_per_principal")
        assert (error.metadata["limit"], error.metadata["used"]) == (str(MAX_MOUNTS), str(MAX_MOUNTS))
        assert f"holds {MAX_MOUNTS} open mounts" in error.message
        assert alice.stat_cube(mine).mount_count == 2  # the refused mount was not opened
        bob_mounts = [bob.mount(shared) for _ in range(MAX_MOUNTS)]  # bob's quota is his own
        assert alice.stat_cube(shared).mount_count == 1 + MAX_MOUNTS
        first.unmount()
        alice.mount(mine)  # the unmount gave one back
        quota_error(lambda: alice.mount(mine), "max_mounts_per_principal")
        assert bob.revoke(shared, alice.whoami().principal_id).mounts_closed == 1
        alice.mount(mine)  # the revoke's closed mount gave one back
        for m in bob_mounts:
            m.unmount()
        assert bob.stat_cube(shared).mount_count == 0


def test_staged_bytes_are_limited_per_principal_and_commit_or_unmount_frees_them(daemon: DaemonProcess,
                                                                                 admin: Client) -> None:
    with user(daemon, admin) as alice, user(daemon, admin) as bob:
        a, b = (alice.alloc_cube(f"q{next(_names)}").cube_id for _ in range(2))
        first, second = alice.mount(a, writable=True), alice.mount(b, writable=True)
        first.write([TEXT])
        second.write([TEXT])
        error = quota_error(lambda: second.write([TEXT]), "max_staged_bytes_per_principal")
        assert error.metadata["used"] == str(2 * ITEM) and error.metadata["limit"] == str(MAX_STAGED)
        assert "Commit or Unmount first" in error.message
        assert len(list(second.iter_items())) == 1  # nothing of the refused write was staged
        with bob.mount(bob.alloc_cube(f"q{next(_names)}").cube_id, writable=True) as theirs:
            theirs.write([TEXT, TEXT])  # bob's staged bytes are his own
        first.commit("one")
        second.write([TEXT])  # the commit freed what it committed
        quota_error(lambda: first.write([TEXT]), "max_staged_bytes_per_principal")
        second.unmount()
        first.write([TEXT, TEXT])  # the unmount freed the staging it discarded
        assert [i.text for i in first.iter_items()].count(TEXT) == 3


def test_the_counts_survive_a_restart(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path / "data", env=ENV).start()
    try:
        with Client(proc.address, token=proc.token, timeout=60) as admin:
            _, token = admin.create_principal("carol", kind="agent")
            with Client(proc.address, token=token, timeout=60) as carol:
                cube = carol.alloc_cube("restart").cube_id
                staging = carol.mount(cube, writable=True)
                staging.write([TEXT, TEXT])
                carol.mount(cube)
        assert proc.stop() == 0, proc.log()
        proc.start()
        with Client(proc.address, token=token, timeout=60) as carol:
            assert carol.stat_cube(cube).mount_count == 2
            carol.mount(cube)
            quota_error(lambda: carol.mount(cube), "max_mounts_per_principal")
            quota_error(lambda: carol.mount(cube, writable=True), "max_mounts_per_principal")
            error = quota_error(lambda: carol.write(staging.mount_id, ["one more"]),
                                "max_staged_bytes_per_principal")
            assert error.metadata["used"] == str(2 * ITEM)
            carol.unmount(staging.mount_id)
            carol.mount(cube)
    finally:
        proc.stop()
