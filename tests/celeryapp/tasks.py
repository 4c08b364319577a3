"""Tasks executed by the real Celery worker in the integration tests.

Task names are explicit so that they never change when this module moves.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from tests.celeryapp import app

__all__ = [
    "SMTPException",
    "echo",
    "fail_connection",
    "fail_until",
    "fail_with",
    "process_card",
    "record_call",
    "send_email",
    "sleep_for",
]

_TaskDecorator = Callable[[Callable[..., Any]], Any]


def _task(name: str, **options: Any) -> _TaskDecorator:
    """Typed wrapper around ``app.task`` (celery ships no type hints)."""
    return cast(_TaskDecorator, app.task(name=name, **options))


class SMTPException(Exception):  # mimics smtplib's naming on purpose
    """Stand-in for ``smtplib.SMTPException`` raised by ``myapp.tasks.send_email``."""


def _redis() -> redis.Redis:
    return redis.Redis.from_url(str(app.conf.broker_url), socket_timeout=5)


@_task("tests.celeryapp.tasks.fail_connection")
def fail_connection(*args: Any, **kwargs: Any) -> None:
    """Always raises ``ConnectionError('upstream refused')``."""
    raise ConnectionError("upstream refused")


@_task("tests.celeryapp.tasks.fail_with")
def fail_with(exc_name: str, message: str) -> None:
    """Raise the builtin exception called ``exc_name`` with ``message``."""
    exc_type = getattr(builtins, exc_name, None)
    if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
        raise TypeError(f"not a builtin exception: {exc_name!r}")
    raise exc_type(message)


@_task("tests.celeryapp.tasks.sleep_for")
def sleep_for(seconds: float) -> float:
    """Sleep ``seconds`` then return them."""
    time.sleep(float(seconds))
    return float(seconds)


@_task("tests.celeryapp.tasks.echo")
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return ``{"args": args, "kwargs": kwargs}``."""
    return {"args": list(args), "kwargs": kwargs}


@_task("tests.celeryapp.tasks.fail_until")
def fail_until(key: str, succeed_after: int) -> dict[str, int]:
    """Fail with ``ConnectionError`` until called ``succeed_after`` times.

    The call count is ``INCR``-ed in redis under ``key`` (on the broker's redis,
    same db).  The call with count ``>= succeed_after`` succeeds and returns
    ``{"calls": count}``.
    """
    count = int(_redis().incr(key))
    if count < int(succeed_after):
        raise ConnectionError(f"upstream refused (call {count} of {succeed_after})")
    return {"calls": count}


@_task("tests.celeryapp.tasks.record_call", bind=True)
def record_call(self: Any, key: str, *args: Any, **kwargs: Any) -> None:
    """Append a JSON record of this call to the redis list ``key``, then fail.

    The record (``json.dumps(..., sort_keys=True)``) holds ``task_id``, ``name``,
    ``args`` and ``kwargs`` exactly as received (``args`` includes ``key``),
    ``retries``, ``root_id``, ``parent_id`` and ``hostname``.  Always raises
    ``ConnectionError('upstream refused')`` afterwards.
    """
    req = self.request
    record = {
        "task_id": req.id,
        "name": self.name,
        "args": list(req.args or ()),
        "kwargs": dict(req.kwargs or {}),
        "retries": req.retries,
        "root_id": req.root_id,
        "parent_id": req.parent_id,
        "hostname": req.hostname,
    }
    _redis().rpush(key, json.dumps(record, sort_keys=True))
    raise ConnectionError("upstream refused")


@_task("payments.process_card")
def process_card(*args: Any, **kwargs: Any) -> None:
    """Always raises ``ValueError('card declined')``."""
    raise ValueError("card declined")


@_task("myapp.tasks.send_email")
def send_email(*args: Any, **kwargs: Any) -> None:
    """Always raises :class:`SMTPException`."""
    raise SMTPException("421 service not available")
