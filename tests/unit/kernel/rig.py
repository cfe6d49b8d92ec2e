"""Building a kernel for the kernel unit tests, and the few steps they all take through its public methods."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig
from memosd.index.fusion import FusedHit, fuse, single
from memosd.kernel.kernel import Kernel
from memosd.kernel.search import Searcher, SearchSettings
from memosd.kernel.types import CommitResult, ItemInput, SearchFilter, SearchHit
from memosd.store.records import CubeRecord
from memosd.store.rocks import Store

from .fakes import FakeIndexes


def open_kernel(data: Path, indexes: FakeIndexes) -> Kernel:
    """A kernel over a real RocksDB store under ``data``; fakes only for the embedder and the indexes.

    Commits are not synced (fsync is slow on a shared machine and durability is not what these test)."""
    kernel = Kernel(Store(data / "store"), HashEmbedder(), indexes, data / "index", LimitsConfig(),
                    sync_commits=False)
    kernel.open()
    return kernel


class Clock:
    """A stand-in for time.time_ns: starts at ``start_ns``, moves 1 µs a call (so times still grow), and
    jumps when told to."""

    def __init__(self, start_ns: int) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        self.now_ns += 1_000
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1_000_000_000)


def record(kernel: Kernel, cube: str) -> CubeRecord:
    return kernel.cube_info(kernel.cube(cube)).record


def head(kernel: Kernel, cube: str) -> int:
    return record(kernel, cube).head


def rw_mount(kernel: Kernel, cube: str, revision: int = 0) -> str:
    """A read-write mount at ``revision`` (0: HEAD)."""
    return kernel.mount(cube, revision, True).record.mount_id


def commit(kernel: Kernel, cube: str, items: Sequence[ItemInput | str] = (), forget: Sequence[str] = (),
           message: str = "test", author: str = "tester") -> tuple[list[str], CommitResult]:
    """Write (and forget) through a fresh read-write mount at HEAD, commit, unmount: the written ids, the result."""
    mount = rw_mount(kernel, cube)
    try:
        inputs = [ItemInput(i) if isinstance(i, str) else i for i in items]
        written = kernel.write(mount, inputs)[0] if inputs else []
        if forget:
            kernel.forget(mount, forget)
        return written, kernel.commit(mount, message, author)
    finally:
        kernel.unmount(mount)


def listed(kernel: Kernel, mount: str, page_size: int = 0) -> dict[str, str]:
    """Every item the mount sees (its base and its staging), item id -> text, read page by page."""
    items: dict[str, str] = {}
    token = ""
    while True:
        page, _ = kernel.list_items(mount, page_size, token)
        items.update((v.item_id, v.text) for v in page.entries)
        token = page.next_token
        if not token:
            return items


def items_at(kernel: Kernel, cube: str, revision: int) -> dict[str, str]:
    """Item id -> text of every item alive at ``revision`` (1 or more; a mount at 0 reads HEAD)."""
    assert revision >= 1, "Mount reads revision 0 as HEAD: there is no mount of the empty cube"
    mount = kernel.mount(cube, revision, False).record.mount_id
    try:
        return listed(kernel, mount)
    finally:
        kernel.unmount(mount)


def rank(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], k: int, mode: str) -> list[FusedHit]:
    """The daemon's default ranker (memosd.daemon.make_ranker with RRF), without importing the daemon."""
    if mode != "hybrid":
        return single(dense if mode == "dense" else lexical, k, lexical=mode == "lexical")
    return fuse(dense, lexical, k)


def search(kernel: Kernel, mount: str, query: str, mode: str, k: int = 10) -> list[SearchHit]:
    return Searcher(kernel, rank, SearchSettings()).search([mount], query, k, SearchFilter(), mode).hits


def found(kernel: Kernel, mount: str, query: str, mode: str, k: int = 10) -> list[str]:
    """The item ids a search of the mount returns, best first."""
    return [hit.item.item_id for hit in search(kernel, mount, query, mode, k)]
