"""Durable file writes: fsync a file or a directory (so a rename survives a crash)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file, or a directory's entries (after creating or renaming in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below root, then root itself."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_path(path)
    fsync_path(root)
