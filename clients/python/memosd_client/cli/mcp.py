"""``memosctl mcp``: serve memosd's memory to an MCP host (Claude Desktop, an agent framework...).

Over stdio by default, the way hosts spawn a server; ``--http HOST:PORT`` serves the same tools over
streamable HTTP instead. Calls use memosctl's token (``--token``, ``--token-file``, the environment).
stdout belongs to the protocol under stdio, so this command writes nothing else there.
"""

from __future__ import annotations

import argparse

from memosd_client.cli.inputs import UsageError
from memosd_client.cli.output import Output
from memosd_client.client import Client

# The hosts only this machine reaches (the SDK also guards these against DNS rebinding).
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
INSTALL_HINT = "memosctl mcp needs the MCP SDK; install it with: pip install 'memos-client[mcp]'"


def http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a host and a port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:8765, not {text!r}")
    return host.strip("[]"), int(port)


def _serve(client: Client, args: argparse.Namespace, out: Output) -> None:
    try:
        from memosd_client.mcp import server
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("mcp"):
            raise
        raise UsageError(INSTALL_HINT) from None
    if args.http is None:
        # stderr only: stdout carries the protocol. Hosts show a server's stderr in their logs.
        out.note(f"MCP over stdio for memosd at {client.target}")
        server.run_stdio(client)
        return
    host, port = args.http
    shown = f"[{host}]" if ":" in host else host
    out.note(f"MCP over streamable HTTP at http://{shown}:{port}{server.HTTP_PATH} for memosd at {client.target}")
    if host not in LOOPBACK:
        out.note(f"warning: {host} is not a loopback address: anyone who reaches this port acts with this "
                 f"command's token and rights")
    server.run_http(client, host, port)


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = nouns.add_parser(
        "mcp", help="serve memory tools to an MCP host (stdio, or --http)",
        description="Run an MCP server whose tools search, write, ingest, read and forget memory and show a "
                    "cube's log and diffs, with this command's token and rights. Over stdio (the default) an "
                    "MCP host spawns it; with --http it serves streamable HTTP at http://HOST:PORT/mcp, where "
                    "every caller that reaches it acts with the token.",
    )
    p.add_argument("--http", type=http_address, metavar="HOST:PORT",
                   help="serve streamable HTTP on this address (e.g. 127.0.0.1:8765) instead of stdio")
    p.set_defaults(handler=_serve)
