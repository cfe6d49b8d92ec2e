"""Logging as one ``key=value`` line per event, on stderr.

    ts=2026-11-24T10:00:00.123Z level=info logger=memosd.kernel event=commit cube=cube_x revision=3

One event is always one line, so logs can be grepped and parsed line by line:
values with spaces, quotes or ``=`` are double-quoted, and newlines and other
unprintable characters are escaped. A traceback becomes one escaped ``exc="..."`` field.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Libraries that log chatty progress at INFO (downloads, locks, model loading).
NOISY_LOGGERS = (
    "sentence_transformers",
    "transformers",
    "huggingface_hub",
    "urllib3",
    "filelock",
    "httpx",
    "httpcore",
)

# log_event() stores its fields under these two record attributes rather than one
# attribute per field: a field called `name` or `msg` would otherwise clash with
# LogRecord's own attributes and make logging raise.
_EVENT_ATTR = "memosd_event"
_FIELDS_ATTR = "memosd_fields"

# Attributes every LogRecord has; anything else was passed through `extra=`.
# vLLM's record factory stamps every record, ours too, with its process name: not ours to print.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName",
                                                                  "vllm_process_name"}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def format_value(value: object) -> str:
    """Render one value: bare when safe, else double-quoted with escapes, never spanning lines."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # isprintable() is False for control characters and for the Unicode line and
    # paragraph separators, which some readers also treat as line breaks.
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif not c.isprintable() and c != " ":
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _format_key(key: str) -> str:
    # Keys are never quoted, so anything that would break the `key=value` shape becomes "_".
    cleaned = "".join(c if c.isprintable() and c not in ' ="\\' else "_" for c in key)
    return cleaned or "_"


class LogfmtFormatter(logging.Formatter):
    """Formats a record as ``ts=... level=... logger=... event=... k=v ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        pairs: list[tuple[str, object]] = [
            ("ts", f"{ts}.{int(record.msecs):03d}Z"),
            ("level", record.levelname.lower()),
            ("logger", record.name),
        ]
        event = getattr(record, _EVENT_ATTR, None)
        if event is not None:
            pairs.append(("event", event))
        else:
            pairs.append(("msg", record.getMessage()))
        fields = getattr(record, _FIELDS_ATTR, None)
        if isinstance(fields, Mapping):
            pairs.extend(fields.items())
        # Plain `logger.info("...", extra={...})` calls get their extras rendered too.
        pairs.extend(
            (k, v)
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("memosd_")
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            pairs.append(("exc", record.exc_text))
        if record.stack_info:
            pairs.append(("stack", self.formatStack(record.stack_info)))
        return " ".join(f"{_format_key(str(k))}={format_value(v)}" for k, v in pairs)


def log_event(
    logger: logging.Logger, event: str, level: int = logging.INFO, *, exc_info: BaseException | None = None,
    **fields: object,
) -> None:
    """Log one event with fields: ``log_event(log, "commit", cube=cube_id, revision=3)``.

    ``exc_info`` adds the exception's traceback as one escaped ``exc=`` field."""
    if logger.isEnabledFor(level):
        # stacklevel=2 credits the caller, not this helper, in funcName/lineno.
        logger.log(level, event, extra={_EVENT_ATTR: event, _FIELDS_ATTR: fields}, stacklevel=2,
                   exc_info=exc_info)


def setup_logging(level: str) -> None:
    """Send every log record to stderr as logfmt, at `level` (debug|info|warning|error|critical)."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}") from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    # Replace, not add: calling this twice (tests, re-configuration) must not double every line.
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # warnings.warn() output is multi-line and bypasses logging unless captured.
    logging.captureWarnings(True)
