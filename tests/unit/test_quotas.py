"""Per-principal quotas in process: open mounts and staged bytes, kept true by every change and a restart.

A kernel over a real RocksDB store and real indexes, with a deterministic
embedder (16 float32 dimensions: 64 bytes a vector). After each step the
counters are compared with a full recount of the mounts' staging.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig, QuotasConfig
from memosd.errors import QuotaExceeded
from memosd.index.cube_index import CubeIndex
from memosd.kernel.kernel import Kernel
from memosd.kernel.quotas import staged_bytes
from memosd.kernel.types import ItemInput
from memosd.store.rocks import Store

VECTOR = HashEmbedder.dim * 4
TEXT = "x" * 300  # one staged item: 300 + 64 bytes
ITEM = len(TEXT) + VECTOR


def open_kernel(data: Path, **quotas: int) -> Kernel:
    kernel = Kernel(Store(data / "store"), HashEmbedder(), CubeIndex.open, data / "index", LimitsConfig(),
                    sync_commits=False, quotas=QuotasConfig(**quotas))
    kernel.open()
    return kernel


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = open_kernel(tmp_path, max_mounts_per_principal=3, max_staged_bytes_per_principal=2 * ITEM + 10)
    for name in ("a", "b", "c"):
        k.alloc_cube(name, "", {})
    yield k
    k.close()


def recount(kernel: Kernel, principal: str) -> tuple[int, int]:
    """(open mounts, staged bytes) of ``principal``, counted from scratch."""
    mounts = [m for m in kernel.mounts.values() if m.record.principal == principal]
    return len(mounts), sum(staged_bytes(s, m.vectors.get(i)) for m in mounts for i, s in m.staging.items())


def held(kernel: Kernel, principal: str) -> tuple[int, int]:
    counted = kernel.quotas.mounts_of(principal), kernel.quotas.staged_of(principal)
    assert counted == recount(kernel, principal)
    return counted


def mount(kernel: Kernel, cube: str, principal: str) -> str:
    return kernel.mount(cube, 0, True, principal).record.mount_id


def test_open_mounts_are_limited_per_principal_across_cubes(kernel: Kernel) -> None:
    mine = [mount(kernel, "a", "alice"), mount(kernel, "b", "alice"), mount(kernel, "b", "alice")]
    with pytest.raises(QuotaExceeded) as refused:
        mount(kernel, "c", "alice")
    error = refused.value
    assert "3 open mounts" in error.message and "quotas.max_mounts_per_principal" in error.message
    assert error.metadata == {"quota": "max_mounts_per_principal", "key": "quotas.max_mounts_per_principal",
                              "limit": "3", "used": "3", "principal": "alice"}
    assert held(kernel, "alice") == (3, 0) and len(kernel.mounts) == 3  # the refused one left nothing
    mount(kernel, "c", "bob")  # another principal is unaffected
    assert [kernel.cube_info(kernel.cube(n)).mount_count for n in "abc"] == [1, 2, 1]
    kernel.unmount(mine[0])
    assert held(kernel, "alice") == (2, 0)
    mount(kernel, "c", "alice")  # the unmount freed one
    kernel.free_cube("b")  # closes two of alice's mounts
    assert held(kernel, "alice") == (1, 0) and held(kernel, "bob") == (1, 0)
    assert [kernel.cube_info(kernel.cube(n)).mount_count for n in "ac"] == [0, 2]


def test_staged_bytes_are_limited_per_principal_and_freed_by_every_change(kernel: Kernel) -> None:
    first, second = mount(kernel, "a", "alice"), mount(kernel, "b", "alice")
    [one], _ = kernel.write(first, [ItemInput(text=TEXT)])
    kernel.write(second, [ItemInput(text=TEXT)])
    assert held(kernel, "alice") == (2, 2 * ITEM)
    with pytest.raises(QuotaExceeded) as refused:
        kernel.write(second, [ItemInput(text="a third item")])
    error = refused.value
    assert error.metadata["key"] == "quotas.max_staged_bytes_per_principal"
    assert error.metadata["used"] == str(2 * ITEM) and error.metadata["limit"] == str(2 * ITEM + 10)
    assert f"{2 * ITEM} bytes staged" in error.message and "Commit or Unmount" in error.message
    assert len(kernel.mounts[second].staging) == 1  # nothing was staged
    kernel.write(mount(kernel, "c", "bob"), [ItemInput(text=TEXT)] * 2)  # bob's quota is his own
    # Replacing a staged item counts the difference: a shorter text makes room.
    kernel.write(first, [ItemInput(text="short", item_id=one)])
    assert held(kernel, "alice") == (2, ITEM + 5 + VECTOR)
    [added], _ = kernel.write(second, [ItemInput(text="fits now")])
    kernel.forget(second, [added])
    assert held(kernel, "alice") == (2, ITEM + 5 + VECTOR)  # unstaging an add frees it
    kernel.commit(first, "commit", "alice")
    assert held(kernel, "alice") == (2, ITEM)
    # A staged forget of a committed item holds no text.
    kernel.forget(first, [one])
    assert held(kernel, "alice") == (2, ITEM)
    kernel.unmount(second)
    assert held(kernel, "alice") == (1, 0) and held(kernel, "bob") == (1, 2 * ITEM)


def test_a_purge_of_staged_copies_frees_their_bytes(kernel: Kernel) -> None:
    staging = mount(kernel, "a", "alice")
    kernel.write(staging, [ItemInput(text=TEXT, tags=["secret"]), ItemInput(text="keep")])
    kernel.purge("a", [], tags=["secret"])
    assert held(kernel, "alice") == (1, len("keep") + VECTOR)


def test_the_counters_are_rebuilt_at_start(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path)
    kernel.alloc_cube("a", "", {})
    staging = mount(kernel, "a", "alice")
    kernel.write(staging, [ItemInput(text=TEXT), ItemInput(text="two")])
    mount(kernel, "a", "alice")
    mount(kernel, "a", "bob")
    before = held(kernel, "alice"), held(kernel, "bob")
    kernel.close()
    kernel = open_kernel(tmp_path)
    try:
        assert (held(kernel, "alice"), held(kernel, "bob")) == before == ((2, 2 * VECTOR + len(TEXT) + 3), (1, 0))
        assert kernel.cube_info(kernel.cube("a")).mount_count == 3
    finally:
        kernel.close()


def test_zero_turns_a_quota_off(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path, max_mounts_per_principal=0, max_staged_bytes_per_principal=0)
    try:
        kernel.alloc_cube("a", "", {})
        mounts = [mount(kernel, "a", "alice") for _ in range(5)]
        kernel.write(mounts[0], [ItemInput(text=TEXT)] * 20)
        assert held(kernel, "alice") == (5, 20 * ITEM)
    finally:
        kernel.close()
