"""``memosctl cube alloc|list|stat|free|activate|evict|policy|freeze|thaw|retention|compact`` (and
export|import, from cli/archive.py)."""

from __future__ import annotations

import argparse
import sys

from memosd_client.cli import archive
from memosd_client.cli.inputs import UsageError, label, natural
from memosd_client.cli.output import Output, fmt_bytes, fmt_map, fmt_ms, fmt_time, to_dict
from memosd_client.client import Client
from memosd_client.v1 import memos_pb2, types_pb2

SOURCES = {
    types_pb2.ACTIVATION_SOURCE_POOL: "pool",
    types_pb2.ACTIVATION_SOURCE_STORE: "store",
    types_pb2.ACTIVATION_SOURCE_COMPUTED: "computed",
}


def cube_block(out: Output, cube: types_pb2.Cube) -> None:
    u = cube.usage
    out.block([
        ("cube id", cube.cube_id),
        ("name", cube.name),
        *([("node", cube.owner_node)] if cube.owner_node else []),  # on a cluster: the node that serves it
        ("description", cube.description or "-"),
        ("labels", fmt_map(cube.labels)),
        ("created", fmt_time(cube.create_time)),
        ("head revision", cube.head_revision),
        ("items", cube.item_count),
        ("versions", cube.version_count),
        ("mounts", cube.mount_count),
        ("owner", cube.owner_principal_id or "-"),
        ("frozen", "yes (read-only)" if cube.frozen else "no"),
        ("retention", _retention_text(cube.retention)),
        ("oldest kept", cube.oldest_revision or 1),
        ("usage", f"{u.searches} searches, {u.reads} reads, {u.generations} generations, {u.item_hits} item hits"
                  f" ({u.items_tracked} items tracked), last used {fmt_time(u.last_used_time)}"),
    ])


def _alloc(client: Client, args: argparse.Namespace, out: Output) -> None:
    cube = client.alloc_cube(args.name, args.description, dict(args.label))
    if out.json:
        out.emit_json(to_dict(cube))
    else:
        cube_block(out, cube)


def _list(client: Client, args: argparse.Namespace, out: Output) -> None:
    cubes = list(client.list_cubes(local=args.local_only))
    if out.json:
        out.emit_json({"cubes": [to_dict(c) for c in cubes]})
        return
    # A cluster node names each cube's owner; a cube whose owner is down is listed with what etcd knows.
    cluster = any(c.owner_node for c in cubes)
    out.table(
        ["CUBE ID", "NAME", *(["NODE"] if cluster else []), "HEAD", "ITEMS", "MOUNTS", "CREATED", "DESCRIPTION"],
        [
            [c.cube_id, c.name, *([c.owner_node + (" (DOWN)" if c.unavailable else "")] if cluster else []),
             *(["-"] * 4 if c.unavailable else [c.head_revision, c.item_count, c.mount_count,
                                                 fmt_time(c.create_time)]),
             "unavailable: its node is down or unreachable" if c.unavailable else c.description or "-"]
            for c in cubes
        ],
    )


def _stat(client: Client, args: argparse.Namespace, out: Output) -> None:
    cube = client.stat_cube(args.cube)
    if out.json:
        out.emit_json(to_dict(cube))
    else:
        cube_block(out, cube)


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (tests, daemons)
        return False


def _free(client: Client, args: argparse.Namespace, out: Output) -> None:
    if not args.yes:
        if not _interactive():
            raise UsageError(f"refusing to free cube {args.cube!r} without --yes: it deletes all its history")
        sys.stderr.write(f"Free cube {args.cube!r} with all its revisions and items? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise UsageError("not confirmed; nothing was freed")
    resp = client.free_cube(args.cube)
    if out.json:
        out.emit_json(to_dict(resp))
        return
    out.block([
        ("freed", args.cube),
        ("revisions deleted", resp.revisions_deleted),
        ("versions deleted", resp.versions_deleted),
        ("mounts closed", resp.mounts_closed),
    ])


def activation_block(out: Output, act: types_pb2.Activation) -> None:
    out.block([
        ("cube id", act.cube_id),
        ("revision", act.revision),
        ("items", act.item_count),
        ("tokens", act.tokens),
        ("computed", act.tokens_computed),
        ("reused", act.tokens_reused),
        ("pool bytes", fmt_bytes(act.pool_bytes)),
        ("persisted bytes", fmt_bytes(act.persisted_bytes)),
        ("source", SOURCES.get(act.source, "?")),
        ("pooled", "yes" if act.pooled else "no"),
        ("cache key", act.cache_key or "-"),
        ("model", act.model_fingerprint or "-"),
        ("adapter", act.adapter_digest or "-"),
        ("selector", act.selector or "all"),
        ("took", fmt_ms(act.took_us)),
    ])


def _activate(client: Client, args: argparse.Namespace, out: Output) -> None:
    with client.mount(args.cube, revision=args.revision) as m:
        act = m.activate(items=args.item, tag=args.tag, working_set=args.working_set)
    if out.json:
        out.emit_json(to_dict(act))
    else:
        activation_block(out, act)


def _policy(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.auto or args.manual or args.working_set or args.drift or args.train_after is not None:
        current = client.stat_cube(args.cube).policy
        auto = args.auto or (not args.manual and current.schedule == types_pb2.SCHEDULE_POLICY_AUTO_ACTIVATE)
        cube = client.set_cube_policy(args.cube, schedule="auto" if auto else "manual",
                                      working_set_size=args.working_set or current.working_set_size,
                                      drift_threshold=args.drift or current.drift_threshold,
                                      train_after_seconds=(current.train_after_seconds if args.train_after is None
                                                           else args.train_after),
                                      train_min_items=current.train_min_items)
    else:
        cube = client.stat_cube(args.cube)
    if out.json:
        out.emit_json(to_dict(cube.policy))
        return
    policy = cube.policy
    out.block([("cube", cube.cube_id),
               ("schedule", "auto" if policy.schedule == types_pb2.SCHEDULE_POLICY_AUTO_ACTIVATE else "manual"),
               ("working set", policy.working_set_size), ("drift threshold", f"{policy.drift_threshold:g}"),
               ("train after", f"{policy.train_after_seconds} s stable, {policy.train_min_items}+ items"
                               if policy.train_after_seconds else "never")])


def _freeze(client: Client, args: argparse.Namespace, out: Output) -> None:
    cube = client.freeze_cube(args.cube) if args.verb == "freeze" else client.thaw_cube(args.cube)
    if out.json:
        out.emit_json(to_dict(cube))
    else:
        out.block([("cube", cube.cube_id), ("name", cube.name), ("head revision", cube.head_revision),
                   ("frozen", "yes (read-only)" if cube.frozen else "no")])


def _retention_text(r: types_pb2.Retention) -> str:
    rules = ([f"last {r.keep_last} revisions"] if r.keep_last else []) + \
        ([f"revisions younger than {r.keep_seconds:g} s"] if r.keep_seconds else [])
    return " or ".join(rules) if rules else "keep everything"


def _retention(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.keep_last is not None or args.keep_seconds is not None:
        current = client.stat_cube(args.cube).retention
        keep_last = current.keep_last if args.keep_last is None else args.keep_last
        keep_seconds = current.keep_seconds if args.keep_seconds is None else args.keep_seconds
        cube = client.set_retention(args.cube, keep_last=keep_last, keep_seconds=keep_seconds)
    else:
        cube = client.stat_cube(args.cube)
    if out.json:
        out.emit_json({"cube_id": cube.cube_id, "retention": to_dict(cube.retention),
                       "oldest_revision": cube.oldest_revision})
    else:
        out.block([("cube", cube.cube_id), ("retention", _retention_text(cube.retention)),
                   ("head revision", cube.head_revision), ("oldest kept", cube.oldest_revision or 1)])


def _compact(client: Client, args: argparse.Namespace, out: Output) -> None:
    resp = client.compact(args.cube)
    if out.json:
        out.emit_json(to_dict(resp))
    else:
        out.block([("cube", resp.header.cube_id), ("revisions compacted", resp.revisions_compacted),
                   ("versions removed", resp.versions_removed), ("oldest kept", resp.oldest_revision),
                   ("head revision", resp.header.head_revision)])


def evict_block(out: Output, cube: str, resp: memos_pb2.EvictResponse) -> None:
    out.block([
        ("evicted", cube),
        ("caches dropped", resp.caches_dropped),
        ("adapters unloaded", resp.adapters_unloaded),
        ("pool bytes freed", fmt_bytes(resp.pool_bytes_freed)),
        ("persisted deleted", fmt_bytes(resp.persisted_bytes_deleted)),
        ("took", fmt_ms(resp.took_us)),
    ])


def _evict(client: Client, args: argparse.Namespace, out: Output) -> None:
    resp = client.evict(args.cube, delete_persisted=args.delete)
    if out.json:
        out.emit_json(to_dict(resp))
    else:
        evict_block(out, args.cube, resp)


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cube = nouns.add_parser("cube", help="allocate, list, inspect and free cubes")
    verbs = cube.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("alloc", help="create an empty cube")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--description", default="", metavar="D")
    p.add_argument("--label", type=label, action="append", default=[], metavar="K=V",
                   help="a label; repeat for more")
    p.set_defaults(handler=_alloc)

    p = verbs.add_parser("list", help="list cubes (on a cluster node: the cluster's, with each owner node)")
    p.add_argument("--local", action="store_true", dest="local_only",  # args.local is main's no-daemon hook
                   help="on a cluster node: only the cubes that node holds")
    p.set_defaults(handler=_list)

    p = verbs.add_parser("stat", help="show a cube's metadata")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.set_defaults(handler=_stat)

    p = verbs.add_parser("free", help="delete a cube and all its history (irreversible)")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--yes", action="store_true", help="do not ask; required when not interactive")
    p.set_defaults(handler=_free)

    p = verbs.add_parser(
        "activate", help="encode a cube's items as a KV cache of the daemon's model",
        description="Mount CUBE read-only at REVISION, activate it (compute, load or reuse its KV cache), "
                    "and unmount. A cold activation runs the model over every item: raise --timeout for "
                    "large cubes.",
    )
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--revision", type=natural, default=0, metavar="N", help="activate this revision (default HEAD)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--item", action="append", metavar="ID", help="only these items (repeatable)")
    which.add_argument("--tag", help="only the items with this tag")
    which.add_argument("--working-set", type=natural, nargs="?", const=0, metavar="N",
                       help="only the cube's working set: its N most used items (default: the policy's N)")
    p.set_defaults(handler=_activate)

    p = verbs.add_parser("policy", help="how the scheduler treats a cube: manual, or auto-activation",
                         description="Show (no options) or set the cube's scheduler policy. With --auto the "
                                     "daemon keeps the cube's working set activated at HEAD in the background.")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--auto", action="store_true", help="auto-activate the working set")
    mode.add_argument("--manual", action="store_true", help="nothing happens on its own (the default)")
    p.add_argument("--working-set", type=natural, default=0, metavar="N", help="N of the working set (default 32)")
    p.add_argument("--drift", type=float, default=0.0, metavar="F",
                   help="re-activate when this fraction of the working set changed (default 0.25)")
    p.add_argument("--train-after", type=natural, metavar="SECONDS",
                   help="train an adapter once the items are unchanged this long (0: never, the default)")
    p.set_defaults(handler=_policy)

    p = verbs.add_parser("freeze", help="make a cube read-only: commits are refused until it is thawed",
                         description="Freeze CUBE: read-write mounts, writes, commits, ingests, rollbacks, adapter "
                                     "imports and training are refused (CUBE_FROZEN). Reads, searches, "
                                     "activations and purge still work. Needs the admin right.")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.set_defaults(handler=_freeze)

    p = verbs.add_parser("thaw", help="accept commits to a frozen cube again")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.set_defaults(handler=_freeze)

    p = verbs.add_parser("retention", help="show or set which revisions compaction keeps",
                         description="Show (no options) or set CUBE's retention policy: compaction keeps HEAD, the "
                                     "revisions open mounts read at, and the revisions either rule keeps. 0 turns a "
                                     "rule off. Nothing is compacted until 'cube compact' or the daemon's lifecycle "
                                     "loop runs. Needs the admin right.")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--keep-last", type=natural, metavar="N", help="keep the last N revisions")
    p.add_argument("--keep-seconds", type=float, metavar="T", help="keep the revisions younger than T seconds")
    p.set_defaults(handler=_retention)

    p = verbs.add_parser("compact", help="apply the retention policy now (irreversible)",
                         description="Delete the item versions no kept revision can see; older revisions stay in "
                                     "the log, marked compacted, and reading at them fails REVISION_COMPACTED.")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.set_defaults(handler=_compact)

    p = verbs.add_parser("evict", help="drop a cube's KV cache from the daemon's pool")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("--delete", action="store_true",
                   help="also delete the persisted cache from the store (deactivates the cube)")
    p.set_defaults(handler=_evict)

    archive.register(verbs)
