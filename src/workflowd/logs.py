"""structlog setup: JSON off a terminal, console on one, journald priority prefixes."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

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
    # sd-daemon(3): "<N>" at the start of a line sets its priority in the journal
    return f"<{_PRIORITY.get(method, 6)}>{event}"


def on_journal(stream: TextIO | None = None, env: dict[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is the journal stream systemd set up (JOURNAL_STREAM).

    systemd.exec(5): compare device and inode, so a redirected stderr (a file, a
    pipe to another program) of a process started from a service is not mistaken
    for the journal.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure(level: str = "info", *, json_logs: bool | None = None, redact: Any = None) -> None:
    """Log to stderr: JSON lines (with journald priorities under systemd) or, on a
    terminal, human-readable lines. Standard-library logging (celery, kombu) is
    rendered the same way, from WARNING up."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if redact is not None:
        shared.append(redact)
    render: list[Any]
    if json_logs:
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if on_journal():
            render.append(_journald_prefix)
    else:
        render = [structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=shared + render,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


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
