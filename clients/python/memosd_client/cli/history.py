"""``memosctl commit|unmount|log|diff|rollback|stats|health``."""

from __future__ import annotations

import argparse
from itertools import islice

from memosd_client.cli.mem import author_arg, revision_block
from memosd_client.cli.output import Output, fmt_bytes, fmt_duration, fmt_time, to_dict
from memosd_client.client import Client
from memosd_client.errors import MemosError
from memosd_client.v1 import memos_pb2, types_pb2

_KIND = {
    types_pb2.REVISION_KIND_COMMIT: "commit",
    types_pb2.REVISION_KIND_ROLLBACK: "rollback",
}
_CHANGE = {
    types_pb2.CHANGE_KIND_ADDED: "+ added",
    types_pb2.CHANGE_KIND_CHANGED: "~ changed",
    types_pb2.CHANGE_KIND_FORGOTTEN: "- forgotten",
}


def _commit(client: Client, args: argparse.Namespace, out: Output) -> None:
    resp = client.commit(args.mount, args.message, args.author)
    if not args.keep_mount:
        client.unmount(args.mount)
    if out.json:
        out.emit_json(to_dict(resp))
    else:
        revision_block(out, resp.revision, [("cube id", resp.mount.cube_id or resp.header.cube_id)])


def _unmount(client: Client, args: argparse.Namespace, out: Output) -> None:
    resp = client.unmount(args.mount)
    if out.json:
        out.emit_json(to_dict(resp))
    else:
        out.block([("unmounted", args.mount), ("discarded changes", resp.discarded_changes)])


def _adapter_mark(r: types_pb2.Revision) -> str:
    """What a revision did to the cube's adapter: its new digest (short), "removed", or "-" for nothing."""
    if not r.adapter_changed:
        return "-"
    return r.adapter_digest[:12] if r.adapter_digest else "removed"


def _log(client: Client, args: argparse.Namespace, out: Output) -> None:
    revs = list(islice(client.log(args.cube), args.limit or None))
    if out.json:
        out.emit_json({"revisions": [to_dict(r) for r in revs]})
        return
    out.table(
        ["REV", "KIND", "AUTHOR", "CREATED", "ADDED", "CHANGED", "FORGOTTEN", "ITEMS", "ADAPTER", "MESSAGE"],
        [
            [r.number, _KIND.get(r.kind, "?"), r.author or "-", fmt_time(r.create_time), r.added, r.changed,
             r.forgotten, r.item_count, _adapter_mark(r),
             ("[compacted] " if r.compacted else "")
             + (f"(restores {r.restored_revision}) {r.message}" if r.restored_revision else r.message or "-")]
            for r in revs
        ],
    )
    remembered = [r for r in revs if r.HasField("generation")]
    if remembered:
        out.stdout.write("\nremembered generations:\n" + "\n".join(
            line for r in remembered for line in generation_lines(r)) + "\n")


def generation_lines(r: types_pb2.Revision) -> list[str]:
    """What a remembered revision's reply was generated with: the model, the adapter, the memory used."""
    g = r.generation
    lines = [f"  {r.number}: model {g.model_fingerprint[:12] or '?'}, "
             f"adapter {g.adapter_digest[:12] if g.adapter_digest else 'none (base model)'}"
             + (f", request {r.request_id}" if r.request_id else "")]
    for source in g.sources:
        lines.append(f"     {source.cube_id} at revision {source.revision}: "
                     f"block {', '.join(source.block_item_ids) or '-'}; "
                     f"retrieved {', '.join(source.retrieved_item_ids) or '-'}")
    if g.hidden_sources:
        lines.append(f"     and {g.hidden_sources} cube(s) you cannot read")
    if not g.sources and not g.hidden_sources:
        lines.append("     no memory")
    return lines


def _adapter_text(change: types_pb2.AdapterChange) -> str:
    def one(a: types_pb2.Adapter) -> str:
        return f"{a.digest[:12]} (rank {a.rank}, {fmt_bytes(a.weights_bytes)}, {a.lineage.origin or '?'})"

    before = change.before if change.HasField("before") else None
    after = change.after if change.HasField("after") else None
    if before is not None and after is not None:
        return f"{before.digest[:12]} -> {one(after)}"
    if after is not None:
        return one(after)
    if before is not None:
        return f"{before.digest[:12]} removed"
    return "-"


def _diff(client: Client, args: argparse.Namespace, out: Output) -> None:
    diff = client.diff(args.cube, args.from_revision, args.to_revision)
    changes = list(diff)
    adapter = diff.adapter_change
    if out.json:
        out.emit_json({"from_revision": args.from_revision, "to_revision": args.to_revision,
                       "changes": [to_dict(c) for c in changes],
                       "adapter_change": to_dict(adapter) if adapter is not None else None})
        return
    rows: list[list[object]] = []
    if adapter is not None:
        rows.append([_CHANGE.get(adapter.kind, "?"), "adapter", _adapter_text(adapter)])
    rows += [
        [_CHANGE.get(c.kind, "?"), c.item_id, c.after.text if c.HasField("after") else c.before.text]
        for c in changes
    ]
    out.table(["CHANGE", "ITEM ID", "TEXT"], rows)


def _rollback(client: Client, args: argparse.Namespace, out: Output) -> None:
    rev = client.rollback(args.cube, args.revision, args.message, args.author)
    if out.json:
        out.emit_json(to_dict(rev))
    else:
        revision_block(out, rev, [("restored", rev.restored_revision)])


def _stats(client: Client, args: argparse.Namespace, out: Output) -> None:
    s = client.stats()
    if out.json:
        out.emit_json(to_dict(s))
        return
    out.block([
        ("version", s.version),
        ("uptime", fmt_duration(s.uptime_seconds)),
        ("cubes", s.cube_count),
        ("mounts", s.mount_count),
        ("items", s.item_count),
        ("versions", s.version_count),
        ("embedder", f"{s.embedder} ({s.embedding_dim} dims)"),
        ("store", fmt_bytes(s.store_bytes)),
        ("dense index", fmt_bytes(s.dense_index_bytes)),
        ("lexical index", fmt_bytes(s.lexical_index_bytes)),
        ("rss", fmt_bytes(s.rss_bytes)),
        *_model_pairs(s),
        *((f"calls {name}", n) for name, n in sorted(s.calls.items())),
    ])


def _model_pairs(s: memos_pb2.StatsResponse) -> list[tuple[str, object]]:
    # Daemons older than the runtime leave both unset.
    pairs: list[tuple[str, object]] = []
    if s.HasField("model"):
        m = s.model
        if m.state == "failed":
            pairs.append(("model", f"failed: {m.error}"))
        elif m.name and m.state == "disabled":  # runtime.model = none: no device, dtype or context to show
            pairs.append(("model", f"{m.name} (disabled: no activation memory or chat)"))
        elif m.name:
            pairs.append(("model", f"{m.name} ({m.state}, {m.device} {m.dtype}, context {m.context_length})"))
        else:
            pairs.append(("model", m.state or "-"))
        if m.engine:  # daemons from before the vLLM engine leave it empty
            pairs.append(("engine", m.engine))
        if m.state == "ready":
            pairs.append(("generation", f"{m.active_generations} active, {m.queue_depth} queued"))
        if m.HasField("engine_stats"):
            e = m.engine_stats
            pairs += [
                ("engine kv cache", f"{e.kv_cache_tokens} tokens, in blocks of {e.block_size}"),
                ("engine blocks", f"{e.blocks_loaded} loaded, {e.blocks_saved} saved, {e.load_errors} load errors"),
                ("engine steps", f"{e.steps} (at most {e.max_requests_per_step} requests in one)"),
            ]
    if s.HasField("kv_pool"):
        p = s.kv_pool
        if not s.model.HasField("engine_stats"):  # on vllm the pool is the engine's cache, shown above
            pairs += [
                ("kv pool", f"{p.entries} caches, {fmt_bytes(p.bytes_used)} of {fmt_bytes(p.budget_bytes)}"),
                ("kv pool traffic", f"{p.hits} hits, {p.misses} misses, {p.evictions} evictions"),
            ]
        pairs.append(("kv persisted", fmt_bytes(p.persisted_bytes)))
    if s.HasField("adapters"):
        a = s.adapters
        pairs += [
            ("adapters", f"{a.resident} of {a.max_resident} resident, {a.loads} loads, {a.evictions} evictions"),
            ("adapters stored", f"{a.stored} ({fmt_bytes(a.stored_bytes)})"),
        ]
    return pairs


def _health(client: Client, args: argparse.Namespace, out: Output) -> None:
    status = client.health()
    if out.json:
        out.emit_json({"status": status})
    else:
        out.stdout.write(status + "\n")
    if status != "SERVING":
        raise MemosError(f"the daemon reports {status}", reason="NOT_SERVING")


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = nouns.add_parser("commit", help="commit a mount left open by 'mem write --no-commit'")
    p.add_argument("--mount", required=True, metavar="MOUNT_ID")
    p.add_argument("-m", "--message", default="memosctl commit", help="commit message")
    p.add_argument("--keep-mount", action="store_true", help="leave the mount open after committing")
    author_arg(p)
    p.set_defaults(handler=_commit)

    p = nouns.add_parser("unmount", help="close a mount, discarding its staged changes")
    p.add_argument("mount", metavar="MOUNT_ID")
    p.set_defaults(handler=_unmount)

    p = nouns.add_parser("log", help="a cube's revisions, newest first")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("-n", "--limit", type=int, default=0, metavar="N", help="show at most N revisions")
    p.set_defaults(handler=_log)

    p = nouns.add_parser("diff", help="items (and the adapter) added, changed and forgotten between two revisions")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("from_revision", type=int, metavar="FROM", help="the older revision (0: empty cube)")
    p.add_argument("to_revision", type=int, nargs="?", default=0, metavar="TO", help="the newer one (default HEAD)")
    p.set_defaults(handler=_diff)

    p = nouns.add_parser("rollback", help="make a new revision with the content of an older one")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("revision", type=int, metavar="REVISION")
    p.add_argument("-m", "--message", default="", help="commit message")
    author_arg(p)
    p.set_defaults(handler=_rollback)

    p = nouns.add_parser("stats", help="daemon-wide statistics")
    p.set_defaults(handler=_stats)

    p = nouns.add_parser("health", help="the daemon's gRPC health status (exit 0 when SERVING)")
    p.set_defaults(handler=_health)
