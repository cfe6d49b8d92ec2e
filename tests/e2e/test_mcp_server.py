"""``memosctl mcp`` driven by the official MCP SDK's client against the session daemon: over stdio (the
command spawned as a host would) and over streamable HTTP; every tool, both resources, and the errors a
model gets back."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the MCP SDK is an optional extra: pip install 'memos-client[mcp]'")

from daemon_proc import DaemonProcess
from mcp import Client as McpClient
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, TextResourceContents
from memos import Client

TOOLS = {"memory_search", "memory_write", "memory_ingest", "memory_read", "memory_forget", "memory_list_cubes",
         "memory_log", "memory_diff"}


def _env(**extra: str) -> dict[str, str]:
    # The SDK spawns the server with only a few safe variables; the server needs the import path too.
    return {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), **extra}


def _stdio(daemon: DaemonProcess, *flags: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "memosd_client.cli.main", "--target", daemon.address, *flags, "mcp"],
                                 env=_env(**env))


def _run(server: StdioServerParameters | str, session: Callable[[McpClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with McpClient(server, read_timeout_seconds=60) as mcp:
            await session(mcp)

    asyncio.run(main())


async def _ok(mcp: McpClient, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await mcp.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    assert not result.is_error, result.content
    assert result.content and result.content[0].type == "text" and result.content[0].text
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def _error(mcp: McpClient, tool: str, **arguments: Any) -> tuple[dict[str, Any], str]:
    result = await mcp.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult) and result.is_error
    assert isinstance(result.structured_content, dict) and result.content[0].type == "text"
    return result.structured_content["error"], result.content[0].text


async def _resource(mcp: McpClient, uri: str) -> dict[str, Any]:
    [contents] = (await mcp.read_resource(uri)).contents
    assert isinstance(contents, TextResourceContents) and contents.mime_type == "application/json"
    doc: dict[str, Any] = json.loads(contents.text)
    return doc


def test_every_tool_and_resource_over_stdio(daemon: DaemonProcess, client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name, description="the MCP test's cube")

    async def session(mcp: McpClient) -> None:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and len(tool.description) > 80, tool.name
            for name, prop in tool.input_schema["properties"].items():
                assert prop.get("description"), f"{tool.name}.{name} has no description"
        assert tools["memory_search"].annotations and tools["memory_search"].annotations.read_only_hint
        assert tools["memory_forget"].annotations and tools["memory_forget"].annotations.destructive_hint

        cubes = (await _ok(mcp, "memory_list_cubes"))["cubes"]
        assert {"name": cube_name, "description": "the MCP test's cube", "head_revision": 0,
                "item_count": 0}.items() <= next(c for c in cubes if c["name"] == cube_name).items()

        wrote = await _ok(mcp, "memory_write", cube=cube_name, tags=["people"],
                          texts=["Ada Lovelace wrote the first published algorithm",
                                 "The Analytical Engine was designed by Charles Babbage"])
        assert wrote["revision"] == 1 and len(wrote["item_ids"]) == 2
        ada, engine = wrote["item_ids"]

        hits = (await _ok(mcp, "memory_search", cubes=[cube_name], query="who designed the engine?", k=1))["hits"]
        assert [(h["cube"], h["item_id"], h["tags"]) for h in hits] == [(cube_name, engine, ["people"])]

        read = await _ok(mcp, "memory_read", cube=cube_name, item_ids=[ada])
        assert [i["text"] for i in read["items"]] == ["Ada Lovelace wrote the first published algorithm"]

        ingested = await _ok(mcp, "memory_ingest", cube=cube_name, session_id="chat-1", messages=[
            {"speaker": "user", "text": "I am flying to Lisbon on Friday", "time": "2026-05-01T09:00:00Z"},
            {"speaker": "assistant", "text": "Noted: Lisbon trip on Friday", "time": "2026-05-01T09:00:05Z"},
        ])
        assert ingested["revision"] == 2 and len(ingested["item_ids"]) == 2
        [turn] = (await _ok(mcp, "memory_search", cubes=[cube_name], query="flying", k=1,
                            mode="lexical", since="2026-05-01T00:00:00Z", context_turns=1))["hits"]
        assert (turn["speaker"], turn["session_id"], turn["event_time"]) == ("user", "chat-1", "2026-05-01T09:00:00Z")
        assert [c["text"] for c in turn["context_after"]] == ["Noted: Lisbon trip on Friday"]

        forgot = await _ok(mcp, "memory_forget", cube=cube_name, item_ids=[ada], message="not needed")
        assert (forgot["revision"], forgot["forgotten"], forgot["item_count"]) == (3, 1, 3)

        log = await _ok(mcp, "memory_log", cube=cube_name, limit=2)
        assert [r["revision"] for r in log["revisions"]] == [3, 2] and log["more"] is True
        assert log["revisions"][0]["message"] == "not needed"

        diff = await _ok(mcp, "memory_diff", cube=cube_name, from_revision=2, to_revision=3)
        assert diff["changes"] == [{"kind": "forgotten", "item_id": ada,
                                    "text_before": "Ada Lovelace wrote the first published algorithm"}]

        listed = await _ok(mcp, "memory_read", cube=cube_name, limit=2)
        assert len(listed["items"]) == 2 and listed["more"] is True and listed["revision"] == 3

        at_one = await _resource(mcp, f"memos://cubes/{cube_name}/items?revision=1")
        assert at_one["revision"] == 1 and sorted(i["item_id"] for i in at_one["items"]) == sorted([ada, engine])
        head = await _resource(mcp, f"memos://cubes/{cube_name}/items")
        assert head["revision"] == 3 and ada not in {i["item_id"] for i in head["items"]}
        assert cube_name in {c["name"] for c in (await _resource(mcp, "memos://cubes"))["cubes"]}
        templates = (await mcp.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["memos://cubes/{cube}/items{?revision}"]

        # Errors a model can act on: the reason, memosd's message, the field, and what to call next.
        error, text = await _error(mcp, "memory_search", cubes=["no-such-cube"], query="anything")
        assert error["reason"] == "CUBE_NOT_FOUND" and "no-such-cube" in error["message"]
        assert text.startswith("CUBE_NOT_FOUND: ") and "memory_list_cubes" in text
        error, text = await _error(mcp, "memory_write", cube=cube_name, texts=["x"], tags=["t" * 200])
        assert error["reason"] == "INVALID_FIELD" and "tags" in error["field"]
        assert f"(field: {error['field']})" in text and "128" in error["message"]
        error, text = await _error(mcp, "memory_read", cube=cube_name, item_ids=["itm_missing"])
        assert error["reason"] == "ITEM_NOT_FOUND" and "memory_search" in text
        error, _ = await _error(mcp, "memory_ingest", cube=cube_name, session_id="s",
                                messages=[{"speaker": "user", "text": "hi", "time": "last friday"}])
        assert (error["reason"], error["field"]) == ("INVALID_ARGUMENT", "messages[0].time")
        assert client.stat_cube(cube_name).head_revision == 3  # none of the refused calls committed

    _run(_stdio(daemon, "--token-file", str(daemon.data_dir / "admin.token")), session)


def test_stdio_acts_with_the_callers_token(daemon: DaemonProcess, client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    reader_name = f"mcp-reader-{cube_name}"[:60]
    _, token = client.create_principal(reader_name)
    client.grant(cube_name, reader_name, ["read"])

    async def session(mcp: McpClient) -> None:
        assert cube_name in {c["name"] for c in (await _ok(mcp, "memory_list_cubes"))["cubes"]}
        error, text = await _error(mcp, "memory_write", cube=cube_name, texts=["a reader cannot write this"])
        assert error["reason"] == "PERMISSION_DENIED" and "grant" in text

    _run(_stdio(daemon, MEMOS_TOKEN=token), session)
    assert client.stat_cube(cube_name).item_count == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_same_server_over_streamable_http(daemon: DaemonProcess, client: Client, cube_name: str,
                                              tmp_path: Path) -> None:
    client.alloc_cube(cube_name)
    port = _free_port()
    log = (tmp_path / "mcp-http.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "memosd_client.cli.main", "--target", daemon.address, "--token-file",
         str(daemon.data_dir / "admin.token"), "mcp", "--http", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **_env()})
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "mcp-http.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "memosctl mcp --http did not listen within 30 s"
            time.sleep(0.1)

        async def session(mcp: McpClient) -> None:
            assert {t.name for t in (await mcp.list_tools()).tools} == TOOLS
            wrote = await _ok(mcp, "memory_write", cube=cube_name, texts=["served over streamable HTTP"])
            items = (await _resource(mcp, f"memos://cubes/{cube_name}/items?revision={wrote['revision']}"))["items"]
            assert [i["item_id"] for i in items] == wrote["item_ids"]
            error, _ = await _error(mcp, "memory_log", cube="no-such-cube")
            assert error["reason"] == "CUBE_NOT_FOUND"

        _run(f"http://127.0.0.1:{port}/mcp", session)
        assert "http://127.0.0.1:" in (tmp_path / "mcp-http.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
