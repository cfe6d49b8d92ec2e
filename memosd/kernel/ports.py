"""What the kernel needs from the index layer, and from a cluster's directory. Tests may pass fakes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

Accept = Callable[[int], bool]
Scored = list[tuple[int, float]]


class EmbedderPort(Protocol):
    name: str
    dim: int
    fingerprint: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class CubeIndexPort(Protocol):
    """The derived indexes of one cube, keyed by version key (vkey)."""

    def add(self, keys: np.ndarray, vectors: np.ndarray, texts: Sequence[str]) -> None: ...
    def add_dense(self, keys: np.ndarray, vectors: np.ndarray) -> None: ...
    def add_lexical(self, docs: Sequence[tuple[int, str]]) -> None: ...
    def remove(self, keys: np.ndarray) -> None: ...
    def dense_missing(self, keys: np.ndarray) -> np.ndarray: ...
    @property
    def lexical_watermark(self) -> int: ...
    def dense_search(self, query: np.ndarray, k: int, accept: Accept | None) -> Scored: ...
    def dense_exact(self, query: np.ndarray, keys: np.ndarray) -> Scored: ...
    def lexical_search(self, query: str, k: int, accept: Accept | None) -> Scored: ...
    def lexical_staged(self, query: str, docs: Sequence[tuple[int, str]], k: int) -> Scored: ...
    def save(self) -> None: ...
    def close(self) -> None: ...
    def destroy(self) -> None: ...
    def bytes_on_disk(self) -> tuple[int, int]: ...


class IndexFactory(Protocol):
    def __call__(self, directory: Path, dim: int) -> CubeIndexPort: ...


class FusedHitLike(Protocol):
    @property
    def key(self) -> int: ...
    @property
    def score(self) -> float: ...
    @property
    def dense_score(self) -> float: ...
    @property
    def lexical_score(self) -> float: ...
    @property
    def dense_rank(self) -> int: ...
    @property
    def lexical_rank(self) -> int: ...


class Ranker(Protocol):
    """Turns the dense and lexical lists into the final top k for a search mode
    ("hybrid" fuses both; "dense"/"lexical" rank by that list alone)."""

    def __call__(self, dense: Scored, lexical: Scored, k: int, mode: str) -> Sequence[FusedHitLike]: ...


class DirectoryPort(Protocol):
    """Where cube ids and names are claimed beyond this node: the cluster's directory in etcd
    (cluster/claims.py), wired by the daemon when [cluster] etcd is set; ``NO_DIRECTORY`` on one node.
    The kernel stays free of etcd: it only calls these, outside its locks (each may take a network
    round trip). Each raises CubeNameTaken, or ClusterUnavailable when the directory cannot be changed."""

    node_tag: bytes  # put into this node's mount ids (ids.new_id), so any node can route a mount

    def claim(self, cube_id: str, name: str, principal: str = "") -> bool:
        """Enter a new cube owned by this node (and by ``principal``), before it is committed locally.
        False: the id is already claimed (an import keeping its source's id then takes a new one)."""
        ...

    def check_changeable(self, cube_id: str) -> None:
        """Before FreeCube frees anything: raises ClusterUnavailable when the release could not be made."""
        ...

    def release(self, cube_id: str) -> None:
        """The cube is gone locally (FreeCube, or a create that failed after its claim): drop its entry."""
        ...


class _NoDirectory:
    """A single node: nothing to claim, and nothing is asked of the network."""

    node_tag = b""

    def claim(self, cube_id: str, name: str, principal: str = "") -> bool:
        return True

    def check_changeable(self, cube_id: str) -> None:
        return None

    def release(self, cube_id: str) -> None:
        return None


NO_DIRECTORY: DirectoryPort = _NoDirectory()
