"""Freeing a cube: the kernel deletes it, and every other part lets go of what it held for it."""

from __future__ import annotations

from dataclasses import dataclass

from memosd.activation.activator import Activator
from memosd.governance.access import AccessControl
from memosd.kernel.kernel import Kernel
from memosd.kernel.usage import UsageTracker
from memosd.parametric.adapters import AdapterService


@dataclass(frozen=True)
class FreedCube:
    """What FreeCube removed: the cube's id, and the revisions, versions and mounts deleted with it."""

    cube_id: str
    revisions: int
    versions: int
    mounts: int


class CubeRemoval:
    """Owns the invariant "nothing of a freed cube outlives it". What each part held, and who drops it:

    - the store rows (its record and name, and the cube's key range in every cube-scoped column family:
      revisions, versions, vectors, activations and KV chunks, a paged engine's stored KV blocks, adapters,
      grants, purge receipts, usage, request ids), its index files and its open mounts: ``Kernel.free_cube``;
    - its adapter versions resident in the model: ``AdapterService.unload_cube``;
    - its KV caches in the pool: ``Activator.drop_pooled``; the activator's account of its stored
      caches: ``Activator.forget_persisted``;
    - its grants held in memory: ``AccessControl.forget_cube``;
    - its usage counts held in memory: ``UsageTracker.forget_cube``.
    """

    def __init__(self, kernel: Kernel, adapters: AdapterService, activator: Activator, access: AccessControl,
                 usage: UsageTracker | None = None) -> None:
        self.kernel = kernel
        self.adapters = adapters
        self.activator = activator
        self.access = access
        self.usage = usage

    def free(self, ref: str, *, local: bool = False) -> FreedCube:
        """Free the cube (an id or a name). Errors are the kernel's, raised before any part lets go:
        InvalidField (an empty ref), CubeNotFound, DiskFull from the store. ``local``: this node's copy
        only, the cluster directory left alone (a moved cube's old copy: cluster/move.py)."""
        cube = self.kernel.cube(ref)
        # Read before the cube goes: the adapter versions resident in the model are keyed by them.
        cube_id, versions = cube.cube_id, list(cube.adapters)
        freed = self.kernel.free_cube(ref, local=local)
        self.adapters.unload_cube(cube_id, versions)
        # The store rows went with the cube's key range; its pooled KV caches go now.
        self.activator.drop_pooled(cube_id)
        self.activator.forget_persisted(cube_id)
        if not local:  # a moved cube's grants (etcd's, under its id) are the new owner's now: they stay
            self.access.forget_cube(cube_id)
        if self.usage is not None:
            self.usage.forget_cube(cube_id)
        return FreedCube(cube_id, freed.revisions, freed.versions, freed.mounts)
