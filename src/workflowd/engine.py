"""Triggers in, workflow runs out: chain enrichment, conditions, circuit breaker, actions, history.

Runs on its own asyncio loop thread. The intake thread hands triggers over with
:meth:`Engine.submit` and never waits. SQLite is used from one dedicated thread,
broker publishes from a small pool, HTTP through one async client, so a hanging
endpoint holds up only the run that called it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import structlog

from workflowd import matching, model
from workflowd.actions import notify
from workflowd.actions.retry import RetrySender
from workflowd.chains import ChainBook
from workflowd.context import TriggerContext
from workflowd.errors import ActionError, DeliveryError, RetryRefused
from workflowd.history import Run, Store
from workflowd.loader import LoadedWorkflow, Snapshot
from workflowd.metrics import Metrics
from workflowd.settings import Settings
from workflowd.state import TaskInfo
from workflowd.writer import Writer

log = structlog.get_logger("workflowd.engine")
T = TypeVar("T")

CHAIN_TRIGGERS = ("task.failed", "task.orphaned")
BREAKER_CHECK_SECONDS = 1.0
PRUNE_EVERY_SECONDS = 3600.0
MAX_CONCURRENT_RUNS = 256
STATIC_CACHE_SIZE = 20_000
FORGET_EVERY_SECONDS = 60.0


@dataclass
class Breaker:
    state: str = "closed"
    opened_at: float | None = None
    suppressed: int = 0
    window: collections.deque[float] = field(default_factory=collections.deque)
    dirty: bool = False  # suppressed count not saved yet

    def prune(self, now: float, seconds: float) -> None:
        cutoff = now - seconds
        while self.window and self.window[0] <= cutoff:
            self.window.popleft()


@dataclass
class RetryPlan:
    action: model.RetryAction
    attempt: int


class Engine:
    def __init__(
        self,
        settings: Settings,
        snapshot: Snapshot,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.snapshot = snapshot
        self._index = _index(snapshot)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._writer = Writer(lambda: Store(self.settings.database))
        self._send_pool = concurrent.futures.ThreadPoolExecutor(4, "workflowd-retry")
        self.store: Store | None = None
        self._sender: RetrySender | None = None
        self._sender_lock = threading.Lock()
        self._http: httpx.AsyncClient | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._runs_sem: asyncio.Semaphore | None = None
        self._accepting = True
        # in-memory view of the chains that can still change, so deciding never waits
        # on SQLite; its watch set is read by the intake thread
        self.chains = ChainBook(clock)
        self.watch = self.chains.watch
        self.breakers: dict[str, Breaker] = {}
        self._inbox: collections.deque[tuple[Any, Any]] = collections.deque()
        self._wakeup_pending = False
        # verdicts of the trigger-only conditions, by the fields they read
        self._static: dict[tuple[Any, ...], tuple[LoadedWorkflow, ...]] = {}
        self._trigger_count: dict[str, Any] = {}
        # orphaned task id -> (retry id, run id, action index) while the retry may be pending
        self.orphan_retries: dict[str, tuple[str, int, int]] = {}
        self.error: BaseException | None = None

    # --- thread & lifecycle ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main, name="workflowd-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start() or the daemon's loop
            self.error = exc
            log.exception("engine stopped on an error")
        finally:
            self._ready.set()
            self._stopped.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._runs_sem = asyncio.Semaphore(MAX_CONCURRENT_RUNS)
        self.store = await asyncio.get_running_loop().run_in_executor(None, self._writer.start)
        await self._db(self._load_state)
        self._http = httpx.AsyncClient(follow_redirects=False)
        self._ready.set()
        housekeeping = asyncio.create_task(self._housekeeping())
        await self._stop_requested.wait()
        housekeeping.cancel()
        await self._drain(self._drain_timeout)
        self._flush_breakers()
        await self._http.aclose()
        await self._db(self._close_store)
        self._send_pool.shutdown(wait=False, cancel_futures=True)

    _drain_timeout = 8.0

    def stop(self, timeout: float = 8.0) -> None:
        """Stop taking triggers; let runs finish for ``timeout`` s; record the rest interrupted."""
        if self._loop is None or self._stop_requested is None:
            return
        self._drain_timeout = timeout
        loop, ev = self._loop, self._stop_requested

        def request() -> None:
            self._accepting = False
            ev.set()

        try:
            loop.call_soon_threadsafe(request)
        except RuntimeError:
            return
        self._stopped.wait(timeout + 3)
        self._writer.stop()

    async def _drain(self, timeout: float) -> None:
        if self._inflight:
            log.info("waiting for running actions", count=len(self._inflight))
            _done, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)

    def _close_store(self) -> None:
        # the writer closes the store itself once everything queued is written
        if self._sender is not None:
            self._sender.close()

    async def _db(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._writer.submit(fn))

    def db_later(self, fn: Callable[[], Any]) -> None:
        """A write whose result nobody waits for (still ordered with the others)."""
        self._writer.later(fn)

    # --- state from the store ---------------------------------------------------

    def _load_state(self) -> None:
        assert self.store is not None
        now = self.clock()
        interrupted = self.store.interrupt_open_runs(now)
        for row in interrupted:
            log.warning(
                "run interrupted by a previous stop; not re-run",
                run_id=row["id"],
                workflow=row["workflow"],
                task_id=row["task_id"],
            )
            self.metrics.runs.labels(row["workflow"], "interrupted").inc()
        since = now - self.settings.history_retention_days * 86400
        rows = self.store.iter_rows(
            "SELECT task_id, parent_id, root_id, attempt, state, queue, sent_at, updated_at "
            "FROM chain_tasks WHERE COALESCE(updated_at, sent_at, 0) >= ? "
            "ORDER BY COALESCE(sent_at, 0), attempt",
            [since],
        )
        fired = self.store.iter_rows("SELECT workflow, root_id, fired_at FROM threshold_fired")
        self.chains.load(rows, fired)
        self.chains.prune()
        saved = self.store.breaker_states()
        for name, lw in self.snapshot.workflows.items():
            b = self._breaker(lw)
            s = saved.get(name)
            if s is not None and s["state"] == "open":
                b.state, b.opened_at, b.suppressed = "open", s["opened_at"], s["suppressed"]
                self.metrics.circuit_open.labels(name).set(1)
            window = lw.workflow.circuit_breaker.window_seconds
            b.window.extend(self.store.executed_times(name, now - window))

    def _breaker(self, lw: LoadedWorkflow) -> Breaker:
        b = self.breakers.get(lw.name)
        if b is None:
            b = self.breakers[lw.name] = Breaker()
        return b

    # --- snapshot ---------------------------------------------------------------

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """Swap the workflows (from any thread); runs already started keep their version."""
        loop = self._loop
        if loop is None:
            self.snapshot, self._index = snapshot, _index(snapshot)
            return
        loop.call_soon_threadsafe(self._swap, snapshot)

    def _swap(self, snapshot: Snapshot) -> None:
        self.snapshot, self._index = snapshot, _index(snapshot)
        self._static = {}
        for lw in snapshot.workflows.values():
            self._breaker(lw)

    # --- intake side --------------------------------------------------------------

    def submit(self, ctx: TriggerContext, info: TaskInfo | None) -> None:
        """Hand a trigger over (called from the intake thread; never blocks)."""
        if self._accepting:
            self._inbox.append((ctx, info))
            if not self._wakeup_pending:
                self._wake()

    def task_state(self, task_id: str, state: str) -> None:
        """A followed chain task changed state (called from the intake thread)."""
        self._inbox.append((task_id, state))
        if not self._wakeup_pending:
            self._wake()

    def _wake(self) -> None:
        # One loop wake-up per batch: triggers handed over while one is pending ride along.
        loop = self._loop
        if loop is None:
            return
        self._wakeup_pending = True
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._wakeup_pending = False
        inbox = self._inbox
        while inbox:
            first, second = inbox.popleft()
            try:
                if isinstance(first, str):
                    self._chain_state(first, second)
                else:
                    self._on_trigger(first, second)
            except Exception:
                log.exception("handling a trigger failed")

    def _chain_state(self, task_id: str, state: str) -> None:
        pending = self.orphan_retries.pop(task_id, None)
        if pending is not None and state in ("RECEIVED", "STARTED"):
            # Celery redelivered the orphan itself: the retry we sent must not run too.
            self._revoke_retry(task_id, *pending)
            return
        self.chains.state(task_id, state)
        if self.chains.member(task_id) is not None and self.store is not None:
            store = self.store
            self.db_later(lambda: store.set_chain_state(task_id, state))

    # --- deciding -------------------------------------------------------------------

    def _chain_position(self, ctx: TriggerContext) -> tuple[str, int, int]:
        """(root, attempt, failure count) of the trigger's task; counts a chain failure."""
        task_id = ctx.task_id or ""
        counts = ctx.trigger in CHAIN_TRIGGERS
        position = self.chains.failed(task_id, counts)
        if counts and self.store is not None and self.chains.member(task_id) is not None:
            store = self.store
            state = "FAILURE" if ctx.trigger == "task.failed" else "ORPHANED"
            self.db_later(lambda: store.set_chain_state(task_id, state))
        return position

    def _candidates(self, ctx: TriggerContext) -> tuple[LoadedWorkflow, ...]:
        key = (
            ctx.trigger,
            ctx.threshold_seconds,
            ctx.task_name,
            ctx.queue,
            ctx.worker,
            ctx.exception,
        )
        found = self._static.get(key)
        if found is None:
            found = tuple(
                lw
                for lw in self._index.get(ctx.trigger, ())
                if (
                    ctx.threshold_seconds is None
                    or lw.workflow.trigger.threshold_seconds == ctx.threshold_seconds
                )
                and matching.static_match(lw.workflow, ctx)
            )
            if len(self._static) >= STATIC_CACHE_SIZE:
                self._static = {}
            self._static[key] = found
        return found

    def _on_trigger(self, ctx: TriggerContext, info: TaskInfo | None) -> None:
        if not self._accepting:
            return
        counter = self._trigger_count.get(ctx.trigger)
        if counter is None:
            counter = self._trigger_count[ctx.trigger] = self.metrics.triggers.labels(ctx.trigger)
        counter.inc()
        if ctx.task_id is not None:
            root, attempt, failures = self._chain_position(ctx)
        candidates = self._candidates(ctx)
        if not candidates:
            return
        if ctx.task_id is not None:
            ctx = ctx.with_(
                root_id=root,
                attempt=attempt,
                failure_count=failures,
                extra={**ctx.extra, "celery_root_id": ctx.root_id},
            )
        now = self.clock()
        for lw in candidates:
            try:
                self._decide(lw, ctx, info, now)
            except Exception:
                log.exception("deciding a workflow failed", workflow=lw.name, task_id=ctx.task_id)

    def _decide(
        self, lw: LoadedWorkflow, ctx: TriggerContext, info: TaskInfo | None, now: float
    ) -> None:
        wf = lw.workflow
        threshold_key = (wf.name, ctx.root_id or "")
        uses_threshold = wf.conditions.failure_count_threshold is not None
        results = matching.evaluate(
            wf,
            ctx,
            threshold_already_fired=uses_threshold and self.chains.threshold_fired(*threshold_key),
        )
        if not matching.matches(results):
            return
        if uses_threshold and ctx.root_id:
            self.chains.mark_fired(*threshold_key)
            if self.store is not None:
                store, (wname, root) = self.store, threshold_key
                self.db_later(lambda: store.mark_threshold_fired(wname, root, now))
        run = Run(
            workflow=wf.name,
            workflow_version=lw.version,
            trigger=ctx.trigger,
            started_at=now,
            task_id=ctx.task_id,
            task_name=ctx.task_name,
            worker=ctx.worker,
            root_id=ctx.root_id,
            conditions=[r.to_dict() for r in results],
        )
        cb = wf.circuit_breaker
        breaker = self._breaker(lw)
        breaker.prune(now, cb.window_seconds)
        run.circuit_breaker = {
            "state": breaker.state,
            "count": len(breaker.window),
            "limit": cb.max_executions,
            "window_hours": cb.time_window_hours,
        }

        retry = wf.retry_action
        plan: RetryPlan | None = None
        if retry is not None:
            reason = self._retry_blocked(ctx, info, retry)
            if reason is not None:
                if len(wf.all_actions) == 1:
                    self._record_skipped(run, reason)
                    return
                run.actions.append(
                    {
                        "type": "retry",
                        "status": "skipped",
                        "detail": {},
                        "duration_ms": 0,
                        "error": reason,
                    }
                )
            else:
                plan = RetryPlan(retry, (ctx.attempt or 0) + 1)

        if len(breaker.window) >= cb.max_executions:
            breaker.suppressed += 1
            if breaker.state == "closed":
                breaker.state, breaker.opened_at = "open", now
                self.metrics.circuit_open.labels(wf.name).set(1)
                self._persist_breaker(wf.name, breaker)
                self._breaker_notice(lw, opened=True, suppressed=0)
            else:
                breaker.dirty = True  # the count is saved by check_breakers, once a second
            run.circuit_breaker["state"] = "open"
            run.actions = []
            self._record_skipped(run, "circuit_open")
            return
        breaker.window.append(now)
        run.executed = True
        run.circuit_breaker["count"] = len(breaker.window)
        if plan is not None and ctx.task_id is not None:
            self.chains.mark_retried(ctx.task_id)  # reserved now: one retry per failed task
        task = asyncio.get_running_loop().create_task(self._execute(run, lw, ctx, info, plan))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _retry_blocked(
        self, ctx: TriggerContext, info: TaskInfo | None, retry: model.RetryAction
    ) -> str | None:
        if ctx.trigger == "task.orphaned" and info is not None and info.redelivered:
            return "redelivered"
        if ctx.task_id is not None and self.chains.was_retried(ctx.task_id):
            return "already_retried"
        if (ctx.attempt or 0) + 1 > retry.max_attempts:
            return "max_attempts_reached"
        return None

    def _record_skipped(self, run: Run, reason: str) -> None:
        run.outcome, run.reason, run.finished_at = "skipped", reason, run.started_at
        self.metrics.runs.labels(run.workflow, "skipped").inc()
        # An open breaker can suppress thousands of triggers a second: history and the
        # runs metric count them; the log says so only at debug level.
        emit = log.debug if reason == "circuit_open" else log.info
        emit("workflow skipped", workflow=run.workflow, task_id=run.task_id, reason=reason)
        if self.store is not None:
            store = self.store
            self.db_later(lambda: store.insert_run(run))

    # --- acting ---------------------------------------------------------------------

    async def _execute(
        self,
        run: Run,
        lw: LoadedWorkflow,
        ctx: TriggerContext,
        info: TaskInfo | None,
        plan: RetryPlan | None,
    ) -> None:
        assert self.store is not None and self._runs_sem is not None
        store = self.store
        redact = self.snapshot.redactor
        variables = ctx.variables(lw.name)
        actions = lw.workflow.all_actions
        pre_skipped = list(run.actions)
        run.actions = [
            {"type": a.type, "status": "pending", "detail": {}, "duration_ms": None, "error": None}
            for a in actions
        ]
        for entry in pre_skipped:  # a retry skipped while deciding
            idx = next(i for i, a in enumerate(actions) if a.type == "retry")
            run.actions[idx] = entry
        await self._db(lambda: store.insert_run(run))
        first_error: str | None = None
        try:
            async with self._runs_sem:
                for i, action in enumerate(actions):
                    entry = run.actions[i]
                    if entry["status"] == "skipped":
                        continue
                    entry["status"] = "running"
                    t0 = time.monotonic()
                    try:
                        if isinstance(action, model.RetryAction):
                            assert plan is not None
                            entry["detail"] = await self._retry(run, ctx, info, plan, entry)
                        else:
                            _, detail = await notify.send(
                                self._client(), notify.request_for(action, variables)
                            )
                            entry["detail"] = detail
                        entry["status"] = "success"
                    except ActionError as exc:
                        entry["status"], entry["error"] = "failure", redact(str(exc))
                        if isinstance(exc, DeliveryError) and exc.status is not None:
                            entry["detail"]["http_status"] = exc.status
                    except Exception as exc:
                        entry["status"] = "failure"
                        entry["error"] = redact(f"{type(exc).__name__}: {exc}")
                        log.exception("action raised", workflow=run.workflow, type=action.type)
                    finally:
                        took = time.monotonic() - t0
                        entry["duration_ms"] = int(took * 1000)
                        if entry["status"] in ("success", "failure"):
                            self.metrics.action_seconds.labels(
                                action.type, entry["status"]
                            ).observe(took)
                    if entry["status"] == "failure" and first_error is None:
                        first_error = f"{action.type}: {entry['error']}"
        except asyncio.CancelledError:
            for entry in run.actions:
                if entry["status"] in ("pending", "running", "sending"):
                    entry["status"] = "interrupted"
            run.outcome, run.reason = "interrupted", "daemon stopped before the run finished"
            run.finished_at = self.clock()
            await asyncio.shield(self._db(lambda: store.update_run(run)))
            self.metrics.runs.labels(run.workflow, "interrupted").inc()
            raise
        ran = [a for a in run.actions if a["status"] != "skipped"]
        if first_error is not None:
            run.outcome, run.reason = "failure", first_error
        elif not ran:
            run.outcome = "skipped"
        else:
            run.outcome = "success"
        run.finished_at = self.clock()
        await self._db(lambda: store.update_run(run))
        self.metrics.runs.labels(run.workflow, run.outcome).inc()
        log.info(
            "workflow ran",
            workflow=run.workflow,
            trigger=run.trigger,
            task_id=run.task_id,
            outcome=run.outcome,
            reason=run.reason,
        )

    def _client(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    def _retry_sender(self) -> RetrySender:
        with self._sender_lock:
            if self._sender is None:
                self._sender = RetrySender(self.settings.broker_url, self.settings.result_backend)
            return self._sender

    async def _retry(
        self,
        run: Run,
        ctx: TriggerContext,
        info: TaskInfo | None,
        plan: RetryPlan,
        entry: dict[str, Any],
    ) -> dict[str, Any]:
        assert self.store is not None and ctx.task_id is not None
        store = self.store
        loop = asyncio.get_running_loop()
        action = plan.action
        if action.same_arguments:
            resolved, meta = await loop.run_in_executor(
                self._send_pool,
                lambda: self._retry_sender().resolve(
                    ctx.task_id or "",
                    event_args=ctx.args,
                    event_kwargs=ctx.kwargs,
                    exact=info.exact if info is not None else None,
                ),
            )
            args, kwargs, args_source = resolved.args, resolved.kwargs, resolved.source
        else:
            meta = None
            args, kwargs, args_source = list(action.args or []), dict(action.kwargs or {}), "action"
        name = ctx.task_name or (meta or {}).get("name")
        if not name:
            raise RetryRefused(
                "task name unknown: no task-received/task-sent event was seen and "
                "no result backend holds it"
            )
        sent_to = self.chains.member(ctx.task_id)
        if action.queue:
            queue, queue_source = action.queue, "action"
        elif sent_to is not None and sent_to.queue:
            queue, queue_source = sent_to.queue, "chain"
        elif ctx.queue:
            queue, queue_source = ctx.queue, ctx.queue_source or "event"
        elif meta is not None and meta.get("queue"):
            queue, queue_source = str(meta["queue"]), "result_backend"
        else:
            queue, queue_source = self.settings.default_queue, "default_queue"
        new_id = str(uuid.uuid4())
        root = ctx.root_id or ctx.task_id
        delay = action.delay_for(plan.attempt)
        detail = {
            "task_id": new_id,
            "attempt": plan.attempt,
            "delay_seconds": delay,
            "queue": queue,
            "queue_source": queue_source,
            "args_source": args_source,
            "parent_id": ctx.task_id,
            "root_id": root,
        }
        entry["detail"] = detail
        entry["status"] = "sending"
        sent_at = self.clock()
        failed_id = ctx.task_id
        failed_state = "FAILURE" if ctx.trigger == "task.failed" else "ORPHANED"

        def record() -> None:
            # Written before the publish: after a crash the run reads interrupted and the
            # chain row keeps the task from being retried a second time.
            with store.db.atomic():
                if self.chains.member(failed_id) is None:
                    store.upsert_chain_task(
                        task_id=failed_id,
                        parent_id=None,
                        root_id=root,
                        task_name=name,
                        attempt=0,
                        workflow="",
                        sent_at=None,
                        state=failed_state,
                    )
                store.upsert_chain_task(
                    task_id=new_id,
                    parent_id=failed_id,
                    root_id=root,
                    task_name=name,
                    attempt=plan.attempt,
                    workflow=run.workflow,
                    run_id=run.id,
                    sent_at=sent_at,
                    state="SENDING",
                    queue=queue,
                )
                store.update_run(run)

        await self._db(record)
        self.chains.add_retry(failed_id, new_id, root, plan.attempt, queue)
        headers = {"workflowd_workflow": run.workflow, "workflowd_attempt": plan.attempt}
        try:
            await loop.run_in_executor(
                self._send_pool,
                lambda: self._retry_sender().send(
                    name=name,
                    args=args,
                    kwargs=kwargs,
                    task_id=new_id,
                    root_id=root,
                    parent_id=failed_id,
                    countdown=delay,
                    queue=queue,
                    headers=headers,
                ),
            )
        except Exception as exc:
            self.db_later(lambda: store.set_chain_state(new_id, "SEND_FAILED"))
            self.chains.state(new_id, "SEND_FAILED")
            raise ActionError(f"sending the retry failed: {type(exc).__name__}: {exc}") from exc
        self.db_later(lambda: store.set_chain_state(new_id, "SENT"))
        if ctx.trigger == "task.orphaned" and run.id is not None:
            index = next(i for i, a in enumerate(run.actions) if a is entry)
            self.orphan_retries[failed_id] = (new_id, run.id, index)
            self.chains.follow(failed_id)
        log.info(
            "retry sent",
            workflow=run.workflow,
            task_id=failed_id,
            retry_id=new_id,
            attempt=plan.attempt,
            delay=delay,
            queue=queue,
            queue_source=queue_source,
        )
        return detail

    def _revoke_retry(self, orphan_id: str, retry_id: str, run_id: int, index: int) -> None:
        assert self.store is not None
        store = self.store
        self.chains.state(retry_id, "REVOKED")
        self.watch.discard(orphan_id)
        note = "revoked: Celery redelivered the orphaned task itself"

        def revoke() -> None:
            self._retry_sender().app.control.revoke(retry_id)

        def record() -> None:
            store.set_chain_state(retry_id, "REVOKED")
            store.annotate_action(run_id, index, "revoked", note)

        fut = self._send_pool.submit(revoke)
        fut.add_done_callback(_log_db_error)
        self.db_later(record)
        log.warning(
            "orphaned task redelivered by Celery; its retry is revoked",
            task_id=orphan_id,
            retry_id=retry_id,
        )

    # --- circuit breaker ------------------------------------------------------------------

    def _persist_breaker(self, name: str, b: Breaker) -> None:
        b.dirty = False
        if self.store is not None:
            store, state, opened, n = self.store, b.state, b.opened_at, b.suppressed
            self.db_later(lambda: store.save_breaker(name, state, opened, n))

    def _breaker_notice(self, lw: LoadedWorkflow, *, opened: bool, suppressed: int) -> None:
        wf = lw.workflow
        cb = wf.circuit_breaker
        if opened:
            text = (
                f"workflowd: circuit breaker OPEN for workflow '{wf.name}': "
                f"{cb.max_executions} executions within {cb.time_window_hours:g} h reached; "
                "further triggers are suppressed"
            )
        else:
            text = (
                f"workflowd: circuit breaker CLOSED for workflow '{wf.name}': "
                f"{suppressed} trigger(s) were suppressed while it was open"
            )
        log.warning(
            "circuit breaker " + ("opened" if opened else "closed"),
            workflow=wf.name,
            limit=cb.max_executions,
            window_hours=cb.time_window_hours,
            suppressed=suppressed,
        )
        target = self.settings.circuit_breaker_notification or next(
            (a for a in wf.all_actions if not isinstance(a, model.RetryAction)), None
        )
        if target is None:
            return
        if isinstance(target, model.SlackAction):
            body: dict[str, Any] = {"text": text}
        else:
            body = {
                "event": "circuit_breaker.open" if opened else "circuit_breaker.closed",
                "workflow": wf.name,
                "limit": cb.max_executions,
                "window_hours": cb.time_window_hours,
                "suppressed": suppressed,
                "text": text,
            }
        request = notify.request_for(target, {}, body=body)
        redact = self.snapshot.redactor

        async def post() -> None:
            try:
                await notify.send(self._client(), request)
            except DeliveryError as exc:
                log.error(
                    "circuit breaker notification failed", workflow=wf.name, error=redact(str(exc))
                )

        task = asyncio.get_running_loop().create_task(post())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def check_breakers(self) -> None:
        now = self.clock()
        for name, b in self.breakers.items():
            if b.state != "open":
                continue
            lw = self.snapshot.workflows.get(name)
            if lw is None:
                continue
            cb = lw.workflow.circuit_breaker
            b.prune(now, cb.window_seconds)
            if len(b.window) < cb.max_executions:
                suppressed = b.suppressed
                b.state, b.opened_at, b.suppressed = "closed", None, 0
                self.metrics.circuit_open.labels(name).set(0)
                self._persist_breaker(name, b)
                self._breaker_notice(lw, opened=False, suppressed=suppressed)
            elif b.dirty:
                self._persist_breaker(name, b)

    def _flush_breakers(self) -> None:
        for name, b in self.breakers.items():
            if b.dirty:
                self._persist_breaker(name, b)

    async def _housekeeping(self) -> None:
        last_prune = last_forget = 0.0
        while True:
            self.check_breakers()
            now = self.clock()
            if now - last_forget > FORGET_EVERY_SECONDS:
                last_forget = now
                self.chains.prune()
                for orphan in [o for o in self.orphan_retries if self.chains.member(o) is None]:
                    del self.orphan_retries[orphan]
            if now - last_prune > PRUNE_EVERY_SECONDS and self.store is not None:
                last_prune = now
                store = self.store
                cutoff = now - self.settings.history_retention_days * 86400
                pruned = await self._db(functools.partial(store.prune, cutoff))
                if pruned:
                    log.info("history pruned", rows=pruned)
            await asyncio.sleep(BREAKER_CHECK_SECONDS)

    # --- introspection (status) -----------------------------------------------------------

    def breaker_summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, b in list(self.breakers.items()):
            out[name] = {"state": b.state, "count": len(b.window), "suppressed": b.suppressed}
        return out


def _index(snapshot: Snapshot) -> dict[str, list[LoadedWorkflow]]:
    idx: dict[str, list[LoadedWorkflow]] = {}
    for lw in snapshot.workflows.values():
        if lw.workflow.enabled:
            idx.setdefault(lw.workflow.trigger.event, []).append(lw)
    return idx


def _log_db_error(fut: concurrent.futures.Future[Any]) -> None:
    exc = fut.exception()
    if exc is not None:
        log.error("history write failed", error=f"{type(exc).__name__}: {exc}")
