"""Tests for log formatting: one line per message, whatever text from peers it carries."""

from __future__ import annotations

import json
import logging
import sys

from fedlink.common.logs import JsonFormatter, TextFormatter, escape_for_log


def _record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "fedlink.test",
        logging.WARNING,
        __file__,
        1,
        message,
        args,
        sys.exc_info() if exc_info else None,
    )


def test_a_text_log_line_cannot_be_forged_through_a_logged_value() -> None:
    forged = "site-a\n2026-12-04 13:00:00,000 INFO    fedlink: forged\r\x1b[2K\x85\u2028end"
    line = TextFormatter().format(_record("refused %s (%s)", forged, "ipv4:10.0.0.1:5"))
    assert "\n" not in line and line.isprintable()
    assert line.endswith(
        "refused site-a\\n2026-12-04 13:00:00,000 INFO    fedlink: forged\\r\\x1b[2K\\x85"
        "\\u2028end (ipv4:10.0.0.1:5)"
    )
    assert "\ttab" in TextFormatter().format(_record("keeps a \ttab"))


def test_a_traceback_keeps_its_lines_and_json_escapes_everything() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed for %s", "x\ny", exc_info=True)
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith("failed for x\\ny")
    assert "Traceback (most recent call last):" in text
    assert json.loads(JsonFormatter().format(record))["message"] == "failed for x\ny"


def test_control_characters_are_escaped_so_peer_text_cannot_forge_log_lines() -> None:
    forged = "bye\n2026-01-01 00:00:00 INFO fake line\x1b[2J\r"
    escaped = escape_for_log(forged, 500)
    assert "\n" not in escaped and "\r" not in escaped and "\x1b" not in escaped
    assert escaped == "bye\\n2026-01-01 00:00:00 INFO fake line\\x1b[2J\\r"


def test_long_peer_text_is_cut_to_the_limit_and_marked() -> None:
    assert escape_for_log("x" * 1000, 10) == "x" * 10 + "…"
    assert escape_for_log("short", 10) == "short"
