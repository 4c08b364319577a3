"""Celery events in: a kombu consumer bound to every routing key, with reconnects and resync.

Runs in the daemon's main thread. Per message it only decodes JSON and updates
:class:`~workflowd.state.ClusterState`; triggers go to the engine without waiting.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from kombu import Connection, Queue

from workflowd.metrics import Metrics
from workflowd.settings import Settings
from workflowd.state import ClusterState

log = structlog.get_logger("workflowd.intake")

TICK_SECONDS = 0.5
RESYNC_TIMEOUT = 1.0
BACKOFF_START, BACKOFF_CAP = 0.5, 30.0


class Intake:
    def __init__(
        self,
        settings: Settings,
        state: ClusterState,
        metrics: Metrics,
        *,
        on_connected: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.on_connected = on_connected
        self.on_tick = on_tick
        self.node_id = f"workflowd.{socket.gethostname()}.{uuid.uuid4().hex[:8]}"
        self.connected = False
        self.connects = 0
        self.gaps = 0
        self.resyncs = 0
        self.last_loop = time.monotonic()
        self._disconnected_at: float | None = None
        self._app: Any = None
        # inspect answers, gathered off-thread and applied by the intake loop
        self._resync_results: queue.SimpleQueue[tuple[dict[str, Any], dict[str, Any]]] = (
            queue.SimpleQueue()
        )

    # --- decoding (the hot path) -------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        body = message.body
        try:
            if message.content_type == "application/json":
                data = json.loads(body)
            else:
                data = message.decode()
        except Exception:
            self.state.malformed += 1
            return
        handle = self.state.handle
        if type(data) is list:  # workers batch task events under "task.multi"
            for event in data:
                handle(event)
        elif type(data) is dict:
            handle(data)
        else:
            self.state.malformed += 1

    # --- connection loop ------------------------------------------------------------------

    def _celery(self) -> Any:
        if self._app is None:
            from celery import Celery

            self._app = Celery(
                "workflowd-intake", broker=self.settings.broker_url, set_as_current=False
            )
        return self._app

    def run(self, stop: threading.Event) -> None:
        from celery.events.event import get_exchange

        backoff = BACKOFF_START
        while not stop.is_set():
            conn = Connection(
                self.settings.broker_url,
                connect_timeout=5,
                transport_options={"socket_timeout": 10},
            )
            try:
                conn.ensure_connection(max_retries=1)
                exchange = get_exchange(conn)
                queue = Queue(
                    self.node_id,
                    exchange=exchange,
                    routing_key="#",
                    auto_delete=True,
                    durable=False,
                    message_ttl=5.0,
                    expires=60.0,
                )
                with conn.Consumer(
                    queue, on_message=self._on_message, no_ack=True, accept=["json"]
                ):
                    self._connected(conn)
                    backoff = BACKOFF_START
                    self._consume(conn, stop)
            except Exception as exc:  # broker gone, redis dropped us, DNS... never fatal
                if stop.is_set():
                    break
                self._lost(exc)
                stop.wait(backoff)
                backoff = min(BACKOFF_CAP, backoff * 2)
            finally:
                with contextlib.suppress(Exception):
                    conn.release()
        self.metrics.broker_connected.set(0)

    def _consume(self, conn: Any, stop: threading.Event) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=TICK_SECONDS)
            now = time.monotonic()
            self.last_loop = now
            if not self._resync_results.empty():
                self._apply_resync()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                self.state.tick()
                if self.on_tick is not None:
                    self.on_tick()

    def _connected(self, conn: Any) -> None:
        self.state.heard_nothing_until_now()
        self.connects += 1
        self.connected = True
        self.metrics.broker_connected.set(1)
        if self._disconnected_at is not None:
            gap = time.time() - self._disconnected_at
            self.gaps += 1
            self.metrics.intake_gaps.inc()
            log.warning(
                "event stream resumed after a gap; events in it were lost",
                gap_seconds=round(gap, 1),
                reconnects=self.connects - 1,
            )
            self._disconnected_at = None
        else:
            log.info("subscribed to the event stream", broker=_safe_url(self.settings.broker_url))
        if self.on_connected is not None:
            self.on_connected()
        self.state.begin_resync()
        threading.Thread(target=self._resync, name="workflowd-resync", daemon=True).start()

    def _lost(self, exc: BaseException) -> None:
        if self.connects and self._disconnected_at is None:
            self._disconnected_at = time.time()
            log.warning(
                "broker connection lost; reconnecting", error=f"{type(exc).__name__}: {exc}"[:300]
            )
        self.connected = False
        self.metrics.broker_connected.set(0)

    def _resync(self) -> None:
        """Ask the workers what they hold now, and wake them for a heartbeat (own thread)."""
        app = self._celery()
        try:
            with app.connection_for_write() as ctl:
                app.control.broadcast("heartbeat", connection=ctl)
                inspect = app.control.inspect(timeout=RESYNC_TIMEOUT, connection=ctl)
                active = inspect.active() or {}
                reserved = inspect.reserved() or {}
        except Exception as exc:
            log.warning("inspect resync failed", error=f"{type(exc).__name__}: {exc}")
            active, reserved = {}, {}
        self._resync_results.put((active, reserved))

    def _apply_resync(self) -> None:
        active, reserved = self._resync_results.get()
        n = self.state.resync(active, "STARTED") + self.state.resync(reserved, "RECEIVED")
        self.state.end_resync()
        self.resyncs += 1
        log.info(
            "running tasks rebuilt from inspect",
            workers=len(set(active) | set(reserved)),
            tasks=n,
        )

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
