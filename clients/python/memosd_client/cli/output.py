"""What memosctl prints: aligned tables and key: value blocks, or one JSON document."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import timezone
from typing import Any, TextIO

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from memosd_client.cli.progress import Progress

# The last column of a table (free text) is cut to fit the terminal, within these bounds.
_TEXT_MAX = 80
_TEXT_MIN = 20
_NUMBER = re.compile(r"^-?[\d.,]+%?$")


def to_dict(message: Message) -> dict[str, Any]:
    """A message as proto3 JSON, field names as in the .proto, zero values included."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def fmt_time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_ms(us: int) -> str:
    """Microseconds as milliseconds."""
    return f"{us / 1000:.1f} ms"


def fmt_duration(seconds: int) -> str:
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days}d{h:02d}h{m:02d}m{s:02d}s" if days else f"{h}h{m:02d}m{s:02d}s"


def fmt_map(values: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(values.items())) or "-"


def one_line(text: str, width: int) -> str:
    """Collapse whitespace and cut to ``width`` characters, marking a cut with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


class Output:
    """Where a command's result goes: stdout as a table/block or as JSON; notes and progress to stderr."""

    def __init__(self, fmt: str, *, quiet: bool, stdout: TextIO, stderr: TextIO) -> None:
        self.json = fmt == "json"
        self.quiet = quiet
        self.stdout = stdout
        self.stderr = stderr

    def emit_json(self, doc: Any) -> None:
        json.dump(doc, self.stdout, indent=2, ensure_ascii=False)
        self.stdout.write("\n")

    def note(self, text: str) -> None:
        """A human remark (not the result): stderr, unless -q."""
        if not self.quiet:
            self.stderr.write(text + "\n")

    def progress(self, total: int, label: str) -> Progress:
        # A JSON consumer reads stdout, but keeps stderr clean of frames too: it is usually a log.
        return Progress(total, label, self.stderr, enabled=not (self.quiet or self.json))

    def block(self, pairs: Sequence[tuple[str, object]]) -> None:
        """One object as aligned ``key: value`` lines."""
        width = max((len(k) for k, _ in pairs), default=0) + 1
        for key, value in pairs:
            self.stdout.write(f"{key + ':':<{width}} {value}\n")

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        """Aligned columns; numeric columns right-aligned; the last column is cut to the terminal width."""
        cells = [[str(c) for c in row] for row in rows]
        widths = [len(h) for h in headers]
        for row in cells:
            for i, c in enumerate(row[:-1]):
                widths[i] = max(widths[i], len(c))
        used = sum(widths[:-1]) + 2 * (len(headers) - 1)
        room = shutil.get_terminal_size((120, 24)).columns - used
        text_width = max(_TEXT_MIN, min(_TEXT_MAX, room))
        for row in cells:
            row[-1] = one_line(row[-1], text_width)
            widths[-1] = max(widths[-1], len(row[-1]))
        # Right-align columns of numbers ("-" standing for none), but not columns of only "-".
        numeric = [
            any(r[i] != "-" for r in cells) and all(_NUMBER.match(r[i]) or r[i] == "-" for r in cells)
            for i in range(len(headers))
        ]
        for row in [list(headers), *cells]:
            parts = [
                c.rjust(widths[i]) if numeric[i] and i < len(row) - 1 else c.ljust(widths[i])
                for i, c in enumerate(row)
            ]
            self.stdout.write("  ".join(parts).rstrip() + "\n")
