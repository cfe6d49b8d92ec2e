"""Move marks: what a node must remember across a crash about the cube moves it takes part in.

One small JSON file per cube under ``<data_dir>/moves/``, written (and fsynced, with its directory)
before the step it guards, removed once the move is settled:

  out  {"role": "out", "peer": <target>, "epoch": e}   written by the owner before it exports: if it dies,
       its restart reads the directory: still this node at epoch e -> the move did not happen (the mark
       goes; nothing else to undo, the freeze was in memory); another node -> the switch happened, so this
       copy is the old one and is deleted
  in   {"role": "in", "peer": <owner>, "epoch": e}     written by the target before the received cube's
       record: if it dies, its restart reads the directory: this node -> the cube is its own (the mark
       goes); anything else -> the copy was never switched to, and is dropped

The directory entry is the truth in both cases; the mark only says which local copy a crash left in the
middle of a move, so that no copy is deleted that was not part of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memosd.fsutil import fsync_path
from memosd.kernel.ids import CUBE_ID_RE

Role = Literal["out", "in"]


@dataclass(frozen=True)
class MoveMark:
    cube_id: str
    role: Role
    peer: str  # the other node: the target of an "out" move, the owner an "in" cube came from
    epoch: int  # the directory entry's epoch before the switch
    # An "in" mark: the create_revision of the owner's member record when it sent the cube. The switch is
    # fenced on it, so once that record is gone or another (the owner restarted, or lost its lease) the
    # switch can never happen and the received copy may be dropped without waiting for a restart here.
    owner_revision: int = 0


class MoveMarks:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, cube_id: str) -> Path:
        if not CUBE_ID_RE.fullmatch(cube_id):
            raise ValueError(f"not a cube id: {cube_id!r}")
        return self.root / f"{cube_id}.json"

    def put(self, mark: MoveMark) -> None:
        """Durable before it returns: the file, then the directory entry naming it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(mark.cube_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"role": mark.role, "peer": mark.peer, "epoch": mark.epoch,
                                   "owner_revision": mark.owner_revision}))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(self.root)

    def get(self, cube_id: str) -> MoveMark | None:
        try:
            doc = json.loads(self._path(cube_id).read_text())
        except FileNotFoundError:
            return None
        return MoveMark(cube_id, doc["role"], str(doc["peer"]), int(doc["epoch"]), int(doc.get("owner_revision", 0)))

    def remove(self, cube_id: str) -> None:
        self._path(cube_id).unlink(missing_ok=True)

    def all(self) -> list[MoveMark]:
        if not self.root.is_dir():
            return []
        found = [self.get(p.stem) for p in sorted(self.root.glob("*.json")) if CUBE_ID_RE.fullmatch(p.stem)]
        return [m for m in found if m is not None]


__all__ = ["MoveMark", "MoveMarks", "Role"]
