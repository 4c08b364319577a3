"""Pytest fixtures for real-component tests.

Make them available from ``tests/conftest.py`` with either
``pytest_plugins = ["tests.support.fixtures"]`` (preferred: lint-clean, and no
"already imported" warning next to test modules that use the same line) or
``from tests.support.fixtures import *  # noqa: F403``.

* ``redis_server`` (session): one real redis-server for the whole run.
* ``broker_url`` (function): ``redis_server.url(db)`` for a db that is private
  to the test (flushed first).  kombu prefixes pub/sub channels with the db
  number, so events and control broadcasts are isolated per test too.
* ``redis_server_factory`` (function): private servers (restart tests, special
  config); all stopped at teardown.
* ``celery_worker_factory`` (function): starts workers (default broker:
  ``broker_url``); all stopped at teardown.
* ``celery_client`` (function): a Celery client app bound to ``broker_url``.
* ``event_collector`` (function): a live :class:`EventCollector` on ``broker_url``.
* ``http_sink`` (function): a started :class:`HttpSink`.

When ``redis-server`` is missing the broker fixtures skip, except when the ``CI``
env var is set, where they fail.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pytest

from tests.support.events import EventCollector
from tests.support.httpsink import HttpSink
from tests.support.procs import CeleryWorker, RedisServer

__all__ = [
    "CeleryWorkerFactory",
    "RedisServerFactory",
    "broker_url",
    "celery_client",
    "celery_worker_factory",
    "event_collector",
    "http_sink",
    "redis_server",
    "redis_server_factory",
]

_DATABASES = 256
_db_counter = itertools.count()


def _require_redis() -> None:
    if RedisServer.available():
        return
    msg = "redis-server not installed (apt-get install -y redis-server)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


class RedisServerFactory(Protocol):
    def __call__(self, extra_args: Sequence[str] = ..., port: int | None = ...) -> RedisServer: ...


class CeleryWorkerFactory(Protocol):
    def __call__(
        self,
        broker_url: str | None = ...,
        backend_url: str | None = ...,
        *,
        concurrency: int = ...,
        pool: str = ...,
        queues: Sequence[str] = ...,
        name: str | None = ...,
        heartbeat: float | None = ...,
        result_extended: bool | None = ...,
        loglevel: str = ...,
        extra_args: Sequence[str] = ...,
        env: dict[str, str] | None = ...,
        start: bool = ...,
        timeout: float = ...,
    ) -> CeleryWorker: ...


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server shared by the session (256 dbs)."""
    _require_redis()
    server = RedisServer(databases=_DATABASES)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def broker_url(redis_server: RedisServer) -> str:
    """URL of a redis db on ``redis_server`` that no other test uses (flushed)."""
    if not redis_server.running:  # a test stopped it: bring it back
        redis_server.start()
    db = next(_db_counter) % (_DATABASES - 1) + 1  # 1..255, db 0 left alone
    client = redis_server.client(db)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url(db)


@pytest.fixture
def redis_server_factory() -> Iterator[RedisServerFactory]:
    """Start private redis-servers; all are stopped and removed at teardown."""
    _require_redis()
    servers: list[RedisServer] = []

    def factory(extra_args: Sequence[str] = (), port: int | None = None) -> RedisServer:
        server = RedisServer(port=port, extra_args=extra_args)
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in reversed(servers):
            server.cleanup()


@pytest.fixture
def celery_worker_factory(
    request: pytest.FixtureRequest,
) -> Iterator[CeleryWorkerFactory]:
    """Start real Celery workers; all are stopped at teardown.

    ``broker_url=None`` uses the ``broker_url`` fixture.  With ``start=False``
    the worker is only created (call ``.start()`` yourself).  The worker log is
    appended to the test report when the test fails.
    """
    workers: list[CeleryWorker] = []

    def factory(
        broker_url: str | None = None,
        backend_url: str | None = None,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: Sequence[str] = ("celery",),
        name: str | None = None,
        heartbeat: float | None = None,
        result_extended: bool | None = None,
        loglevel: str = "info",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        start: bool = True,
        timeout: float = 30.0,
    ) -> CeleryWorker:
        if broker_url is None:
            broker_url = str(request.getfixturevalue("broker_url"))
        worker = CeleryWorker(
            broker_url,
            backend_url,
            concurrency=concurrency,
            pool=pool,
            queues=queues,
            name=name,
            heartbeat=heartbeat,
            result_extended=result_extended,
            loglevel=loglevel,
            extra_args=extra_args,
            env=env,
        )
        workers.append(worker)
        if start:
            worker.start(timeout=timeout)
        return worker

    try:
        yield factory
    finally:
        for worker in workers:  # warm shutdowns run in parallel
            worker.terminate()
        for worker in reversed(workers):
            try:
                worker.stop()
            finally:
                log = worker.log_text()
                if log:
                    request.node.add_report_section(
                        "teardown", f"celery worker {worker.hostname} log", log[-20000:]
                    )
                worker.cleanup()


@pytest.fixture
def celery_client(broker_url: str) -> Iterator[Any]:
    """A ``celery.Celery`` client app (tests.celeryapp config) bound to ``broker_url``."""
    from tests.celeryapp import make_app

    app = make_app(broker_url)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def event_collector(broker_url: str) -> Iterator[EventCollector]:
    """A started :class:`EventCollector` on ``broker_url`` (already subscribed)."""
    collector = EventCollector(broker_url).start()
    try:
        yield collector
    finally:
        collector.stop()


@pytest.fixture
def http_sink() -> Iterator[HttpSink]:
    """A started :class:`HttpSink` on 127.0.0.1; stopped at teardown."""
    with HttpSink() as sink:
        yield sink
