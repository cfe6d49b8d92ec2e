"""memosd.logfmt: one line per event, key=value, values quoted and escaped."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator

import pytest

from memosd.logfmt import LogfmtFormatter, format_value, log_event, setup_logging

# key=bare or key="quoted with \" escapes"
PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def parse(line: str) -> dict[str, str]:
    """A strict logfmt parser: the whole line must be pairs separated by single spaces."""
    pairs = PAIR.findall(line)
    assert " ".join(f"{k}={v}" for k, v in pairs) == line, line
    return {k: v for k, v in pairs}


def unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    return value[1:-1].encode().decode("unicode_escape")


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def record_line(fn_level: int = logging.INFO, **kwargs: object) -> str:
    """Format one record made by log_event through a capturing handler."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    logger = logging.getLogger("memosd.test.capture")
    handler = Capture()
    handler.setFormatter(LogfmtFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        log_event(logger, "commit", fn_level, **kwargs)
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1
    return lines[0]


def test_format_value_quoting() -> None:
    assert format_value("cube_x") == "cube_x"
    assert format_value(3) == "3"
    assert format_value(1.2) == "1.2"
    assert format_value(True) == "true"
    assert format_value(None) == "null"
    assert format_value("") == '""'
    assert format_value("two words") == '"two words"'
    assert format_value("a=b") == '"a=b"'
    assert format_value('say "hi"') == '"say \\"hi\\""'
    assert format_value("back\\slash") == '"back\\\\slash"'
    assert format_value("line1\nline2\r\n") == '"line1\\nline2\\r\\n"'
    assert format_value("tab\there") == '"tab\\there"'
    assert format_value("nul\x00sep\u2028") == '"nul\\u0000sep\\u2028"'
    assert format_value("héllo") == "héllo"


def test_event_line_shape() -> None:
    line = record_line(cube="cube_x", revision=3, took_ms=1.2, note="a b")
    assert re.fullmatch(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info logger=memosd\.test\.capture "
        r'event=commit cube=cube_x revision=3 took_ms=1\.2 note="a b"',
        line,
    ), line


def test_reserved_field_names_do_not_clash() -> None:
    # `name`, `msg` and `args` are LogRecord attributes; passing them must not raise.
    fields = parse(record_line(logging.WARNING, name="my cube", msg="x", args=2))
    assert fields["level"] == "warning"
    assert unquote(fields["name"]) == "my cube"
    assert fields["msg"] == "x" and fields["args"] == "2"


def test_newlines_stay_on_one_line() -> None:
    text = 'first\nsecond "quoted" a=b\r\n\tthird\u2029'
    line = record_line(text=text)
    assert "\n" not in line and "\r" not in line and len(line.splitlines()) == 1
    assert unquote(parse(line)["text"]) == text


def test_exception_is_one_escaped_field(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("debug")
    log = logging.getLogger("memosd.test.exc")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("commit failed for %s", "cube_x")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    fields = parse(err.rstrip("\n"))
    assert fields["level"] == "error"
    assert unquote(fields["msg"]) == "commit failed for cube_x"
    exc = unquote(fields["exc"])
    assert exc.startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom\nsecond line" in exc


def test_setup_logging_levels_and_noisy_loggers(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("warning")
    setup_logging("INFO")  # idempotent: a second call replaces the handler, lines are not doubled
    log = logging.getLogger("memosd.kernel")
    log_event(log, "commit", cube="c", revision=3)
    log_event(log, "detail", logging.DEBUG, x=1)  # below the level: dropped
    logging.getLogger("transformers").info("loading weights")  # quieted: dropped
    logging.getLogger("memosd.kernel").info("plain %d", 5, extra={"cube": "c2"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    first, second = parse(lines[0]), parse(lines[1])
    assert first["event"] == "commit" and first["cube"] == "c" and first["revision"] == "3"
    assert first["logger"] == "memosd.kernel"
    assert unquote(second["msg"]) == "plain 5" and second["cube"] == "c2"
    assert logging.getLogger("sentence_transformers").level == logging.WARNING


def test_warnings_are_one_line(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "logger=py.warnings" in lines[0]


def test_bad_level() -> None:
    with pytest.raises(ValueError, match="loud"):
        setup_logging("loud")
