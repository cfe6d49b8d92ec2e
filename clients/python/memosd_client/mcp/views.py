"""What the MCP tools hand a model: memosd's messages as compact JSON values, and a few lines of text.

A model reads every byte of a result, so a view keeps only what it can act on (ids, text, the revision,
counts) and drops what is empty or default: no write times, hit counts or raw ranks. Times are ISO 8601
in UTC. Nothing here imports the MCP SDK, so the views are tested without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from memosd_client.v1 import types_pb2

JSON = dict[str, Any]

# The longest text a one-line summary quotes from an item; the structured content has it whole.
TEXT_PREVIEW_CHARS = 160

_STATES = {types_pb2.ITEM_STATE_ARCHIVED: "archived", types_pb2.ITEM_STATE_EXPIRED: "expired"}
_CHANGES = {types_pb2.CHANGE_KIND_ADDED: "added", types_pb2.CHANGE_KIND_CHANGED: "changed",
            types_pb2.CHANGE_KIND_FORGOTTEN: "forgotten"}


def iso(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def preview(text: str, limit: int = TEXT_PREVIEW_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def item(it: types_pb2.Item) -> JSON:
    """An item: id and text always; tags, source, speaker, session, times and state only when set."""
    doc: JSON = {"item_id": it.item_id, "text": it.text}
    if it.tags:
        doc["tags"] = list(it.tags)
    if it.source:
        doc["source"] = it.source
    if it.speaker:
        doc["speaker"] = it.speaker
    if it.session_id:
        doc["session_id"] = it.session_id
    if it.HasField("event_time"):
        doc["event_time"] = iso(it.event_time)
    if it.HasField("expire_time"):
        doc["expire_time"] = iso(it.expire_time)
    if it.state in _STATES:
        doc["state"] = _STATES[it.state]
    # born_revision is 0 only for a staged item, which a tool never leaves behind.
    if it.born_revision:
        doc["revision"] = it.born_revision
    return doc


def said(it: types_pb2.Item) -> str:
    """A conversation turn after its speaker, or an item's bare text; on one line."""
    return preview(f"{it.speaker}: {it.text}" if it.speaker else it.text)


def hit(h: types_pb2.SearchHit, cube: str) -> JSON:
    doc: JSON = {"cube": cube, "score": round(h.score, 4), **item(h.item)}
    if h.context_before:
        doc["context_before"] = [item(c) for c in h.context_before]
    if h.context_after:
        doc["context_after"] = [item(c) for c in h.context_after]
    return doc


def cube(c: types_pb2.Cube) -> JSON:
    doc: JSON = {"name": c.name, "cube_id": c.cube_id, "head_revision": c.head_revision,
                 "item_count": c.item_count}
    if c.description:
        doc["description"] = c.description
    if c.frozen:
        doc["frozen"] = True
    return doc


def revision(r: types_pb2.Revision) -> JSON:
    doc: JSON = {"revision": r.number, "time": iso(r.create_time), "added": r.added, "changed": r.changed,
                 "forgotten": r.forgotten, "item_count": r.item_count}
    if r.author:
        doc["author"] = r.author
    if r.message:
        doc["message"] = r.message
    if r.restored_revision:
        doc["restored_revision"] = r.restored_revision
    if r.adapter_changed:
        doc["adapter"] = r.adapter_digest or "removed"
    return doc


def change(c: types_pb2.ItemChange) -> JSON:
    doc: JSON = {"kind": _CHANGES.get(c.kind, "unknown"), "item_id": c.item_id}
    if c.HasField("after"):
        doc["text"] = c.after.text
    if c.HasField("before") and (not c.HasField("after") or c.before.text != c.after.text):
        doc["text_before"] = c.before.text
    return doc


def lines(head: str, rows: Iterable[str]) -> str:
    """A summary line, then one line per row (a model reads this when a host shows no structured content)."""
    return "\n".join([head, *rows])

