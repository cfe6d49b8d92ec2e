"""Parsing what the user typed or piped in: argparse types and the JSONL item format."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from memosd_client.client import parse_time

_JSONL_KEYS = frozenset({"text", "tags", "source", "event_time", "item_id"})
_CONVERSATION_KEYS = frozenset({"speaker", "text", "time", "session_id"})


class UsageError(Exception):
    """Bad input found after argument parsing (exit code 2, like argparse's own errors)."""


def iso_time(text: str) -> datetime:
    """argparse type: an ISO 8601 time; naive means UTC."""
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def natural(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def label(text: str) -> tuple[str, str]:
    """argparse type: ``key=value``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _item(line: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON: {e.msg}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a JSON object")
    unknown = set(doc) - _JSONL_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_JSONL_KEYS)}")
    if not isinstance(doc.get("text"), str):
        raise UsageError(f"{where}: \"text\" must be a string")
    tags = doc.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise UsageError(f"{where}: \"tags\" must be a list of strings")
    for key in ("source", "item_id"):
        if not isinstance(doc.get(key, ""), str):
            raise UsageError(f"{where}: {key!r} must be a string")
    if "event_time" in doc:
        try:
            doc["event_time"] = parse_time(str(doc["event_time"]))
        except ValueError:
            raise UsageError(f"{where}: \"event_time\" is not an ISO 8601 time") from None
    return doc


def _lines(path: str) -> list[tuple[str, str]]:
    """The non-blank lines of a file ("-": stdin), each with where it is ("file:line")."""
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror}") from None
    return [(line, f"{name}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


def load_jsonl(path: str) -> list[dict[str, Any]]:
    """Items from a JSONL file ("-": stdin), validated before anything is sent; blank lines are skipped."""
    return [_item(line, where) for line, where in _lines(path)]


def _message(line: str, where: str, session_id: str) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON: {e.msg}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a JSON object")
    unknown = set(doc) - _CONVERSATION_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_CONVERSATION_KEYS)}")
    doc.setdefault("session_id", session_id)
    # The daemon refuses these too, but a file goes in several calls: checking it all first commits nothing
    # of a file with a bad line.
    for key in ("speaker", "text", "session_id"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            hint = " (or give --session)" if key == "session_id" else ""
            raise UsageError(f"{where}: {key!r} must be a non-empty string{hint}")
    if "time" in doc:
        try:
            doc["time"] = parse_time(str(doc["time"]))
        except ValueError:
            raise UsageError(f"{where}: \"time\" is not an ISO 8601 time") from None
    return doc


def load_conversation(path: str, session_id: str = "") -> list[dict[str, Any]]:
    """Conversation messages from a JSONL file ("-": stdin), all validated before anything is sent;
    ``session_id`` is the session of lines that name none."""
    return [_message(line, where, session_id) for line, where in _lines(path)]
