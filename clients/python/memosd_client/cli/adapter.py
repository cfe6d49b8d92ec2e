"""``memosctl adapter import|export|show|remove``: a cube's LoRA adapter (its parametric memory)."""

from __future__ import annotations

import argparse
import os

from memosd_client.cli.inputs import UsageError, natural
from memosd_client.cli.mem import author_arg, revision_block
from memosd_client.cli.output import Output, fmt_bytes, fmt_map, fmt_time, to_dict
from memosd_client.client import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, Client, load_adapter_dir
from memosd_client.v1 import types_pb2

DEFAULT_IMPORT_MESSAGE = "memosctl adapter import"
DEFAULT_REMOVE_MESSAGE = "memosctl adapter remove"


def adapter_pairs(a: types_pb2.Adapter) -> list[tuple[str, object]]:
    """An adapter's metadata as key/value pairs: what it is, its sizes, where it came from."""
    lin = a.lineage
    pairs: list[tuple[str, object]] = [
        ("digest", a.digest or "-"),
        ("born revision", "staged" if a.staged or not a.born_revision else a.born_revision),
        ("rank", a.rank),
        ("target modules", ",".join(a.target_modules) or "-"),
        ("base model", a.base_model or "-"),
        ("config bytes", fmt_bytes(a.config_bytes)),
        ("weights bytes", fmt_bytes(a.weights_bytes)),
        ("origin", lin.origin or "-"),
    ]
    if lin.origin == "trained" or lin.job_id:
        pairs += [
            ("trained from", f"{lin.source_cube_id or '-'} at revision {lin.source_revision} "
                             f"({len(lin.source_item_ids)} items)"),
            ("job", lin.job_id or "-"),
            ("settings", fmt_map(lin.settings)),
        ]
    pairs += [("model", lin.model_fingerprint or "-"), ("created", fmt_time(lin.create_time))]
    return pairs


def _import(client: Client, args: argparse.Namespace, out: Output) -> None:
    # Read (and check) the files before the mount exists, so bad input leaves no trace.
    try:
        files = load_adapter_dir(args.directory)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read {args.directory}: {e.strerror or e}") from None
    with client.mount(args.cube, writable=True) as m:
        base = m.base_revision
        resp = m.import_adapter(files)
        rev = m.commit(args.message, args.author).revision
    adapter = types_pb2.Adapter()
    adapter.CopyFrom(resp.adapter)
    if rev.number != base:  # the commit made the staged adapter current
        adapter.born_revision, adapter.staged = rev.number, False
    if out.json:
        out.emit_json({"cube_id": m.cube_id, "adapter": to_dict(adapter), "revision": to_dict(rev)})
    else:
        out.block([("cube id", m.cube_id), ("revision", rev.number), *adapter_pairs(adapter)])


def _export(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube, revision=args.revision) as m:
        try:
            adapter, _, _ = m.export_adapter(args.directory)
        except OSError as e:
            raise UsageError(f"cannot write {args.directory}: {e.strerror or e}") from None
        base = m.base_revision
    files = [os.path.join(args.directory, name) for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)]
    if out.json:
        out.emit_json({"cube_id": m.cube_id, "revision": base, "adapter": to_dict(adapter), "files": files})
    else:
        out.block([("cube id", m.cube_id), ("revision", base), *adapter_pairs(adapter),
                   ("written", ", ".join(files))])


def _show(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube, revision=args.revision) as m:
        adapter, _, _ = m.export_adapter()
        base = m.base_revision
    if out.json:
        out.emit_json({"cube_id": m.cube_id, "revision": base, "adapter": to_dict(adapter)})
    else:
        out.block([("cube id", m.cube_id), ("revision", base), *adapter_pairs(adapter)])


def _remove(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube, writable=True) as m:
        m.forget(adapter=True)
        rev = m.commit(args.message, args.author).revision
    if out.json:
        out.emit_json({"cube_id": m.cube_id, "revision": to_dict(rev)})
    else:
        revision_block(out, rev, [("cube id", m.cube_id)])


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    adapter = nouns.add_parser("adapter", help="import, export, show and remove a cube's LoRA adapter")
    verbs = adapter.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser(
        "import", help="make a peft LoRA adapter the cube's, as a new revision",
        description=f"Upload the peft LoRA adapter in DIR ({ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}) "
                    "into CUBE and commit it as a new revision. The daemon checks it fits its model. "
                    "Raise --timeout for large adapters.",
    )
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("directory", metavar="DIR", help="a peft adapter directory")
    p.add_argument("-m", "--message", default=DEFAULT_IMPORT_MESSAGE, help="commit message")
    author_arg(p)
    p.set_defaults(handler=_import)

    p = verbs.add_parser("export", help="write a cube's adapter to a directory, byte-identical")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("directory", metavar="DIR", help="created if missing; the two files in it are replaced")
    p.add_argument("--revision", type=natural, default=0, metavar="N", help="the adapter at this revision "
                   "(default HEAD)")
    p.set_defaults(handler=_export)

    p = verbs.add_parser("show", help="a cube's adapter's metadata: digest, rank, sizes, lineage")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--revision", type=natural, default=0, metavar="N", help="the adapter at this revision "
                   "(default HEAD)")
    p.set_defaults(handler=_show)

    p = verbs.add_parser("remove", help="remove a cube's adapter, as a new revision (history keeps it)")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("-m", "--message", default=DEFAULT_REMOVE_MESSAGE, help="commit message")
    author_arg(p)
    p.set_defaults(handler=_remove)
