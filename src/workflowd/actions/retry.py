"""The retry action: resolve the task's exact arguments and queue, then send it again.

A retry is never sent with arguments that may differ from the original: the
sources, in order, are the result backend (``result_extended``), the exact
args ``inspect`` reported for the task, and the event's repr when it parses
and was not cut by Celery. Otherwise the action fails and says what to enable.
"""

from __future__ import annotations

import ast
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from workflowd.errors import RetryRefused

# Celery cuts event reprs at 1024 characters (celery.app.task argsrepr maxlen).
EVENT_REPR_LIMIT = 1024


@dataclass(frozen=True)
class Arguments:
    args: list[Any]
    kwargs: dict[str, Any]
    source: str  # result_backend | inspect | event | action


def _contains_ellipsis(value: Any) -> bool:
    if value is Ellipsis:
        return True
    if isinstance(value, list | tuple | set | frozenset):
        return any(_contains_ellipsis(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_ellipsis(k) or _contains_ellipsis(v) for k, v in value.items())
    return False


def parse_event_repr(
    args: str | None, kwargs: str | None
) -> tuple[list[Any], dict[str, Any]] | None:
    """Args and kwargs from the event's repr, or None when they may not be exact."""
    if args is None or kwargs is None:
        return None
    if len(args) >= EVENT_REPR_LIMIT - 3 or len(kwargs) >= EVENT_REPR_LIMIT - 3:
        return None  # at the limit: may have been cut
    try:
        a = ast.literal_eval(args)
        k = ast.literal_eval(kwargs)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if isinstance(a, list):
        a = tuple(a)
    if not isinstance(a, tuple) or not isinstance(k, dict):
        return None
    if _contains_ellipsis(a) or _contains_ellipsis(k):
        return None  # saferepr marks cut nesting with "..."
    if not all(isinstance(key, str) for key in k):
        return None
    return list(a), k


REFUSED_HINT = (
    "exact arguments unknown: {why}. workflowd sends a retry only with the original "
    "arguments. Enable result_extended = True with a result backend in the Celery app "
    "and give workflowd the same backend (--result-backend / WORKFLOWD_RESULT_BACKEND), "
    "or use same_arguments: false with explicit args/kwargs"
)


class RetrySender:
    """Owns a Celery app for reading the result backend and publishing retries.

    Blocking; the engine calls it from one dedicated thread.
    """

    def __init__(self, broker_url: str, result_backend: str | None) -> None:
        from celery import Celery

        self.result_backend = result_backend
        # One connection per sender thread, outside kombu's process-wide pools: a stalled
        # publish must not hold up the intake's inspect calls, nor they it.
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self.app = Celery(
            "workflowd", broker=broker_url, backend=result_backend, set_as_current=False
        )
        self.app.conf.update(
            # No task-sent event per retry: it costs a publish, and the chain records
            # the queue the retry went to.
            task_send_sent_event=False,
            broker_connection_retry_on_startup=True,
            broker_connection_max_retries=3,
            result_extended=True,
        )

    def backend_meta(self, task_id: str, wait: float = 1.0) -> dict[str, Any] | None:
        """The stored meta of a finished task, if the backend has it with its args."""
        if not self.result_backend:
            return None
        deadline = time.monotonic() + wait
        while True:
            meta: dict[str, Any] = self.app.backend.get_task_meta(task_id)
            if meta.get("status") not in (None, "PENDING") or time.monotonic() >= deadline:
                break
            time.sleep(0.05)  # the worker stores the result just before it sends the event
        if "args" not in meta or meta.get("args") is None:
            return None
        return meta

    def resolve(
        self,
        task_id: str,
        *,
        event_args: str | None,
        event_kwargs: str | None,
        exact: tuple[list[Any], dict[str, Any]] | None,
    ) -> tuple[Arguments, dict[str, Any] | None]:
        meta = self.backend_meta(task_id)
        if meta is not None:
            args, kwargs = meta.get("args"), meta.get("kwargs")
            if isinstance(args, list | tuple) and isinstance(kwargs, dict):
                return Arguments(list(args), dict(kwargs), "result_backend"), meta
        if exact is not None:
            return Arguments(list(exact[0]), dict(exact[1]), "inspect"), meta
        parsed = parse_event_repr(event_args, event_kwargs)
        if parsed is not None:
            return Arguments(parsed[0], parsed[1], "event"), meta
        if event_args is None:
            why = "no event carried them (no task-received or task-sent was seen)"
        elif len(event_args) >= EVENT_REPR_LIMIT - 3 or len(event_kwargs or "") >= (
            EVENT_REPR_LIMIT - 3
        ):
            why = "Celery truncated the event's args repr (over 1024 characters)"
        else:
            why = "the event's args repr does not parse as Python literals"
        if not self.result_backend:
            why += "; no result backend is configured"
        else:
            why += "; the result backend holds no args for it (result_extended off or expired)"
        raise RetryRefused(REFUSED_HINT.format(why=why))

    def _producer(self) -> Any:
        producer = getattr(self._local, "producer", None)
        if producer is None:
            conn = self.app.connection_for_write()
            with self._lock:
                self._connections.append(conn)
            producer = self._local.producer = self.app.amqp.Producer(conn)
        return producer

    def send(
        self,
        *,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        task_id: str,
        root_id: str,
        parent_id: str,
        countdown: float,
        queue: str,
        headers: dict[str, Any],
    ) -> None:
        self.app.send_task(
            name,
            args=args,
            kwargs=kwargs,
            task_id=task_id,
            root_id=root_id,
            parent_id=parent_id,
            countdown=countdown if countdown > 0 else None,
            queue=queue,
            headers=headers,
            producer=self._producer(),
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(Exception):
                    conn.release()
        self.app.close()
