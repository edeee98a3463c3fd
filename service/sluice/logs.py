"""Structured logging: one JSON object per line on stderr.

A record whose message is a ``dict`` (the per-stream summary) is merged
into the line as fields; any other message goes under ``"message"``.

Secrets (provider and gateway keys) are registered at start-up with
:func:`redact`; the formatter replaces any of them that reaches a line,
whatever logged it (a library's exception message included).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


_secrets: set[str] = set()

#: built once: ``json.dumps`` with arguments builds a new encoder per line
_LINE_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


def redact(*secrets: str | None) -> None:
    """Never print these strings in a log line (keys shorter than 8 characters are not secrets)."""
    _secrets.update(secret for secret in secrets if secret and len(secret) >= 8)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, dict):
            line.update(record.msg)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = _LINE_JSON.encode(line)
        for secret in _secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The lines print none of the caller's file, thread or process: each
    # record skips finding them (the logging HOWTO's "Optimization"; the
    # caller's frame walk is about a tenth of a stream's log line).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # httpx2 logs every request at INFO: a log call per request on the hot
    # path, and the per-stream summary already says it all.
    for noisy in ("httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
