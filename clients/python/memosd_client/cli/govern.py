"""``memosctl principal|whoami|grant|revoke|grants|audit|purge``: who may do what, what was done, erasure."""

from __future__ import annotations

import argparse
import os
import sys

from memosd_client.audit import verify
from memosd_client.cli.inputs import UsageError, natural
from memosd_client.cli.names import Names
from memosd_client.cli.output import Output, fmt_time, to_dict
from memosd_client.client import RIGHTS, Client
from memosd_client.v1 import types_pb2


class CheckFailed(Exception):
    """A check memosctl ran found a problem (exit code 5)."""


KINDS = {types_pb2.PRINCIPAL_KIND_USER: "user", types_pb2.PRINCIPAL_KIND_AGENT: "agent"}
OUTCOMES = {types_pb2.AUDIT_OUTCOME_OK: "ok", types_pb2.AUDIT_OUTCOME_DENIED: "denied",
            types_pb2.AUDIT_OUTCOME_FAILED: "failed"}


def _rights(grant: types_pb2.CubeGrant) -> str:
    names = [types_pb2.Right.Name(r).removeprefix("RIGHT_").lower() for r in grant.rights]
    return ",".join(names) or "-"


def _rights_arg(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RIGHTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rights {unknown}; use some of {','.join(RIGHTS)}")
    return names


def _principal_rows(principals: list[types_pb2.Principal]) -> list[list[object]]:
    return [[p.principal_id, p.name, KINDS.get(p.kind, "?"), "yes" if p.admin else "no",
             "disabled" if p.disabled else "enabled", fmt_time(p.create_time)] for p in principals]


# -- principals -------------------------------------------------------------------------------
def _principal_create(client: Client, args: argparse.Namespace, out: Output) -> None:
    # The file is made before the principal, so a path that cannot take the token refuses the call
    # instead of leaving a principal whose token was shown to no one.
    fd = -1
    if args.token_out:
        try:
            fd = os.open(args.token_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise UsageError(f"--token-out {args.token_out}: {error.strerror}; name a new file "
                             "(it is never overwritten)") from None
    try:
        principal, token = client.create_principal(args.name, kind=args.kind, admin=args.admin)
    except BaseException:
        if fd >= 0:
            os.close(fd)
            os.unlink(args.token_out)
        raise
    if fd >= 0:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    if out.json:
        out.emit_json({"principal": to_dict(principal), "token": "" if args.token_out else token})
        return
    out.block([("principal id", principal.principal_id), ("name", principal.name),
               ("kind", KINDS.get(principal.kind, "?")), ("admin", "yes" if principal.admin else "no"),
               ("token", f"written to {args.token_out} (mode 0600)" if args.token_out else token)])
    if not args.token_out:
        out.note("memosctl: the token is shown only now; memosd keeps only its hash")


def _principal_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    principals = list(client.list_principals())
    if out.json:
        out.emit_json({"principals": [to_dict(p) for p in principals]})
        return
    out.table(["PRINCIPAL ID", "NAME", "KIND", "ADMIN", "STATE", "CREATED"], _principal_rows(principals))


def _principal_disable(client: Client, args: argparse.Namespace, out: Output) -> None:
    resp = client.disable_principal(args.principal)
    if out.json:
        out.emit_json(to_dict(resp))
        return
    out.block([("principal id", resp.principal.principal_id), ("name", resp.principal.name),
               ("state", "disabled"), ("mounts closed", resp.mounts_closed)])


def _whoami(client: Client, args: argparse.Namespace, out: Output) -> None:
    p = client.whoami()
    if out.json:
        out.emit_json(to_dict(p))
        return
    out.block([("principal id", p.principal_id), ("name", p.name), ("kind", KINDS.get(p.kind, "?")),
               ("admin", "yes" if p.admin else "no")])


# -- grants ---------------------------------------------------------------------------------------
def _grant_rows(grants: list[types_pb2.CubeGrant], names: Names) -> list[list[object]]:
    return [[names.cube(g.cube_id), names.principal(g.principal_id), "owner" if g.owner else _rights(g),
             "expired" if g.expired else (fmt_time(g.expire_time) if g.HasField("expire_time") else "never"),
             names.principal(g.granted_by)] for g in grants]


def _grant(client: Client, args: argparse.Namespace, out: Output) -> None:
    grant = client.grant(args.cube, args.principal, args.rights, expires=args.expires)
    if out.json:
        out.emit_json(to_dict(grant))
        return
    out.table(["CUBE", "PRINCIPAL", "RIGHTS", "EXPIRES", "GRANTED BY"], _grant_rows([grant], Names(client)))


def _revoke(client: Client, args: argparse.Namespace, out: Output) -> None:
    resp = client.revoke(args.cube, args.principal, args.rights or [])
    if out.json:
        out.emit_json(to_dict(resp))
        return
    names = Names(client)
    out.block([("cube", names.cube(resp.grant.cube_id)), ("principal", names.principal(resp.grant.principal_id)),
               ("rights left", _rights(resp.grant)), ("mounts closed", resp.mounts_closed)])


def _grants(client: Client, args: argparse.Namespace, out: Output) -> None:
    grants = list(client.list_grants(args.cube or ""))
    if out.json:
        out.emit_json({"grants": [to_dict(g) for g in grants]})
        return
    out.table(["CUBE", "PRINCIPAL", "RIGHTS", "EXPIRES", "GRANTED BY"], _grant_rows(grants, Names(client)))


# -- audit ------------------------------------------------------------------------------------------
def _audit_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    names = Names(client)
    principal_id = names.principal_id(args.principal) if args.principal else ""
    records = client.audit(after_seq=args.after, limit=args.limit, cube=args.cube or "",
                           principal_id=principal_id, method=args.method or "", outcome=args.outcome or "",
                           since=args.since, until=args.until, follow=args.follow)
    if out.json and not args.follow:
        out.emit_json({"records": [to_dict(r) | {"body": r.body.decode()} for r in records]})
        return
    headers = ["SEQ", "TIME", "PRINCIPAL", "METHOD", "CUBE", "REV", "OUTCOME", "CODE", "USED"]
    if args.follow:  # one line per record as it arrives
        for r in records:
            out.stdout.write("  ".join(str(c) for c in _audit_row(r, names)) + "\n")
            out.stdout.flush()
        return
    out.table(headers, [_audit_row(r, names) for r in records])


def _audit_row(r: types_pb2.AuditRecord, names: Names) -> list[object]:
    used = len(r.item_ids) + len(r.artifacts)
    detail = ",".join([*r.artifacts[:2], *r.item_ids[:2]]) + ("…" if used > 4 else "")
    # A freed cube's or a new principal's id has no name in the listings: it is shown as the id.
    return [r.seq, fmt_time(r.time), names.principal(r.principal_id), r.method, names.cube(r.cube_id),
            r.revision or "-", OUTCOMES.get(r.outcome, "?"), r.code, detail or "-"]


def _audit_verify(client: Client, args: argparse.Namespace, out: Output) -> None:
    verdict = verify(client.audit(timeout=args.timeout_all), expect_head=args.expect_head or "")
    if out.json:
        out.emit_json(verdict.__dict__)
    elif verdict.ok:
        out.block([("chain", "intact"), ("records", verdict.checked), ("head seq", verdict.head_seq),
                   ("head hash", verdict.head)])
        out.note("memosctl: keep the head hash elsewhere and pass it to --expect-head next time: it also "
                 "catches a rewritten or truncated chain")
    else:
        out.block([("chain", "BROKEN"), ("records checked", verdict.checked), ("first bad record", verdict.bad_seq),
                   ("problem", verdict.problem)])
    if not verdict.ok:
        raise CheckFailed(f"audit chain broken at record {verdict.bad_seq}: {verdict.problem}")


# -- purge ------------------------------------------------------------------------------------------
def _purge(client: Client, args: argparse.Namespace, out: Output) -> None:
    if not (args.item or args.source or args.tag):
        raise UsageError("purge needs what to erase: --item ID, --source S or --tag T")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("purge erases history irreversibly; pass --yes to confirm")
        answer = input(f"Erase the matching items of cube {args.cube} from every revision? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UsageError("not confirmed; nothing was purged")
    receipt = client.purge(args.cube, args.item or [], source=args.source or "", tags=args.tag or [])
    if out.json:
        out.emit_json(to_dict(receipt))
        return
    if not receipt.item_ids:  # a blank receipt reads like a failure; say what happened instead
        asked = [*(f"--item {i}" for i in args.item or []), *([f"--source {args.source}"] if args.source else []),
                 *(f"--tag {t}" for t in args.tag or [])]
        out.stdout.write(f"nothing matched {' or '.join(asked)} in cube {args.cube}; nothing was purged\n")
        return
    out.block([
        ("purge id", receipt.purge_id), ("cube", receipt.cube_id), ("items", len(receipt.item_ids)),
        # The cascade: items derived from a purged one (the MemReader's), purged with it.
        ("derived items", f"{len(receipt.derived_item_ids)} ({', '.join(receipt.derived_item_ids[:5])}"
         f"{', ...' if len(receipt.derived_item_ids) > 5 else ''})" if receipt.derived_item_ids else "-"),
        ("versions removed", receipt.versions_removed), ("vectors removed", receipt.vectors_removed),
        ("staged removed", receipt.staged_removed), ("dense entries removed", receipt.dense_entries_removed),
        ("lexical entries removed", receipt.lexical_entries_removed),
        ("kv caches deleted", len(receipt.kv_caches_deleted)),
        ("adapters tainted", ", ".join(f"{a.digest[:12]}@{a.born_revision}" for a in receipt.adapters_tainted)
         or "-"),
    ])


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    principal = nouns.add_parser("principal", help="users and agents, and their tokens (admins)")
    verbs = principal.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("create", help="create a principal and print its token (shown once)")
    p.add_argument("name")
    p.add_argument("--kind", choices=["user", "agent"], default="user")
    p.add_argument("--admin", action="store_true", help="an admin: manages principals, holds every right")
    p.add_argument("--token-out", metavar="FILE", help="write the token to FILE (mode 0600) instead of printing it")
    p.set_defaults(handler=_principal_create)
    p = verbs.add_parser("list", help="list principals")
    p.set_defaults(handler=_principal_list)
    p = verbs.add_parser("disable", help="disable a principal: its token stops working, its mounts close")
    p.add_argument("principal", help="id or name")
    p.set_defaults(handler=_principal_disable)

    p = nouns.add_parser("whoami", help="the principal of the token in use")
    p.set_defaults(handler=_whoami)

    p = nouns.add_parser("grant", help="give a principal rights on a cube")
    p.add_argument("cube", help="cube id or name")
    p.add_argument("principal", help="principal id or name")
    p.add_argument("rights", type=_rights_arg, help=f"comma-separated: {','.join(RIGHTS)}")
    p.add_argument("--expires", metavar="TIME", help="ISO 8601 time the grant ends (default: never)")
    p.set_defaults(handler=_grant)
    p = nouns.add_parser("revoke", help="take rights back (all by default); closes the principal's mounts")
    p.add_argument("cube")
    p.add_argument("principal")
    p.add_argument("rights", nargs="?", type=_rights_arg, help="comma-separated; default: all")
    p.set_defaults(handler=_revoke)
    p = nouns.add_parser("grants", help="who holds what on a cube (or your own grants)")
    p.add_argument("cube", nargs="?", help="cube id or name; default: your own grants")
    p.set_defaults(handler=_grants)

    audit = nouns.add_parser("audit", help="the audit log: list, follow, verify the hash chain")
    verbs = audit.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("list", help="records in order, filtered")
    p.add_argument("--cube")
    p.add_argument("--principal", help="principal id or name")
    p.add_argument("--method", help="syscall name, e.g. Generate")
    p.add_argument("--outcome", choices=["ok", "denied", "failed"])
    p.add_argument("--since", metavar="TIME")
    p.add_argument("--until", metavar="TIME")
    p.add_argument("--after", type=natural, default=0, metavar="SEQ", help="only records after SEQ")
    p.add_argument("--limit", type=natural, default=0, help="at most this many (default: all)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records (Ctrl-C stops)")
    p.set_defaults(handler=_audit_list)
    p = verbs.add_parser("verify", help="check the hash chain; exit code 5 and the first bad record if broken")
    p.add_argument("--expect-head", metavar="HASH", help="a head hash from an earlier verify that must still be "
                                                         "in the chain")
    p.add_argument("--timeout-all", type=float, default=None, metavar="SECONDS",
                   help="deadline of the whole read (default: none)")
    p.set_defaults(handler=_audit_verify)

    p = nouns.add_parser("purge", help="erase items from every revision, index and KV cache (irreversible)")
    p.add_argument("cube", help="cube id or name")
    p.add_argument("--item", action="append", metavar="ID", help="an item id (repeatable)")
    p.add_argument("--source", help="every item with this source")
    p.add_argument("--tag", action="append", help="every item with this tag (repeatable)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=_purge)
