"""Text from peers in log lines."""

from __future__ import annotations

from fedlink.common.logs import escape_for_log


def test_control_characters_are_escaped_so_peer_text_cannot_forge_log_lines() -> None:
    forged = "bye\n2026-01-01 00:00:00 INFO fake line\x1b[2J\r"
    escaped = escape_for_log(forged, 500)
    assert "\n" not in escaped and "\r" not in escaped and "\x1b" not in escaped
    assert escaped == "bye\\n2026-01-01 00:00:00 INFO fake line\\x1b[2J\\r"


def test_long_peer_text_is_cut_to_the_limit_and_marked() -> None:
    assert escape_for_log("x" * 1000, 10) == "x" * 10 + "…"
    assert escape_for_log("short", 10) == "short"
