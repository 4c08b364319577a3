"""Bounded task and worker state built from Celery events; detects the four triggers.

Time for elapsed and heartbeat checks is the daemon's own monotonic clock, taken
when an event arrives, so worker clock skew does not matter. Nothing here
blocks: detected triggers are handed to ``emit`` and this module moves on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

from workflowd.context import TriggerContext

Emit = Callable[[TriggerContext, "TaskInfo | None"], None]

TERMINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED"})
# The wake-up heartbeat a receiver asks for carries freq=5 and no "active";
# it says nothing about the worker's real interval.
DEFAULT_HEARTBEAT = 2.0
# A worker whose broker connection blips sends worker-offline and, on reconnecting,
# worker-online within a few seconds; its tasks keep running. An offline that no
# online or heartbeat follows within this time is a worker that went away.
OFFLINE_CONFIRM_SECONDS = 3.0
_WATCHED = {
    "task-sent": "SENT",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-retried": "RETRY",
    "task-rejected": "REJECTED",
    "task-revoked": "REVOKED",
}


class TaskInfo:
    """What is known of one task. Args are Celery's repr strings unless ``exact`` is set."""

    __slots__ = (
        "args",
        "exact",
        "exception",
        "fired",
        "id",
        "kwargs",
        "name",
        "orphaned",
        "parent_id",
        "queue",
        "queue_source",
        "received_count",
        "redelivered",
        "retries",
        "root_id",
        "started_at",
        "state",
        "worker",
    )

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.name: str | None = None
        self.args: str | None = None
        self.kwargs: str | None = None
        # (args, kwargs) as real objects, from inspect or the result backend
        self.exact: tuple[list[Any], dict[str, Any]] | None = None
        self.root_id: str | None = None
        self.parent_id: str | None = None
        self.retries = 0
        self.queue: str | None = None
        self.queue_source: str | None = None
        self.worker: str | None = None
        self.state = "PENDING"
        self.started_at: float | None = None
        self.exception: str | None = None
        self.received_count = 0
        self.orphaned = False
        self.redelivered = False
        self.fired = 0  # thresholds already fired (index into the sorted list)


class WorkerInfo:
    __slots__ = (
        "freq",
        "hostname",
        "last_seen",
        "offline_at",
        "offline_fired",
        "online",
        "tasks",
    )

    def __init__(self, hostname: str, now: float) -> None:
        self.hostname = hostname
        self.last_seen = now
        self.freq = DEFAULT_HEARTBEAT
        self.online = True
        self.offline_fired = False
        self.offline_at: float | None = None  # a worker-offline waiting for confirmation
        self.tasks: set[str] = set()


class ClusterState:
    """Feed it events with :meth:`handle`; call :meth:`tick` about twice a second."""

    def __init__(
        self,
        emit: Emit,
        *,
        worker_timeout: float = 30.0,
        max_tasks: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.emit = emit
        self.worker_timeout = worker_timeout
        self.max_tasks = max_tasks
        self.clock = clock
        self.wall = wall
        self.tasks: dict[str, TaskInfo] = {}
        self.running: dict[str, TaskInfo] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.thresholds: tuple[float, ...] = ()
        self.malformed = 0
        self.counts: dict[str, int] = {}
        # chain tasks whose state the store follows, and where their changes go
        self.watch: set[str] = set()
        self.on_state: Callable[[str, str], None] | None = None
        # ids that finished while an inspect resync was in flight: its answer is older
        self.finished_during_resync: set[str] | None = None
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "task-sent": self._sent,
            "task-received": self._received,
            "task-started": self._started,
            "task-succeeded": self._succeeded,
            "task-failed": self._failed,
            "task-retried": self._retried,
            "task-rejected": self._rejected,
            "task-revoked": self._revoked,
            "worker-heartbeat": self._heartbeat,
            "worker-online": self._online,
            "worker-offline": self._offline,
        }

    # --- intake ---------------------------------------------------------------

    def handle(self, event: Any) -> None:
        """One decoded event (a dict); malformed ones are counted and skipped."""
        try:
            kind = event["type"]
            counts = self.counts
            counts[kind] = counts.get(kind, 0) + 1
            handler = self._handlers.get(kind)
            if handler is not None:
                handler(event)
                if self.watch and (tid := event.get("uuid")) in self.watch and self.on_state:
                    self.on_state(tid, _WATCHED.get(kind, kind))
        except (KeyError, TypeError, AttributeError, ValueError):
            self.malformed += 1

    def _task(self, task_id: str) -> TaskInfo:
        info = self.tasks.get(task_id)
        if info is None:
            if type(task_id) is not str:
                raise TypeError("uuid")
            info = self.tasks[task_id] = TaskInfo(task_id)
            if len(self.tasks) > self.max_tasks:
                self._evict()
        return info

    def _evict(self) -> None:
        # Oldest tenth first; running tasks and orphans are dropped too when that
        # old, which bounds memory when final events were lost.
        for tid in list(islice(self.tasks, max(1, self.max_tasks // 10))):
            info = self.tasks.pop(tid)
            self.running.pop(tid, None)
            if info.worker is not None and (w := self.workers.get(info.worker)) is not None:
                w.tasks.discard(tid)

    def _fields(self, info: TaskInfo, e: Mapping[str, Any]) -> None:
        name = e.get("name")
        if name:
            info.name = name
        if "args" in e:
            info.args = e["args"]
            info.kwargs = e.get("kwargs")
        root = e.get("root_id")
        if root:
            info.root_id = root
        parent = e.get("parent_id")
        if parent:
            info.parent_id = parent
        retries = e.get("retries")
        if retries:
            info.retries = int(retries)

    def _sent(self, e: Mapping[str, Any]) -> None:
        info = self._task(e["uuid"])
        self._fields(info, e)
        queue = e.get("queue") or e.get("routing_key")
        if queue and info.queue_source not in ("inspect", "result_backend"):
            info.queue = queue
            info.queue_source = "task-sent"
        if info.state == "PENDING":
            info.state = "SENT"

    def _received(self, e: Mapping[str, Any]) -> None:
        info = self._task(e["uuid"])
        self._fields(info, e)
        info.received_count += 1
        if info.orphaned or info.state == "REJECTED":
            info.redelivered = True
        info.state = "RECEIVED"
        self._assign(info, e["hostname"])

    def _assign(self, info: TaskInfo, hostname: str) -> None:
        if info.worker != hostname:
            if info.worker is not None and (old := self.workers.get(info.worker)) is not None:
                old.tasks.discard(info.id)
            info.worker = hostname
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = WorkerInfo(hostname, self.clock())
        worker.tasks.add(info.id)

    def _started(self, e: Mapping[str, Any]) -> None:
        info = self._task(e["uuid"])
        info.state = "STARTED"
        info.started_at = self.clock()
        info.fired = 0
        self._assign(info, e["hostname"])
        self.running[info.id] = info

    def _finish(self, task_id: str, state: str) -> TaskInfo | None:
        if self.finished_during_resync is not None:
            self.finished_during_resync.add(task_id)
        info = self.tasks.pop(task_id, None)
        if info is None:
            return None
        info.state = state
        self.running.pop(task_id, None)
        if info.worker is not None and (w := self.workers.get(info.worker)) is not None:
            w.tasks.discard(task_id)
        return info

    def _succeeded(self, e: Mapping[str, Any]) -> None:
        self._finish(e["uuid"], "SUCCESS")

    def _revoked(self, e: Mapping[str, Any]) -> None:
        self._finish(e["uuid"], "REVOKED")

    def _rejected(self, e: Mapping[str, Any]) -> None:
        info = self._finish(e["uuid"], "REJECTED")
        if info is not None and e.get("requeue"):
            # Celery puts it back; keep it to recognise the redelivery.
            info.worker = None
            self.tasks[info.id] = info

    def _retried(self, e: Mapping[str, Any]) -> None:
        # self.retry(): the same id comes back later; not a failure, not on a worker now.
        info = self.tasks.get(e["uuid"])
        if info is not None:
            info.state = "RETRY"
            self.running.pop(info.id, None)
            if info.worker is not None and (w := self.workers.get(info.worker)) is not None:
                w.tasks.discard(info.id)

    def _failed(self, e: Mapping[str, Any]) -> None:
        task_id = e["uuid"]
        info = self._finish(task_id, "FAILURE")
        if info is None:
            info = TaskInfo(task_id)
            info.state = "FAILURE"
        info.exception = e.get("exception")
        worker = e.get("hostname") or info.worker
        self.emit(self._context("task.failed", info, worker=worker), info)

    def _context(self, trigger: str, info: TaskInfo, **extra: Any) -> TriggerContext:
        return TriggerContext(
            trigger=trigger,
            timestamp=self.wall(),
            task_id=info.id,
            task_name=info.name,
            args=info.args,
            kwargs=info.kwargs,
            queue=info.queue,
            queue_source=info.queue_source,
            worker=extra.pop("worker", info.worker),
            exception=info.exception,
            root_id=info.root_id,
            parent_id=info.parent_id,
            **extra,
        )

    # --- workers --------------------------------------------------------------

    def _worker_seen(self, e: Mapping[str, Any]) -> WorkerInfo:
        hostname = e["hostname"]
        now = self.clock()
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = WorkerInfo(hostname, now)
        elif not worker.online:
            worker.online = True
            worker.offline_fired = False  # a new spell starts when it goes away again
        worker.offline_at = None
        worker.last_seen = now
        return worker

    def _heartbeat(self, e: Mapping[str, Any]) -> None:
        worker = self._worker_seen(e)
        freq = e.get("freq")
        if freq and "active" in e:
            worker.freq = float(freq)

    def _online(self, e: Mapping[str, Any]) -> None:
        worker = self._worker_seen(e)
        freq = e.get("freq")
        if freq:
            worker.freq = float(freq)

    def _offline(self, e: Mapping[str, Any]) -> None:
        worker = self.workers.get(e["hostname"])
        if worker is None:
            worker = self.workers[e["hostname"]] = WorkerInfo(e["hostname"], self.clock())
        if worker.online and worker.offline_at is None:
            worker.offline_at = self.clock()  # confirmed by tick() unless it comes back

    def _went_offline(self, worker: WorkerInfo, how: str) -> None:
        worker.online = False
        worker.offline_at = None
        if worker.offline_fired:
            return
        worker.offline_fired = True
        silent = round(self.clock() - worker.last_seen, 1)
        self.emit(
            TriggerContext(
                trigger="worker.offline",
                timestamp=self.wall(),
                worker=worker.hostname,
                extra={"detected_by": how, "silent_seconds": silent},
            ),
            None,
        )
        for tid in sorted(worker.tasks):
            info = self.tasks.get(tid)
            if info is None or info.state in TERMINAL or info.orphaned:
                continue
            info.orphaned = True
            self.running.pop(tid, None)
            self.emit(self._context("task.orphaned", info, worker=worker.hostname), info)
        worker.tasks.clear()

    # --- time -------------------------------------------------------------------

    def set_thresholds(self, thresholds: Iterable[float]) -> None:
        self.thresholds = tuple(sorted(set(thresholds)))
        for info in self.running.values():
            info.fired = 0 if info.started_at is None else self._fired_count(info)

    def _fired_count(self, info: TaskInfo) -> int:
        # After a reload, thresholds already passed are not fired again for a task.
        assert info.started_at is not None
        elapsed = self.clock() - info.started_at
        return sum(1 for t in self.thresholds if t < elapsed - 1.0)

    def tick(self) -> None:
        """Detect silent workers and tasks running past a threshold."""
        now = self.clock()
        for worker in list(self.workers.values()):
            if not worker.online:
                continue
            if worker.offline_at is not None:
                if now - worker.offline_at >= OFFLINE_CONFIRM_SECONDS:
                    self._went_offline(worker, "worker-offline")
            elif now - worker.last_seen > self.worker_timeout:
                self._went_offline(worker, "heartbeat timeout")
        thresholds = self.thresholds
        if not thresholds:
            return
        first = thresholds[0]
        for info in list(self.running.values()):
            started = info.started_at
            if started is None:
                continue
            elapsed = now - started
            if elapsed < first:
                continue
            while info.fired < len(thresholds) and elapsed >= thresholds[info.fired]:
                threshold = thresholds[info.fired]
                info.fired += 1
                self.emit(
                    self._context(
                        "task.execution_time_exceeded",
                        info,
                        elapsed_seconds=elapsed,
                        threshold_seconds=threshold,
                    ),
                    info,
                )

    # --- resync -----------------------------------------------------------------

    def heard_nothing_until_now(self) -> None:
        """After our own disconnect: silence was ours, not the workers'. Restart their clocks."""
        now = self.clock()
        for worker in self.workers.values():
            worker.last_seen = now

    def begin_resync(self) -> None:
        self.finished_during_resync = set()

    def end_resync(self) -> None:
        self.finished_during_resync = None

    def resync(self, tasks_by_worker: Mapping[str, list[dict[str, Any]]], state: str) -> int:
        """Tasks a worker holds now (``inspect active``/``reserved``), with exact args."""
        skip = self.finished_during_resync or set()
        n = 0
        for hostname, tasks in tasks_by_worker.items():
            worker = self.workers.get(hostname)
            if worker is None:
                worker = self.workers[hostname] = WorkerInfo(hostname, self.clock())
            worker.last_seen = self.clock()
            for t in tasks or []:
                task_id = t.get("id")
                if not isinstance(task_id, str) or task_id in skip:
                    continue
                info = self._task(task_id)
                info.name = t.get("name") or info.name
                args, kwargs = t.get("args"), t.get("kwargs")
                if isinstance(args, list | tuple) and isinstance(kwargs, dict):
                    info.exact = (list(args), dict(kwargs))
                route = (t.get("delivery_info") or {}).get("routing_key")
                if route:
                    info.queue, info.queue_source = route, "inspect"
                if state == "STARTED" and info.state != "STARTED":
                    info.state = "STARTED"
                    # inspect's time_start is on the worker's clock, which ours
                    # cannot compare with; elapsed counts from the resync.
                    info.started_at = self.clock()
                    self.running[task_id] = info
                elif info.state in ("PENDING", "SENT"):
                    info.state = "RECEIVED"
                self._assign(info, hostname)
                n += 1
        return n
