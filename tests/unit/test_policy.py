"""The rights table covers the whole wire contract: no syscall can slip past the check."""

from __future__ import annotations

from memos.v1 import memos_pb2

from memosd.governance.access import Right
from memosd.syscalls.policy import RULES

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
    daemon_wide = {"AllocCube", "ImportCube", "ListCubes", "Stats", "CreatePrincipal", "ListPrincipals",
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
