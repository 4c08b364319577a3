"""structlog setup: JSON off a terminal, console on one, journald priority prefixes."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}


def _journald_prefix(_: Any, method: str, event: str) -> str:
    return f"<{_PRIORITY.get(method, 6)}>{event}"


def configure(level: str = "info", *, json_logs: bool | None = None, redact: Any = None) -> None:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if redact is not None:
        processors.append(redact)
    if json_logs:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if os.environ.get("JOURNAL_STREAM"):
            processors.append(_journald_prefix)
    else:
        processors.append(structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class Redact:
    """A structlog processor that puts ``${NAME}`` back in place of secret values."""

    def __init__(self) -> None:
        self.redactor: Any = None

    def __call__(self, _: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        r = self.redactor
        if r is None:
            return event_dict
        return {
            k: r.deep(v) if isinstance(v, str | dict | list) else v for k, v in event_dict.items()
        }
