"""The cube archive format, ``memosd-cube`` version 1: framing, header, trailer and digest (docs/ARCHIVE.md).

An archive is a file: the 12-byte magic ``MEMOSD-CUBE\\n``, then frames, each
``kind`` (one ASCII byte), ``length`` (u32, little endian) and ``length``
bytes of payload. The first frame is the header (``H``, JSON: format,
version, the source and the embedder); the last is the trailer (``Z``, JSON:
the count of every kind of frame, the bytes before the trailer, and the
sha256 of those bytes). Nothing may follow the trailer. A reader checks all
of it (``verify``) before it trusts a single frame, so a truncated file (no
trailer), a flipped byte (the digest), a frame cut short or too long, and a
version it does not read are each refused with ``ArchiveInvalid``, naming
the problem in its metadata.

This module knows frames, not cubes: what each kind holds is kernel/portable.py's.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from memosd.errors import ArchiveInvalid

MAGIC = b"MEMOSD-CUBE\n"
FORMAT = "memosd-cube"
VERSION = 1
HEADER, TRAILER = b"H", b"Z"
MAX_FRAME_BYTES = 64 << 20  # the largest frame a reader accepts: an 8 MiB adapter piece, a KV block or chunk
_FRAME = struct.Struct("<cI")
_META_LENGTH = struct.Struct("<I")
_VKEY = struct.Struct("<Q")
READ_BYTES = 1 << 20


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class ArchiveSummary:
    """What a writer wrote or a reader verified: sizes, digests and the count of each frame kind."""

    header: dict[str, Any]
    size_bytes: int  # the whole file
    sha256: str  # of the whole file (what ``sha256sum`` prints)
    counts: dict[str, int] = field(default_factory=dict)


class ArchiveWriter:
    """Writes frames to ``out`` (a binary file), hashing as it goes; ``finish`` writes the trailer."""

    def __init__(self, out: IO[bytes], header: dict[str, Any]) -> None:
        self._out = out
        self._content = hashlib.sha256()  # the bytes before the trailer: the trailer's digest
        self._whole = hashlib.sha256()  # every byte: what the export reports
        self._size = 0
        self._counts: dict[str, int] = {}
        self.header = {"format": FORMAT, "version": VERSION, **header}
        self._raw(MAGIC)
        self.frame(HEADER, _json(self.header))

    def _raw(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._content.update(data)
        self._whole.update(data)
        self._size += len(data)

    def frame(self, kind: bytes, payload: bytes | memoryview) -> None:
        if len(payload) > MAX_FRAME_BYTES:
            raise ValueError(f"a {kind!r} frame of {len(payload)} bytes is over {MAX_FRAME_BYTES}")
        self._raw(_FRAME.pack(kind, len(payload)))
        self._raw(payload)
        key = kind.decode()
        self._counts[key] = self._counts.get(key, 0) + 1

    def record(self, kind: bytes, value: dict[str, Any]) -> None:
        self.frame(kind, _json(value))

    def blob(self, kind: bytes, meta: dict[str, Any], data: bytes) -> None:
        encoded = _json(meta)
        self.frame(kind, _META_LENGTH.pack(len(encoded)) + encoded + data)

    def vector(self, kind: bytes, vkey: int, vector: np.ndarray) -> None:
        self.frame(kind, _VKEY.pack(vkey) + np.ascontiguousarray(vector, dtype="<f4").tobytes())

    def finish(self) -> ArchiveSummary:
        trailer = _json({"counts": self._counts, "bytes": self._size, "sha256": self._content.hexdigest()})
        data = _FRAME.pack(TRAILER, len(trailer)) + trailer
        self._out.write(data)
        self._whole.update(data)
        self._size += len(data)
        self._out.flush()
        return ArchiveSummary(self.header, self._size, self._whole.hexdigest(), dict(self._counts))


# -- reading ------------------------------------------------------------------------------------------
def _invalid(problem: str, message: str, **metadata: object) -> ArchiveInvalid:
    return ArchiveInvalid(f"the archive is {problem}: {message}; nothing was imported", problem=problem, **metadata)


def _frames(f: IO[bytes], size: int) -> Iterator[tuple[bytes, bytes, int]]:
    """(kind, payload, offset) of every frame after the magic, checked against the file's size."""
    offset = len(MAGIC)
    while offset < size:
        head = f.read(_FRAME.size)
        if len(head) < _FRAME.size:
            raise _invalid("truncated", f"it ends inside a frame's header at byte {offset} of {size}",
                           offset=offset)
        kind, length = _FRAME.unpack(head)
        if length > MAX_FRAME_BYTES:
            raise _invalid("corrupt", f"the frame at byte {offset} claims {length} bytes (at most "
                           f"{MAX_FRAME_BYTES})", offset=offset)
        payload = f.read(length)
        if len(payload) < length:
            raise _invalid("truncated", f"the frame at byte {offset} is cut short ({len(payload)} of {length} "
                           "bytes)", offset=offset)
        yield kind, payload, offset
        offset += _FRAME.size + length


def verify(path: Path) -> ArchiveSummary:
    """Check the whole archive: magic, header (format, version), framing, trailer, counts and digest."""
    size = path.stat().st_size
    content, whole = hashlib.sha256(), hashlib.sha256()
    counts: dict[str, int] = {}
    header: dict[str, Any] | None = None
    trailer: dict[str, Any] | None = None
    trailer_at = 0
    with path.open("rb", buffering=READ_BYTES) as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise _invalid("corrupt", "it does not start with the memosd-cube magic (is it a cube archive "
                           "written by ExportCube?)", offset=0)
        content.update(magic)
        whole.update(magic)
        for kind, payload, offset in _frames(f, size):
            framed = _FRAME.pack(kind, len(payload))
            whole.update(framed)
            whole.update(payload)
            if trailer is not None:
                raise _invalid("corrupt", f"bytes follow the trailer at byte {offset}", offset=offset)
            if kind == TRAILER:
                trailer, trailer_at = _decode_json(payload, offset, "trailer"), offset
                continue
            content.update(framed)
            content.update(payload)
            if header is None:
                if kind != HEADER:
                    raise _invalid("corrupt", "its first frame is not the header", offset=offset)
                header = _check_header(_decode_json(payload, offset, "header"))
            counts[kind.decode(errors="replace")] = counts.get(kind.decode(errors="replace"), 0) + 1
    if header is None or trailer is None:
        raise _invalid("truncated", f"it ends at byte {size} without its trailer (was the export or the upload "
                       "cut short?)", size=size)
    if trailer.get("sha256") != content.hexdigest() or trailer.get("bytes") != trailer_at:
        raise _invalid("corrupt", "its sha256 does not match its trailer (the file was changed or damaged)")
    if trailer.get("counts") != counts:
        raise _invalid("corrupt", f"its frames {counts} are not the {trailer.get('counts')} its trailer lists")
    return ArchiveSummary(header, size, whole.hexdigest(), counts)


def _check_header(header: dict[str, Any]) -> dict[str, Any]:
    if header.get("format") != FORMAT:
        raise _invalid("corrupt", f"its header names the format {header.get('format')!r}, not {FORMAT!r}")
    version = header.get("version")
    if version != VERSION:
        raise _invalid("version", f"it is {FORMAT} version {version!r}; this daemon reads version {VERSION} "
                       "(import it on a daemon of the version that wrote it, or a newer one)",
                       version=version, supported=VERSION)
    return header


def _decode_json(payload: bytes, offset: int, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        raise _invalid("corrupt", f"the {what} at byte {offset} is not JSON", offset=offset) from None
    if not isinstance(value, dict):
        raise _invalid("corrupt", f"the {what} at byte {offset} is not a JSON object", offset=offset)
    return value


def frames(path: Path) -> Iterator[tuple[bytes, bytes, int]]:
    """Every frame but the header and the trailer, as (kind, payload, offset): call after ``verify``."""
    size = path.stat().st_size
    with path.open("rb", buffering=READ_BYTES) as f:
        f.seek(len(MAGIC))
        for kind, payload, offset in _frames(f, size):
            if kind not in (HEADER, TRAILER):
                yield kind, payload, offset


def record(payload: bytes, offset: int) -> dict[str, Any]:
    """A JSON frame's object."""
    return _decode_json(payload, offset, "record")


def blob(payload: bytes, offset: int) -> tuple[dict[str, Any], bytes]:
    """A blob frame's (meta, data)."""
    if len(payload) < _META_LENGTH.size:
        raise _invalid("inconsistent", f"the blob frame at byte {offset} is too short", offset=offset)
    (length,) = _META_LENGTH.unpack_from(payload)
    end = _META_LENGTH.size + length
    if end > len(payload):
        raise _invalid("inconsistent", f"the blob frame at byte {offset} has a meta longer than itself",
                       offset=offset)
    return _decode_json(payload[_META_LENGTH.size:end], offset, "blob meta"), payload[end:]


def vector(payload: bytes, offset: int, dim: int) -> tuple[int, np.ndarray]:
    """A vector frame's (vkey, float32[dim])."""
    if len(payload) != _VKEY.size + 4 * dim:
        raise _invalid("inconsistent", f"the vector at byte {offset} has {(len(payload) - _VKEY.size) // 4} "
                       f"dimensions, not the header's {dim}", offset=offset)
    (vkey,) = _VKEY.unpack_from(payload)
    return vkey, np.frombuffer(payload, dtype="<f4", offset=_VKEY.size).astype(np.float32)
