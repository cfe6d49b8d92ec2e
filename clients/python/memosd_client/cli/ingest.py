"""``memosctl ingest``: a conversation (JSONL) into a cube, one item per message, with a progress bar."""

from __future__ import annotations

import argparse
from typing import Any

from memosd_client.cli.inputs import UsageError, load_conversation
from memosd_client.cli.mem import author_arg
from memosd_client.cli.output import Output, to_dict
from memosd_client.client import DEFAULT_INGEST_BATCH, Client
from memosd_client.errors import MemosError

_DESCRIPTION = """\
Ingest a conversation into CUBE: every message becomes an item with its speaker, session and time, and
the turns of a session are linked (search can then filter by speaker and session and return the turns
around a hit). JSONL lines look like
  {"speaker": "user", "text": "...", "time": "2024-05-01T12:00:00Z", "session_id": "s1"}
("time" is optional: the ingest time, keeping the file's order). The whole file is checked before anything
is sent. It goes in batches of --batch-size messages, each one Ingest call committing ONE revision; a
failure leaves the batches before it committed (memosctl says how many messages were).
"""


def _ingest(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
    messages = load_conversation(args.file, args.session)  # checked before the mount exists
    if not messages:
        out.note(f"{args.file}: no messages; nothing was ingested")
    with client.mount(args.cube, writable=True) as handle:
        progress = out.progress(len(messages), "ingesting")
        try:
            responses = handle.ingest_many(
                messages, args.batch_size, progress.update, tags=args.tag, source=args.source,
                commit_message=args.message, author=args.author,
            )
        except MemosError:
            progress.close()
            if progress.done:
                out.note(f"{progress.done} of {len(messages)} messages were committed before this failure "
                         f"(the last of them made revision {handle.base_revision})")
            raise
        progress.close()
    item_ids = [i for r in responses for i in r.item_ids]
    revisions = [r.revision for r in responses]
    if out.json:
        doc: dict[str, Any] = {"cube_id": handle.cube_id, "item_ids": item_ids,
                               "revisions": [to_dict(r) for r in revisions]}
        out.emit_json(doc)
        return
    sessions = {str(m["session_id"]) for m in messages}
    out.block([
        ("cube id", handle.cube_id),
        ("messages", len(item_ids)),
        ("sessions", len(sessions)),
        ("revisions", ", ".join(str(r.number) for r in revisions) or "-"),
    ])


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = nouns.add_parser("ingest", help="ingest a conversation (JSONL) as linked, searchable turns",
                         description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--file", "-f", required=True, metavar="PATH", help="a JSONL conversation, '-' for stdin")
    p.add_argument("--session", default="", metavar="ID", help="session of lines without a session_id")
    p.add_argument("--tag", action="append", default=[], metavar="T", help="add a tag to every item")
    p.add_argument("--source", default="", help="source of every item (e.g. the file's name)")
    p.add_argument("-m", "--message", default="", help="revision message (default: 'ingest N messages')")
    p.add_argument("--batch-size", type=int, default=DEFAULT_INGEST_BATCH, metavar="N",
                   help="messages per Ingest call, i.e. per revision (default %(default)s; lowered to the "
                        "daemon's limits.max_items_per_write when that is smaller)")
    author_arg(p)
    p.set_defaults(handler=_ingest)
