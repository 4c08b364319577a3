"""One thread owns the SQLite connection and commits whatever is pending in one transaction.

A failure storm produces thousands of history rows a second; one commit per row
would fall behind and queue without bound. Batching keeps writes in order and
cheap, and callers that need a result still get it through a future.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from workflowd.history import Store

log = structlog.get_logger("workflowd.writer")
T = TypeVar("T")

MAX_BATCH = 2000
BACKLOG_WARNING = 50_000

_STOP = object()


class Writer:
    def __init__(self, open_store: Callable[[], Store]) -> None:
        self._open = open_store
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="workflowd-db", daemon=True)
        self._warned = False
        self.store: Store | None = None
        self._started = concurrent.futures.Future[Store]()

    def start(self) -> Store:
        self._thread.start()
        return self._started.result(30)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, fut))
        return fut

    def later(self, fn: Callable[[], Any]) -> None:
        self._queue.put((fn, None))

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.store = store = self._open()
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(store)
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP:
                batch.pop()
                stopping = True
            self._commit(store, batch)
            backlog = self._queue.qsize()
            if backlog > BACKLOG_WARNING and not self._warned:
                self._warned = True
                log.warning("history writes are falling behind", backlog=backlog)
            elif backlog < BACKLOG_WARNING // 10:
                self._warned = False
        store.close()

    def _commit(self, store: Store, batch: list[Any]) -> None:
        results: list[tuple[concurrent.futures.Future[Any] | None, Any, BaseException | None]] = []
        try:
            with store.db.atomic():
                for item in batch:
                    if item is _STOP:
                        continue
                    fn, fut = item
                    try:
                        results.append((fut, fn(), None))
                    except Exception as exc:
                        results.append((fut, None, exc))
        except Exception as exc:  # the commit itself failed: tell everyone waiting
            log.error(
                "history commit failed", error=f"{type(exc).__name__}: {exc}", writes=len(batch)
            )
            results = [(fut, None, exc) for fut, _, _ in results]
        for fut, value, error in results:
            if fut is None:
                if error is not None:
                    log.error("history write failed", error=f"{type(error).__name__}: {error}")
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
