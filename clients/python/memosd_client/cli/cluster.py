"""``memosctl cluster status|members|move|config``: a cluster node's view of the cluster, moving a cube, and
the cluster config (``config get`` shows what the node applies; ``config set KEY VALUE`` changes a cluster-wide
setting in etcd, which every node applies).

status and members read the Stats syscall's cluster section of the node memosctl talks to (admins): it
answers from that node's memory, so it works with etcd out of reach and says since when its reading is
old. move runs MoveCube through that node (the cube's owner runs it) and prints each step as it is done.
"""

from __future__ import annotations

import argparse

from memosd_client.cli.inputs import UsageError
from memosd_client.cli.output import Output, fmt_time, to_dict
from memosd_client.client import Client
from memosd_client.v1 import memos_pb2


def _cluster(client: Client) -> memos_pb2.ClusterStats:
    stats = client.stats()
    if not stats.HasField("cluster"):
        raise UsageError("this memosd is a single node (cluster.etcd is empty): it is in no cluster")
    return stats.cluster


def _etcd_health(c: memos_pb2.ClusterStats) -> str:
    where = ", ".join(c.etcd_endpoints)
    if c.last_error:
        return f"FAILING at {where}: {c.last_error} (member list {c.members_age_seconds:.1f} s old)"
    return f"ok at {where} (member list read {c.members_age_seconds:.1f} s ago)"


def _status(client: Client, args: argparse.Namespace, out: Output) -> None:
    c = _cluster(client)
    if out.json:
        out.emit_json(to_dict(c))
        return
    counts = dict(c.cubes_per_node)
    out.block([
        ("this node", f"{c.node_name} at {c.address or '-'} ({'joined' if c.joined else 'NOT joined'})"),
        ("etcd", _etcd_health(c)),
        ("members", f"{len(c.members)}: {', '.join(c.members) or '-'}"),
        ("cubes", sum(counts.values())),
        ("forwarded calls", c.forwarded_calls),
        ("moves", f"{c.moves_out} out, {c.moves_in} in, {c.moves_failed} given up"
                  + (f"; moving now: {', '.join(c.moving)}" if c.moving else "")),
        ("not served here", ", ".join(c.not_served) or "-"),
        ("missing here", ", ".join(c.missing) or "-"),
    ])
    out.stdout.write("\n")
    live = set(c.members)
    out.table(["NODE", "CUBES", "LIVE"], [[node, counts.get(node, 0), "yes" if node in live else "NO"]
                                         for node in sorted(live | set(counts))])


def _members(client: Client, args: argparse.Namespace, out: Output) -> None:
    c = _cluster(client)
    if out.json:
        out.emit_json([to_dict(m) for m in c.member_records])
        return
    out.table(["NAME", "ADDRESS", "STARTED", "VERSION"],
              [[m.name + (" (this node)" if m.name == c.node_name else ""), m.address, fmt_time(m.started),
                m.version] for m in c.member_records])


def _move(client: Client, args: argparse.Namespace, out: Output) -> None:
    steps: list[memos_pb2.MoveCubeProgress] = []

    def show(step: memos_pb2.MoveCubeProgress) -> None:
        steps.append(step)
        if not (out.quiet or out.json):
            size = f", {step.archive_bytes} bytes" if step.archive_bytes else ""
            print(f"  {step.elapsed_seconds:7.3f} s  {step.step} (epoch {step.epoch}{size})", file=out.stderr,
                  flush=True)

    last = client.move_cube(args.cube, args.node, drain_seconds=args.drain_seconds, progress=show)
    if out.json:
        out.emit_json([to_dict(s) for s in steps])
        return
    # Only the "exported" step carries the cube (as it was moved); the last step says where it went.
    cube = next((s.cube for s in reversed(steps) if s.cube.cube_id), last.cube)
    out.block([("cube", f"{cube.name} ({cube.cube_id})" if cube.cube_id else args.cube),
               ("moved", f"{last.from_node} -> {last.to_node}"), ("epoch", last.epoch),
               ("head revision", cube.head_revision), ("took", f"{last.elapsed_seconds:.2f} s")])


def _config_get(client: Client, args: argparse.Namespace, out: Output) -> None:
    _show_config(client.cluster_config(), out)


def _config_set(client: Client, args: argparse.Namespace, out: Output) -> None:
    _show_config(client.set_cluster_config(args.key, args.value), out)


def _show_config(c: memos_pb2.ClusterConfigResponse, out: Output) -> None:
    if out.json:
        out.emit_json(to_dict(c))
        return
    out.block([("node", c.node), ("revision", c.revision), ("created by", c.created_by or "-"),
               ("updated", f"{fmt_time(c.update_time)} by {c.updated_by or '-'}")])
    out.stdout.write("\n")
    out.table(["KEY", "VALUE", "KIND"], [*([k, c.fixed[k], "fixed (every node must agree)"] for k in sorted(c.fixed)),
                                         *([k, c.settings[k], "setting"] for k in sorted(c.settings))])


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = nouns.add_parser("cluster", help="a cluster node's view of the cluster; move a cube between nodes")
    verbs = cluster.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("status", help="this node, etcd's health, the members and their cube counts (admins)")
    p.set_defaults(handler=_status)
    p = verbs.add_parser("members", help="the live members: name, address, start time, version (admins)")
    p.set_defaults(handler=_members)
    p = verbs.add_parser(
        "move", help="move a cube to another node, keeping its id and revisions",
        description="Move CUBE to the cluster node NODE. Its owner stops taking changes (open read-write mounts "
                    "drain first), exports it, NODE receives it, the directory in etcd is switched "
                    "(compare-and-swap), then NODE serves it and the old copy is deleted. Changes to the cube "
                    "are refused with CUBE_MOVING meanwhile (seconds). Needs the admin right on the cube.")
    p.add_argument("cube", metavar="CUBE", help="cube id or name")
    p.add_argument("node", metavar="NODE", help="the target node's name (memosctl cluster members)")
    p.add_argument("--drain-seconds", type=float, default=0.0, metavar="S",
                   help="how long to wait for open read-write mounts to close (default 10)")
    p.set_defaults(handler=_move)
    p = verbs.add_parser(
        "config", help="the cluster config: get it, or set a cluster-wide setting (admins)",
        description="The cluster config in etcd (memosd/config). Fixed values (the embedder, the model, auth, TLS, "
                    "the lease, the placement rule) are checked by every node at its start and cannot be set. "
                    "Settings (the quotas) are cluster-wide defaults: set one and every node applies it.")
    how = p.add_subparsers(dest="how", required=True, metavar="get|set")
    g = how.add_parser("get", help="the config as the node memosctl talks to applies it")
    g.set_defaults(handler=_config_get)
    g = how.add_parser("set", help="change one setting (a compare-and-swap in etcd)")
    g.add_argument("key", metavar="KEY", help="e.g. quotas.max_mounts_per_principal")
    g.add_argument("value", metavar="VALUE", help="e.g. 64 (parsed as the config file's value would be)")
    g.set_defaults(handler=_config_set)


__all__ = ["register"]
