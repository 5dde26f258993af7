"""The audit log: one JSON line per completion request, appended and flushed before its
response is finished, rotated by size (FILE -> FILE.1 -> ... FILE.<backups>).

A line: {"time" (UTC, ISO 8601), "id", "client" (host:port), "endpoint", "model",
"model_step", "status" (the HTTP status), "finish_reasons", "parameters" (the request's
sampling fields), "prompt" (the text or token ids as sent; for chat, the messages),
"output" (the text as sent, after any redaction), "prompt_tokens", "completion_tokens",
"redacted" (matches per kind, with --redact_output), "error"}. API keys and headers are
never written.

Rotation and the lock between threads are the standard library's RotatingFileHandler (it
flushes after every record).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
from typing import Any


class AuditLog:
    def __init__(self, path: str | os.PathLike, max_bytes: int, backups: int):
        self.path = str(path)
        self.handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, **fields: Any) -> None:
        line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                **fields}
        self.handler.handle(logging.makeLogRecord(
            {"msg": json.dumps(line, ensure_ascii=False), "levelno": logging.INFO}))

    def close(self) -> None:
        self.handler.close()
