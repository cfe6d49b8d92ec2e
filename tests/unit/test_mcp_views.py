"""The MCP server's parts that need no daemon: the compact views a model reads, the error results, the
``--http`` address, and ``memosctl mcp`` without the MCP SDK installed."""

from __future__ import annotations

import argparse
import sys

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from memos.cli.main import EXIT_USAGE, main
from memos.cli.mcp import INSTALL_HINT, http_address
from memos.errors import CubeNotFound, InvalidArgument, MemosError
from memos.mcp import views
from memos.v1 import types_pb2


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def test_an_item_view_keeps_what_is_set_and_drops_the_rest() -> None:
    plain = types_pb2.Item(item_id="itm_1", text="Ada prefers tea", born_revision=3, hit_count=9,
                           write_time=_ts(1), state=types_pb2.ITEM_STATE_ACTIVE)
    assert views.item(plain) == {"item_id": "itm_1", "text": "Ada prefers tea", "revision": 3}
    turn = types_pb2.Item(item_id="itm_2", text="hi", tags=["chat"], source="slack", speaker="user",
                          session_id="s1", event_time=_ts(1_777_000_000), state=types_pb2.ITEM_STATE_ARCHIVED,
                          born_revision=4)
    assert views.item(turn) == {"item_id": "itm_2", "text": "hi", "tags": ["chat"], "source": "slack",
                                "speaker": "user", "session_id": "s1", "event_time": "2026-04-24T03:06:40Z",
                                "state": "archived", "revision": 4}
    assert views.said(turn) == "user: hi"


def test_a_change_view_quotes_the_old_text_only_when_it_differs() -> None:
    old, new = types_pb2.Item(item_id="i", text="old"), types_pb2.Item(item_id="i", text="new")
    changed = types_pb2.ItemChange(kind=types_pb2.CHANGE_KIND_CHANGED, item_id="i", before=old, after=new)
    assert views.change(changed) == {"kind": "changed", "item_id": "i", "text": "new", "text_before": "old"}
    retagged = types_pb2.ItemChange(kind=types_pb2.CHANGE_KIND_CHANGED, item_id="i", before=old, after=old)
    assert views.change(retagged) == {"kind": "changed", "item_id": "i", "text": "old"}
    gone = types_pb2.ItemChange(kind=types_pb2.CHANGE_KIND_FORGOTTEN, item_id="i", before=old)
    assert views.change(gone) == {"kind": "forgotten", "item_id": "i", "text_before": "old"}


def test_a_preview_is_one_line_and_cut_with_an_ellipsis() -> None:
    assert views.preview("a\n b\tc") == "a b c"
    assert views.preview("x" * 10, limit=5) == "xxxx…"


@pytest.mark.parametrize(("text", "address"), [("127.0.0.1:8765", ("127.0.0.1", 8765)),
                                               ("localhost:1", ("localhost", 1)),
                                               ("[::1]:8765", ("::1", 8765))])
def test_http_address(text: str, address: tuple[str, int]) -> None:
    assert http_address(text) == address


@pytest.mark.parametrize("text", ["8765", ":8765", "host:", "host:0", "host:70000", "host:port"])
def test_a_bad_http_address_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        http_address(text)


def test_memosctl_mcp_without_the_sdk_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # None in sys.modules makes "import mcp" fail as if the package were not installed.
    # Its submodules too, where another test has imported them already.
    for name in ["mcp", *[m for m in sys.modules if m.startswith("mcp.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m.startswith("memos.mcp.") and m != "memos.mcp.views"]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["--target", "127.0.0.1:1", "--token", "t", "mcp"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"memosctl: error: {INSTALL_HINT}\n"
    assert "pip install 'memos-client[mcp]'" in err


def test_an_error_result_names_the_reason_the_field_and_the_next_step() -> None:
    pytest.importorskip("mcp")
    from mcp.types import CallToolResult, TextContent
    from memos.mcp.errors import error_result

    def text(result: CallToolResult) -> str:
        [content] = result.content
        assert isinstance(content, TextContent)
        return content.text

    result = error_result(InvalidArgument("items[0].tags has tag 'x': tags are 1 to 128 printable characters",
                                          reason="INVALID_FIELD", metadata={"field": "items[0].tags"}))
    assert result.is_error
    assert result.structured_content == {"error": {
        "reason": "INVALID_FIELD", "code": "INVALID_ARGUMENT", "field": "items[0].tags",
        "message": "items[0].tags has tag 'x': tags are 1 to 128 printable characters"}}
    assert text(result) == ("INVALID_FIELD: items[0].tags has tag 'x': tags are 1 to 128 printable "
                                      "characters (field: items[0].tags)")
    missing = error_result(CubeNotFound("no cube with id or name 'x'", metadata={"cube": "x"}))
    assert missing.structured_content["error"]["details"] == {"cube": "x"}
    assert text(missing).endswith("\nmemory_list_cubes lists the cubes this token can use.")
    down = error_result(MemosError("failed to connect", code=grpc.StatusCode.UNAVAILABLE),
                        unreachable_target="127.0.0.1:1")
    assert down.structured_content["error"]["reason"] == "UNAVAILABLE"
    assert "memosd is not reachable at 127.0.0.1:1" in text(down)
