"""Structured (JSON lines) logging for the server.

Records carry only what an operator needs: method, status, duration, peer,
the token's configured name. Never image bytes, never image, subject or
gallery identifiers, never error details from the library (they may name ids).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

RPC_LOGGER = "phenolens.rpc"
SERVER_LOGGER = "phenolens.server"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            payload["error_type"] = record.exc_info[0].__name__
            payload["traceback"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(level: str = "INFO", *, json_lines: bool = True,
                  stream: TextIO | None = None) -> logging.Handler:
    """Route the ``phenolens`` loggers to ``stream`` (stderr) as JSON lines; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(fields)s"))
    root = logging.getLogger("phenolens")
    for old in list(root.handlers):
        if getattr(old, "_phenolens", False):
            root.removeHandler(old)
    handler._phenolens = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # Library warnings (Pillow, torch, captum) become JSON records of this tree too,
    # instead of plain text on stderr.
    logging.captureWarnings(False)  # re-install: warnings.showwarning may have been swapped
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    for old in list(warnings_log.handlers):
        if getattr(old, "_phenolens", False):
            warnings_log.removeHandler(old)
    warnings_log.addHandler(handler)
    warnings_log.propagate = False
    return handler


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})
