"""The rights table covers the whole wire contract: no syscall can slip past the check."""

from __future__ import annotations

from pathlib import Path

import pytest
from activation_rig import open_rig
from memos.v1 import memos_pb2

from memosd.errors import PermissionDenied
from memosd.governance.access import AccessControl, Right
from memosd.governance.principals import Principals
from memosd.store.records import JobRecord, PrincipalRecord
from memosd.syscalls.policy import RULES, authorize

SERVICE = memos_pb2.DESCRIPTOR.services_by_name["MemOS"]


def test_every_syscall_has_exactly_one_rule() -> None:
    assert set(RULES) == {m.name for m in SERVICE.methods}


def test_rules_name_request_fields_that_exist() -> None:
    for method in SERVICE.methods:
        rule = RULES[method.name]
        request = getattr(memos_pb2, method.input_type.name)()
        for path in filter(None, (rule.cube, rule.job, *rule.mounts, *(p for p, _ in rule.mounts_with))):
            value = request
            for part in path.split("."):
                assert hasattr(value, part), f"{method.name}: {path}"
                value = getattr(value, part)


def test_every_call_that_touches_a_cube_names_how_it_finds_it() -> None:
    daemon_wide = {"AllocCube", "ImportCube", "ReceiveCube", "SettleCube", "GetClusterConfig", "SetClusterConfig",
                   "ListCubes", "Stats", "CreatePrincipal", "ListPrincipals",
                   "DisablePrincipal", "WhoAmI", "SchedulerStatus"}
    for name, rule in RULES.items():
        if name in daemon_wide:
            assert not (rule.cube or rule.mounts or rule.job)
        else:
            assert rule.cube or rule.mounts or rule.job, name
            assert rule.rights or rule.rights_of or rule.owner_or_admin or name == "Unmount", name
    assert RULES["Generate"].rights == {Right.READ, Right.ACTIVATE}
    # Remembering writes the exchange into the remember mount's cube: the write right there, not read.
    assert dict(RULES["Generate"].mounts_with) == {"options.remember_mount_id": {Right.WRITE}}


def test_every_syscall_is_implemented() -> None:
    """Nothing answers UNIMPLEMENTED (README): the servicer has a handler for every method of the contract.
    The generated base servicer's NotImplementedError stubs are never registered (syscalls/registry.py)."""
    from memosd.syscalls.servicer import MemOSServicer

    missing = [m.name for m in SERVICE.methods if not callable(getattr(MemOSServicer, m.name, None))]
    assert missing == []


def test_cancel_job_needs_the_right_that_starting_that_kind_of_job_needs(tmp_path: Path) -> None:
    """Train needs train and Extract needs write: a principal that may start an Extract may cancel it, and a
    train-only one may not cancel someone's Extract (nor a write-only one a Train)."""
    rig = open_rig(tmp_path, "none")
    try:
        principals = Principals(rig.kernel.store)
        access = AccessControl(rig.kernel, principals)
        owner, _ = principals.create("owner", "user", False, "")
        writer, _ = principals.create("writer", "agent", False, "")
        trainer, _ = principals.create("trainer", "agent", False, "")
        cube_id = rig.kernel.alloc_cube("c", "", {}, owner=owner.principal_id).record.cube_id
        access.grant(owner, "c", writer.principal_id, [Right.READ, Right.WRITE], 0)
        access.grant(owner, "c", trainer.principal_id, [Right.READ, Right.TRAIN], 0)
        jobs = {kind: JobRecord(f"job_{kind}", cube_id, 1, {}, "", "", 0, kind=kind)  # type: ignore[arg-type]
                for kind in ("extract", "train")}

        class Jobs:
            def get(self, job_id: str) -> JobRecord:
                return jobs[job_id.removeprefix("job_")]

            def not_found(self, job_id: str) -> None:
                raise AssertionError(f"{job_id} is visible to every caller here")

        def cancel(caller: PrincipalRecord, kind: str) -> None:
            authorize(access, Jobs(), caller, "CancelJob",  # type: ignore[arg-type]
                      memos_pb2.CancelJobRequest(job_id=f"job_{kind}"))

        cancel(writer, "extract")
        cancel(trainer, "train")
        with pytest.raises(PermissionDenied, match="write"):
            cancel(trainer, "extract")
        with pytest.raises(PermissionDenied, match="train"):
            cancel(writer, "train")
    finally:
        rig.close()
