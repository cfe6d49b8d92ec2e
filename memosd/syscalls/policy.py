"""Which rights each syscall needs, on which cube: the one table every call is checked against.

``authorize`` runs before the handler, for every RPC of the MemOS service
(tests check that each has a rule). It resolves the cube (by ref, by the
caller's own mount, or by job) through ``AccessControl``, so a refusal is the
same whichever syscall meets it. Calls that list things (ListCubes,
ListJobs, ListGrants without a cube) are allowed here and filter what they
return by ``AccessControl.visible``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memosd_client.v1 import types_pb2 as t

from memosd.errors import PermissionDenied
from memosd.governance.access import AccessControl, Right
from memosd.parametric.jobs import JobManager
from memosd.store.records import JobRecord, PrincipalRecord

R, W, A, T, G = Right.READ, Right.WRITE, Right.ACTIVATE, Right.TRAIN, Right.GRANT


@dataclass(frozen=True)
class Rule:
    rights: frozenset[Right] = frozenset()
    cube: str = ""  # the request field naming a cube (id or name)
    mounts: tuple[str, ...] = ()  # request fields (dotted paths) holding mount ids; repeated or single
    # Mount fields that need other rights than `rights` (Generate's remember mount is written, not read).
    mounts_with: tuple[tuple[str, frozenset[Right]], ...] = ()
    job: str = ""  # the request field holding a job id
    admin: bool = False  # daemon admins only
    owner_or_admin: bool = False  # Audit: admins, or the owner of the cube named in `cube`
    rights_of: Callable[[Any], frozenset[Right]] | None = field(default=None, compare=False)
    # The rights on the job's cube, by the job (`job` set): what starting that kind of job needed.
    job_rights: Callable[[JobRecord], frozenset[Right]] | None = field(default=None, compare=False)


@dataclass
class Target:
    """What the call concerns, for the audit record."""

    cube_id: str = ""
    mount_id: str = ""


def _mount_rights(request: Any) -> frozenset[Right]:
    return frozenset({R, W}) if request.mode == t.MOUNT_MODE_READ_WRITE else frozenset({R})


def _rule(*rights: Right, **where: Any) -> Rule:
    return Rule(frozenset(rights), **where)


RULES: dict[str, Rule] = {
    "AllocCube": Rule(),
    "FreeCube": _rule(Right.ADMIN, cube="cube"),
    "StatCube": _rule(R, cube="cube"),
    "ListCubes": Rule(),
    "Mount": Rule(cube="cube", rights_of=_mount_rights),
    "Unmount": _rule(mounts=("mount_id",)),
    "Write": _rule(W, mounts=("mount_id",)),
    "Read": _rule(R, mounts=("mount_id",)),
    "Forget": _rule(W, mounts=("mount_id",)),
    "Search": _rule(R, mounts=("mount_ids",)),
    "Ingest": _rule(W, mounts=("mount_id",)),
    "Commit": _rule(W, mounts=("mount_id",)),
    "Log": _rule(R, cube="cube"),
    "Diff": _rule(R, cube="cube"),
    "Rollback": _rule(W, cube="cube"),
    "Stats": Rule(admin=True),
    "Activate": _rule(A, mounts=("mount_id",)),
    "Evict": _rule(A, cube="cube"),
    "Generate": _rule(R, A, mounts=("mount_ids", "options.adapter_mount_id"),
                      mounts_with=(("options.remember_mount_id", frozenset({W})),)),
    "ImportAdapter": _rule(W, mounts=("header.mount_id",)),
    "ExportAdapter": _rule(R, mounts=("mount_id",)),
    "Train": _rule(T, mounts=("mount_id",)),
    # It reads the mount's turns and commits derived items: a read-write mount's rights.
    "Extract": _rule(R, W, mounts=("mount_id",)),
    "WatchJob": _rule(R, job="job_id"),
    "CancelJob": _rule(T, job="job_id", job_rights=lambda job: frozenset({W}) if job.kind == "extract"
                       else frozenset({T})),  # who may start a kind of job may cancel one: Extract needs write
    "ListJobs": _rule(R, cube="cube"),  # an empty cube lists the jobs of visible cubes
    "SetCubePolicy": _rule(Right.ADMIN, cube="cube"),
    "SchedulerStatus": Rule(admin=True),
    "FreezeCube": _rule(Right.ADMIN, cube="cube"),
    "ThawCube": _rule(Right.ADMIN, cube="cube"),
    "SetItemState": _rule(W, cube="cube"),
    "SetRetention": _rule(Right.ADMIN, cube="cube"),
    "Compact": _rule(Right.ADMIN, cube="cube"),
    "CreatePrincipal": Rule(admin=True),
    "ListPrincipals": Rule(admin=True),
    "DisablePrincipal": Rule(admin=True),
    "WhoAmI": Rule(),
    "Grant": _rule(G, cube="cube"),
    "Revoke": _rule(G, cube="cube"),
    "ListGrants": _rule(G, cube="cube"),  # an empty cube lists the caller's own grants
    "Audit": Rule(cube="cube", owner_or_admin=True),
    "Purge": _rule(Right.ADMIN, cube="cube"),
    # An archive holds what a reader can already read (every revision, the adapter); the importer owns the copy.
    "ExportCube": _rule(R, cube="cube"),
    "ImportCube": Rule(),
    "MoveCube": _rule(Right.ADMIN, cube="cube"),
    # Node to node (the owner calls the target during MoveCube): they name no cube to route or check by
    # (the cube is the owner's in the directory until the switch), so daemon admins only.
    "ReceiveCube": Rule(admin=True),
    "SettleCube": Rule(admin=True),
    # The cluster config (cluster/settings.py): what every node applies, so daemon admins only.
    "GetClusterConfig": Rule(admin=True),
    "SetClusterConfig": Rule(admin=True),
}


def _field(request: Any, path: str) -> Any:
    value = request
    for part in path.split("."):
        value = getattr(value, part)
    return value


def authorize(access: AccessControl, jobs: JobManager, caller: PrincipalRecord, method: str, request: Any
              ) -> Target:
    """Check ``caller`` may make this call; returns what it concerns. Raises the refusal."""
    rule = RULES[method]
    target = Target()
    if rule.admin and not caller.admin:
        raise PermissionDenied(f"{method} is for admins; principal {caller.name!r} is not one")
    needed = rule.rights_of(request) if rule.rights_of else rule.rights
    if rule.owner_or_admin:
        ref = _field(request, rule.cube)
        if caller.admin:
            target.cube_id = access.kernel.cube(ref).cube_id if ref else ""
            return target
        if not ref:
            raise PermissionDenied(f"only admins read the whole audit log; principal {caller.name!r} can read the "
                                   "records of a cube it owns: name the cube")
        cube = access.cube(caller, ref, set())
        if cube.record.owner != caller.principal_id:
            raise PermissionDenied(f"only the owner of cube {cube.record.name!r} and admins read its audit records")
        target.cube_id = cube.cube_id
        return target
    if rule.cube and _field(request, rule.cube):
        target.cube_id = access.cube(caller, _field(request, rule.cube), needed).cube_id
    for path, rights in [*((path, needed) for path in rule.mounts), *rule.mounts_with]:
        value = _field(request, path)
        # An empty id names no mount: nothing to check, and the handler refuses it as missing.
        for mount_id in filter(None, [value] if isinstance(value, str) else list(value)):
            mount = access.mount(caller, mount_id, rights)
            target.cube_id = target.cube_id or mount.record.cube_id
            target.mount_id = target.mount_id or mount.mount_id
    if rule.job:
        job = jobs.get(_field(request, rule.job))
        job_cube = access.kernel.cube_record(job.cube_id)
        if job_cube is None or not access.visible(caller, job_cube):
            jobs.not_found(job.job_id)
        access.cube(caller, job.cube_id, rule.job_rights(job) if rule.job_rights else needed)
        target.cube_id = job.cube_id
    return target
