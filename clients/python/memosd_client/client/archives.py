"""A cube archive (ExportCube / ImportCube) on the client's side: an upload cut into messages, and a
download written to a file only once its size and sha256 match what the daemon announced."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress

from memosd_client.errors import DataLoss
from memosd_client.v1 import memos_pb2

# progress(done_bytes, total_bytes), after each chunk.
Progress = Callable[[int, int], None]


def archive_upload(path: str | os.PathLike[str], name: str, chunk_bytes: int,
                   progress: Progress | None = None) -> Iterator[memos_pb2.ImportCubeRequest]:
    """The messages of an ImportCube: start (the name and the file's size), then the file in chunks."""
    total = os.path.getsize(path)
    yield memos_pb2.ImportCubeRequest(start=memos_pb2.ImportCubeStart(name=name, size_bytes=total))
    done = 0
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield memos_pb2.ImportCubeRequest(data=data)
            done += len(data)
            if progress is not None:
                progress(done, total)


def save_archive(stream: Iterable[memos_pb2.ExportCubeResponse], path: str | os.PathLike[str],
                 progress: Progress | None = None) -> memos_pb2.CubeArchive:
    """Write an ExportCube stream to ``path`` (through ``path``.part, renamed when whole); DataLoss, and no
    file, when the bytes are not the archive the first message announced (gRPC errors pass through)."""
    target = os.fspath(path)
    partial = target + ".part"
    responses = iter(stream)
    first = next(responses, None)
    if first is None or not first.HasField("archive"):
        raise DataLoss("the export ended before it described the archive")
    archive = first.archive
    digest, done = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for resp in responses:
                out.write(resp.data)
                digest.update(resp.data)
                done += len(resp.data)
                if progress is not None:
                    progress(done, archive.size_bytes)
            out.flush()
            os.fsync(out.fileno())
        if done != archive.size_bytes or digest.hexdigest() != archive.sha256:
            raise DataLoss(f"the export delivered {done} of {archive.size_bytes} bytes, or bytes whose sha256 is "
                           "not the archive's; nothing was saved: export again")
        os.replace(partial, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return archive
