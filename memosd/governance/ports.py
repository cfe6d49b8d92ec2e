"""Where governance keeps principals and grants: the interface Principals and AccessControl use.

Two implementations: ``governance/local.py`` (this node's RocksDB, a single node: as before) and
``cluster/grants.py`` (etcd, a cluster node: a token and a right mean the same on every node). Governance
never sees etcd; its unit tests pass a fake. Reads answer from memory (every call checks a token and a
right, so a read must never wait on a disk or a network); changes write through and may take a round
trip, and raise ClusterUnavailable when the shared state cannot be changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from memosd.store.records import GrantRecord, PrincipalRecord

# A grant's read-modify-write: the current record (None: none) -> the new one (None: delete it).
GrantChange = Callable[[GrantRecord | None], GrantRecord | None]


class GovernanceStore(Protocol):
    # -- reads (memory only) -----------------------------------------------------------------------
    def principal(self, principal_id: str) -> PrincipalRecord | None: ...

    def principals(self) -> list[PrincipalRecord]: ...

    def grant(self, cube_id: str, principal_id: str) -> GrantRecord | None: ...

    def grants(self) -> list[GrantRecord]: ...

    def unconfirmed(self) -> str:
        """Why rights from grants cannot be trusted now ("" when they can). Only a shared store says
        anything here: one that has not been able to confirm its copy is current for too long (a
        revocation elsewhere may not have reached it), so rights that come from a grant are refused
        until it can; owners, admins and tokens are not affected."""
        ...

    # -- changes (written through) -----------------------------------------------------------------
    def add_principal(self, record: PrincipalRecord) -> None:
        """A new principal; raises PrincipalNameTaken when its name is held (checked atomically)."""
        ...

    def update_principal(self, record: PrincipalRecord) -> None:
        """An existing principal changed (disabled); raises PrincipalNotFound when it is not there."""
        ...

    def change_grant(self, cube_id: str, principal_id: str, change: GrantChange) -> GrantRecord | None:
        """Apply ``change`` to the current grant atomically (a concurrent change elsewhere makes it run
        again on the newer record); returns what is stored now."""
        ...

    def forget_cube(self, cube_id: str) -> None:
        """The cube was freed: its grants go (locally, FreeCube deleted their rows with its key range)."""
        ...


__all__ = ["GovernanceStore", "GrantChange"]
