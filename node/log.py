"""Logging set-up: structlog, JSON lines in production, readable in a terminal.

Every log line is an event name plus key/value fields. Callers pass only
pseudonymous identifiers, AE titles, addresses, statuses and sizes: original
patient values never reach a logger (PS3.15 keeps them inside the hospital,
and log files travel further than databases do).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _ToStructlog(logging.Handler):
    """Re-emit pynetdicom's stdlib warnings as structured lines (its messages carry no dataset values)."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        method = log.error if record.levelno >= logging.ERROR else log.warning
        method("library_message", message=record.getMessage())


def configure(fmt: str = "auto", level: str = "info", stream: Any = None, process: str = "") -> None:
    """Configure structlog once per process: 'json', 'console', or 'auto' (console on a TTY).
    `process` names a worker process in each of its lines."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([_field("process", process)] if process else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # One write per line (print() writes the line and its newline separately), so that the
        # lines of the supervisor and of its workers, sharing one stderr, never interleave.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    library = logging.getLogger("pynetdicom")
    library.handlers = [_ToStructlog(level=logging.WARNING)]
    library.setLevel(logging.WARNING)
    library.propagate = False
    # pydicom's log lines and Python warnings can quote element values (PHI): drop them.
    for name in ("pydicom", "py.warnings"):
        silent = logging.getLogger(name)
        silent.handlers = [logging.NullHandler()]
        silent.propagate = False
    logging.captureWarnings(True)


def _field(key: str, value: str) -> Any:
    def add(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault(key, value)
        return event

    return add


def get(name: str) -> Any:
    """A logger named after the module that uses it."""
    return structlog.get_logger(f"telenode.{name}")
