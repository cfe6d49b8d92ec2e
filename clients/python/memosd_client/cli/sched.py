"""``memosctl sched status``: what the MemScheduler is doing, and why it did what it did."""

from __future__ import annotations

import argparse

from memosd_client.cli.names import Names
from memosd_client.cli.output import Output, fmt_bytes, fmt_time, to_dict
from memosd_client.client import Client


def _status(client: Client, args: argparse.Namespace, out: Output) -> None:
    s = client.scheduler_status()
    if out.json:
        out.emit_json(to_dict(s))
        return
    pool, adapters = s.kv_pool, s.adapters
    names = Names(client)
    lookups = pool.hits + pool.misses
    out.block([
        ("scheduler", f"on, every {s.interval_seconds:g} s" if s.enabled else "off (scheduler.enabled = false)"),
        ("running", names.cube(s.running_cube_id)),
        ("pending", ", ".join(names.cube(c) for c in s.pending_cube_ids) or "-"),
        ("passes / activations", f"{s.ticks} / {s.activations}"),
        ("worker queue", s.queue_depth),
        ("kv pool", f"{fmt_bytes(pool.bytes_used)} of {fmt_bytes(pool.budget_bytes)}, {pool.entries} caches, "
                    f"hit rate {pool.hits / lookups:.0%} ({pool.hits}/{lookups}), {pool.evictions} evictions"
                    if lookups else f"{fmt_bytes(pool.bytes_used)} of {fmt_bytes(pool.budget_bytes)}, "
                                    f"{pool.entries} caches, no lookups yet"),
        ("adapter pool", f"{adapters.resident} of {adapters.max_resident} resident, {adapters.loads} loads, "
                         f"{adapters.evictions} evictions"),
    ])
    if s.decisions:
        out.stdout.write("\n")
        out.table(["TIME", "CUBE", "ACTION", "REUSED", "COMPUTED", "REASON"],
                  [[fmt_time(d.time), names.cube(d.cube_id), d.action, d.tokens_reused or "-", d.tokens_computed or "-",
                    d.reason] for d in list(s.decisions)[-args.last:]])


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sched = nouns.add_parser("sched", help="the MemScheduler: queue, running task, pools, recent decisions")
    verbs = sched.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("status", help="what it is doing and its recent decisions with their reasons (admins)")
    p.add_argument("--last", type=int, default=20, metavar="N", help="show the last N decisions (default 20)")
    p.set_defaults(handler=_status)
