"""What the kernel holds, counted for Stats: cubes, mounts, items, index and store bytes, stored adapters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memosd.kernel.state import CubeState
from memosd.store.rocks import Store


@dataclass(frozen=True)
class KernelTotals:
    cube_count: int
    mount_count: int
    item_count: int
    version_count: int
    dense_index_bytes: int
    lexical_index_bytes: int
    adapter_count: int  # distinct (cube, digest) stored, every version counted once
    adapter_bytes: int
    store_bytes: int
    disk_full: bool
    disk_free_bytes: int


def count(cubes: Iterable[CubeState], mount_count: int, store: Store) -> KernelTotals:
    """One pass over a snapshot of the open cubes (the caller copies the table, see Tables)."""
    cubes = list(cubes)
    dense = lexical = 0
    for cube in cubes:
        d, lx = cube.index.bytes_on_disk()
        dense, lexical = dense + d, lexical + lx
    stored = {(c.cube_id, a.digest): a.config_bytes + a.weights_bytes for c in cubes for a in c.adapters}
    return KernelTotals(
        cube_count=len(cubes), mount_count=mount_count, item_count=sum(c.record.item_count for c in cubes),
        version_count=sum(c.record.version_count for c in cubes), dense_index_bytes=dense,
        lexical_index_bytes=lexical, adapter_count=len(stored), adapter_bytes=sum(stored.values()),
        store_bytes=store.size_bytes(), disk_full=store.space.full, disk_free_bytes=store.space.free_bytes())
