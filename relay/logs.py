"""Logging setup for ``relay serve``: readable text (default) or JSON lines.

Log calls put structured fields in ``extra={"fields": {...}}``; :func:`fields` builds that
dict. The text format appends them as ``key=value``, the JSON format as keys of the line's
object, so a log pipeline can filter on ``event``, ``conn``, ``user`` or ``code`` without
parsing messages. Exceptions become one ``exc`` field (the traceback as a string), so every
JSON record stays on one line.

Callers must never pass a token, a secret or an API key as a field or in a message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


def fields(**values: Any) -> dict[str, Any]:
    """Return ``extra`` for a log call carrying ``values`` as structured fields."""
    return {"fields": values}


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    found = getattr(record, "fields", None)
    return found if isinstance(found, dict) else {}


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 INFO relay.connection: connection closed conn=ab12 code=1000``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _record_fields(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in extra.items())
        return f"{head} {pairs}{sep}{tail}"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c.isspace() or c in '"=' for c in text)) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``,
    the record's fields, and ``exc`` when it carries an exception."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _record_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(level: str = "info", log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` and above to ``stream`` (stderr) in ``log_format``.

    Replaces the root logger's handlers, so calling it again reconfigures logging.

    Returns:
        The installed handler.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "fields", "setup"]
