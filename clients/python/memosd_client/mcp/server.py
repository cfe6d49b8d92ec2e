"""The MCP server around one :class:`memosd_client.Client`, and its two transports.

Every request uses the client's token: the server acts as that principal, with its rights. Over
stdio that is the host that spawned ``memosctl mcp``; over HTTP it is anyone who can reach the
address, so it listens on loopback unless told otherwise.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from memosd_client import __version__
from memosd_client.client import Client
from memosd_client.mcp import tools

HTTP_PATH = "/mcp"

INSTRUCTIONS = """\
memosd is a versioned memory store. Memories are items (short texts, optionally with tags, a source,
a speaker and session, an event time) kept in cubes: named collections with a history of revisions.
memory_list_cubes shows the cubes; memory_search finds items by meaning and keywords; memory_write
stores new facts and memory_ingest a conversation; memory_forget removes items. Every change is
committed as a new revision at once; memory_log and memory_diff show the history, which keeps
forgotten items. Item ids (itm_...) come from search, read and write results."""


def build_server(client: Client) -> MCPServer[Any]:
    """An MCP server whose tools and resources call memosd through ``client``."""
    server: MCPServer[Any] = MCPServer(name="memosd", title="memosd memory", version=__version__,
                                       instructions=INSTRUCTIONS, log_level="WARNING")
    tools.register(server, client)
    return server


def run_stdio(client: Client) -> None:
    """Serve MCP on stdin/stdout until the host closes them."""
    build_server(client).run("stdio")


def run_http(client: Client, host: str, port: int) -> None:
    """Serve MCP over streamable HTTP at ``http://host:port/mcp`` until interrupted."""
    build_server(client).run("streamable-http", host=host, port=port, streamable_http_path=HTTP_PATH)
