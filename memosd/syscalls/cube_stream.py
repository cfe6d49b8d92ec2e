"""ExportCube's server stream and ImportCube's client stream: protobuf messages <-> an archive file.

The wire side of a portable cube, so that the kernel sees files only. An export is written whole to a
spool file first (the kernel holds the cube's lock only while it writes the durable part, and the
first message can then give the archive's exact size and sha256), then sent in chunks; an import is
spooled to a file as it arrives (never a growing buffer), bounded by ``limits.max_archive_bytes`` and by
the size its first message declares, and handed to ``Kernel.import_cube``. Both spool files are under
the data dir's ``uploads/`` (deleted when the call ends, and any left over at start).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memosd_client.v1 import memos_pb2 as pb

from memosd.cluster.move import CubeMover
from memosd.errors import ArchiveInvalid, InvalidField
from memosd.kernel.ids import CUBE_ID_RE
from memosd.kernel.kernel import Kernel
from memosd.kernel.portable import ImportResult
from memosd.kernel.types import CubeInfo
from memosd.parametric.adapters import SPOOL_PREFIX
from memosd.store.archive import FORMAT, VERSION, ArchiveSummary

CHUNK_BYTES = 1 << 20  # under gRPC's default 4 MiB message limit, with room for the envelope
EXPORT_PREFIX = SPOOL_PREFIX + "export-"
IMPORT_PREFIX = SPOOL_PREFIX + "cube-"


@contextmanager
def export(kernel: Kernel, cube: str, *, with_kv: bool, spool: Path
           ) -> Iterator[tuple[CubeInfo, ArchiveSummary, Iterator[bytes]]]:
    """The cube, its archive's summary, and the archive's bytes in chunks; the spool file goes on exit."""
    spool.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool, prefix=EXPORT_PREFIX) as out:
        info, summary = kernel.export_cube(cube, out, with_kv=with_kv)

        def chunks() -> Iterator[bytes]:
            out.seek(0)
            while data := out.read(CHUNK_BYTES):
                yield data

        yield info, summary, chunks()


@contextmanager
def _spooled(first_size: int, requests: Iterator[Any], limit: int, spool: Path, call: str) -> Iterator[Path]:
    """The archive's bytes (every message after the start) in a spool file, bounded by ``limit`` and by the
    size the start declared (0: not checked); the file goes on exit."""
    declared = first_size
    if declared > limit:
        raise ArchiveInvalid(f"the archive's {declared} bytes are over limits.max_archive_bytes ({limit})",
                             problem="too_large", limit=limit)
    spool.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool, prefix=IMPORT_PREFIX) as archive:
        size = 0
        for request in requests:
            if request.WhichOneof("part") != "data":
                raise InvalidField(f"after start, every {call} message must carry data", field="data")
            size += len(request.data)
            if size > limit or (declared and size > declared):
                raise ArchiveInvalid(f"more than the {declared or limit} bytes "
                                     f"{'start.size_bytes declared' if declared else 'limits.max_archive_bytes allows'}"
                                     " arrived", problem="too_large", limit=declared or limit)
            archive.write(request.data)
        if declared and size != declared:
            raise ArchiveInvalid(f"the upload is truncated: {size} of the {declared} bytes start.size_bytes "
                                 "declared arrived; send the whole file", problem="truncated")
        archive.flush()
        yield Path(archive.name)


def receive_import(kernel: Kernel, requests: Iterator[pb.ImportCubeRequest], spool: Path, *, owner: str,
                   accept_kv: Callable[[str], bool], kv_unavailable: str) -> ImportResult:
    """Spool the stream (a start message, then the archive's bytes), then import it; the file goes on exit."""
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "start":
        raise InvalidField("the first ImportCube message must be start (the new cube's name)", field="start")
    with _spooled(first.start.size_bytes, requests, kernel.limits.max_archive_bytes, spool, "ImportCube") as path:
        return kernel.import_cube(path, first.start.name, owner, accept_kv, kv_unavailable)


def receive_moved(kernel: Kernel, mover: CubeMover, requests: Iterator[pb.ReceiveCubeRequest], spool: Path, *,
                  accept_kv: Callable[[str], bool], kv_unavailable: str) -> ImportResult:
    """ReceiveCube: the moved cube's archive spooled, then received by the mover's rules (cluster/move.py)."""
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "start":
        raise InvalidField("the first ReceiveCube message must be start (the cube id, its owner and epoch)",
                           field="start")
    start = first.start
    if not CUBE_ID_RE.fullmatch(start.cube_id) or not start.from_node or not start.epoch:
        raise InvalidField("ReceiveCube's start needs a cube_id, from_node and epoch", field="start")
    with _spooled(start.size_bytes, requests, kernel.limits.max_archive_bytes, spool, "ReceiveCube") as path:
        return mover.receive(start.cube_id, start.from_node, start.epoch, start.owner_revision,
                             lambda: kernel.import_cube(path, "", "", accept_kv, kv_unavailable,
                                                        moved_from=start.from_node, cube_id=start.cube_id))


def archive_message(summary: ArchiveSummary) -> pb.CubeArchive:
    header = summary.header
    source = header.get("source", {})
    counts = summary.counts
    return pb.CubeArchive(
        format=FORMAT, version=VERSION, size_bytes=summary.size_bytes, sha256=summary.sha256,
        revisions=counts.get("R", 0), versions=counts.get("V", 0), adapters=counts.get("A", 0),
        kv_records=counts.get("T", 0) + counts.get("B", 0), source_cube_id=str(source.get("cube_id", "")),
        source_name=str(source.get("name", "")), embedder=str(header.get("embedder", {}).get("fingerprint", "")))
