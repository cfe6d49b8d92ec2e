"""A refused or failed call as an MCP tool error: an ``isError`` result a model can act on.

MCP asks that a tool's own failures come back as a result with ``isError`` set, not as a protocol error,
so that the model sees them and can correct its call. memosd's message already says what to fix; the
result adds the stable reason, the field it names (``ErrorInfo.metadata["field"]``) and, for the few
reasons a model meets most, which tool to call next.
"""

from __future__ import annotations

from mcp.types import CallToolResult, TextContent

from memosd_client.errors import MemosError
from memosd_client.mcp.views import JSON

# The next step, for the reasons a model is most likely to cause. The daemon's message says what was
# wrong; this says which of these tools finds the right value.
NEXT_STEP = {
    "CUBE_NOT_FOUND": "memory_list_cubes lists the cubes this token can use.",
    "ITEM_NOT_FOUND": "memory_search, or memory_read without item_ids, shows the item ids a cube has.",
    "REVISION_NOT_FOUND": "memory_log lists the cube's revisions.",
    "PERMISSION_DENIED": "This token lacks that right on the cube; a cube owner or admin can grant it "
                         "(memosctl grant). Do not retry.",
    "UNAUTHENTICATED": "The MCP server's memosd token is missing or wrong; whoever started it must fix "
                       "its --token or --token-file. Do not retry.",
    "COMMIT_CONFLICT": "Another writer changed these items first; read them again, then retry.",
    "CUBE_FROZEN": "The cube is frozen (read-only) until an admin thaws it; only reads work.",
}


def error_doc(e: MemosError) -> JSON:
    """The error's machine-readable part: reason (or the gRPC code when there is none), message, field."""
    doc: JSON = {"reason": e.reason or e.code.name, "code": e.code.name, "message": e.message}
    if e.metadata.get("field"):
        doc["field"] = e.metadata["field"]
    other = {k: v for k, v in e.metadata.items() if k != "field"}
    if other:
        doc["details"] = other
    return doc


def describe(e: MemosError, *, unreachable_target: str | None = None) -> tuple[str, JSON]:
    """The text a model reads and the structured error. ``unreachable_target``: memosd could not be
    reached at that address (the transport's UNAVAILABLE, no reason)."""
    doc = error_doc(e)
    text = f"{doc['reason']}: {e.message}"
    if "field" in doc:
        text += f" (field: {doc['field']})"
    step = NEXT_STEP.get(doc["reason"])
    if unreachable_target is not None:
        step = f"memosd is not reachable at {unreachable_target}; retry later or ask the user to start it."
    if step:
        doc["next_step"] = step
        text += f"\n{step}"
    return text, doc


def error_result(e: MemosError, *, unreachable_target: str | None = None) -> CallToolResult:
    """``e`` as an isError result."""
    text, doc = describe(e, unreachable_target=unreachable_target)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content={"error": doc},
                          is_error=True)


def argument_error(message: str, field: str) -> CallToolResult:
    """A call the server refuses before asking memosd (a value the client library rejects)."""
    doc: JSON = {"reason": "INVALID_ARGUMENT", "code": "INVALID_ARGUMENT", "message": message, "field": field}
    return CallToolResult(content=[TextContent(type="text", text=f"INVALID_ARGUMENT: {message} (field: {field})")],
                          structured_content={"error": doc}, is_error=True)
