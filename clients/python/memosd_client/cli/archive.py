"""``memosctl cube export|import``: a cube as a portable archive file and back, with a progress bar."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from memosd_client.cli.output import Output, fmt_bytes, to_dict
from memosd_client.cli.progress import Progress, bar
from memosd_client.client import Client
from memosd_client.v1 import memos_pb2


class ByteProgress(Progress):
    """A Progress in bytes: ``[####....] 12.0 MiB/40.0 MiB 30% 8.1 MiB/s``."""

    def render(self, now: float) -> str:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        rate = self.done / max(now - self._start, 1e-9)
        return (f"{self.label} {bar(frac)} {fmt_bytes(self.done)}/{fmt_bytes(self.total)} {frac:4.0%} "
                f"{fmt_bytes(int(rate))}/s")


def _bytes_progress(out: Output, total: int, label: str) -> ByteProgress:
    return ByteProgress(total, label, out.stderr, enabled=not (out.quiet or out.json))


def _updater(progress: ByteProgress) -> Callable[[int, int], None]:
    """The client's progress(done, total) callback, drawn on ``progress``."""
    def update(done: int, total: int) -> None:
        progress.total = total
        progress.update(done - progress.done)

    return update


def archive_rows(archive: memos_pb2.CubeArchive) -> list[tuple[str, object]]:
    return [("archive", f"{archive.format}/{archive.version}, {fmt_bytes(archive.size_bytes)}"),
            ("sha256", archive.sha256), ("source", f"{archive.source_name} ({archive.source_cube_id})"),
            ("revisions", archive.revisions), ("versions", archive.versions), ("adapters", archive.adapters),
            ("kv records", archive.kv_records)]


def _export(client: Client, args: argparse.Namespace, out: Output) -> None:
    progress = _bytes_progress(out, 0, "exporting")
    started = time.monotonic()
    try:
        archive = client.export_cube(args.cube, args.file, with_kv=args.with_kv, progress=_updater(progress))
    finally:
        progress.close()
    if out.json:
        out.emit_json({"file": os.fspath(args.file), "archive": to_dict(archive)})
        return
    out.block([("file", os.fspath(args.file)), *archive_rows(archive),
               ("took", f"{time.monotonic() - started:.1f} s")])


def _import(client: Client, args: argparse.Namespace, out: Output) -> None:
    progress = _bytes_progress(out, os.path.getsize(args.file), "importing")
    started = time.monotonic()
    try:
        resp = client.import_cube(args.file, args.name, progress=_updater(progress))
    finally:
        progress.close()
    if out.json:
        out.emit_json(to_dict(resp))
        return
    kv = f"{resp.kv_loaded} loaded, {resp.kv_skipped} skipped" + (
        f" ({resp.kv_skipped_reason})" if resp.kv_skipped_reason else "")
    out.block([("cube id", resp.cube.cube_id), ("name", resp.cube.name),
               ("head revision", resp.cube.head_revision), ("items", resp.cube.item_count),
               ("versions", resp.cube.version_count),
               ("cube id kept", "yes" if resp.kept_cube_id else "no (the source's id is in use here)"),
               ("vectors", "re-embedded (another embedder made them)" if resp.reembedded else "as exported"),
               ("kv caches", kv), *archive_rows(resp.archive)[:2],
               ("took", f"{time.monotonic() - started:.1f} s")])


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "export", help="save a cube as a portable archive file",
        description="Write CUBE, with every revision, item version, vector and adapter (and with --with-kv its "
                    "persisted KV caches), to FILE in the memosd-cube format. FILE appears only once whole and "
                    "checked. Grants, the audit trail and open mounts stay behind. Needs the read right.")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("file", metavar="FILE", help="the archive to write (replaced if it exists)")
    p.add_argument("--with-kv", action="store_true",
                   help="include the persisted KV caches (large; they load only under the same model)")
    p.set_defaults(handler=_export)

    p = verbs.add_parser(
        "import", help="recreate a cube from an archive file",
        description="Recreate the cube archived in FILE as a new cube NAME, owned by you, with the same "
                    "revisions. The archive is checked whole first; a truncated or damaged one is refused "
                    "(ARCHIVE_INVALID) and nothing is imported.")
    p.add_argument("file", metavar="FILE", help="an archive written by 'cube export'")
    p.add_argument("name", metavar="NAME", help="the new cube's name (must be free)")
    p.set_defaults(handler=_import)
