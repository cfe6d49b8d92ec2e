"""The kernel's DirectoryPort on a cluster node: cubes claimed in etcd's directory for this node.

AllocCube and ImportCube claim the cube id and its name in one txn before they commit locally (and
release it if the local commit fails); FreeCube checks that the directory answers, frees locally, then
releases. etcd without quorum (or out of reach) is ClusterUnavailable: creation and removal are refused,
calls on existing cubes go on (they never ask etcd). What this node claims or releases is noted in its
DirectoryView at once, so its own router sees it before the watch event comes back.
"""

from __future__ import annotations

import logging

from memosd.cluster.directory import CubeClaimed, Directory, StaleEpoch
from memosd.cluster.etcd import EtcdError, EtcdUnavailable
from memosd.cluster.view import DirectoryView, node_tag
from memosd.errors import ClusterUnavailable, CubeNotFound
from memosd.logfmt import log_event

log = logging.getLogger("memosd.cluster")

UNAVAILABLE = ("the cluster directory is unavailable (etcd has no quorum): cube creation and removal are "
               "refused until it is back; calls on existing cubes still work")


def unavailable(error: EtcdError) -> ClusterUnavailable:
    """A claim whose txn was cut off after it was sent may have been made (the etcd error says "outcome
    unknown"): its entry then names this node for a cube it lacks, reported at the next join (missing)."""
    return ClusterUnavailable(f"{UNAVAILABLE} ({error})")


class DirectoryClaims:
    def __init__(self, directory: Directory, node: str, view: DirectoryView | None = None) -> None:
        self.directory = directory
        self.node = node
        self.view = view
        self.node_tag = node_tag(node)

    def claim(self, cube_id: str, name: str, principal: str = "") -> bool:
        try:
            entry = self.directory.claim(cube_id, self.node, name, principal)
        except CubeClaimed:
            return False
        except EtcdError as e:  # EtcdUnavailable (no quorum, no endpoint) or etcd refusing the txn
            raise unavailable(e) from None
        if self.view is not None:
            self.view.noted(entry)
        return True

    def check_changeable(self, cube_id: str) -> None:
        try:
            self.directory.lookup(cube_id)  # a linearizable read: it needs a quorum, as the release will
        except EtcdError as e:
            raise unavailable(e) from None

    def release(self, cube_id: str) -> None:
        """Best effort once the cube is gone here: a release that fails is logged (the entry then names
        this node for a cube it lacks, which the next join reports), never raised over a done free."""
        try:
            entry = self.directory.lookup(cube_id)
            if entry is not None and entry.owner == self.node:
                self.directory.release(cube_id, self.node, entry.epoch)
        except (EtcdError, EtcdUnavailable, StaleEpoch, CubeNotFound) as e:
            log_event(log, "cluster_release_failed", level=logging.WARNING, cube=cube_id, error=str(e))
        if self.view is not None:
            self.view.dropped(cube_id)


__all__ = ["UNAVAILABLE", "DirectoryClaims", "unavailable"]
