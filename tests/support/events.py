"""Collect a Celery cluster's events in a background thread (for assertions).

Uses celery's own ``app.events.Receiver``.  On the redis transport events are
pub/sub messages and the subscription is only made on the first
``drain_events``, so :meth:`EventCollector.start` does not return until a probe
event it publishes itself has come back: after ``start()`` no event is missed.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from tests.support.procs import wait_for

__all__ = ["PROBE_EVENT", "Event", "EventCollector"]

Event = dict[str, Any]
PROBE_EVENT = "wfd-probe"


class EventCollector:
    """Receives every event published on ``broker_url`` into a thread-safe list."""

    def __init__(self, broker_url: str) -> None:
        from tests.celeryapp import make_app

        self.broker_url = broker_url
        self.app: Any = make_app(broker_url)
        self._events: list[Event] = []
        self._probes: set[str] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._receiver: Any = None
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> EventCollector:
        """Start receiving; returns once the subscription is proven live."""
        self._thread = threading.Thread(target=self._run, name="wfd-event-collector", daemon=True)
        self._thread.start()
        probe_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        while True:
            self._send_probe(probe_id)
            with self._cond:
                if self._cond.wait_for(lambda: probe_id in self._probes, timeout=0.3):
                    return self
            if time.monotonic() >= deadline:
                self.stop()
                raise TimeoutError(
                    f"event receiver on {self.broker_url} not live after {timeout}s "
                    f"(errors: {self.errors!r})"
                )

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with contextlib.suppress(Exception):
            self.app.close()

    def __enter__(self) -> EventCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send_probe(self, probe_id: str) -> None:
        try:
            with self.app.connection_for_write() as conn:
                dispatcher = self.app.events.Dispatcher(conn, enabled=True)
                dispatcher.send(PROBE_EVENT, probe_id=probe_id)
                dispatcher.close()
        except Exception as exc:  # broker not reachable yet
            self.errors.append(exc)

    def _on_event(self, event: Event) -> None:
        with self._cond:
            if event.get("type") == PROBE_EVENT:
                self._probes.add(str(event.get("probe_id")))
            else:
                self._events.append(event)
            self._cond.notify_all()

    def _run(self) -> None:
        # Reconnects (bounded by stop()) if the broker goes away, e.g. a redis restart.
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                    if self._stop.is_set():
                        return
                    self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:
                self.errors.append(exc)
            self._stop.wait(0.2)

    # -- queries -------------------------------------------------------------------------
    def events(self, type: str | None = None, **fields: Any) -> list[Event]:
        """Events received so far, optionally filtered by type and exact field values."""
        with self._cond:
            return [e for e in self._events if _matches(e, type, fields)]

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def wait_for_event(
        self,
        type: str | None = None,
        timeout: float = 10.0,
        predicate: Callable[[Event], bool] | None = None,
        **fields: Any,
    ) -> Event:
        """Return the first (already received or future) matching event.

        Raises :class:`TimeoutError` if none arrives within ``timeout``.
        """

        def find() -> Event | None:
            for event in self._events:
                if _matches(event, type, fields) and (predicate is None or predicate(event)):
                    return event
            return None

        with self._cond:
            found = self._cond.wait_for(find, timeout=timeout)
            if found is None:
                seen = sorted({str(e.get("type")) for e in self._events})
                raise TimeoutError(
                    f"no event type={type!r} {fields!r} within {timeout}s (types seen: {seen})"
                )
            return found

    def assert_no_event(
        self,
        type: str | None = None,
        within: float = 3.0,
        **fields: Any,
    ) -> None:
        """Wait ``within`` seconds and fail if a matching event was received."""
        time.sleep(within)
        unexpected = self.events(type, **fields)
        assert not unexpected, f"unexpected events: {unexpected!r}"

    def wait_until(self, predicate: Callable[[list[Event]], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate(all_events)`` is true."""
        wait_for(lambda: predicate(self.events()), timeout, message="event predicate")


def _matches(event: Event, type: str | None, fields: dict[str, Any]) -> bool:
    if type is not None and event.get("type") != type:
        return False
    return all(event.get(k) == v for k, v in fields.items())
