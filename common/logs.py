"""Logging to stderr, as text for people or as JSON lines for log collectors."""

from __future__ import annotations

import copy
import json
import logging
import sys
from datetime import datetime, timezone

from fedlink.common.errors import ConfigError

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Control characters (C0 but tab, DEL, C1) and Unicode line breaks, as escapes: messages carry
# text from peers (certificate names, metric names, error texts), and a newline in one would
# start a forged line. Tracebacks are not messages and keep their lines.
_ESCAPES = {
    code: f"\\x{code:02x}" for code in (*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0))
} | {0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, one line per message whatever the message holds."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        escaped = copy.copy(record)
        escaped.message = record.message.translate(_ESCAPES)
        return super().formatMessage(escaped)


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
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # grpc.aio logs a line at debug level for every call it schedules: --verbose is for fedlink.
    logging.getLogger("grpc").setLevel(logging.INFO)


def escape_for_log(text: str, limit: int) -> str:
    """`text` from a peer cut to `limit` characters and escaped as TextFormatter escapes every
    message, so it stays one line in JSON logs and in anything else it is passed on to."""
    return text[:limit].translate(_ESCAPES) + ("…" if len(text) > limit else "")
