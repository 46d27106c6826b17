"""The dashboard's token file and page policy (the page itself is tested in Chromium, e2e)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedlink.common.errors import ConfigError
from fedlink.server.dashboard import MIN_TOKEN_CHARS, _finite, _page, load_token


def test_a_missing_token_file_is_created_random_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dashboard-token"
    token = load_token(path)
    assert len(token) >= MIN_TOKEN_CHARS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(path) == token  # read back, not replaced
    assert load_token(tmp_path / "other") != token


def test_a_short_or_odd_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("secret\n")
    with pytest.raises(ConfigError, match="at least 32"):
        load_token(path)
    path.write_text("a" * 40 + "\n<script>")
    with pytest.raises(ConfigError):
        load_token(path)


def test_the_page_policy_allows_exactly_its_own_inline_script_and_style() -> None:
    html, policy = _page()
    assert b"<script>" in html and b"http" not in html.replace(b"http://www.w3.org/2000/svg", b"")
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy


def test_json_gets_null_for_numbers_it_cannot_spell() -> None:
    assert _finite({"a": [float("nan"), 1.5, float("inf")], "b": "x"}) == {
        "a": [None, 1.5, None],
        "b": "x",
    }
