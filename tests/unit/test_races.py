"""Readers that take no lock against writers that change what they read: a consistent snapshot, no error.

Each test hammers one reader against one writer for a bounded count, with a
tiny GIL switch interval so the threads interleave inside the reader's loop
(without the fix these raised "dictionary changed size during iteration"
within the first few hundred passes).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig
from memosd.index.cube_index import CubeIndex
from memosd.kernel.catalog import Catalog, VersionMeta
from memosd.kernel.kernel import Kernel
from memosd.store.rocks import Store


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def race(reader: Callable[[], object], writer: Callable[[int], object], writes: int) -> list[BaseException]:
    """Run ``reader`` over and over while ``writer(i)`` runs ``writes`` times; the reader's errors."""
    errors: list[BaseException] = []
    done = threading.Event()

    def write_all() -> None:
        try:
            for i in range(writes):
                writer(i)
        finally:
            done.set()

    thread = threading.Thread(target=write_all)
    thread.start()
    while not done.is_set():
        try:
            reader()
        except RuntimeError as e:
            errors.append(e)
            break
    thread.join()
    return errors


def meta(vkey: int, revision: int) -> VersionMeta:
    return VersionMeta(vkey=vkey, item_id=f"itm_{vkey:020d}", born=revision, died=0, tags=frozenset(),
                       event_ns=0, content_id=vkey)


def test_listing_a_catalog_while_commits_add_items() -> None:
    catalog = Catalog()
    for vkey in range(2000):
        catalog.add(meta(vkey, 1))
    errors = race(lambda: sum(1 for _ in catalog.alive_at(1)), lambda i: catalog.add(meta(2000 + i, 2)),
                  writes=20_000)
    assert errors == []
    assert len(catalog) == 22_000


def test_counting_mounts_while_others_mount_and_unmount(tmp_path: Path) -> None:
    kernel = Kernel(Store(tmp_path / "store"), HashEmbedder(), CubeIndex.open, tmp_path / "index", LimitsConfig(),
                    sync_commits=False)
    kernel.open()
    try:
        kernel.alloc_cube("counted", "", {})
        kernel.alloc_cube("busy", "", {})
        for _ in range(300):  # a long dict for the reader to walk
            kernel.mount("busy", 0, False)
        cube = kernel.cube("counted")

        def mount_and_unmount(_: int) -> None:
            kernel.unmount(kernel.mount("counted", 0, False).record.mount_id)

        errors = race(lambda: kernel.cube_info(cube), mount_and_unmount, writes=1500)
        assert errors == []
        assert kernel.cube_info(cube).mount_count == 0
    finally:
        kernel.close()
