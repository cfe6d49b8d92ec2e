"""Principals and AccessControl over the GovernanceStore port (governance/ports.py), with a fake store:
what governance does with a shared store's answers (a lost bootstrap race, a copy it cannot confirm, a
grant changed elsewhere between the read and the write), without etcd (tests/cluster/test_grants*.py
run the etcd one)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from memosd.errors import ClusterUnavailable, CubeNotFound, PrincipalNameTaken
from memosd.governance.access import AccessControl, Right
from memosd.governance.ports import GovernanceStore, GrantChange
from memosd.governance.principals import ADMIN_TOKEN_FILE, Principals, mint_token
from memosd.kernel.kernel import Kernel
from memosd.store.records import CubeRecord, GrantRecord, PrincipalRecord


class FakeStore:
    """The port in memory; ``stale`` is what unconfirmed() says; ``elsewhere`` is applied to a grant just
    before a change reads it (another node's change, seen by the store, not yet by the caller)."""

    def __init__(self) -> None:
        self.by_id: dict[str, PrincipalRecord] = {}
        self.grant_rows: dict[tuple[str, str], GrantRecord] = {}
        self.stale = ""
        self.elsewhere: GrantChange | None = None

    def principal(self, principal_id: str) -> PrincipalRecord | None:
        return self.by_id.get(principal_id)

    def principals(self) -> list[PrincipalRecord]:
        return list(self.by_id.values())

    def grant(self, cube_id: str, principal_id: str) -> GrantRecord | None:
        return self.grant_rows.get((cube_id, principal_id))

    def grants(self) -> list[GrantRecord]:
        return list(self.grant_rows.values())

    def unconfirmed(self) -> str:
        return self.stale

    def add_principal(self, record: PrincipalRecord) -> None:
        if any(p.name == record.name for p in self.by_id.values()):
            raise PrincipalNameTaken("taken", name=record.name)
        self.by_id[record.principal_id] = record

    def update_principal(self, record: PrincipalRecord) -> None:
        self.by_id[record.principal_id] = record

    def change_grant(self, cube_id: str, principal_id: str, change: GrantChange) -> GrantRecord | None:
        key = (cube_id, principal_id)
        if self.elsewhere is not None:
            other = self.elsewhere(self.grant_rows.get(key))
            if other is not None:
                self.grant_rows[key] = other
            self.elsewhere = None
        new = change(self.grant_rows.get(key))
        if new is None:
            self.grant_rows.pop(key, None)
        else:
            self.grant_rows[key] = new
        return new

    def forget_cube(self, cube_id: str) -> None:
        for key in [k for k in self.grant_rows if k[0] == cube_id]:
            del self.grant_rows[key]


@dataclass
class FakeCube:
    record: CubeRecord

    @property
    def cube_id(self) -> str:
        return self.record.cube_id


class FakeKernel:
    def __init__(self, cube: CubeRecord) -> None:
        self.the_cube = FakeCube(cube)

    def cube(self, ref: str) -> FakeCube:
        if ref not in (self.the_cube.cube_id, self.the_cube.record.name):
            raise CubeNotFound(f"no cube with id or name {ref!r}", cube=ref)
        return self.the_cube

    def mounts_of(self, cube_id: str, principal: str = "") -> list[Any]:
        return []


def _principal(name: str, admin: bool = False) -> PrincipalRecord:
    return PrincipalRecord(f"p_{name}", name, "user", admin, mint_token(f"p_{name}")[1], time.time_ns())


def _rig() -> tuple[FakeStore, AccessControl, CubeRecord, dict[str, PrincipalRecord]]:
    store = FakeStore()
    who = {n: _principal(n, admin=n == "root") for n in ("owner", "grantee", "stranger", "root")}
    for record in who.values():
        store.add_principal(record)
    cube = CubeRecord("cube_" + "1" * 24, "c", "", {}, time.time_ns(), owner=who["owner"].principal_id)
    access = AccessControl(cast(Kernel, FakeKernel(cube)), Principals(cast(GovernanceStore, store)))
    access.grant(who["owner"], "c", "grantee", [Right.READ], 0)
    return store, access, cube, who


def test_a_copy_the_store_cannot_confirm_refuses_rights_from_grants_only() -> None:
    store, access, cube, who = _rig()
    assert access.cube(who["grantee"], "c", {Right.READ}).cube_id == cube.cube_id
    store.stale = "cannot confirm the grants are current"
    with pytest.raises(ClusterUnavailable, match="cannot confirm") as refused:
        access.cube(who["grantee"], "c", {Right.READ})
    assert "c" not in refused.value.metadata.values() and cube.cube_id not in refused.value.message
    assert access.rights(who["grantee"], cube) == frozenset()  # filters (ListCubes) see nothing
    for name in ("owner", "root"):  # owners and admins are not affected
        assert access.cube(who[name], "c", {Right.ADMIN}).cube_id == cube.cube_id
    with pytest.raises(CubeNotFound):  # no grant at all: as before, it says nothing about the store
        access.cube(who["stranger"], "c", {Right.READ})
    store.stale = ""
    assert access.cube(who["grantee"], "c", {Right.READ}).cube_id == cube.cube_id


def test_a_grant_is_a_read_modify_write_of_the_stores_newest_record() -> None:
    store, access, cube, who = _rig()
    # Another node added write between this node's last look and the change: both rights survive.
    store.elsewhere = lambda held: GrantRecord(cube.cube_id, "p_grantee", sorted({*(held.rights if held else []),
                                                                                    "write"}), "p_owner", 1)
    view = access.grant(who["owner"], "c", "grantee", [Right.ACTIVATE], 0)
    assert view.rights == {Right.READ, Right.WRITE, Right.ACTIVATE}
    assert access.revoke(who["owner"], "c", "grantee", [Right.READ, Right.WRITE])[1] == 0
    assert store.grant(cube.cube_id, "p_grantee").rights == ["activate"]  # type: ignore[union-attr]
    access.revoke(who["owner"], "c", "grantee", [])
    assert store.grant(cube.cube_id, "p_grantee") is None


def test_a_bootstrap_whose_admin_name_another_node_won_writes_no_token(tmp_path: Path) -> None:
    store = FakeStore()
    racing = Principals(cast(GovernanceStore, store))
    # Between this node's look (no principal) and its write, another node made the cluster's admin.
    original = store.add_principal

    def lost(record: PrincipalRecord) -> None:
        original(_principal("admin", admin=True))
        original(record)

    store.add_principal = lost  # type: ignore[method-assign]
    assert racing.bootstrap_admin(tmp_path) is None
    assert not (tmp_path / ADMIN_TOKEN_FILE).exists() and not (tmp_path / f"{ADMIN_TOKEN_FILE}.new").exists()
    assert [p.principal_id for p in store.principals()] == ["p_admin"]


def test_a_side_file_whose_admin_was_never_saved_is_dropped(tmp_path: Path) -> None:
    store = FakeStore()
    store.add_principal(_principal("admin", admin=True))  # another node's
    pending = tmp_path / f"{ADMIN_TOKEN_FILE}.new"
    pending.write_text(mint_token("p_never_saved")[0] + "\n")  # a crash before our admin reached the store
    assert Principals(cast(GovernanceStore, store)).bootstrap_admin(tmp_path) is None
    assert not pending.exists() and not (tmp_path / ADMIN_TOKEN_FILE).exists()
