"""memosctl: the admin command line of memosd. Nouns then verbs: ``memosctl cube list``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress

from memosd_client import __version__
from memosd_client.cli import (
    adapter,
    chat,
    cluster,
    completion,
    cubes,
    govern,
    history,
    ingest,
    jobs,
    mcp,
    mem,
    sched,
)
from memosd_client.cli.connect import DaemonNotFound, connection, refused_token_hint
from memosd_client.cli.inputs import UsageError
from memosd_client.cli.output import Output
from memosd_client.client import DEFAULT_TARGET, Client, RetryPolicy
from memosd_client.errors import DeadlineExceeded, MemosError, Unauthenticated, Unavailable

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_RPC = 3
EXIT_UNREACHABLE = 4
EXIT_CHECK_FAILED = 5

Handler = Callable[[Client, argparse.Namespace, Output], None]

_EPILOG = """\
exit codes:
  0  success
  1  unexpected failure (a bug; the message says what)
  2  bad arguments or input (usage)
  3  the daemon refused or failed the call (the message starts with its reason)
  4  the daemon is unreachable (not running, wrong --target, no answer within --timeout)
  5  a check found a problem (audit verify: the chain is broken)

environment:
  MEMOS_TARGET      default for --target
  MEMOS_TOKEN       the bearer token (default for --token)
  MEMOS_TOKEN_FILE  a file holding it (default for --token-file)
  MEMOSD_DATA_DIR   default for --data-dir
  MEMOS_AUTHOR      default author of commits

Without a token, memosctl uses the admin token a local memosd wrote at first
start ($XDG_DATA_HOME/memosd/admin.token), when this user can read it. With
--data-dir DIR it uses DIR's admin.token, and the address in DIR/daemon.json
unless --target or $MEMOS_TARGET says otherwise.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memosctl",
        description="Administer memosd: cubes, their items, adapters and history, training jobs, and chat "
                    "with their memory.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", help="the daemon's host:port (default: $MEMOS_TARGET, the address in "
                                         f"--data-dir's daemon.json, or {DEFAULT_TARGET})")
    parser.add_argument("--data-dir", metavar="DIR", help="the data dir of the daemon to talk to: its daemon.json "
                                                          "gives the address, its admin.token the token "
                                                          "(default: $MEMOSD_DATA_DIR)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="table (default) or one JSON document on stdout")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="deadline of each call (default %(default)s); writes, ingests, adapter uploads "
                             "and chat replies get more per item, MiB or token")
    parser.add_argument("--retries", type=int, default=RetryPolicy.attempts - 1, metavar="N",
                        help="resend a write, ingest, commit or adapter upload whose answer was lost (deadline "
                             "or unreachable daemon) up to N times, with the same request id so it is applied "
                             "once; reads are resent when the daemon is unreachable (default %(default)s)")
    parser.add_argument("--token", help="bearer token (default: $MEMOS_TOKEN)")
    parser.add_argument("--token-file", metavar="FILE", help="read the token from FILE (default: $MEMOS_TOKEN_FILE)")
    parser.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA (\"system\" for the "
                                                        "system roots)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a daemon that demands one (mTLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="the client certificate's key")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    nouns = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")
    cubes.register(nouns)
    mem.register(nouns)
    ingest.register(nouns)
    history.register(nouns)
    adapter.register(nouns)
    jobs.register(nouns)
    chat.register(nouns)
    govern.register(nouns)
    sched.register(nouns)
    cluster.register(nouns)
    mcp.register(nouns)
    completion.register(nouns)  # after every command: it completes what the parser holds
    _accept_output_anywhere(parser)
    return parser


def _accept_output_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let every command take -o/--output after its name too (``memosctl cube list -o json``).

    Each subcommand parser gets its own -o whose default is SUPPRESS: given there, it sets args.output;
    not given, it leaves the value the top-level -o (or its default) put there."""
    # argparse has no public walk of its subparsers; _actions and _SubParsersAction have been stable for years.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                taken = sub._option_string_actions
                if "-o" not in taken and "--output" not in taken:  # a subcommand's own -o would win; none has one
                    sub.add_argument("-o", "--output", choices=["table", "json"], default=argparse.SUPPRESS,
                                     help="table (default) or one JSON document on stdout")
                _accept_output_anywhere(sub)


def _unreachable(e: MemosError, client: Client) -> bool:
    # A reason means the daemon answered (e.g. SHUTTING_DOWN). Without one, UNAVAILABLE is the
    # transport's "cannot connect"; a DEADLINE_EXCEEDED is a slow daemon only if we are connected.
    if e.reason:
        return False
    if isinstance(e, Unavailable):
        return True
    return isinstance(e, DeadlineExceeded) and not client.is_ready(timeout=0.2)


def _run(handler: Handler, args: argparse.Namespace, out: Output) -> int:
    tls_ca: str | bool | None = True if args.tls_ca == "system" else args.tls_ca
    if args.retries < 0:
        raise UsageError(f"--retries must be 0 or more, not {args.retries}")
    try:
        conn = connection(args.target, args.token, args.token_file, args.data_dir)
    except DaemonNotFound as e:
        out.stderr.write(f"memosctl: error: {e}\n")
        return EXIT_UNREACHABLE
    try:
        client = Client(conn.target, timeout=args.timeout, token=conn.token, tls_ca=tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, retry=RetryPolicy(attempts=args.retries + 1))
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    with client:
        try:
            handler(client, args, out)
        except govern.CheckFailed as e:
            out.stderr.write(f"memosctl: {e}\n")
            return EXIT_CHECK_FAILED
        except MemosError as e:
            if _unreachable(e, client):
                out.stderr.write(f"memosctl: error: {e} (is memosd running at {conn.target}?)\n")
                return EXIT_UNREACHABLE
            hint = refused_token_hint(conn) if isinstance(e, Unauthenticated) else ""
            out.stderr.write(f"memosctl: error: {e}{hint}\n")
            return EXIT_RPC
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run memosctl with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a newcomer typing `memosctl`: the commands, not "the following arguments are required"
        parser.print_help(sys.stdout)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = Output(args.output, quiet=args.quiet, stdout=sys.stdout, stderr=sys.stderr)
    local: Callable[[argparse.Namespace, Output], None] | None = getattr(args, "local", None)
    try:
        if local is not None:  # a command that needs no daemon (completion)
            local(args, out)
            return EXIT_OK
        return _run(args.handler, args, out)
    except UsageError as e:
        sys.stderr.write(f"memosctl: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("memosctl: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (memosctl log | head): not our failure. Stop Python
        # from reporting it again when it flushes stdout at exit.
        with suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        sys.stderr.write(f"memosctl: error: unexpected {type(e).__name__}: {e}\n")
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
