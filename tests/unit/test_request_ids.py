"""Request ids in the kernel: a retried Write, Ingest or Commit returns the first result and changes nothing,
across a restart too; another request under the same id is REQUEST_ID_REUSED; a retry racing the first call
waits for it; ids are scoped by cube and principal, expire, and go with their cube.

A kernel over a real RocksDB store and real indexes with a deterministic embedder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig
from memosd.errors import InvalidField, RequestIdReused
from memosd.index.cube_index import CubeIndex
from memosd.kernel.kernel import Kernel
from memosd.kernel.requests import RequestRef, request_ref
from memosd.kernel.types import ItemInput, Message
from memosd.store.rocks import Store

ALICE = "prn_alice"


class GatedEmbedder(HashEmbedder):
    """Blocks every embed call until ``release`` is set, once ``armed``; counts the calls."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if self.armed:
            self.entered.set()
            assert self.release.wait(60), "the test never released the embedder"
        return super().embed(texts)


def open_kernel(data: Path, embedder: HashEmbedder | None = None, ttl: float = 86400.0) -> Kernel:
    kernel = Kernel(Store(data / "store"), embedder or HashEmbedder(), CubeIndex.open, data / "index",
                    LimitsConfig(request_id_ttl_seconds=ttl), sync_commits=False)
    kernel.open()
    return kernel


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = open_kernel(tmp_path / "data")
    k.alloc_cube("c", "", {})
    yield k
    if k.store._cfs:  # not closed by the test
        k.close()


def rw(kernel: Kernel) -> str:
    return kernel.mount("c", 0, True).record.mount_id


def chat(*texts: str) -> list[Message]:
    return [Message("user", text, "s1") for text in texts]


def ref(request_id: str, principal: str = ALICE) -> RequestRef:
    found = request_ref(principal, request_id)
    assert found is not None
    return found


def revisions(kernel: Kernel) -> list[int]:
    return [r.number for r in kernel.log("c", 100, "")[0].entries]


def test_ingest_retried_with_its_id_commits_once_and_returns_the_first_result(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    first = kernel.ingest(mount_id, chat("hello", "world"), request=ref("req-1"))
    again = kernel.ingest(mount_id, chat("hello", "world"), request=ref("req-1"))
    assert (again.revision, again.item_ids) == (first.revision, first.item_ids)
    assert first.revision.request_id == "req-1"
    assert revisions(kernel) == [1]
    assert kernel.cube("c").record.item_count == 2
    # Without an id (or with a new one) the same conversation is a new request.
    kernel.ingest(mount_id, chat("hello", "world"), request=ref("req-2"))
    assert revisions(kernel) == [2, 1]


def test_same_id_with_another_request_is_refused_and_changes_nothing(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    kernel.ingest(mount_id, chat("hello"), request=ref("req-1"))
    with pytest.raises(RequestIdReused) as info:
        kernel.ingest(mount_id, chat("something else"), request=ref("req-1"))
    assert "req-1" in info.value.message and "new id" in info.value.message
    with pytest.raises(RequestIdReused):  # another kind of call under the same id
        kernel.commit(mount_id, "", "me", request=ref("req-1"))
    assert revisions(kernel) == [1]


def test_the_id_is_remembered_after_a_restart(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path / "data")
    kernel.alloc_cube("c", "", {})
    mount_id = rw(kernel)
    first = kernel.ingest(mount_id, chat("a", "b", "c"), request=ref("req-1"))
    staged, _ = kernel.write(mount_id, [ItemInput("staged text")], request=ref("req-w"))
    kernel.close()

    kernel = open_kernel(tmp_path / "data")
    try:
        again = kernel.ingest(mount_id, chat("a", "b", "c"), request=ref("req-1"))
        assert (again.revision.number, again.item_ids) == (first.revision.number, first.item_ids)
        assert revisions(kernel) == [1]
        ids, info = kernel.write(mount_id, [ItemInput("staged text")], request=ref("req-w"))
        assert ids == staged and info.staged_adds == 1
    finally:
        kernel.close()


def test_write_retried_returns_the_same_ids_and_stages_nothing_new(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    items = [ItemInput("one"), ItemInput("two", tags=("t",))]
    ids, info = kernel.write(mount_id, items, request=ref("w-1"))
    again, info_again = kernel.write(mount_id, items, request=ref("w-1"))
    assert again == ids and info_again.staged_adds == info.staged_adds == 2
    with pytest.raises(RequestIdReused):
        kernel.write(mount_id, [ItemInput("one")], request=ref("w-1"))
    # Committed, the id still names that Write: a late retry stages nothing again.
    kernel.commit(mount_id, "", "me")
    again, info_again = kernel.write(mount_id, items, request=ref("w-1"))
    assert again == ids and info_again.staged_adds == 0
    assert kernel.cube("c").record.item_count == 2


def test_commit_retried_returns_its_revision_and_leaves_later_staging_staged(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    kernel.write(mount_id, [ItemInput("first")])
    first = kernel.commit(mount_id, "m", "me", request=ref("c-1"))
    assert first.revision is not None and first.revision.number == 1
    kernel.write(mount_id, [ItemInput("second")])
    again = kernel.commit(mount_id, "m", "me", request=ref("c-1"))
    assert again.revision == first.revision and again.head == 1
    assert again.mount.staged_adds == 1  # the later write was not committed by the retry
    assert revisions(kernel) == [1]
    # A commit with nothing staged is remembered too: its retry makes no revision either.
    kernel.commit(mount_id, "", "me")
    empty = kernel.commit(mount_id, "", "me", request=ref("c-2"))
    kernel.write(mount_id, [ItemInput("third")])
    assert empty.revision is None
    assert kernel.commit(mount_id, "", "me", request=ref("c-2")).revision is None
    assert revisions(kernel) == [2, 1]


def test_a_retry_racing_the_first_call_waits_for_it(tmp_path: Path) -> None:
    embedder = GatedEmbedder()
    kernel = open_kernel(tmp_path / "data", embedder)
    try:
        kernel.alloc_cube("c", "", {})
        mount_id = rw(kernel)
        embedder.armed = True
        results: list[object] = []

        def call() -> None:
            results.append(kernel.ingest(mount_id, chat("slow", "turns"), request=ref("req-1")))

        first = threading.Thread(target=call)
        first.start()
        assert embedder.entered.wait(30)  # the first call is embedding, its request not yet committed
        second = threading.Thread(target=call)
        second.start()
        # The retry is in flight: it must wait on the id, not embed and commit again. Generous deadline: a
        # thread start on two busy cores.
        key = (kernel.cube("c").cube_id, ALICE, "req-1")
        deadline = time.monotonic() + 30
        while kernel.requests._held.get(key, (None, 0))[1] < 2 and embedder.calls < 2:
            assert time.monotonic() < deadline, "the retry never arrived"
            time.sleep(0.01)
        embedder.release.set()
        first.join(30)
        second.join(30)
        assert embedder.calls == 1
        assert revisions(kernel) == [1]
        a, b = results
        assert a == b
    finally:
        embedder.release.set()
        kernel.close()


def test_ids_are_scoped_by_principal_and_cube(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    kernel.ingest(mount_id, chat("hello"), request=ref("shared", "prn_alice"))
    kernel.ingest(mount_id, chat("hello"), request=ref("shared", "prn_bob"))
    kernel.alloc_cube("other", "", {})
    other = kernel.mount("other", 0, True).record.mount_id
    kernel.ingest(other, chat("hi"), request=ref("shared", "prn_alice"))
    assert revisions(kernel) == [2, 1]
    assert kernel.cube("other").head == 1


def test_request_ids_are_validated() -> None:
    assert request_ref(ALICE, "") is None
    assert request_ref(ALICE, "6f1c0b0e-8d4c-4a57-9d0e-1d2f3a4b5c6d") is not None
    for bad in ("has space", "a/b", "x" * 129, "é"):
        with pytest.raises(InvalidField) as info:
            request_ref(ALICE, bad)
        assert info.value.metadata["field"] == "request_id"


def test_ids_expire_after_the_ttl_and_are_swept(tmp_path: Path) -> None:
    kernel = open_kernel(tmp_path / "data", ttl=0.05)
    try:
        kernel.alloc_cube("c", "", {})
        mount_id = rw(kernel)
        kernel.ingest(mount_id, chat("hello"), request=ref("req-1"))
        cube_id = kernel.cube("c").cube_id
        time.sleep(0.2)  # past the 50 ms TTL
        assert kernel.requests.sweep(force=True) == 1
        assert kernel.store.get_request(cube_id, ALICE, "req-1") is None
        # Forgotten, the id is new again.
        kernel.ingest(mount_id, chat("hello"), request=ref("req-1"))
        assert revisions(kernel) == [2, 1]
    finally:
        kernel.close()


def test_free_cube_removes_its_ids(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    kernel.ingest(mount_id, chat("hello"), request=ref("req-1"))
    cube_id = kernel.cube("c").cube_id
    assert kernel.store.get_request(cube_id, ALICE, "req-1") is not None
    kernel.free_cube("c")
    assert kernel.store.get_request(cube_id, ALICE, "req-1") is None


def test_purge_drops_the_digest_of_a_request_whose_items_it_erased(kernel: Kernel) -> None:
    mount_id = rw(kernel)
    first = kernel.ingest(mount_id, chat("secret", "other"), request=ref("req-1"))
    kernel.ingest(mount_id, chat("unrelated"), request=ref("req-2"))
    cube_id = kernel.cube("c").cube_id
    kept = kernel.store.get_request(cube_id, ALICE, "req-2")
    receipt = kernel.purge("c", [first.item_ids[0]])
    record = kernel.store.get_request(cube_id, ALICE, "req-1")
    assert record is not None and record.digest == f"purged:{receipt.purge_id}"  # no hash of the text left
    assert kernel.store.get_request(cube_id, ALICE, "req-2") == kept
    # A late retry is refused, not applied again: the purged text does not come back.
    with pytest.raises(RequestIdReused) as info:
        kernel.ingest(mount_id, chat("secret", "other"), request=ref("req-1"))
    assert "purged" in info.value.message
    assert revisions(kernel) == [2, 1]
