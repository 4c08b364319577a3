"""Celery application used by the real-component tests.

The worker subprocess is started as ``celery -A tests.celeryapp worker`` and is
configured entirely from environment variables (see :data:`ENV_VARS`):

``WFD_TEST_BROKER``
    Broker URL (default ``redis://127.0.0.1:6379/0``).
``WFD_TEST_BACKEND``
    Result backend URL (optional; no result backend when unset or empty).
``WFD_TEST_RESULT_EXTENDED``
    ``1``/``0`` to force ``result_extended``; defaults to on when a backend is set.
``WFD_TEST_HEARTBEAT``
    Worker event heartbeat interval in seconds (float, e.g. ``0.5``).  Celery's
    CLI only offers ``--heartbeat-interval`` as an *int*; this env var installs a
    consumer whose ``Heart`` bootstep defaults to the given (possibly
    fractional) interval.  Unset: Celery's default of 2 s.  An explicit
    ``--heartbeat-interval`` on the command line still wins.

Test processes that only *send* tasks or control commands should build their own
client with :func:`make_app` so that nothing depends on import-time env state.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from celery.worker.consumer.heart import Heart

__all__ = [
    "BACKEND_ENV",
    "BROKER_ENV",
    "DEFAULT_BROKER",
    "ENV_VARS",
    "HEARTBEAT_ENV",
    "RESULT_EXTENDED_ENV",
    "app",
    "make_app",
]

BROKER_ENV = "WFD_TEST_BROKER"
BACKEND_ENV = "WFD_TEST_BACKEND"
RESULT_EXTENDED_ENV = "WFD_TEST_RESULT_EXTENDED"
HEARTBEAT_ENV = "WFD_TEST_HEARTBEAT"
ENV_VARS = (BROKER_ENV, BACKEND_ENV, RESULT_EXTENDED_ENV, HEARTBEAT_ENV)

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

_HEART_STEP = "celery.worker.consumer.heart:Heart"


def _env_heartbeat() -> float | None:
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return None
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{HEARTBEAT_ENV} must be > 0, got {raw!r}")
    return value


class EnvHeart(Heart):  # type: ignore[misc]  # celery is untyped
    """``Heart`` bootstep whose default interval comes from ``WFD_TEST_HEARTBEAT``."""

    # Keep the stock step name so nothing that refers to it by name breaks.
    name = "celery.worker.consumer.heart.Heart"

    def __init__(
        self,
        c: Any,
        without_heartbeat: bool = False,
        heartbeat_interval: float | None = None,
        **kwargs: Any,
    ) -> None:
        if heartbeat_interval is None:
            heartbeat_interval = _env_heartbeat()
        super().__init__(
            c,
            without_heartbeat=without_heartbeat,
            heartbeat_interval=heartbeat_interval,
            **kwargs,
        )


class EnvConsumer(Consumer):  # type: ignore[misc]  # celery is untyped
    """Stock consumer, with :class:`EnvHeart` in place of the stock ``Heart`` step."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps = [  # noqa: RUF012  # mirrors celery's own class attribute
            "tests.celeryapp:EnvHeart" if step == _HEART_STEP else step
            for step in Consumer.Blueprint.default_steps
        ]


def make_app(
    broker: str | None = None,
    backend: str | None = None,
    *,
    result_extended: bool | None = None,
    main: str = "tests.celeryapp",
) -> Any:
    """Build a Celery app with the test configuration.

    ``broker``/``backend`` default to the env vars.  Returns ``celery.Celery``
    (typed ``Any`` because celery ships no type information).
    """
    if broker is None:
        broker = os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if result_extended is None:
        raw = os.environ.get(RESULT_EXTENDED_ENV, "").strip()
        result_extended = raw not in ("0", "false", "no") if raw else backend is not None

    celery_app = Celery(main, broker=broker, backend=backend)
    celery_app.conf.update(
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_extended=result_extended,
        task_default_queue="celery",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        enable_utc=True,
    )
    if _env_heartbeat() is not None:
        celery_app.conf.worker_consumer = "tests.celeryapp:EnvConsumer"
    return celery_app


app: Any = make_app()
app.conf.include = ["tests.celeryapp.tasks"]
