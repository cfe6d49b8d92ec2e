"""The kernel's DirectoryPort (kernel/ports.py): what AllocCube, FreeCube, ImportCube and Mount ask of a
cluster's directory, and in which order, against a fake that records and can refuse (no etcd here:
tests/cluster/ runs the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hash_embedder import HashEmbedder

from memosd.config import LimitsConfig
from memosd.errors import ClusterUnavailable, CubeNameTaken, DiskFull
from memosd.kernel import ids
from memosd.kernel.kernel import Kernel
from memosd.store.rocks import Store

from .fakes import FakeIndexes


class FakeDirectory:
    node_tag = b"\x01\x02\x03"

    def __init__(self) -> None:
        self.claimed: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: Exception | None = None  # raised by the next claim / check
        self.taken_ids: set[str] = set()
        self.principals: dict[str, str] = {}  # cube id -> the owning principal its claim named

    def claim(self, cube_id: str, name: str, principal: str = "") -> bool:
        self.calls.append(("claim", cube_id))
        if self.refuse is not None:
            raise self.refuse
        if cube_id in self.taken_ids or cube_id in self.claimed:
            return False
        self.claimed[cube_id] = name
        self.principals[cube_id] = principal
        return True

    def check_changeable(self, cube_id: str) -> None:
        self.calls.append(("check", cube_id))
        if self.refuse is not None:
            raise self.refuse

    def release(self, cube_id: str) -> None:
        self.calls.append(("release", cube_id))
        self.claimed.pop(cube_id, None)


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory()


@pytest.fixture
def kernel(tmp_path: Path, directory: FakeDirectory) -> Iterator[Kernel]:
    k = Kernel(Store(tmp_path / "store"), HashEmbedder(), FakeIndexes(), tmp_path / "index", LimitsConfig(),
               sync_commits=False, directory=directory)
    k.open()
    yield k
    k.close()


def test_alloc_claims_before_it_commits_and_keeps_the_placed_id(kernel: Kernel, directory: FakeDirectory) -> None:
    placed = ids.new_id(ids.CUBE_PREFIX)
    info = kernel.alloc_cube("notes", "", {}, owner="prn_owner", cube_id=placed)
    assert info.record.cube_id == placed and directory.claimed == {placed: "notes"}
    assert directory.calls == [("claim", placed)]
    assert directory.principals == {placed: "prn_owner"}  # the claim names the cube's owning principal


def test_a_name_taken_in_the_cluster_or_no_quorum_creates_nothing(kernel: Kernel, directory: FakeDirectory) -> None:
    directory.refuse = CubeNameTaken("the cube name 'notes' is in use in the cluster", name="notes")
    with pytest.raises(CubeNameTaken):
        kernel.alloc_cube("notes", "", {})
    directory.refuse = ClusterUnavailable("no quorum")
    with pytest.raises(ClusterUnavailable):
        kernel.alloc_cube("notes", "", {})
    assert kernel.cube_records() == [] and kernel.store.cube_id_by_name("notes") is None
    directory.refuse = None
    assert kernel.alloc_cube("notes", "", {}).record.name == "notes"


def test_a_local_commit_that_fails_gives_the_claim_back(kernel: Kernel, directory: FakeDirectory,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object, **_kwargs: object) -> None:
        raise DiskFull("the disk is full")

    monkeypatch.setattr(kernel.store, "write", full)
    with pytest.raises(DiskFull):
        kernel.alloc_cube("notes", "", {})
    (claim, cube_id), (release, released) = directory.calls
    assert (claim, release, released) == ("claim", "release", cube_id) and directory.claimed == {}


def test_free_is_refused_before_anything_goes_without_quorum_then_frees_and_releases(
        kernel: Kernel, directory: FakeDirectory) -> None:
    cube_id = kernel.alloc_cube("notes", "", {}).record.cube_id
    directory.refuse = ClusterUnavailable("no quorum")
    with pytest.raises(ClusterUnavailable):
        kernel.free_cube("notes")
    assert kernel.cube("notes").cube_id == cube_id  # still there
    directory.refuse = None
    kernel.free_cube("notes")
    assert directory.calls[-2:] == [("check", cube_id), ("release", cube_id)] and directory.claimed == {}


def test_an_import_whose_id_is_claimed_elsewhere_takes_a_new_one(kernel: Kernel, directory: FakeDirectory,
                                                                tmp_path: Path) -> None:
    source = kernel.alloc_cube("source", "", {}).record.cube_id
    archive = tmp_path / "cube.memosd"
    with archive.open("wb") as out:
        kernel.export_cube("source", out, with_kv=False)
    kernel.free_cube("source")
    directory.taken_ids.add(source)  # another node holds the id now
    result = kernel.import_cube(archive, "copy", "", lambda _: False)
    assert result.cube.record.cube_id != source and not result.kept_cube_id
    assert directory.claimed == {result.cube.record.cube_id: "copy"}


def test_mount_and_job_ids_carry_the_node_tag(kernel: Kernel, directory: FakeDirectory) -> None:
    kernel.alloc_cube("notes", "", {})
    mount_id = kernel.mount("notes", 0, True).record.mount_id
    assert ids.MOUNT_ID_RE.fullmatch(mount_id)
    assert ids.tag_of(mount_id, ids.MOUNT_PREFIX) == directory.node_tag
    assert kernel.node_tag == directory.node_tag
