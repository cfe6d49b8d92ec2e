"""A single node's principals and grants: held in memory (there are few) and written through to its
RocksDB, synced. The GovernanceStore of a node without ``[cluster] etcd`` (governance/ports.py)."""

from __future__ import annotations

import threading

from memosd.errors import PrincipalNameTaken, PrincipalNotFound
from memosd.governance.ports import GrantChange
from memosd.store.records import GrantRecord, PrincipalRecord
from memosd.store.rocks import Store


def name_taken(name: str) -> PrincipalNameTaken:
    return PrincipalNameTaken(f"a principal named {name!r} exists; pick another name", name=name)


def principal_not_found(ref: str) -> PrincipalNotFound:
    return PrincipalNotFound(f"no principal with id or name {ref!r}; list them with ListPrincipals", principal=ref)


class LocalGovernance:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._principals = {p.principal_id: p for p in store.iter_principals()}
        self._grants = {(g.cube_id, g.principal_id): g for g in store.iter_grants()}

    def principal(self, principal_id: str) -> PrincipalRecord | None:
        return self._principals.get(principal_id)

    def principals(self) -> list[PrincipalRecord]:
        return list(self._principals.values())

    def grant(self, cube_id: str, principal_id: str) -> GrantRecord | None:
        return self._grants.get((cube_id, principal_id))

    def grants(self) -> list[GrantRecord]:
        return list(self._grants.values())

    def unconfirmed(self) -> str:
        return ""  # the node's own store is always current

    def add_principal(self, record: PrincipalRecord) -> None:
        with self._lock:
            if any(p.name == record.name for p in self._principals.values()):
                raise name_taken(record.name)
            self.store.put_principal(record)
            self._principals[record.principal_id] = record

    def update_principal(self, record: PrincipalRecord) -> None:
        with self._lock:
            if record.principal_id not in self._principals:
                raise principal_not_found(record.principal_id)
            self.store.put_principal(record)
            self._principals[record.principal_id] = record

    def change_grant(self, cube_id: str, principal_id: str, change: GrantChange) -> GrantRecord | None:
        key = (cube_id, principal_id)
        with self._lock:
            new = change(self._grants.get(key))
            if new is None:
                if self._grants.pop(key, None) is not None:
                    self.store.delete_grant(cube_id, principal_id)
            else:
                self.store.put_grant(new)
                self._grants[key] = new
            return new

    def forget_cube(self, cube_id: str) -> None:
        with self._lock:
            for key in [k for k in self._grants if k[0] == cube_id]:
                del self._grants[key]


__all__ = ["LocalGovernance", "name_taken", "principal_not_found"]
