"""``memosctl mem write|read|search|forget|archive|restore``: plaintext items (most through a short-lived mount)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from typing import Any

from memosd_client.cli.inputs import UsageError, iso_time, load_jsonl, natural
from memosd_client.cli.output import Output, fmt_time, to_dict
from memosd_client.client import Client, ItemLike, MountHandle
from memosd_client.errors import MemosError
from memosd_client.v1 import types_pb2

DEFAULT_WRITE_MESSAGE = "memosctl write"
DEFAULT_FORGET_MESSAGE = "memosctl forget"


def author_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--author", default=os.environ.get("MEMOS_AUTHOR", ""),
                   help="recorded in the log (default: $MEMOS_AUTHOR; the daemon records the caller's principal name)")


def revision_block(out: Output, rev: types_pb2.Revision, extra: Sequence[tuple[str, object]] = ()) -> None:
    out.block([
        *extra,
        ("revision", rev.number),
        ("author", rev.author or "-"),
        ("message", rev.message or "-"),
        ("created", fmt_time(rev.create_time)),
        ("added", rev.added),
        ("changed", rev.changed),
        ("forgotten", rev.forgotten),
        ("items", rev.item_count),
        *([("adapter", rev.adapter_digest or "removed")] if rev.adapter_changed else []),
    ])


def _items(args: argparse.Namespace) -> list[ItemLike]:
    items: list[ItemLike] = list(args.text)
    if args.file is not None:
        for doc in load_jsonl(args.file):
            # --tag adds to each line's own tags rather than being overridden by them.
            doc["tags"] = list(dict.fromkeys([*doc.get("tags", []), *args.tag]))
            items.append(doc)
    if not items:
        raise UsageError("nothing to write: give TEXT arguments or --file")
    return items


def _write(client: Client, args: argparse.Namespace, out: Output) -> None:
    items = _items(args)  # validated before the mount exists, so bad input leaves no trace
    handle = client.mount(args.cube, writable=True)
    try:
        progress = out.progress(len(items), "writing") if args.file is not None else None
        ids = handle.write_many(
            items, args.batch_size, progress.update if progress else None,
            tags=args.tag, source=args.source, event_time=args.event_time, ttl_seconds=args.ttl,
        )
        if progress:
            progress.close()
        rev = None if args.no_commit else handle.commit(args.message, args.author).revision
    except BaseException:
        # Unmounting discards the staged part, so a failed write commits nothing.
        with suppress(MemosError):  # the original failure is the one to report
            handle.unmount()
        raise
    if rev is not None:
        handle.unmount()
    else:
        out.note(f"staged {len(ids)} items in mount {handle.mount_id}; "
                 f"commit them with: memosctl commit --mount {handle.mount_id}")
    if out.json:
        doc: dict[str, Any] = {"cube_id": handle.cube_id, "item_ids": ids, "committed": rev is not None,
                               "mount": to_dict(handle.info)}
        if rev is not None:
            doc["revision"] = to_dict(rev)
        out.emit_json(doc)
        return
    summary: list[tuple[str, object]] = [("cube id", handle.cube_id), ("written", len(ids))]
    summary += [("revision", rev.number)] if rev is not None else [("mount", f"{handle.mount_id} (not committed)")]
    out.block(summary)
    out.stdout.write("\n")
    out.table(["#", "ITEM ID"], [[i, item_id] for i, item_id in enumerate(ids, 1)])


def _item_rows(items: Sequence[types_pb2.Item]) -> list[list[object]]:
    return [
        [it.item_id, it.born_revision or "staged", _STATES.get(it.state, "active"), fmt_time(it.event_time),
         ",".join(it.tags) or "-", it.source or "-", it.text]
        for it in items
    ]


_STATES = {types_pb2.ITEM_STATE_ACTIVE: "active", types_pb2.ITEM_STATE_ARCHIVED: "archived",
           types_pb2.ITEM_STATE_EXPIRED: "expired"}


def _read(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube, revision=args.revision) as m:
        items = m.read(args.item_ids) if args.item_ids else list(m.iter_items())
        base = m.base_revision
    if out.json:
        out.emit_json({"cube_id": m.cube_id, "revision": base, "items": [to_dict(i) for i in items]})
    else:
        out.table(["ITEM ID", "REV", "STATE", "EVENT TIME", "TAGS", "SOURCE", "TEXT"], _item_rows(items))


def _said(item: types_pb2.Item) -> str:
    """A conversation turn's text after its speaker."""
    return f"{item.speaker}: {item.text}" if item.speaker else item.text


def _search(client: Client, args: argparse.Namespace, out: Output) -> None:
    with ExitStack() as stack:
        mounts: list[MountHandle] = [
            stack.enter_context(client.mount(cube, revision=args.revision)) for cube in args.cubes
        ]
        results = client.search(
            [m.mount_id for m in mounts], args.query, args.k,
            tags_all=args.tag, tags_any=args.any_tag, tags_none=args.not_tag,
            since=args.since, until=args.until, mode=args.mode,
            speakers=args.speaker, session_ids=args.session, context_turns=args.context,
            include_archived=args.include_archived,
        )
    if out.json:
        out.emit_json(to_dict(results.response))
        return
    # Show cubes as the user named them, not by their ids.
    names = {m.cube_id: cube for m, cube in zip(mounts, args.cubes, strict=True)}
    rows: list[list[object]] = []
    for rank, h in enumerate(results, 1):
        cube = names.get(h.cube_id, h.cube_id)
        # Context turns go around their hit, unranked and indented.
        rows += [["-", "-", "-", "-", c.item_id, cube, "  | " + _said(c)] for c in h.context_before]
        rows.append([rank, f"{h.score:.4f}", f"{h.dense_score:.4f}" if h.dense_rank else "-",
                     f"{h.lexical_score:.3f}" if h.lexical_rank else "-", h.item.item_id, cube, _said(h.item)])
        rows += [["-", "-", "-", "-", c.item_id, cube, "  | " + _said(c)] for c in h.context_after]
    out.table(["RANK", "SCORE", "DENSE", "LEXICAL", "ITEM ID", "CUBE", "TEXT"], rows)
    out.note(f"{len(results)} hits in {results.took_us / 1000:.1f} ms")


def _forget(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube, writable=True) as m:
        m.forget(args.item_ids)
        rev = m.commit(args.message, args.author).revision
    if out.json:
        out.emit_json({"cube_id": m.cube_id, "revision": to_dict(rev)})
    else:
        revision_block(out, rev, [("cube id", m.cube_id)])


def _set_state(client: Client, args: argparse.Namespace, out: Output) -> None:
    state = "archived" if args.verb == "archive" else "active"
    rev = client.set_item_state(args.cube, args.item_ids, state, message=args.message, author=args.author)
    if out.json:
        out.emit_json({"cube": args.cube, "state": state, "revision": to_dict(rev) if rev is not None else None})
    elif rev is None:
        out.block([("cube", args.cube), ("revision", f"none: every item was {state} already")])
    else:
        revision_block(out, rev, [("cube", args.cube), ("state", state)])


def _extract(client: Client, args: argparse.Namespace, out: Output) -> None:
    # jobs.py imports this module (author_arg): its job display is taken when used.
    from memosd_client.cli.jobs import emit_job, finish, watch

    token = ""
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise MemosError(f"--token-env {args.token_env}: the variable is not set or empty",
                             reason="TOKEN_NOT_SET")
    with client.mount(args.cube, writable=True) as m:
        job = m.extract(url=args.url, token=token, model=args.model, max_tokens=args.max_tokens,
                        message=args.message, author=args.author, reread=args.reread)
        if args.detach:
            emit_job(out, job)
            out.note(f"reading in the background; follow it with: memosctl job watch {job.job_id}")
            return
        out.note(f"job {job.job_id}: reading {job.extract.turns_total} turns of cube {job.cube_id or m.cube_id} "
                 f"at revision {job.revision or m.base_revision} (Ctrl-C cancels it)")
        job = watch(client, out, job.job_id, first=job, cancel_on_interrupt=True)
    finish(out, job)


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mem = nouns.add_parser("mem", help="write, read, search and forget plaintext items")
    verbs = mem.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser(
        "write", help="write items and commit them",
        description='Write items into CUBE and commit them as one new revision. JSONL lines look like '
                    '{"text": "...", "tags": ["..."], "source": "...", "event_time": "2024-05-01T12:00:00Z"}.',
    )
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("text", nargs="*", metavar="TEXT", help="one item per argument")
    p.add_argument("--file", "-f", metavar="PATH", help="a JSONL file of items, '-' for stdin")
    p.add_argument("--tag", action="append", default=[], metavar="T", help="add a tag to every item")
    p.add_argument("--source", default="", help="source of items that do not name their own")
    p.add_argument("--event-time", type=iso_time, metavar="ISO", help="event time of items without their own")
    p.add_argument("-m", "--message", default=DEFAULT_WRITE_MESSAGE, help="commit message")
    p.add_argument("--no-commit", action="store_true",
                   help="stage only, leaving the mount open; prints the mount id for 'commit --mount'")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="items per Write call")
    p.add_argument("--ttl", type=natural, default=0, metavar="SECONDS",
                   help="the items expire SECONDS after the write (left out, then purged after the daemon's "
                        "lifecycle.expire_grace_seconds); default: never")
    author_arg(p)
    p.set_defaults(handler=_write)

    p = verbs.add_parser("read", help="read items by id, or list them all")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("item_ids", nargs="*", metavar="ITEM_ID")
    p.add_argument("--revision", type=int, default=0, metavar="N", help="read at this revision (default HEAD)")
    p.set_defaults(handler=_read)

    p = verbs.add_parser("search", help="hybrid top-k search over one or more cubes")
    p.add_argument("cubes", nargs="+", metavar="CUBE", help="cube ids or names")
    p.add_argument("-q", "--query", required=True)
    p.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    p.add_argument("--tag", action="append", default=[], metavar="T", help="items must carry every such tag")
    p.add_argument("--any-tag", action="append", default=[], metavar="T", help="items carry at least one")
    p.add_argument("--not-tag", action="append", default=[], metavar="T", help="items carry none of these")
    p.add_argument("--since", type=iso_time, metavar="ISO", help="event time at or after")
    p.add_argument("--until", type=iso_time, metavar="ISO", help="event time before")
    p.add_argument("--mode", choices=["hybrid", "dense", "lexical"], default="hybrid")
    p.add_argument("--speaker", action="append", default=[], metavar="S",
                   help="conversation turns said by S (repeat: any of them)")
    p.add_argument("--session", action="append", default=[], metavar="ID",
                   help="conversation turns of session ID (repeat: any of them)")
    p.add_argument("--context", type=natural, default=0, metavar="N",
                   help="also show up to N turns before and after each hit in its session (0 to 10)")
    p.add_argument("--revision", type=int, default=0, metavar="N", help="search at this revision (default HEAD)")
    p.add_argument("--include-archived", action="store_true", help="also return archived items")
    p.set_defaults(handler=_search)

    p = verbs.add_parser("forget", help="forget items and commit")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("item_ids", nargs="+", metavar="ITEM_ID")
    p.add_argument("-m", "--message", default=DEFAULT_FORGET_MESSAGE, help="commit message")
    author_arg(p)
    p.set_defaults(handler=_forget)

    p = verbs.add_parser(
        "extract", help="derive facts, preferences and events from a cube's conversation turns",
        description="Start the MemReader on CUBE (mounted read-write at HEAD): the extractor reads its turns and "
                    "proposes memory items; those that parse and that their source turns support are "
                    "reconciled with the cube's derived items and committed as one revision. Follows the job "
                    "(prompts read, items kept, dropped, refused) and prints its final state; exits 3 if it "
                    "failed or was cancelled. Ctrl-C cancels it. The extractor is the daemon's own model "
                    "unless --url names an OpenAI-compatible endpoint.",
    )
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--url", default="", help="an OpenAI-compatible endpoint's base URL (http(s)://.../v1)")
    p.add_argument("--token-env", default="", metavar="VAR",
                   help="the environment variable holding the endpoint's bearer token (never an argument)")
    p.add_argument("--model", default="", help="the endpoint's model name")
    p.add_argument("--max-tokens", type=natural, default=0, metavar="N",
                   help="new tokens per answer (default: the daemon's, 256)")
    p.add_argument("-m", "--message", default="memosctl mem extract",
                   help="message of the revision that commits the items")
    p.add_argument("--reread", action="store_true",
                   help="read every turn again (default: only the turns new since the last successful extraction)")
    p.add_argument("--detach", action="store_true", help="start the job and return without watching it")
    author_arg(p)
    p.set_defaults(handler=_extract)

    for verb, what in (("archive", "archive items: kept and readable, left out of search and memory blocks"),
                       ("restore", "restore archived (or expired, not yet purged) items")):
        p = verbs.add_parser(verb, help=f"{what}; commits a revision")
        p.add_argument("cube", metavar="CUBE", help="cube id or name")
        p.add_argument("item_ids", nargs="+", metavar="ITEM_ID")
        p.add_argument("-m", "--message", default="", help="commit message (default: '<verb> N items')")
        author_arg(p)
        p.set_defaults(handler=_set_state)
