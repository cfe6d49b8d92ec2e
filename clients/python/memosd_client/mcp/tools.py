"""The MCP tools and resources, each a thin call of :class:`memosd_client.Client` through a short-lived mount.

Every tool that changes memory commits before it returns (one revision per call), so a model never
leaves staged changes behind in a mount it cannot see; the mount is closed whatever happens. Each
tool returns structured content and a few lines of text saying the same (many hosts show a model only
the text). A memosd refusal becomes an ``isError`` result (:mod:`memosd_client.mcp.errors`).

This module deliberately has no ``from __future__ import annotations``: the SDK builds each tool's
JSON schema from its signature at run time, and the argument descriptions live in those annotations.
"""

import json
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from datetime import datetime
from itertools import islice
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from memosd_client.client import Client, parse_time
from memosd_client.errors import MemosError, Unavailable
from memosd_client.mcp import views
from memosd_client.mcp.errors import argument_error, describe, error_result
from memosd_client.mcp.views import JSON

DEFAULT_WRITE_MESSAGE = "mcp memory_write"
DEFAULT_FORGET_MESSAGE = "mcp memory_forget"
# What one resource read returns at most; a host may put a whole resource into the model's context.
MAX_RESOURCE_ITEMS = 500
ITEMS_URI = "memos://cubes/{cube}/items{?revision}"
CUBES_URI = "memos://cubes"

_T = TypeVar("_T")

Cube = Annotated[str, Field(description="The cube's name (or id). memory_list_cubes lists them.", min_length=1)]
Revision = Annotated[int, Field(ge=0, description="Read at this revision number; 0 (default) means HEAD, the "
                                                  "latest. memory_log lists the revisions.")]
Tags = Annotated[list[str], Field(description="Tags to attach to every item, e.g. [\"preference\"]. "
                                              "Default: none.")]
Message = Annotated[str, Field(description="Commit message recorded in the cube's log. Default: a generic one.")]


class Turn(BaseModel):
    """One message of a conversation."""

    speaker: str = Field(min_length=1, description="Who said it, e.g. \"user\", \"assistant\" or a person's name.")
    text: str = Field(min_length=1, description="What was said.")
    time: str | None = Field(default=None, description="When, ISO 8601 (e.g. \"2026-05-01T12:00:00Z\"). "
                                                       "Default: the time of the call, in the given order.")


def _ok(summary: str, rows: Iterable[str], data: JSON) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=views.lines(summary, rows))],
                          structured_content=data)


def _first(values: Iterable[_T], limit: int) -> tuple[list[_T], bool]:
    """The first ``limit`` values, and whether there were more."""
    got = list(islice(values, limit + 1))
    return got[:limit], len(got) > limit


class _ArgumentError(Exception):
    """An argument the server refuses before calling memosd, and the field it names."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _time(value: str | None, field: str) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise _ArgumentError(f"{field} {value!r} is not an ISO 8601 time such as 2026-05-01T12:00:00Z",
                             field) from None


def _guarded(client: Client, body: Callable[[], CallToolResult]) -> CallToolResult:
    """Run a tool's body; a memosd error or a refused argument becomes an isError result."""
    try:
        return body()
    except _ArgumentError as e:
        return argument_error(str(e), e.field)
    except MemosError as e:
        # No reason and UNAVAILABLE: the transport could not reach the daemon at all.
        unreachable = client.target if isinstance(e, Unavailable) and not e.reason else None
        return error_result(e, unreachable_target=unreachable)


def register(server: MCPServer[Any], client: Client) -> None:
    """Add memosd's tools and resources to ``server``, each calling memosd through ``client``."""
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                             open_world_hint=False)
    removes = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                              open_world_hint=False)

    def memory_search(
        cubes: Annotated[list[str], Field(min_length=1, description="Names (or ids) of the cubes to search, "
                                                                    "e.g. [\"notes\"]; results are merged.")],
        query: Annotated[str, Field(min_length=1, description="What to look for, in natural language or "
                                                              "keywords.")],
        k: Annotated[int, Field(ge=1, le=100, description="How many results to return, best first. "
                                                          "Default 5.")] = 5,
        mode: Annotated[Literal["hybrid", "dense", "lexical"], Field(
            description="hybrid (default): meaning and keywords fused; dense: meaning only; lexical: keywords "
                        "only (BM25).")] = "hybrid",
        tags: Annotated[list[str], Field(description="Only items carrying every one of these tags. Default: "
                                                     "any.")] = [],  # noqa: B006 (the SDK copies defaults)
        since: Annotated[str | None, Field(description="Only items whose event time is at or after this ISO "
                                                       "8601 time. Default: no bound.")] = None,
        until: Annotated[str | None, Field(description="Only items whose event time is before this ISO 8601 "
                                                       "time. Default: no bound.")] = None,
        context_turns: Annotated[int, Field(ge=0, le=10, description="For conversation turns: also return up "
                                                                     "to this many turns before and after "
                                                                     "each hit in its session. Default 0.")] = 0,
        revision: Revision = 0,
    ) -> CallToolResult:
        """Search memory: the items of one or more cubes most relevant to a query, best first.

        Returns each hit's cube, item_id, text, score (higher is better; only the order matters) and, when
        set, its tags, source, speaker, session_id and event_time. Use the item_id with memory_read or
        memory_forget. revision applies to every cube; leave it 0 to search what is current.
        """
        def body() -> CallToolResult:
            start, end = _time(since, "since"), _time(until, "until")
            with ExitStack() as stack:
                mounts = [stack.enter_context(client.mount(c, revision=revision)) for c in cubes]
                names = {m.cube_id: name for m, name in zip(mounts, cubes, strict=True)}
                results = client.search(mounts, query, k, tags_all=tags, since=start, until=end, mode=mode,
                                        context_turns=context_turns)
            hits = [views.hit(h, names.get(h.cube_id, h.cube_id)) for h in results]
            rows = [f"{n}. [{h['cube']} {h['item_id']}] {views.said(r.item)}"
                    for n, (h, r) in enumerate(zip(hits, results, strict=True), 1)]
            summary = f"{len(hits)} hit(s) for {views.preview(query, 60)!r} in {', '.join(cubes)}"
            return _ok(summary, rows, {"hits": hits})

        return _guarded(client, body)

    def memory_write(
        cube: Cube,
        texts: Annotated[list[str], Field(min_length=1, description="The memories to store, one item each; "
                                                                    "each a self-contained statement, e.g. "
                                                                    "\"Ada prefers tea to coffee\".")],
        tags: Tags = [],  # noqa: B006
        source: Annotated[str, Field(description="Where the memories come from, e.g. a URL or \"chat\". "
                                                 "Default: none.")] = "",
        event_time: Annotated[str | None, Field(description="When what they describe happened, ISO 8601. "
                                                            "Default: now.")] = None,
        ttl_seconds: Annotated[int, Field(ge=0, description="Forget the items this many seconds after the "
                                                            "write. Default 0: keep them.")] = 0,
        message: Message = DEFAULT_WRITE_MESSAGE,
    ) -> CallToolResult:
        """Store new memories in a cube and commit them as one new revision.

        Returns the cube, the new revision number and the item_ids in the order of texts. To change a
        memory, forget the old item (memory_forget) and write the new text.
        """
        def body() -> CallToolResult:
            when = _time(event_time, "event_time")
            with client.mount(cube, writable=True) as m:
                ids = m.write(texts, tags=tags, source=source, event_time=when, ttl_seconds=ttl_seconds)
                rev = m.commit(message).revision
            data = {"cube": cube, "cube_id": m.cube_id, "revision": rev.number, "item_ids": ids}
            return _ok(f"wrote {len(ids)} item(s) to {cube}, committed as revision {rev.number}",
                       [f"{n}. {i}" for n, i in enumerate(ids, 1)], data)

        return _guarded(client, body)

    def memory_ingest(
        cube: Cube,
        messages: Annotated[list[Turn], Field(min_length=1, description="The conversation's messages in "
                                                                        "order; each becomes one item.")],
        session_id: Annotated[str, Field(min_length=1, description="A stable id for this conversation (e.g. "
                                                                   "a chat id); turns of one session are "
                                                                   "linked, and later calls with the same id "
                                                                   "continue it.")],
        tags: Tags = [],  # noqa: B006
        source: Annotated[str, Field(description="Where the conversation comes from. Default: none.")] = "",
        message: Annotated[str, Field(description="Commit message. Default: 'ingest N messages'.")] = "",
    ) -> CallToolResult:
        """Store a conversation turn (or several) in a cube: one item per message, committed as one revision.

        Each item keeps its speaker, session and time, so memory_search can return the turns around a
        hit (context_turns). Returns the new revision and the item_ids in message order.
        """
        def body() -> CallToolResult:
            turns: list[dict[str, Any]] = []
            for n, t in enumerate(messages):
                when = _time(t.time, f"messages[{n}].time")
                turns.append({"speaker": t.speaker, "text": t.text, **({"time": when} if when else {})})
            with client.mount(cube, writable=True) as m:
                resp = m.ingest(turns, session_id=session_id, tags=tags, source=source, commit_message=message)
            ids = list(resp.item_ids)
            data = {"cube": cube, "cube_id": m.cube_id, "revision": resp.revision.number, "item_ids": ids}
            return _ok(f"ingested {len(ids)} message(s) of session {session_id!r} into {cube}, committed as "
                       f"revision {resp.revision.number}", [f"{n}. {i}" for n, i in enumerate(ids, 1)], data)

        return _guarded(client, body)

    def memory_read(
        cube: Cube,
        item_ids: Annotated[list[str], Field(description="The items to read (ids from memory_search). "
                                                         "Default: list the cube's items, by id.")] = [],  # noqa: B006
        revision: Revision = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_RESOURCE_ITEMS, description="When listing: at most this "
                                                                             "many items. Default 50.")] = 50,
    ) -> CallToolResult:
        """Read items of a cube by id, or list its items, as they are at a revision (default: HEAD).

        Returns the revision read and each item's item_id and text, with its tags, source, speaker,
        session_id and event_time when set. "more": true says that listing stopped at limit.
        """
        def body() -> CallToolResult:
            with client.mount(cube, revision=revision) as m:
                items, more = (m.read(item_ids), False) if item_ids else _first(m.iter_items(), limit)
                base = m.base_revision
            docs = [views.item(i) for i in items]
            data = {"cube": cube, "revision": base, "items": docs, "more": more}
            summary = f"{len(docs)} item(s) of {cube} at revision {base}" + (
                f" (the first {limit}; raise limit for more)" if more else "")
            return _ok(summary, [f"- [{i.item_id}] {views.said(i)}" for i in items], data)

        return _guarded(client, body)

    def memory_forget(
        cube: Cube,
        item_ids: Annotated[list[str], Field(min_length=1, description="The items to forget (ids from "
                                                                       "memory_search or memory_read).")],
        message: Message = DEFAULT_FORGET_MESSAGE,
    ) -> CallToolResult:
        """Forget items: remove them from the cube's current memory, committed as one new revision.

        History keeps them (memory_log and memory_diff show the change; an admin can roll back). Returns
        the new revision number.
        """
        def body() -> CallToolResult:
            with client.mount(cube, writable=True) as m:
                m.forget(item_ids)
                rev = m.commit(message).revision
            data = {"cube": cube, "revision": rev.number, "forgotten": rev.forgotten, "item_count": rev.item_count}
            return _ok(f"forgot {rev.forgotten} item(s) in {cube}, committed as revision {rev.number} "
                       f"({rev.item_count} items remain)", [], data)

        return _guarded(client, body)

    def memory_list_cubes(
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many cubes. Default 100.")] = 100,
    ) -> CallToolResult:
        """List the cubes (named, versioned memory collections) this token can read.

        Returns each cube's name, cube_id, head_revision (its latest revision), item_count and description.
        """
        def body() -> CallToolResult:
            cubes, more = _first(client.list_cubes(), limit)
            docs = [views.cube(c) for c in cubes]
            rows = [f"- {c.name}: {c.item_count} items, revision {c.head_revision}"
                    + (f", {views.preview(c.description, 80)}" if c.description else "") for c in cubes]
            return _ok(f"{len(docs)} cube(s)" + (" (more exist; raise limit)" if more else ""), rows,
                       {"cubes": docs, "more": more})

        return _guarded(client, body)

    def memory_log(
        cube: Cube,
        limit: Annotated[int, Field(ge=1, le=100, description="At most this many revisions. Default 10.")] = 10,
    ) -> CallToolResult:
        """The cube's history: its revisions, newest first.

        Returns each revision's number, time, author, message and how many items it added, changed and
        forgot. Pass two revision numbers to memory_diff to see what changed between them.
        """
        def body() -> CallToolResult:
            revs, more = _first(client.log(cube), limit)
            docs = [views.revision(r) for r in revs]
            rows = [f"- {r.number} {views.iso(r.create_time)} +{r.added} ~{r.changed} -{r.forgotten}"
                    + (f" {views.preview(r.message, 80)!r}" if r.message else "") for r in revs]
            return _ok(f"{len(docs)} revision(s) of {cube}, newest first" + (" (older ones exist)" if more else ""),
                       rows, {"cube": cube, "revisions": docs, "more": more})

        return _guarded(client, body)

    def memory_diff(
        cube: Cube,
        from_revision: Annotated[int, Field(ge=0, description="The older revision number.")],
        to_revision: Annotated[int, Field(ge=0, description="The newer revision number; 0 (default) means "
                                                            "HEAD.")] = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_RESOURCE_ITEMS, description="At most this many changes. "
                                                                             "Default 100.")] = 100,
    ) -> CallToolResult:
        """What changed in a cube between two revisions: the items added, changed and forgotten.

        Returns each change's kind (added, changed or forgotten), item_id and text (for a forgotten item
        its last text; for a changed one also text_before).
        """
        def body() -> CallToolResult:
            changes, more = _first(client.diff(cube, from_revision, to_revision), limit)
            docs = [views.change(c) for c in changes]
            rows = [f"{d['kind']} {d['item_id']}: {views.preview(str(d.get('text', d.get('text_before', ''))), 100)}"
                    for d in docs]
            to = to_revision or "HEAD"
            return _ok(f"{len(docs)} change(s) in {cube} from revision {from_revision} to {to}"
                       + (" (more exist; raise limit)" if more else ""), rows,
                       {"cube": cube, "from_revision": from_revision, "to_revision": to_revision,
                        "changes": docs, "more": more})

        return _guarded(client, body)

    # Registered by call rather than by decorator: where the SDK is not installed mypy sees it as Any, and an
    # untyped decorator would make these functions untyped too.
    tool_list: list[tuple[Callable[..., CallToolResult], ToolAnnotations]] = [
        (memory_search, read_only),
        (memory_write, writes),
        (memory_ingest, writes),
        (memory_read, read_only),
        (memory_forget, removes),
        (memory_list_cubes, read_only),
        (memory_log, read_only),
        (memory_diff, read_only),
    ]
    for fn, hints in tool_list:
        server.add_tool(fn, name=fn.__name__, annotations=hints)

    def resource_error(e: MemosError) -> ResourceError:
        return ResourceError(describe(e)[0])

    def cubes_resource() -> str:
        try:
            docs = [views.cube(c) for c in islice(client.list_cubes(), MAX_RESOURCE_ITEMS)]
        except MemosError as e:
            raise resource_error(e) from None
        return json.dumps({"cubes": docs}, ensure_ascii=False)

    def items_resource(cube: str, revision: int = 0) -> str:
        try:
            with client.mount(cube, revision=revision) as m:
                items, more = _first(m.iter_items(), MAX_RESOURCE_ITEMS)
                base = m.base_revision
        except MemosError as e:
            raise resource_error(e) from None
        return json.dumps({"cube": cube, "cube_id": m.cube_id, "revision": base,
                           "items": [views.item(i) for i in items], "more": more}, ensure_ascii=False)

    server.resource(CUBES_URI, name="cubes", mime_type="application/json",
                    description="The cubes this token can read: name, cube_id, head_revision, item_count."
                    )(cubes_resource)
    server.resource(ITEMS_URI, name="cube-items", mime_type="application/json",
                    description=f"A cube's items at a revision (omit ?revision= for HEAD), ordered by item id; "
                                f"at most {MAX_RESOURCE_ITEMS} (\"more\": true when there are more)."
                    )(items_resource)
