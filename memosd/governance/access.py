"""Rights on cubes: who holds what, and the one check every syscall goes through.

A cube's owner (``CubeRecord.owner``) and admins hold every right; anyone
else holds what an unexpired grant gives them. A caller holding no right on a
cube cannot tell it from a cube that does not exist: the refusal is
CUBE_NOT_FOUND with the kernel's own message. A caller that sees the cube but
lacks a right gets PERMISSION_DENIED naming it. Mounts belong to the principal
that opened them; anyone else's mount id is MOUNT_NOT_FOUND, like an unknown one.

Rights are checked on every call, not only at Mount, so a revoked or expired
grant stops a principal's next call through a mount it still holds. Grants live in the
GovernanceStore (governance/ports.py: this node's RocksDB, or etcd on a cluster node); when a shared
store cannot confirm its copy is current (``unconfirmed``), rights that come from a grant are refused
with CLUSTER_UNAVAILABLE rather than trusted, while owners and admins keep theirs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from memosd.errors import ClusterUnavailable, CubeNotFound, InvalidField, PermissionDenied
from memosd.governance.principals import Principals
from memosd.kernel.kernel import CubeState, Kernel, MountState, mount_not_found
from memosd.store.records import CubeRecord, GrantRecord, PrincipalRecord


class Right(StrEnum):
    READ = "read"
    WRITE = "write"
    ACTIVATE = "activate"
    TRAIN = "train"
    GRANT = "grant"
    ADMIN = "admin"


ALL_RIGHTS = frozenset(Right)
# The caller when authentication is switched off (auth.enabled = false): it may do anything.
ANONYMOUS_ADMIN = PrincipalRecord("", "anonymous", "user", True, "", 0)


@dataclass(frozen=True)
class GrantView:
    """What one principal holds on one cube, as ListGrants shows it."""

    cube_id: str
    principal_id: str
    rights: frozenset[Right]
    granted_by: str = ""
    update_ns: int = 0
    expire_ns: int = 0
    owner: bool = False

    @property
    def expired(self) -> bool:
        return bool(self.expire_ns) and self.expire_ns <= time.time_ns()


class AccessControl:
    def __init__(self, kernel: Kernel, principals: Principals) -> None:
        self.kernel = kernel
        self.principals = principals
        self.rows = principals.rows  # principals and grants are kept in one GovernanceStore
        self._lock = threading.Lock()

    # -- the check -------------------------------------------------------------
    def rights(self, caller: PrincipalRecord, cube: CubeRecord) -> frozenset[Right]:
        if caller.admin or (cube.owner and cube.owner == caller.principal_id):
            return ALL_RIGHTS
        grant = self.rows.grant(cube.cube_id, caller.principal_id)
        if grant is None or (grant.expire_ns and grant.expire_ns <= time.time_ns()) or self.rows.unconfirmed():
            return frozenset()
        return frozenset(Right(r) for r in grant.rights)

    @contextmanager
    def still_holds(self, principal_id: str, right: Right, cube: CubeState) -> Iterator[None]:
        """Refuse unless ``principal_id`` is enabled and holds ``right`` on ``cube`` now, and keep it so for the
        body: Grant, Revoke and DisablePrincipal wait for it, so one that lands first wins. A training job
        commits its result inside this, as the principal that started it (under the cube's lock, which is
        taken before these locks and never after them)."""
        with self._lock, self.principals.lock:
            principal = self.principals.get(principal_id)
            if principal.disabled or right not in self.rights(principal, cube.record):
                why = ("was disabled" if principal.disabled
                       else f"no longer holds the {right} right (revoked, or its grant expired)")
                raise PermissionDenied(
                    f"principal {principal.name!r}, which started the job, {why}: nothing was committed to cube "
                    f"{cube.record.name!r}. Start the job again once the right is back", cube=cube.cube_id,
                    missing=str(right), principal=principal_id)
            yield

    def visible(self, caller: PrincipalRecord, cube: CubeRecord) -> bool:
        return bool(self.rights(caller, cube))

    def visible_by_id(self, caller: PrincipalRecord, cube_id: str) -> bool:
        """Whether the caller may see a cube this node does not hold (a cluster ListCubes listing a cube whose
        owner is down): an admin, or a live grant. Its owning principal is in the owner's store, unknown here."""
        if caller.admin:
            return True
        grant = self.rows.grant(cube_id, caller.principal_id)
        return not (grant is None or (grant.expire_ns and grant.expire_ns <= time.time_ns())
                    or self.rows.unconfirmed() or not grant.rights)

    def cube(self, caller: PrincipalRecord, ref: str, needed: Iterable[Right]) -> CubeState:
        """The cube ``ref`` names, if the caller holds ``needed`` on it."""
        cube = self.kernel.cube(ref)
        self._require(caller, cube, ref, frozenset(needed))
        return cube

    def mount(self, caller: PrincipalRecord, mount_id: str, needed: Iterable[Right]) -> MountState:
        """The caller's own open mount, if it (still) holds ``needed`` on the mount's cube."""
        mount = self.kernel.mount_state(mount_id)
        if mount.record.principal != caller.principal_id and not (caller.admin and not mount.record.principal):
            raise mount_not_found(mount_id)
        cube = self.kernel.cube_of(mount)
        if not self.visible(caller, cube.record):
            raise mount_not_found(mount_id)
        self._require(caller, cube, cube.record.name, frozenset(needed))
        return mount

    def _require(self, caller: PrincipalRecord, cube: CubeState, ref: str, needed: frozenset[Right]) -> None:
        held = self.rights(caller, cube.record)
        if not held:
            unconfirmed = self.rows.unconfirmed()
            if unconfirmed and self.rows.grant(cube.cube_id, caller.principal_id) is not None:
                # Fail safe: the grant may have been revoked elsewhere. It never names the cube.
                raise ClusterUnavailable(unconfirmed)
            raise CubeNotFound(f"no cube with id or name {ref!r}", cube=ref)
        missing = sorted(needed - held)
        if missing:
            raise PermissionDenied(
                f"principal {caller.name!r} lacks the {', '.join(missing)} right{'s' if len(missing) > 1 else ''} "
                f"on cube {cube.record.name!r}; its owner, or a principal holding the grant right, can Grant it",
                cube=cube.cube_id, missing=",".join(missing))

    # -- grants ---------------------------------------------------------------------
    def grant(self, caller: PrincipalRecord, ref: str, principal_ref: str, rights: Iterable[Right],
              expire_ns: int) -> GrantView:
        wanted = frozenset(rights)
        if not wanted:
            raise InvalidField("rights is empty; name at least one right to grant", field="rights")
        if expire_ns and expire_ns <= time.time_ns():
            raise InvalidField("expire_time is in the past; give a future time, or none for no expiry",
                               field="expire_time")
        cube = self.cube(caller, ref, {Right.GRANT})
        beyond = sorted(wanted - self.rights(caller, cube.record))
        if beyond:
            raise PermissionDenied(f"principal {caller.name!r} cannot grant rights it does not hold: "
                                   f"{', '.join(beyond)}", cube=cube.cube_id)
        grantee = self.principals.get(principal_ref)
        if cube.record.owner == grantee.principal_id:
            raise InvalidField(f"principal {grantee.name!r} owns cube {cube.record.name!r} and holds every right "
                               "on it already", field="principal")

        def add(held: GrantRecord | None) -> GrantRecord:
            current = set(held.rights) if held and not (held.expire_ns and held.expire_ns <= time.time_ns()) else set()
            return GrantRecord(cube.cube_id, grantee.principal_id, sorted(current | {str(r) for r in wanted}),
                               caller.principal_id, time.time_ns(), expire_ns)

        with self._lock:
            self.rows.change_grant(cube.cube_id, grantee.principal_id, add)
        return self._view(cube.record, grantee.principal_id)

    def revoke(self, caller: PrincipalRecord, ref: str, principal_ref: str, rights: Iterable[Right]
               ) -> tuple[GrantView, int]:
        """Take ``rights`` (all when empty) back; closes the principal's mounts of the cube."""
        cube = self.cube(caller, ref, {Right.GRANT})
        grantee = self.principals.get(principal_ref)
        if cube.record.owner == grantee.principal_id:
            raise InvalidField(f"principal {grantee.name!r} owns cube {cube.record.name!r}; an owner's rights "
                               "cannot be revoked", field="principal")
        taken = {str(r) for r in rights}

        def take(held: GrantRecord | None) -> GrantRecord | None:
            left = sorted(set(held.rights) - taken) if held is not None and taken else []
            if held is None or not left:
                return None
            return GrantRecord(held.cube_id, held.principal_id, left, caller.principal_id, time.time_ns(),
                               held.expire_ns)

        with self._lock:
            self.rows.change_grant(cube.cube_id, grantee.principal_id, take)
        closed = self.close_mounts(grantee.principal_id, cube.cube_id)
        return self._view(cube.record, grantee.principal_id), closed

    def list_grants(self, caller: PrincipalRecord, ref: str) -> list[GrantView]:
        """Everyone's rights on a cube (needs the grant right), or the caller's own grants for ref ""."""
        if ref:
            cube = self.cube(caller, ref, {Right.GRANT})
            views = [self._view(cube.record, cube.record.owner)] if cube.record.owner else []
            return views + [self._view(cube.record, pid) for (cid, pid) in self._grant_keys() if cid == cube.cube_id]
        records = {record.cube_id: record for record in self.kernel.cube_records()}
        mine = [record for record in records.values() if record.owner == caller.principal_id]
        granted = [records[cid] for (cid, pid) in self._grant_keys() if pid == caller.principal_id and cid in records]
        return [self._view(record, caller.principal_id) for record in mine + granted]

    def close_mounts(self, principal_id: str, cube_id: str = "") -> int:
        """Unmount the principal's mounts (of one cube, or all); staged changes are discarded."""
        doomed = [m.record.mount_id for m in self.kernel.mounts_of(cube_id, principal=principal_id)]
        for mount_id in doomed:
            self.kernel.unmount(mount_id)
        return len(doomed)

    def forget_cube(self, cube_id: str) -> None:
        """FreeCube deleted the cube's grant rows with its key range; drop them from memory too (and from
        etcd on a cluster node)."""
        with self._lock:
            self.rows.forget_cube(cube_id)

    def _grant_keys(self) -> list[tuple[str, str]]:
        return sorted((g.cube_id, g.principal_id) for g in self.rows.grants())

    def _view(self, cube: CubeRecord, principal_id: str) -> GrantView:
        if cube.owner and cube.owner == principal_id:
            return GrantView(cube.cube_id, principal_id, ALL_RIGHTS, owner=True, update_ns=cube.create_ns)
        grant = self.rows.grant(cube.cube_id, principal_id)
        if grant is None:
            return GrantView(cube.cube_id, principal_id, frozenset())
        return GrantView(cube.cube_id, principal_id, frozenset(Right(r) for r in grant.rights), grant.granted_by,
                         grant.update_ns, grant.expire_ns)
