"""Refusals every kernel part shares: a mount that is gone, a compacted revision, a frozen or moving cube."""

from __future__ import annotations

from memosd.errors import CubeFrozen, CubeMoving, MountNotFound, RevisionCompacted
from memosd.kernel.state import CubeState


def mount_not_found(mount_id: str) -> MountNotFound:
    """The one refusal for a mount id that is unknown, closed, or someone else's: they look the same."""
    return MountNotFound(f"no open mount {mount_id!r}; it was unmounted, its cube freed, or never existed. "
                         "Mount the cube again and use the new mount_id", mount=mount_id)


def oldest_readable(cube: CubeState) -> int:
    """The oldest revision compaction left the content of (see kernel/compact.py)."""
    return max(1, cube.record.compacted_below)


def check_readable(cube: CubeState, revision: int, action: str) -> None:
    """Refuse ``action`` at a revision compaction removed the content of (revision 0, the empty cube, stays)."""
    oldest = oldest_readable(cube)
    if 1 <= revision < oldest:
        raise RevisionCompacted(
            f"revision {revision} of cube {cube.record.name!r} was compacted by its retention policy: its log "
            f"entry stays but its content is gone. Revisions {oldest} to {cube.head} (HEAD) remain; {action} "
            "one of those", cube=cube.cube_id, revision=revision, oldest=oldest, head=cube.head)


def check_not_moving(cube: CubeState, action: str, *, opening: bool = False) -> None:
    """Refuse ``action`` while the cube moves between cluster nodes: any change once the move froze it;
    before that (its read-write mounts draining) only ``opening`` a new read-write mount."""
    if cube.moving and (cube.move_frozen or opening):
        where = (f"moving to cluster node {cube.moving!r}" if cube.move_direction == "to"
                 else f"arriving from cluster node {cube.moving!r}")
        raise CubeMoving(f"cube {cube.record.name!r} is {where}: {action} is refused until the move ends (seconds); "
                         "retry then, and the call reaches the cube's owner", cube=cube.cube_id,
                         **{cube.move_direction or "to": cube.moving})


def check_thawed(cube: CubeState, action: str) -> None:
    """Refuse ``action`` (something that would commit to the cube) while the cube is frozen or moving."""
    check_not_moving(cube, action)
    if cube.record.frozen:
        raise CubeFrozen(f"cube {cube.record.name!r} is frozen (read-only): {action} is refused. Reads, "
                         "searches and activations still work; ThawCube (memosctl cube thaw) accepts "
                         "commits again", cube=cube.cube_id)
