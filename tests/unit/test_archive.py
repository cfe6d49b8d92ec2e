"""The memosd-cube archive format (store/archive.py): framing, the header's version, the trailer's digest."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from memosd.errors import ArchiveInvalid
from memosd.store import archive
from memosd.store.archive import MAGIC, ArchiveWriter


def _write(path: Path, frames: list[tuple[bytes, bytes]], header: dict[str, object] | None = None) -> Path:
    with path.open("wb") as out:
        writer = ArchiveWriter(out, header or {"source": {"cube_id": "c"}})
        for kind, payload in frames:
            writer.frame(kind, payload)
        writer.finish()
    return path


def _problem(path: Path) -> str:
    with pytest.raises(ArchiveInvalid) as info:
        archive.verify(path)
    assert "nothing was imported" in info.value.message
    return info.value.metadata["problem"]


def test_frames_round_trip_and_the_summary_counts_them(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    writer = ArchiveWriter(buffer, {"source": {"cube_id": "c"}})
    writer.record(b"V", {"text": "hello"})
    writer.blob(b"F", {"digest": "d", "file": "config"}, b"\x00\x01binary")
    writer.vector(b"E", 7, np.arange(4, dtype=np.float32))
    summary = writer.finish()
    path = tmp_path / "a.memcube"
    path.write_bytes(buffer.getvalue())

    verified = archive.verify(path)
    assert verified.sha256 == summary.sha256 and verified.size_bytes == summary.size_bytes == len(buffer.getvalue())
    assert verified.counts == summary.counts == {"H": 1, "V": 1, "F": 1, "E": 1}
    assert verified.header["format"] == "memosd-cube" and verified.header["version"] == 1
    (k1, record, o1), (k2, blob, o2), (k3, vector, o3) = archive.frames(path)
    assert (k1, archive.record(record, o1)) == (b"V", {"text": "hello"})
    assert (k2, archive.blob(blob, o2)) == (b"F", ({"digest": "d", "file": "config"}, b"\x00\x01binary"))
    vkey, values = archive.vector(vector, o3, 4)
    assert k3 == b"E" and vkey == 7 and values.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_a_truncated_archive_is_refused(tmp_path: Path, cut: int) -> None:
    path = _write(tmp_path / "a.memcube", [(b"V", b'{"text":"x"}')])
    path.write_bytes(path.read_bytes()[:-cut])
    assert _problem(path) == "truncated"


def test_a_flipped_byte_fails_the_digest(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.memcube", [(b"V", b'{"text":"exactly this"}')])
    data = bytearray(path.read_bytes())
    data[data.index(b"exactly")] ^= 0x01
    path.write_bytes(bytes(data))
    assert _problem(path) == "corrupt"


def test_bytes_after_the_trailer_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.memcube", [])
    path.write_bytes(path.read_bytes() + struct.pack("<cI", b"V", 2) + b"{}")
    assert _problem(path) == "corrupt"


def test_another_format_version_is_refused_by_its_number(tmp_path: Path) -> None:
    path = tmp_path / "v2.memcube"
    header = json.dumps({"format": "memosd-cube", "version": 2}).encode()
    path.write_bytes(MAGIC + struct.pack("<cI", b"H", len(header)) + header)
    with pytest.raises(ArchiveInvalid, match="version 2; this daemon reads version 1") as info:
        archive.verify(path)
    assert info.value.metadata["problem"] == "version"


def test_a_file_that_is_no_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"PK\x03\x04 a zip, say")
    assert _problem(path) == "corrupt"


def test_a_frame_claiming_more_than_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.memcube"
    path.write_bytes(MAGIC + struct.pack("<cI", b"H", archive.MAX_FRAME_BYTES + 1))
    assert _problem(path) == "corrupt"


def test_a_vector_of_another_dimension_is_inconsistent() -> None:
    payload = struct.pack("<Q", 1) + np.zeros(3, np.float32).tobytes()
    with pytest.raises(ArchiveInvalid, match="3 dimensions, not the header's 4"):
        archive.vector(payload, 0, 4)
