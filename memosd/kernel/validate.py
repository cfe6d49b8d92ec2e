"""Every semantic bound on what clients send (lengths, ranges, counts, policy and retention bounds, the
MAX_* limits), with messages that say what to fix.

One home, so that every caller shares the same checks: the syscall handlers (after ``syscalls/convert*.py``
has checked the wire shape: enums, required fields, oneofs) and the daemon's own background callers of the
kernel (the lifecycle loop, the scheduler) alike. The limits that operators set are ``config.LimitsConfig``
(``limits.*``); the fixed ones are the constants here.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from memosd.config import LimitsConfig as Limits
from memosd.errors import AdapterInvalid, AdapterTooLarge, InvalidField, TextEmpty, TextTooLarge, TooManyItems
from memosd.kernel.ids import CUBE_NAME_RE, ITEM_ID_RE
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
MAX_TTL_SECONDS = 100 * 365 * 86400
ITEM_STATES = ("active", "archived")  # what SetItemState sets; "expired" is only the lifecycle loop's
MAX_WORKING_SET = 10_000  # items in a working set (a cube's policy, an Activate selector)
MAX_MOUNTS = 64  # mounts one Search or Generate reads
MAX_CONTEXT_TURNS = 10  # session turns before and after each search hit
CHAT_ROLES = ("system", "user", "assistant")  # the roles of a Generate conversation
MAX_MESSAGES = 1024  # messages in one Generate conversation
MAX_TEMPERATURE = 5.0
MAX_STOPS = 8
MAX_STOP_BYTES = 256
MAX_STEPS = 100_000  # optimizer steps of one Train job
MAX_REQUEST_ID_CHARS = 128
# The MemReader's bounds on what an extractor may answer (memosd/reader/parse.py): anything past them is
# dropped and counted, never stored. An answer is read only up to MAX_EXTRACT_OUTPUT_BYTES (json.loads never
# sees more), and each prompt shows at most MAX_TURNS_PER_PROMPT turns, so a bad model costs bounded work.
MAX_EXTRACT_OUTPUT_BYTES = 32 * 1024
MAX_EXTRACTED_ITEMS = 32  # items one answer may hold; the rest are dropped ("too_many")
MAX_EXTRACTED_TEXT_CHARS = 500  # an extracted item's text
MAX_EXTRACTED_SOURCES = 16  # source turns one extracted item may name
MAX_TURNS_PER_PROMPT = 16
MAX_EXTRACT_TURNS = 10_000  # turns one Extract job reads
MAX_EXTRACT_NEW_TOKENS = 2048  # an Extract job's answer budget per prompt (ExtractorSettings.max_tokens)
DEFAULT_EXTRACT_NEW_TOKENS = 256
MAX_EXTRACTOR_URL_CHARS = 2048
MAX_EXTRACTOR_TOKEN_CHARS = 4096
MAX_DERIVED_FROM = 64  # source items one item may name as derived_from (Write's structured memory)
REQUEST_ID_RE = re.compile(rf"^[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}$")


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
        source(item.source, f"items[{i}].source")
        speaker(item.speaker, f"items[{i}].speaker", required=False)
        session_id(item.session_id, f"items[{i}].session_id", required=False)


def item_fields(inputs: Sequence[ItemInput]) -> None:
    """A write's TTLs and item ids (after ``items``, which checks their texts and labels first)."""
    for i, item in enumerate(inputs):
        if not 0 <= item.ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidField(f"items[{i}].ttl_seconds is {item.ttl_seconds}; use 0 (no TTL) to "
                               f"{MAX_TTL_SECONDS} (100 years)", field=f"items[{i}].ttl_seconds")
        if item.item_id and not ITEM_ID_RE.fullmatch(item.item_id):
            raise InvalidField(f"items[{i}].item_id {item.item_id!r} is not an item id; leave it empty "
                               "to add a new item", field=f"items[{i}].item_id")
        derived_from(item.derived_from, item.item_id, f"items[{i}].derived_from")


def extractor(url: str, token: str, model: str, max_tokens: int, allowed: Sequence[str] = ()) -> int:
    """An Extract job's extractor settings; returns the answer budget (0: the default). An endpoint must be
    a plain http(s) URL (a host, a numeric port if any; no user, query or fragment) that starts with one of
    ``allowed`` (``[reader] endpoints``: the operator's choice, never a caller's)."""
    if url and not _plain_http_url(url):
        raise InvalidField(f"extractor.url {url[:100]!r} is not an http(s) URL of at most {MAX_EXTRACTOR_URL_CHARS} "
                           "characters with a host, an optional numeric port and a path (no user, query or "
                           "fragment); leave it empty for the in-process model", field="extractor.url")
    if url and not any(url.startswith(prefix) for prefix in allowed):
        raise InvalidField(f"extractor.url {url[:100]!r} is not among the endpoints this daemon may send turns to "
                           "(its [reader] endpoints setting); ask its operator to add it, or leave the url empty "
                           "for the in-process model", field="extractor.url")
    if not token.isascii():
        raise InvalidField("extractor.token must be ASCII (it is sent as an HTTP header)", field="extractor.token")
    if (token or model) and not url:
        raise InvalidField("extractor.token and extractor.model are for an endpoint: set extractor.url too",
                           field="extractor.url")
    if len(token) > MAX_EXTRACTOR_TOKEN_CHARS or not token.isprintable():
        raise InvalidField(f"extractor.token is at most {MAX_EXTRACTOR_TOKEN_CHARS} printable characters",
                           field="extractor.token")
    if len(model) > 256 or not model.isprintable():
        raise InvalidField("extractor.model is at most 256 printable characters", field="extractor.model")
    if not 0 <= max_tokens <= MAX_EXTRACT_NEW_TOKENS:
        raise InvalidField(f"extractor.max_tokens is {max_tokens}; use 0 (the default, "
                           f"{DEFAULT_EXTRACT_NEW_TOKENS}) to {MAX_EXTRACT_NEW_TOKENS}", field="extractor.max_tokens")
    return max_tokens or DEFAULT_EXTRACT_NEW_TOKENS


def extract_turns(count: int, cube: str, revision: int) -> None:
    """The turns one Extract job reads: at most MAX_EXTRACT_TURNS (``cube``, ``revision``: for the message)."""
    if count > MAX_EXTRACT_TURNS:
        raise TooManyItems(f"cube {cube!r} has {count} conversation turns at revision {revision}; one Extract job "
                           f"reads at most {MAX_EXTRACT_TURNS}. Extract from a cube holding fewer turns",
                           count=count, limit=MAX_EXTRACT_TURNS)


def _plain_http_url(url: str) -> bool:
    if len(url) > MAX_EXTRACTOR_URL_CHARS or any(c.isspace() for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and parts.username is None
            and not parts.query and not parts.fragment)


def derived_from(values: Sequence[str], item_id: str, what: str) -> None:
    """The sources a derived item names: item ids, at most MAX_DERIVED_FROM, never the item itself."""
    if len(values) > MAX_DERIVED_FROM:
        raise InvalidField(f"{what} names {len(values)} items; at most {MAX_DERIVED_FROM} are allowed",
                           field=what)
    for value in values:
        if not ITEM_ID_RE.fullmatch(value):
            raise InvalidField(f"{what} has {value!r}, which is not an item id", field=what)
        if item_id and value == item_id:
            raise InvalidField(f"{what} names the item itself ({item_id}); an item is derived from others",
                               field=what)


def source(value: str, what: str) -> None:
    if len(value) > MAX_SOURCE_CHARS:
        raise InvalidField(f"{what} is over {MAX_SOURCE_CHARS} characters", field=what)


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


def request_id(value: str, field: str) -> None:
    """A call's request id (not empty: no id is checked by the caller)."""
    if not REQUEST_ID_RE.match(value):
        raise InvalidField(f"{field} {value[:40]!r} is not a request id: use 1 to {MAX_REQUEST_ID_CHARS} of "
                           "A-Z a-z 0-9 . _ : - (a uuid4 fits), or leave it empty", field=field)


def principal_name(name: str) -> None:
    # The same characters as a cube name: both are shown in listings, audit records and tokens' owners.
    if not CUBE_NAME_RE.fullmatch(name):
        raise InvalidField(f"principal name {name!r} is invalid: use 1-64 characters of [A-Za-z0-9._-], "
                           "starting with a letter or digit", field="name")


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


def item_state(state: str) -> None:
    """SetItemState's target state: archived or active (an item expires only through its TTL)."""
    if state not in ITEM_STATES:
        raise InvalidField(f"state {state!r} cannot be set; use ITEM_STATE_ARCHIVED or ITEM_STATE_ACTIVE (items "
                           "expire only through their TTL)", field="state")


def working_set_size(size: int, what: str) -> None:
    if size > MAX_WORKING_SET:
        raise InvalidField(f"{what} is {size}; at most {MAX_WORKING_SET}", field=what)


def policy(values: Mapping[str, Any]) -> dict[str, Any]:
    """A cube's scheduler policy, bounded, as it is stored (the drift threshold to 4 decimals)."""
    stored = dict(values)
    working_set_size(int(stored.get("working_set_size", 0)), "policy.working_set_size")
    if "drift_threshold" in stored:
        drift = float(stored["drift_threshold"])
        if not 0 <= drift <= 1:
            raise InvalidField(f"policy.drift_threshold is {stored['drift_threshold']}; use 0 (the default) to 1",
                               field="policy.drift_threshold")
        stored["drift_threshold"] = round(drift, 4)
    return stored


def retention(keep_last: int, keep_seconds: float) -> None:
    """Which revisions compaction keeps; 0 turns a rule off."""
    if keep_last < 0:
        raise InvalidField(f"retention.keep_last is {keep_last}; use 0 (off) or more", field="retention.keep_last")
    if not 0 <= keep_seconds < float("inf"):
        raise InvalidField(f"retention.keep_seconds is {keep_seconds}; use 0 (off) or a number of seconds",
                           field="retention.keep_seconds")


def search(mount_ids: Sequence[str], query: str, k: int, mode: str, modes: Sequence[str], speakers: Sequence[str],
           session_ids: Sequence[str], context_turns: int, limits: Limits) -> int:
    """A Search's arguments; returns k (0: the default, 10)."""
    if not mount_ids:
        raise InvalidField("mount_ids is empty; search needs at least one mount", field="mount_ids")
    if len(mount_ids) > MAX_MOUNTS:
        raise InvalidField(f"{len(mount_ids)} mounts; one search covers at most {MAX_MOUNTS}",
                           field="mount_ids")
    text(query, "query", limits.max_query_bytes, "limits.max_query_bytes")
    k = 10 if k == 0 else k
    if k > limits.max_k:
        raise InvalidField(f"k is {k}; at most {limits.max_k} results can be asked for", field="k")
    if mode not in modes:
        raise InvalidField(f"mode {mode!r} is not one of {', '.join(modes)}", field="mode")
    filter_values(speakers, "speakers")
    filter_values(session_ids, "session_ids")
    if not 0 <= context_turns <= MAX_CONTEXT_TURNS:
        raise InvalidField(f"context_turns is {context_turns}; at most {MAX_CONTEXT_TURNS} turns before and "
                           "after each hit can be asked for", field="context_turns")
    return k


def generate(messages: Sequence[tuple[str, str]], mount_ids: Sequence[str], max_tokens: int, max_tokens_limit: int,
             temperature: float, top_p: float, stop: Sequence[str], k: int, limits: Limits) -> None:
    """A Generate's conversation and options (``max_tokens`` and ``k`` with the configured defaults applied;
    ``max_tokens_limit``: runtime.max_tokens_limit)."""
    if not messages:
        raise InvalidField("messages is empty; send the conversation, ending with a user message",
                           field="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidField(f"{len(messages)} messages; at most {MAX_MESSAGES}", field="messages")
    for i, (role, _content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidField(f"messages[{i}].role is {role!r}; use one of {', '.join(CHAT_ROLES)}",
                               field=f"messages[{i}].role")
    role, content = messages[-1]
    if role != "user" or not content.strip():
        raise InvalidField("the last message must be a non-empty user message: it is what is answered",
                           field=f"messages[{len(messages) - 1}]")
    if len(mount_ids) > MAX_MOUNTS:
        raise InvalidField(f"{len(mount_ids)} mounts; at most {MAX_MOUNTS}", field="mount_ids")
    if max_tokens > max_tokens_limit:
        raise InvalidField(f"options.max_tokens is {max_tokens}; at most {max_tokens_limit} "
                           "(runtime.max_tokens_limit)", field="options.max_tokens")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidField(f"options.temperature is {temperature}; use 0 (greedy) to "
                           f"{MAX_TEMPERATURE}", field="options.temperature")
    if not 0 <= top_p <= 1:
        raise InvalidField(f"options.top_p is {top_p}; use a value in (0, 1], or 0 for 1",
                           field="options.top_p")
    if len(stop) > MAX_STOPS or any(not s or len(s.encode()) > MAX_STOP_BYTES for s in stop):
        raise InvalidField(f"options.stop takes at most {MAX_STOPS} strings of 1 to {MAX_STOP_BYTES} bytes",
                           field="options.stop")
    if k > limits.max_k:
        raise InvalidField(f"retrieve_k is {k}; at most {limits.max_k}", field="retrieve_k")


def train_steps(steps: int) -> None:
    if not 0 <= steps <= MAX_STEPS:
        raise InvalidField(f"settings.steps is {steps}; use 1 to {MAX_STEPS}, or 0 for the default",
                           field="settings.steps")
