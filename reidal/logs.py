"""Structured logs for every reidal process: ``event k=v ...`` lines or JSON lines.

The workflows (answers, cycles, operations, training jobs) and the transport (the gRPC
interceptor, serve) log through :func:`log_kv`, so this module sits below both: it
imports nothing of reidal, and a workflow that logs never depends on the gRPC server.
"""

from __future__ import annotations

import json
import logging
import sys

#: Longest value written into a log line (characters); longer ones are cut.
MAX_LOG_VALUE = 1000


def bounded(text: str, limit: int, unit: str = "characters") -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... (cut: {len(text)} {unit})"


def _log_value(value: object) -> object:
    return bounded(value, MAX_LOG_VALUE) if isinstance(value, str) else value


def _kv_value(value: object) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        text = ",".join(str(v) for v in value)
    else:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def log_kv(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log ``event k=v k=v ...`` (values quoted when needed) with the fields attached.

    The fields also travel as ``record.fields`` so :class:`JsonFormatter` can emit them as
    JSON keys: one call, readable in a terminal and parseable by a log pipeline. String
    values are cut to ``MAX_LOG_VALUE`` characters: a log line never holds a huge input.
    """
    if logger.isEnabledFor(level):
        fields = {k: _log_value(v) for k, v in fields.items()}
        text = " ".join([event, *(f"{k}={_kv_value(v)}" for k, v in fields.items())])
        logger.log(level, text, extra={"fields": {"event": event, **fields}}, stacklevel=2)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str | int = "INFO", *, json_lines: bool = False) -> None:
    """Root logging for a reidal process: key=value lines (default) or JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
