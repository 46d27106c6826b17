"""Logging to stderr, as text for people or as JSON lines for log collectors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from fedlink.common.errors import ConfigError

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def check_log_format(log_format: str) -> None:
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def configure_logging(*, verbose: bool, log_format: str = "text") -> None:
    """(Re)configure the root logger; called again once a config file has chosen the format."""
    check_log_format(log_format)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def escape_for_log(text: str, limit: int) -> str:
    """`text` from a peer made safe for one log line: control characters (newlines that could
    forge a line, terminal escapes) written as escapes, and at most `limit` characters kept."""
    clipped = text[:limit]
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in clipped)
    return escaped + ("…" if len(text) > limit else "")
