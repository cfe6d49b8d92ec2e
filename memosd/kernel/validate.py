"""Limits on what clients send, with messages that say what to fix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from memosd.config import LimitsConfig as Limits
from memosd.errors import AdapterInvalid, AdapterTooLarge, InvalidField, TextEmpty, TextTooLarge, TooManyItems
from memosd.kernel.ids import CUBE_NAME_RE
from memosd.kernel.types import ItemInput, Message
from memosd.runtime.adapters import MAX_CONFIG_BYTES

MAX_TAGS = 64
MAX_TAG_CHARS = 128
MAX_SOURCE_CHARS = 2048
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_DESCRIPTION_CHARS = 4096
MAX_SPEAKER_CHARS = 128
MAX_SESSION_CHARS = 256
MAX_FILTER_VALUES = 64  # speakers / session ids in one search filter


def text(value: str, what: str, max_bytes: int, limit_name: str) -> None:
    if not value.strip():
        raise TextEmpty(f"{what} is empty; send at least one non-blank character", field=what)
    size = len(value.encode())
    if size > max_bytes:
        raise TextTooLarge(
            f"{what} is {size} bytes; the limit is {max_bytes} ({limit_name}). Split it into smaller items",
            field=what, size=size, limit=max_bytes,
        )


def tags(values: Sequence[str], what: str) -> None:
    if len(values) > MAX_TAGS:
        raise InvalidField(f"{what} has {len(values)} tags; at most {MAX_TAGS} are allowed", field=what)
    for tag in values:
        if not tag or len(tag) > MAX_TAG_CHARS or not tag.isprintable():
            raise InvalidField(
                f"{what} has tag {tag!r}: tags are 1 to {MAX_TAG_CHARS} printable characters", field=what
            )


def items(inputs: Sequence[ItemInput], limits: Limits) -> None:
    if not inputs:
        raise InvalidField("items is empty; send at least one item", field="items")
    if len(inputs) > limits.max_items_per_write:
        raise TooManyItems(
            f"{len(inputs)} items in one write; the limit is {limits.max_items_per_write} "
            "(limits.max_items_per_write). Send them in several calls",
            count=len(inputs), limit=limits.max_items_per_write,
        )
    for i, item in enumerate(inputs):
        text(item.text, f"items[{i}].text", limits.max_item_bytes, "limits.max_item_bytes")
        tags(item.tags, f"items[{i}].tags")
        if len(item.source) > MAX_SOURCE_CHARS:
            raise InvalidField(f"items[{i}].source is over {MAX_SOURCE_CHARS} characters",
                               field=f"items[{i}].source")
        speaker(item.speaker, f"items[{i}].speaker", required=False)
        session_id(item.session_id, f"items[{i}].session_id", required=False)


def _name(value: str, what: str, max_chars: int, required: bool) -> None:
    if not value and not required:
        return
    if not value.strip() or len(value) > max_chars or not value.isprintable():
        raise InvalidField(f"{what} is {value!r}: give 1 to {max_chars} printable characters, not only blanks",
                           field=what)


def speaker(value: str, what: str, *, required: bool) -> None:
    _name(value, what, MAX_SPEAKER_CHARS, required)


def session_id(value: str, what: str, *, required: bool) -> None:
    _name(value, what, MAX_SESSION_CHARS, required)


def messages(values: Sequence[Message], limits: Limits) -> None:
    """A conversation for Ingest: every message has a speaker, a text and a session."""
    if not values:
        raise InvalidField("messages is empty; send at least one message", field="messages")
    if len(values) > limits.max_items_per_write:
        raise TooManyItems(
            f"{len(values)} messages in one ingest; the limit is {limits.max_items_per_write} "
            "(limits.max_items_per_write). Send them in several calls: turns of one session are linked "
            "across calls", count=len(values), limit=limits.max_items_per_write,
        )
    for i, message in enumerate(values):
        speaker(message.speaker, f"messages[{i}].speaker", required=True)
        text(message.text, f"messages[{i}].text", limits.max_item_bytes, "limits.max_item_bytes")
        session_id(message.session_id, f"messages[{i}].session_id", required=True)


def filter_values(values: Sequence[str], what: str) -> None:
    if len(values) > MAX_FILTER_VALUES:
        raise InvalidField(f"{what} has {len(values)} values; at most {MAX_FILTER_VALUES} are allowed", field=what)


def id_count(item_ids: Sequence[str], limits: Limits) -> None:
    if len(item_ids) > limits.max_items_per_write:
        raise TooManyItems(
            f"{len(item_ids)} item ids in one call; the limit is {limits.max_items_per_write} "
            "(limits.max_items_per_write). Send them in several calls",
            count=len(item_ids), limit=limits.max_items_per_write,
        )


def cube_name(name: str) -> None:
    if not CUBE_NAME_RE.fullmatch(name):
        raise InvalidField(
            f"cube name {name!r} is invalid: use 1 to 64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit", field="name",
        )


def cube_meta(description: str, labels: Mapping[str, str]) -> None:
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidField(f"description is over {MAX_DESCRIPTION_CHARS} characters", field="description")
    if len(labels) > MAX_LABELS:
        raise InvalidField(f"{len(labels)} labels; at most {MAX_LABELS} are allowed", field="labels")
    for key, value in labels.items():
        # Printable, like tags: a newline would let two labels look alike in listings.
        if not key or len(key) > 63 or len(value) > MAX_LABEL_CHARS or not (key + value).isprintable():
            raise InvalidField(
                f"label {key!r}: keys are 1 to 63 printable characters, values at most {MAX_LABEL_CHARS}",
                field="labels",
            )


def adapter_upload(config_bytes: int, weights_bytes: int, limit: int) -> None:
    """An ImportAdapter header's declared sizes, checked before any chunk is read (``limit``:
    limits.max_adapter_bytes). Raises AdapterTooLarge / AdapterInvalid."""
    declared = config_bytes + weights_bytes
    if declared > limit:
        raise AdapterTooLarge(f"the adapter is {declared} bytes; the daemon takes at most {limit} "
                              "(limits.max_adapter_bytes)", size=declared, limit=limit)
    if not config_bytes or not weights_bytes:
        raise AdapterInvalid("the header must give the sizes of both adapter_config.json and "
                             "adapter_model.safetensors")
    if config_bytes > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"adapter_config.json is {config_bytes} bytes; at most {MAX_CONFIG_BYTES} "
                             "are accepted", key="adapter_config.json")
