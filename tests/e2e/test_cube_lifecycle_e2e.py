"""The cube and item lifecycle through a real daemon over gRPC (issue 6, point 4): freeze and thaw,
archive and restore, TTL expiry and the purge after the grace period, retention and compaction."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from daemon_proc import DaemonProcess, client_fixture, daemon_fixture
from memos import Client, CubeFrozen, InvalidField, ItemNotFound, PermissionDenied, RevisionCompacted
from memos.v1 import memos_pb2, types_pb2

# The TTL tests' item: its expiry is awaited (the loop's revision), never raced; reads of it are pinned to a
# revision, so no assertion depends on how long the machine takes between calls.
TTL_SECONDS = 1
# The lifecycle loop's pass, here: fast, so the waits below are short.
LIFECYCLE_ENV = {"MEMOSD_LIFECYCLE__INTERVAL_SECONDS": "0.2"}


# A daemon without a model (plaintext memory only), with a fast lifecycle loop.
lifecycle_daemon = daemon_fixture("lifecycle", LIFECYCLE_ENV)
admin = client_fixture("lifecycle_daemon")


def test_frozen_cube_refuses_every_commit_path_with_cube_frozen_until_thawed(admin: Client) -> None:
    admin.alloc_cube("frosty")
    with admin.mount("frosty", writable=True) as m:
        (kept,) = m.write(["the glacier moves slowly"])
        m.commit("seed")
    early = admin.mount("frosty", writable=True)  # opened before the freeze, with staged work
    early.write(["staged before the freeze"])

    cube = admin.freeze_cube("frosty")
    assert cube.frozen and admin.stat_cube("frosty").frozen

    refusals = {
        "Commit": lambda: early.commit("after the freeze"),
        "Write": lambda: early.write(["more"]),
        "Forget": lambda: early.forget([kept]),
        "Ingest": lambda: early.ingest([{"speaker": "user", "text": "hi", "session_id": "s1"}]),
        "Mount (rw)": lambda: admin.mount("frosty", writable=True),
        "Rollback": lambda: admin.rollback("frosty", 0),
    }
    for name, attempt in refusals.items():
        with pytest.raises(CubeFrozen) as refused:
            attempt()
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, name
        assert "frozen" in refused.value.message and "ThawCube" in refused.value.message, name
    assert admin.stat_cube("frosty").head_revision == 1
    assert [r.number for r in admin.log("frosty")] == [1]

    # Reads and searches still work, and so does erasure (Purge), which makes no revision.
    with admin.mount("frosty") as ro:
        assert [h.item.item_id for h in ro.search("glacier", k=1, mode="lexical")] == [kept]
    assert list(admin.purge("frosty", [kept]).item_ids) == [kept]

    assert not admin.thaw_cube("frosty").frozen
    result = early.commit("after the thaw")  # the staging survived the refusals
    assert result.revision.number == 2 and admin.stat_cube("frosty").item_count == 1
    early.unmount()
    methods = [r.method for r in admin.audit(cube=admin.stat_cube("frosty").cube_id)]
    assert "FreezeCube" in methods and "ThawCube" in methods


def test_freeze_and_thaw_need_the_admin_right(admin: Client, lifecycle_daemon: DaemonProcess) -> None:
    admin.alloc_cube("guarded")
    writer, token = admin.create_principal("freeze-writer", kind="agent")
    admin.grant("guarded", writer.principal_id, ["read", "write"])
    with Client(lifecycle_daemon.address, token=token) as c:
        with pytest.raises(PermissionDenied):
            c.freeze_cube("guarded")
        admin.freeze_cube("guarded")
        with pytest.raises(PermissionDenied):
            c.thaw_cube("guarded")
        with pytest.raises(CubeFrozen):
            c.mount("guarded", writable=True)
    assert admin.thaw_cube("guarded").frozen is False


def test_memosctl_cube_freeze_and_thaw(admin: Client, lifecycle_daemon: DaemonProcess) -> None:
    admin.alloc_cube("cli-frozen")
    env = {**os.environ, "MEMOS_TARGET": lifecycle_daemon.address,
           "MEMOS_TOKEN_FILE": str(lifecycle_daemon.data_dir / "admin.token")}

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memos.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    frozen = ctl("cube", "freeze", "cli-frozen")
    assert frozen.returncode == 0 and "yes (read-only)" in frozen.stdout
    refused = ctl("mem", "write", "cli-frozen", "not while frozen")
    assert refused.returncode == 3 and "CUBE_FROZEN" in refused.stderr
    assert "yes (read-only)" in ctl("cube", "stat", "cli-frozen").stdout
    thawed = ctl("cube", "thaw", "cli-frozen")
    assert thawed.returncode == 0 and admin.stat_cube("cli-frozen").frozen is False
    assert ctl("mem", "write", "cli-frozen", "now it works").returncode == 0


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll until ``check``; the generous deadline only bounds a hang (the loop runs every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _lexical_ids(m: object, query: str, **options: bool) -> list[str]:
    return [h.item.item_id for h in m.search(query, k=5, mode="lexical", **options)]  # type: ignore[attr-defined]


def test_archive_hides_from_search_keeps_the_item_and_restore_brings_it_back(admin: Client) -> None:
    admin.alloc_cube("shelf")
    with admin.mount("shelf", writable=True) as m:
        owl, fox = m.write(["the barn owl hunts mice", "the red fox hunts voles"])
        m.commit("seed")

    rev = admin.archive("shelf", [owl])
    assert rev is not None and (rev.number, rev.changed, rev.added, rev.forgotten) == (2, 1, 0, 0)
    assert rev.message == "archive 1 item" and [r.number for r in admin.log("shelf")] == [2, 1]
    assert admin.archive("shelf", [owl]) is None  # already archived: no revision
    assert admin.stat_cube("shelf").head_revision == 2
    with admin.mount("shelf") as m:
        assert _lexical_ids(m, "hunts") == [fox]
        assert set(_lexical_ids(m, "hunts", include_archived=True)) == {owl, fox}
        (kept,) = m.read([owl])  # kept, and readable, with its state
        assert kept.state == types_pb2.ITEM_STATE_ARCHIVED and kept.text == "the barn owl hunts mice"
    with admin.mount("shelf", revision=1) as old:  # history is untouched
        assert set(_lexical_ids(old, "hunts")) == {owl, fox}
    (change,) = list(admin.diff("shelf", 1, 2))
    assert (change.item_id, change.kind) == (owl, types_pb2.CHANGE_KIND_CHANGED)
    assert (change.before.state, change.after.state) == (types_pb2.ITEM_STATE_ACTIVE, types_pb2.ITEM_STATE_ARCHIVED)

    restored = admin.restore("shelf", [owl])
    assert restored is not None and restored.number == 3
    with admin.mount("shelf") as m:
        assert set(_lexical_ids(m, "hunts")) == {owl, fox}
        assert m.read([owl])[0].state == types_pb2.ITEM_STATE_ACTIVE
    admin.rollback("shelf", 2)  # Rollback restores states too
    with admin.mount("shelf") as m:
        assert _lexical_ids(m, "hunts") == [fox]

    records = [r for r in admin.audit(cube=admin.stat_cube("shelf").cube_id) if r.method == "SetItemState"]
    assert [(list(r.item_ids), r.revision) for r in records if r.outcome == types_pb2.AUDIT_OUTCOME_OK][:1] == \
        [([owl], 2)]
    with pytest.raises(InvalidField):
        admin._call(admin._stub.SetItemState, memos_pb2.SetItemStateRequest(
            cube="shelf", item_ids=[owl], state=types_pb2.ITEM_STATE_EXPIRED))
    with pytest.raises(ItemNotFound):
        admin.archive("shelf", ["itm_aaaaaaaaaaaaaaaaaaaa"])
    admin.freeze_cube("shelf")
    with pytest.raises(CubeFrozen):
        admin.restore("shelf", [owl])
    admin.thaw_cube("shelf")


def test_a_ttl_item_expires_in_an_audited_revision_and_stays_until_the_grace_period_ends(admin: Client) -> None:
    # The module's daemon keeps the default grace period (a day): no test outlasts it, so the expired item is
    # there to read however slow the machine is. The purge once it ends is the next test's.
    admin.alloc_cube("mayfly")
    cube_id = admin.stat_cube("mayfly").cube_id
    with admin.mount("mayfly", writable=True) as m:
        (brief,) = m.write(["the mayfly lives one day"], ttl_seconds=TTL_SECONDS)
        (lasting,) = m.write(["the tortoise lives one century"])
        m.commit("seed")
        item = m.read([brief])[0]  # at the mount's revision 1, whatever the loop has committed since
        assert item.state == types_pb2.ITEM_STATE_ACTIVE and item.HasField("expire_time")
        assert not m.read([lasting])[0].HasField("expire_time")

    _wait_for("the expiry revision", lambda: admin.stat_cube("mayfly").head_revision == 2)
    (expiry, _) = list(admin.log("mayfly"))
    assert (expiry.author, expiry.message, expiry.changed) == ("memosd", "expire 1 item (TTL passed)", 1)
    with admin.mount("mayfly") as m:
        assert m.read([brief])[0].state == types_pb2.ITEM_STATE_EXPIRED  # left out, not yet purged
        assert _lexical_ids(m, "lives", include_archived=True) == [lasting]
    # The loop appends its audit record right after the commit (as the gate does after a syscall).
    _wait_for("the expiry's audit record",
              lambda: any(r.method == "Lifecycle.Expire" for r in admin.audit(cube=cube_id)))
    (expired,) = [r for r in admin.audit(cube=cube_id) if r.method == "Lifecycle.Expire"]
    assert (expired.principal_id, list(expired.item_ids), expired.revision) == ("", [brief], 2)
    assert not any(r.method == "Lifecycle.Purge" for r in admin.audit(cube=cube_id))  # within the grace


def test_an_expired_item_is_purged_from_every_revision_once_the_grace_period_ends(tmp_path: Path) -> None:
    # No grace period: the pass that expires the item purges it too, so nothing here waits for a window to end.
    env = {**LIFECYCLE_ENV, "MEMOSD_LIFECYCLE__EXPIRE_GRACE_SECONDS": "0"}
    daemon = DaemonProcess(tmp_path / "data", env=env).start()
    try:
        with Client(daemon.address, token=daemon.token, timeout=60) as admin:
            admin.alloc_cube("mayfly")
            cube_id = admin.stat_cube("mayfly").cube_id
            with admin.mount("mayfly", writable=True) as m:
                (brief,) = m.write(["the mayfly lives one day"], ttl_seconds=TTL_SECONDS)
                m.write(["the tortoise lives one century"])
                m.commit("seed")

            def purged() -> bool:
                return any(r.method == "Lifecycle.Purge" for r in admin.audit(cube=cube_id))

            _wait_for("the purge after the grace period", purged)
            assert [r.method for r in admin.audit(cube=cube_id) if r.method.startswith("Lifecycle.")] == [
                "Lifecycle.Expire", "Lifecycle.Purge"]  # expired (audited) first, then purged
            (purge,) = [r for r in admin.audit(cube=cube_id) if r.method == "Lifecycle.Purge"]
            assert list(purge.item_ids) == [brief] and purge.principal_id == ""
            with admin.mount("mayfly") as m, pytest.raises(ItemNotFound):
                m.read([brief])
            with admin.mount("mayfly", revision=1) as first, pytest.raises(ItemNotFound):
                first.read([brief])  # erased from every revision
            assert admin.stat_cube("mayfly").item_count == 1
    finally:
        stopped = daemon.stop()
    assert stopped == 0, daemon.log()


def test_memosctl_archive_restore_ttl_and_include_archived(admin: Client, lifecycle_daemon: DaemonProcess) -> None:
    admin.alloc_cube("cli-shelf")
    env = {**os.environ, "MEMOS_TARGET": lifecycle_daemon.address,
           "MEMOS_TOKEN_FILE": str(lifecycle_daemon.data_dir / "admin.token")}

    def ctl(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "memos.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    ctl("mem", "write", "cli-shelf", "a heron waits by the water")
    ctl("mem", "write", "cli-shelf", "a swallow skims the water", "--ttl", "3600")
    with admin.mount("cli-shelf") as m:
        items = {i.text: i for i in m.iter_items()}
    heron = items["a heron waits by the water"].item_id
    assert items["a swallow skims the water"].HasField("expire_time")
    assert "state:     archived" in ctl("mem", "archive", "cli-shelf", heron)
    assert heron not in ctl("mem", "search", "cli-shelf", "-q", "water", "--mode", "lexical")
    assert heron in ctl("mem", "search", "cli-shelf", "-q", "water", "--mode", "lexical", "--include-archived")
    assert "archived" in ctl("mem", "read", "cli-shelf", heron)
    ctl("mem", "restore", "cli-shelf", heron)
    assert heron in ctl("mem", "search", "cli-shelf", "-q", "water", "--mode", "lexical")


def _history(admin: Client, cube: str) -> dict[str, str]:
    """Five revisions: a is written, edited twice; b and c are added. Returns the ids."""
    admin.alloc_cube(cube)
    with admin.mount(cube, writable=True) as m:
        (a,) = m.write(["alpha one"])
        m.commit("r1")
        m.write([{"item_id": a, "text": "alpha two"}])
        m.commit("r2")
        (b,) = m.write(["beta"])
        m.commit("r3")
        m.write([{"item_id": a, "text": "alpha three"}])
        m.commit("r4")
        (c,) = m.write(["gamma"])
        m.commit("r5")
    return {"a": a, "b": b, "c": c}


def test_compaction_keeps_the_last_n_revisions_and_older_ones_are_out_of_range(admin: Client) -> None:
    ids = _history(admin, "annals")
    assert admin.stat_cube("annals").version_count == 5
    cube = admin.set_retention("annals", keep_last=2)
    assert cube.retention.keep_last == 2 and cube.oldest_revision == 1  # nothing compacted yet

    done = admin.compact("annals")
    # Revisions 4 and 5 are kept; "alpha one" (died at 2) and "alpha two" (died at 4) are deleted.
    assert (done.revisions_compacted, done.versions_removed, done.oldest_revision) == (3, 2, 4)
    stat = admin.stat_cube("annals")
    assert (stat.version_count, stat.item_count, stat.oldest_revision, stat.head_revision) == (3, 3, 4, 5)
    assert [(r.number, r.compacted) for r in admin.log("annals")] == [
        (5, False), (4, False), (3, True), (2, True), (1, True)]  # the log entries stay

    refusals = {
        "Mount": lambda: admin.mount("annals", revision=2),
        "Diff": lambda: list(admin.diff("annals", 3, 5)),
        "Rollback": lambda: admin.rollback("annals", 1),
    }
    for name, attempt in refusals.items():
        with pytest.raises(RevisionCompacted) as refused:
            attempt()
        assert refused.value.code == grpc.StatusCode.OUT_OF_RANGE, name
        assert "compacted" in refused.value.message and "Revisions 4 to 5 (HEAD) remain" in refused.value.message

    with admin.mount("annals", revision=4) as m:  # the kept revisions read as before
        assert sorted(i.text for i in m.iter_items()) == ["alpha three", "beta"]
        assert [h.item.text for h in m.search("alpha", k=5, mode="lexical")] == ["alpha three"]
        assert [h.item.item_id for h in m.search("alpha three", k=1, mode="dense")] == [ids["a"]]
    assert [c.item_id for c in admin.diff("annals", 4, 5)] == [ids["c"]]
    assert admin.rollback("annals", 4).number == 6

    again = admin.compact("annals")  # keep_last 2 now keeps 5 and 6; gamma (died at 6) is seen at 5: kept
    assert (again.revisions_compacted, again.versions_removed, again.oldest_revision) == (1, 0, 5)
    compactions = [r for r in admin.audit(cube=stat.cube_id, method="Compact")]
    assert [r.revision for r in compactions] == [4, 5]


def test_an_open_mount_keeps_its_revision_through_compaction(admin: Client) -> None:
    _history(admin, "pinned")
    admin.set_retention("pinned", keep_last=1)
    reader = admin.mount("pinned", revision=2)
    assert admin.compact("pinned").oldest_revision == 2
    assert sorted(i.text for i in reader.iter_items()) == ["alpha two"]
    reader.unmount()
    assert admin.compact("pinned").oldest_revision == 5


def test_the_lifecycle_loop_compacts_revisions_older_than_keep_seconds(admin: Client) -> None:
    admin.alloc_cube("aging")
    cube_id = admin.stat_cube("aging").cube_id
    with admin.mount("aging", writable=True) as m:
        (item,) = m.write(["first draft"])
        m.commit("old")
        time.sleep(1.5)
        m.write([{"item_id": item, "text": "second draft"}])
        m.commit("new")
    admin.set_retention("aging", keep_seconds=1.0)
    _wait_for("the loop's compaction", lambda: admin.stat_cube("aging").oldest_revision == 2)
    _wait_for("its audit record", lambda: any(r.method == "Lifecycle.Compact" for r in admin.audit(cube=cube_id)))
    (record,) = [r for r in admin.audit(cube=cube_id) if r.method == "Lifecycle.Compact"]
    assert (record.principal_id, record.revision, list(record.artifacts)) == ("", 2, ["compacted:1:1"])
    with pytest.raises(RevisionCompacted):
        admin.mount("aging", revision=1)


def test_a_frozen_cube_is_not_compacted(admin: Client) -> None:
    _history(admin, "held")
    # Frozen first: with the retention set first, the lifecycle loop (every 0.2 s) could compact it before
    # the freeze, and whether it did would depend on the machine's speed.
    admin.freeze_cube("held")
    admin.set_retention("held", keep_last=1)
    with pytest.raises(CubeFrozen):
        admin.compact("held")
    assert admin.stat_cube("held").oldest_revision == 1
    admin.thaw_cube("held")


def test_memosctl_cube_retention_compact_and_log(admin: Client, lifecycle_daemon: DaemonProcess) -> None:
    _history(admin, "cli-annals")
    env = {**os.environ, "MEMOS_TARGET": lifecycle_daemon.address,
           "MEMOS_TOKEN_FILE": str(lifecycle_daemon.data_dir / "admin.token")}

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memos.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    assert "last 2 revisions" in ctl("cube", "retention", "cli-annals", "--keep-last", "2").stdout
    compacted = ctl("cube", "compact", "cli-annals")
    assert compacted.returncode == 0 and "oldest kept:" in compacted.stdout
    assert admin.stat_cube("cli-annals").oldest_revision == 4
    assert "[compacted] r3" in ctl("log", "cli-annals").stdout
    refused = ctl("mem", "read", "cli-annals", "--revision", "2")
    assert refused.returncode == 3 and "REVISION_COMPACTED" in refused.stderr
