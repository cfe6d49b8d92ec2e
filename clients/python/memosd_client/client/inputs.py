"""What the client's calls accept, and its conversion into the ``memos.v1`` messages a request carries.

The ``*Like`` aliases are the loose forms a caller may pass (bare text, tuples, mappings, datetimes);
the functions here turn them into protobuf messages, refusing unknown keys by name, so a typo in a
mapping is an error and not a silently empty field. Nothing here talks to the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from itertools import islice
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from memosd_client.v1 import types_pb2

# Anything write() accepts as one item: bare text, a ready ItemInput, or a dict
# with the keys text/tags/source/event_time/item_id/speaker/session_id/ttl_seconds/derived_from.
ItemLike = str | types_pb2.ItemInput | Mapping[str, Any]
# A point in time: a datetime (naive means UTC), an ISO 8601 string, or a Timestamp.
TimeLike = datetime | str | Timestamp
# One message of a conversation: a ready ChatMessage, a (role, content) pair, or a
# mapping with the keys role/content.
MessageLike = types_pb2.ChatMessage | tuple[str, str] | Mapping[str, str]
# One message of a conversation to ingest: a ready ConversationMessage, or a mapping with the keys
# speaker/text/time/session_id (time: a TimeLike).
ConversationLike = types_pb2.ConversationMessage | Mapping[str, Any]
# A peft LoRA adapter: a directory holding its two files, or their bytes (config, weights).
AdapterSource = str | os.PathLike[str] | tuple[bytes, bytes]

# The names a call takes for an enum, and the values they stand for.
SEARCH_MODES = {
    "hybrid": types_pb2.SEARCH_MODE_HYBRID,
    "dense": types_pb2.SEARCH_MODE_DENSE,
    "lexical": types_pb2.SEARCH_MODE_LEXICAL,
}
PRINCIPAL_KINDS = {"user": types_pb2.PRINCIPAL_KIND_USER, "agent": types_pb2.PRINCIPAL_KIND_AGENT}
AUDIT_OUTCOMES = {"ok": types_pb2.AUDIT_OUTCOME_OK, "denied": types_pb2.AUDIT_OUTCOME_DENIED,
                  "failed": types_pb2.AUDIT_OUTCOME_FAILED}
ITEM_STATES = {"active": types_pb2.ITEM_STATE_ACTIVE, "archived": types_pb2.ITEM_STATE_ARCHIVED}
SCHEDULES = {"manual": types_pb2.SCHEDULE_POLICY_MANUAL, "auto": types_pb2.SCHEDULE_POLICY_AUTO_ACTIVATE}
RIGHTS = ("read", "write", "activate", "train", "grant", "admin")

_ITEM_KEYS = frozenset({"text", "tags", "source", "event_time", "item_id", "speaker", "session_id", "ttl_seconds",
                        "derived_from"})
_MESSAGE_KEYS = frozenset({"role", "content"})
_CONVERSATION_KEYS = frozenset({"speaker", "text", "time", "session_id"})

_T = TypeVar("_T")


def parse_time(text: str) -> datetime:
    """Parse ISO 8601 (a trailing ``Z`` and date-only forms included) into an aware datetime."""
    # fromisoformat() on Python 3.10 rejects the "Z" suffix.
    value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def to_timestamp(value: TimeLike) -> Timestamp:
    """Convert a datetime (naive means UTC), an ISO 8601 string or a Timestamp to a Timestamp."""
    if isinstance(value, Timestamp):
        return value
    if isinstance(value, str):
        value = parse_time(value)
    ts = Timestamp()
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    ts.FromDatetime(value)
    return ts


def item_input(
    item: ItemLike, tags: Sequence[str], source: str, event_time: Timestamp | None, ttl_seconds: int = 0
) -> types_pb2.ItemInput:
    """One item of a Write; the call's ``tags``/``source``/``event_time``/``ttl_seconds`` fill what it lacks."""
    if isinstance(item, types_pb2.ItemInput):
        return item
    if isinstance(item, str):
        return types_pb2.ItemInput(text=item, tags=tags, source=source, event_time=event_time,
                                   ttl_seconds=ttl_seconds)
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise ValueError(f"unknown item keys {sorted(unknown)}; expected some of {sorted(_ITEM_KEYS)}")
    item_tags = item.get("tags", tags)
    # A bare string would otherwise be split into one tag per character.
    item_tags = [item_tags] if isinstance(item_tags, str) else list(item_tags)
    when = item.get("event_time")
    return types_pb2.ItemInput(
        item_id=item.get("item_id", ""),
        text=item.get("text", ""),
        tags=item_tags,
        source=item.get("source", source),
        event_time=to_timestamp(when) if when is not None else event_time,
        speaker=item.get("speaker", ""),
        session_id=item.get("session_id", ""),
        ttl_seconds=int(item.get("ttl_seconds", ttl_seconds)),
        derived_from=list(item.get("derived_from", ())),
    )


def conversation_message(message: ConversationLike, session_id: str) -> types_pb2.ConversationMessage:
    """One message of an Ingest; ``session_id`` fills a message that names none."""
    if isinstance(message, types_pb2.ConversationMessage):
        return message
    if not isinstance(message, Mapping):
        raise TypeError(f"a conversation message is a ConversationMessage or a mapping with the keys "
                        f"{sorted(_CONVERSATION_KEYS)}, not {type(message).__name__}")
    unknown = set(message) - _CONVERSATION_KEYS
    if unknown:
        raise ValueError(f"unknown message keys {sorted(unknown)}; expected some of {sorted(_CONVERSATION_KEYS)}")
    when = message.get("time")
    return types_pb2.ConversationMessage(
        speaker=message.get("speaker", ""), text=message.get("text", ""),
        time=to_timestamp(when) if when is not None else None,
        session_id=message.get("session_id") or session_id,
    )


def _chat_message(message: MessageLike) -> types_pb2.ChatMessage:
    if isinstance(message, types_pb2.ChatMessage):
        return message
    if isinstance(message, tuple):
        role, content = message
        return types_pb2.ChatMessage(role=role, content=content)
    if isinstance(message, Mapping):
        unknown = set(message) - _MESSAGE_KEYS
        if unknown:
            raise ValueError(f"unknown message keys {sorted(unknown)}; expected {sorted(_MESSAGE_KEYS)}")
        return types_pb2.ChatMessage(role=message.get("role", ""), content=message.get("content", ""))
    # A bare str here is most likely a (role, content) pair that lost its tuple.
    raise TypeError(
        f"a message is a ChatMessage, a (role, content) tuple or a role/content mapping, not "
        f"{type(message).__name__}; pass one str as `messages` for a single user message"
    )


def chat_messages(messages: str | Sequence[MessageLike]) -> list[types_pb2.ChatMessage]:
    """The messages of a Generate: one str is a single user message."""
    if isinstance(messages, str):
        return [types_pb2.ChatMessage(role="user", content=messages)]
    return [_chat_message(m) for m in messages]


def right_values(names: Sequence[str]) -> list[types_pb2.Right.ValueType]:
    """The Right values of ``names`` (some of :data:`RIGHTS`)."""
    unknown = [n for n in names if n not in RIGHTS]
    if unknown:
        raise ValueError(f"unknown rights {unknown}; use some of {list(RIGHTS)}")
    return [types_pb2.Right.Value(f"RIGHT_{n.upper()}") for n in names]


def as_list(value: str | Sequence[str]) -> list[str]:
    """One str as a list of one (a str is a Sequence too, and would become its characters)."""
    return [value] if isinstance(value, str) else list(value)


def chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    """``items`` in lists of ``size`` (the last may be shorter), read lazily."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
