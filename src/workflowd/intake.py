"""Celery events in, with reconnects, gap accounting and an ``inspect`` resync.

Two sources, one contract. On Redis, Celery publishes events with ``PUBLISH`` to
``/{db}.celeryev/<routing key>``; workflowd subscribes to that pattern itself and
parses the pub/sub stream with hiredis, which takes events off the socket several
times faster than a kombu consumer (see bench/README.md) — intake speed is what
keeps Redis from dropping a subscriber that falls 32 MB behind. Every other
transport (RabbitMQ, Redis Sentinel) goes through a kombu consumer bound to
every routing key, like Celery's own receiver.

Per message the intake thread only decodes JSON and updates
:class:`~workflowd.state.ClusterState`; triggers go to the engine without waiting.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import orjson
import structlog
from kombu import Connection, Queue

from workflowd.metrics import Metrics
from workflowd.settings import Settings
from workflowd.state import ClusterState

log = structlog.get_logger("workflowd.intake")

TICK_SECONDS = 0.5
RESYNC_TIMEOUT = 1.0
BACKOFF_START, BACKOFF_CAP = 0.5, 30.0
RECV_BYTES = 1 << 18


class Source(Protocol):
    """Where events come from: open (subscribed when it returns), drain, close."""

    name: str

    def open(self) -> None: ...

    def drain(self, timeout: float) -> None: ...

    def close(self) -> None: ...


class KombuSource:
    """A kombu consumer on Celery's event exchange, every routing key, no acks."""

    name = "kombu"

    def __init__(self, url: str, node_id: str, deliver: Callable[[Any], None]) -> None:
        self.url = url
        self.node_id = node_id
        self.deliver = deliver
        self.conn: Any = None
        self.consumer: Any = None

    def _on_message(self, message: Any) -> None:
        try:
            if message.content_type == "application/json":
                data = loads(message.body)
            else:
                data = message.decode()
        except Exception:
            data = _MALFORMED
        self.deliver(data)

    def open(self) -> None:
        from celery.events.event import get_exchange

        self.conn = Connection(
            self.url, connect_timeout=5, transport_options={"socket_timeout": 10}
        )
        self.conn.ensure_connection(max_retries=1)
        queue_ = Queue(
            self.node_id,
            exchange=get_exchange(self.conn),
            routing_key="#",
            auto_delete=True,
            durable=False,
            message_ttl=5.0,
            expires=60.0,
        )
        self.consumer = self.conn.Consumer(
            queue_, on_message=self._on_message, no_ack=True, accept=["json"]
        )
        self.consumer.consume()

    def drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            self.conn.drain_events(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.consumer is not None:
                self.consumer.cancel()
        with contextlib.suppress(Exception):
            if self.conn is not None:
                self.conn.release()


class RedisSource:
    """``PSUBSCRIBE`` to Celery's event channels; the stream parsed by hiredis.

    redis-py makes the connection (auth, TLS, unix sockets); after the subscribe
    the socket only carries pushed messages, which hiredis splits.
    """

    name = "redis"

    def __init__(self, url: str, deliver: Callable[[Any], None]) -> None:
        import redis

        self.url = url
        self.deliver = deliver
        self.client = redis.Redis.from_url(
            url, protocol=2, socket_connect_timeout=5, socket_timeout=10, health_check_interval=0
        )
        db = int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)
        # kombu's fanout channel for an exchange: "/{db}.<exchange>/<routing key>"
        self.pattern = f"/{db}.celeryev/*"
        self.conn: Any = None
        self.sock: Any = None
        self.reader: Any = None

    def open(self) -> None:
        import hiredis

        self.conn = self.client.connection_pool.make_connection()
        self.conn.connect()
        self.conn.send_command("PSUBSCRIBE", self.pattern)
        reply = self.conn.read_response()
        if not reply or reply[0] not in (b"psubscribe", "psubscribe"):
            raise ConnectionError(f"unexpected reply to PSUBSCRIBE: {reply!r}")
        self.sock = self.conn._sock  # the pushed stream, read directly from here on
        self.sock.settimeout(None)
        self.reader = hiredis.Reader()

    def drain(self, timeout: float) -> None:
        sock, reader, handle = self.sock, self.reader, self._message
        pending = getattr(sock, "pending", None)  # TLS keeps decrypted bytes in its buffer
        if not (pending and pending()):
            ready, _, _ = select.select([sock], [], [], timeout)
            if not ready:
                return
        deadline = time.monotonic() + TICK_SECONDS
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionError("the broker closed the event subscription")
            reader.feed(data)
            while (msg := reader.gets()) is not False:
                if msg[0] == b"pmessage":
                    handle(msg[3])
            if time.monotonic() > deadline:
                return  # let the loop tick
            if not (pending and pending()):
                ready, _, _ = select.select([sock], [], [], 0)
                if not ready:
                    return

    def _message(self, payload: bytes) -> None:
        try:
            envelope = loads(payload)
            body = envelope["body"]
            props = envelope.get("properties") or {}
            if props.get("body_encoding") == "base64":
                body = base64.b64decode(body)
            if envelope.get("content-type", "application/json") == "application/json":
                data = loads(body)
            else:
                from kombu.serialization import loads as kombu_loads

                data = kombu_loads(
                    body,
                    envelope["content-type"],
                    envelope.get("content-encoding"),
                    accept={"json", "msgpack", "yaml"},
                )
        except (ValueError, KeyError, TypeError, binascii.Error, AttributeError):
            data = _MALFORMED
        except Exception:  # kombu's loads refuses a content type: not an event for us
            data = _MALFORMED
        self.deliver(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn is not None:
                self.conn.disconnect()
        self.client.close()


_MALFORMED = object()


def loads(data: bytes | str) -> Any:
    """JSON with orjson (about twice as fast here); the stdlib for what orjson refuses
    (NaN, Infinity), which Python's json writes for such floats."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def make_source(url: str, node_id: str, deliver: Callable[[Any], None]) -> Source:
    """The fast Redis reader where it applies, else kombu's consumer."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss") and _hiredis_available():
        return RedisSource(url, deliver)
    return KombuSource(url, node_id, deliver)


def _hiredis_available() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


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
        self.source_name = ""
        self.last_loop = time.monotonic()
        self._disconnected_at: float | None = None
        self._app: Any = None
        # inspect answers, gathered off-thread and applied by the intake loop
        self._resync_results: queue.SimpleQueue[tuple[dict[str, Any], dict[str, Any]]] = (
            queue.SimpleQueue()
        )

    # --- decoding (the hot path) -------------------------------------------------------

    def _deliver(self, data: Any) -> None:
        if type(data) is list:  # workers batch task events under "task.multi"
            handle = self.state.handle
            for event in data:
                handle(event)
        elif type(data) is dict:
            self.state.handle(data)
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
        backoff = BACKOFF_START
        while not stop.is_set():
            source = make_source(self.settings.broker_url, self.node_id, self._deliver)
            try:
                source.open()
                self.source_name = source.name
                self._connected()
                backoff = BACKOFF_START
                self._consume(source, stop)
            except Exception as exc:  # broker gone, redis dropped us, DNS... never fatal
                if stop.is_set():
                    break
                self._lost(exc)
                self._wait(stop, backoff)
                backoff = min(BACKOFF_CAP, backoff * 2)
            finally:
                source.close()
        self.metrics.broker_connected.set(0)

    def _wait(self, stop: threading.Event, seconds: float) -> None:
        """Back off, still showing the loop is alive (the watchdog reads last_loop)."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            self.last_loop = now = time.monotonic()
            if now >= deadline:
                return
            stop.wait(min(TICK_SECONDS, deadline - now))

    def _consume(self, source: Source, stop: threading.Event) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while not stop.is_set():
            source.drain(TICK_SECONDS)
            now = time.monotonic()
            self.last_loop = now
            if not self._resync_results.empty():
                self._apply_resync()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                self.state.tick()
                if self.on_tick is not None:
                    self.on_tick()

    def _connected(self) -> None:
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
            log.info(
                "subscribed to the event stream",
                broker=_safe_url(self.settings.broker_url),
                source=self.source_name,
            )
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
