"""``workflowd run``: wire loader, intake, state and engine together; signals, reload, systemd.

Threads: the main thread supervises (signals, watchdog, status, shutdown); event
intake, the engine's event loop, the reload poller and the metrics server each run
in their own thread. The watchdog is fed by the main thread only while intake and
engine show signs of life, so it keeps coming while the broker is down (intake is
busy reconnecting then) but stops when a loop hangs.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workflowd import history, loader, logs, sdnotify
from workflowd.engine import Engine
from workflowd.intake import Intake
from workflowd.metrics import Metrics
from workflowd.settings import Settings
from workflowd.state import ClusterState

log = structlog.get_logger("workflowd")

# SPEC §4: exit within 10 s of SIGTERM. Running actions get DRAIN_BUDGET; the
# engine then needs up to ~2 s to record the rest as interrupted.
SHUTDOWN_DEADLINE = 10.0
DRAIN_BUDGET = 6.0
INTAKE_JOIN = 2.0
STATUS_EVERY = 5.0
LOOP_SECONDS = 0.25
# A loop that shows no sign of life for this long is hung: the watchdog is no
# longer fed and /healthz answers 503. Above the intake's 10 s socket timeout.
STALL_SECONDS = 15.0


def fingerprint(paths: list[Path]) -> str:
    """Content hash of every workflow file: catches edits, renames and symlink swaps."""
    h = hashlib.sha256()
    for p in loader.discover(paths):
        h.update(str(p).encode())
        try:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        except OSError as exc:
            h.update(repr(exc).encode())
    return h.hexdigest()


def liveness(
    now: float,
    *,
    intake_running: bool,
    connected: bool,
    intake_last_loop: float,
    engine_running: bool,
    engine_last_beat: float,
    stall: float = STALL_SECONDS,
) -> str | None:
    """None when the daemon is alive, else what is wrong.

    A broker outage is not a liveness problem: intake is then busy reconnecting
    with backoff, and restarting the daemon would not bring the broker back.
    """
    if not engine_running:
        return "engine stopped"
    if now - engine_last_beat > stall:
        return f"engine loop unresponsive for {now - engine_last_beat:.0f}s"
    if not intake_running:
        return "event intake stopped"
    if connected and now - intake_last_loop > stall:
        return f"event intake stalled for {now - intake_last_loop:.0f}s"
    return None


class Daemon:
    def __init__(self, settings: Settings, *, redact: logs.Redact | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.redact = redact or logs.Redact()
        # hash first, then load: an edit in between makes the next poll reload
        self._fingerprint = fingerprint([settings.workflows_dir])
        self.snapshot = loader.load_paths([settings.workflows_dir])
        self.last_reload: dict[str, Any] = {}
        self._note_reload(self.snapshot, time.time())
        self.engine = Engine(settings, self.snapshot, metrics=self.metrics)
        self.state = ClusterState(
            self.engine.submit, worker_timeout=settings.worker_timeout_seconds
        )
        self.state.watch = self.engine.watch
        self.state.on_state = self.engine.task_state
        # written by reloads, applied by the intake thread (the state is its own)
        self._wanted_thresholds = _thresholds(self.snapshot)
        self._applied_thresholds = self._wanted_thresholds
        self.state.set_thresholds(self._applied_thresholds)
        self.intake = Intake(
            settings,
            self.state,
            self.metrics,
            on_connected=self._on_connected,
            on_tick=self._on_tick,
        )
        self.metrics.watch_state(self._state_numbers)
        # READY=1 and the RELOADING=1/READY=1 pairs of reloads never interleave
        self._lifecycle = threading.Lock()
        self._ready_sent = False
        self._subscribing = False
        self._watchdog = sdnotify.watchdog_interval()
        self._stop_signal: int | None = None
        self._hup = False
        self._exit_code = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._intake_thread: threading.Thread | None = None
        self._intake_error: BaseException | None = None
        self._engine_beat = time.monotonic()
        self._main_beat = time.monotonic()
        self._problem: str | None = None
        self._status_sent = ""
        self._exported_breakers: set[str] = set()
        self._http: http.server.ThreadingHTTPServer | None = None

    # --- reload -------------------------------------------------------------------

    def _note_reload(self, snap: loader.Snapshot, now: float) -> None:
        self.redact.redactor = snap.redactor
        errors = snap.errors
        self.last_reload = {
            "at": history.iso(now),
            "success": not errors,
            "errors": [str(i) for i in errors],
            "held": sorted(snap.held),
            "workflows": len(snap.workflows),
        }
        self.metrics.reload_success.set(0 if errors else 1)
        if not errors:
            self.metrics.reload_time.set(now)
        self.metrics.file_errors.set(sum(1 for r in snap.files.values() if not r.ok))
        self.metrics.workflows_loaded.set(len(snap.workflows))
        for issue in errors:
            self.metrics.reload_errors.inc()
            log.error(
                "workflow file failed to load",
                file=issue.file,
                line=issue.line,
                column=issue.column,
                key=issue.key,
                message=issue.message,
                kept_last_good=issue.file in snap.held,
                error=str(issue),
            )
        for issue in snap.warnings:
            log.warning(
                "workflow file warning",
                file=issue.file,
                line=issue.line,
                key=issue.key,
                message=issue.message,
            )

    def reload(self, *, force: bool = False) -> bool:
        """Reload when a file changed (or ``force``, for SIGHUP); True when it reloaded."""
        fp = fingerprint([self.settings.workflows_dir])
        if fp == self._fingerprint and not force:
            return False
        with self._lifecycle:
            ready = self._ready_sent
            if ready:
                sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={sdnotify.monotonic_usec()}")
            snap = loader.load_paths([self.settings.workflows_dir], previous=self.snapshot)
            self._fingerprint = fp
            old = self.snapshot
            self.snapshot = snap
            self.engine.set_snapshot(snap)
            self._wanted_thresholds = _thresholds(snap)
            self._note_reload(snap, time.time())
            changed = sorted(
                name
                for name, lw in snap.workflows.items()
                if name not in old.workflows or old.workflows[name].version != lw.version
            )
            removed = sorted(set(old.workflows) - set(snap.workflows))
            log.info(
                "workflows reloaded",
                workflows=len(snap.workflows),
                changed=changed,
                removed=removed,
                errors=len(snap.errors),
                held=sorted(snap.held),
                forced=force,
            )
            self._publish_status()
            if ready:
                self._status_sent = self._status_line()
                sdnotify.notify(f"READY=1\nSTATUS={self._status_sent}")
        return True

    def _reloader(self) -> None:
        interval = self.settings.reload_interval_seconds
        while not self.stop_event.is_set():
            forced = self.reload_event.wait(interval)
            if self.stop_event.is_set():
                break
            self.reload_event.clear()
            try:
                self.reload(force=forced)
            except Exception:
                log.exception("reload failed; the previous workflows keep running")

    # --- intake callbacks (intake thread) ------------------------------------------------

    def _on_connected(self) -> None:
        # The consumer is declared, but on Redis kombu sends PSUBSCRIBE only when it
        # first polls: READY=1 waits for the first tick, which follows a poll.
        self._subscribing = True

    def _on_tick(self) -> None:
        # cluster state belongs to the intake thread: thresholds change here
        wanted = self._wanted_thresholds
        if wanted is not self._applied_thresholds:
            self.state.set_thresholds(wanted)
            self._applied_thresholds = wanted
        if self._subscribing:
            self._subscribing = False
            self._send_ready()

    def _send_ready(self) -> None:
        with self._lifecycle:
            if self._ready_sent:
                return
            self._ready_sent = True
            self._status_sent = self._status_line(connected=True)
            sdnotify.notify(f"READY=1\nSTATUS={self._status_sent}")
        log.info("ready", workflows=len(self.snapshot.workflows))

    # --- status ------------------------------------------------------------------------

    def _status_line(self, *, connected: bool | None = None) -> str:
        r = self.last_reload
        ok = "ok" if r.get("success") else f"{len(r.get('errors', []))} error(s)"
        n = len(self.snapshot.workflows)
        if connected is None:
            connected = self.intake.connected
        broker = "broker connected" if connected else "broker disconnected, reconnecting"
        text = f"{n} workflows loaded; {broker}; last reload {r.get('at')}: {ok}"
        if self._problem:
            text += f"; unhealthy: {self._problem}"
        return text

    def _state_numbers(self) -> dict[str, Any]:
        return {
            "events_by_type": dict(self.state.counts),
            "malformed": self.state.malformed,
            "tasks": len(self.state.tasks),
            "workers": sum(1 for w in list(self.state.workers.values()) if w.online),
        }

    def status(self) -> dict[str, Any]:
        breakers = self.engine.breaker_summary()
        snap = self.snapshot
        return {
            "pid": os.getpid(),
            "updated_at": history.iso(time.time()),
            "broker_connected": self.intake.connected,
            "intake_gaps": self.intake.gaps,
            "healthy": self._problem is None,
            "problem": self._problem,
            "last_reload": self.last_reload,
            "workflows": [
                loader.summary(
                    lw,
                    snap,
                    breakers.get(lw.name, {"state": "closed", "count": 0, "suppressed": 0}),
                )
                for lw in sorted(snap.workflows.values(), key=lambda w: w.name)
            ],
        }

    def _publish_status(self) -> None:
        store = self.engine.store
        if store is None or self.stop_event.is_set():
            return
        status = self.status()
        with contextlib.suppress(RuntimeError):  # the store is closing
            self.engine.db_later(lambda: history.set_meta(store, "status", status))

    # --- health --------------------------------------------------------------------------

    def _engine_alive(self) -> bool:
        thread = self.engine._thread
        return thread is not None and thread.is_alive() and self.engine.error is None

    def _intake_alive(self) -> bool:
        thread = self._intake_thread
        return thread is not None and thread.is_alive()

    def health(self, now: float | None = None) -> str | None:
        """None when alive, else what is wrong (for the watchdog and /healthz)."""
        now = time.monotonic() if now is None else now
        problem = liveness(
            now,
            intake_running=self._intake_alive(),
            connected=self.intake.connected,
            intake_last_loop=self.intake.last_loop,
            engine_running=self._engine_alive(),
            engine_last_beat=self._engine_beat,
        )
        if problem is None and now - self._main_beat > STALL_SECONDS:
            problem = f"main loop unresponsive for {now - self._main_beat:.0f}s"
        return problem

    def _beat(self) -> None:
        self._engine_beat = time.monotonic()

    def _ask_engine_for_a_beat(self) -> None:
        loop = self.engine._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(self._beat)

    # --- metrics endpoint ------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        address = self.settings.metrics_address
        if not address:
            return
        host, _, port = address.rpartition(":")
        daemon = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body = generate_latest(daemon.metrics.registry)
                    self._reply(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    problem = daemon.health()
                    if problem is None:
                        self._reply(200, b"ok\n", "text/plain; charset=utf-8")
                    else:
                        self._reply(503, f"{problem}\n".encode(), "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"not found\n", "text/plain; charset=utf-8")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(
            (host.strip("[]") or "127.0.0.1", int(port)), Handler
        )
        self._http.daemon_threads = True
        threading.Thread(
            target=self._http.serve_forever, name="workflowd-metrics", daemon=True
        ).start()
        log.info("metrics served", address=address)

    # --- main ---------------------------------------------------------------------------------

    def _signals(self) -> None:
        # Handlers only set plain attributes: the main thread may hold any lock when
        # a signal arrives, so taking one here could deadlock. The wakeup fd ends the
        # main loop's wait at once, so SIGHUP and SIGTERM act without delay.
        self._wake_r, wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

        def on_stop(signum: int, _: Any) -> None:
            if self._stop_signal is None:
                self._stop_signal = signum

        def on_hup(_: int, __: Any) -> None:
            self._hup = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _run_intake(self) -> None:
        try:
            self.intake.run(self.stop_event)
        except BaseException as exc:
            self._intake_error = exc
            log.exception("event intake stopped on an error")

    def _supervise(self) -> int:
        """The main loop: watchdog, status, and what the signal handlers asked for."""
        next_watchdog = 0.0
        next_status = 0.0
        self._engine_beat = time.monotonic()  # startup time is not a stall
        while True:
            now = time.monotonic()
            self._main_beat = now
            if self._stop_signal is not None:
                log.info("stopping", signal=signal.Signals(self._stop_signal).name)
                return 0
            if self._hup:
                self._hup = False
                self.reload_event.set()
            if not self._intake_alive():
                log.error("event intake thread ended; exiting", error=repr(self._intake_error))
                return 1
            if not self._engine_alive():
                log.error("engine thread ended; exiting", error=repr(self.engine.error))
                return 1
            self._ask_engine_for_a_beat()
            problem = self.health(now)
            if problem != self._problem:
                if problem is None:
                    log.info("healthy again; feeding the watchdog")
                else:
                    log.error("unhealthy; not feeding the watchdog", problem=problem)
                self._problem = problem
            if self._watchdog is not None and now >= next_watchdog and problem is None:
                next_watchdog = now + self._watchdog
                sdnotify.notify("WATCHDOG=1")
            self._notify_status()
            if now >= next_status:
                next_status = now + STATUS_EVERY
                self._publish_status()
                self._export_breakers()
            wake = now + LOOP_SECONDS
            if self._watchdog is not None and problem is None:
                wake = min(wake, next_watchdog)
            self._sleep(max(0.0, wake - time.monotonic()))

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when a signal arrives."""
        if self._wake_r is None:
            time.sleep(seconds)
            return
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], seconds)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(512):
                pass

    def _notify_status(self) -> None:
        """Tell systemd when the one-line status changed (broker lost, health...)."""
        if not self._ready_sent or not self._lifecycle.acquire(blocking=False):
            return  # before READY, or a reload is telling it right now
        try:
            line = self._status_line()
            if line != self._status_sent:
                self._status_sent = line
                sdnotify.notify(f"STATUS={line}")
        finally:
            self._lifecycle.release()

    def _export_breakers(self) -> None:
        """Circuit state gauges for every loaded workflow (0 too, so alerts see it);
        a removed workflow's series goes away with it."""
        summary = self.engine.breaker_summary()
        names = set(self.snapshot.workflows)
        for name in names:
            state = summary.get(name, {}).get("state", "closed")
            self.metrics.circuit_open.labels(name).set(1 if state == "open" else 0)
        for name in self._exported_breakers - names:
            with contextlib.suppress(KeyError):
                self.metrics.circuit_open.remove(name)
        self._exported_breakers = names

    def run(self) -> int:
        self._signals()
        sdnotify.notify("STATUS=starting: opening the history database")
        self.engine.start()
        self._serve_metrics()
        self._publish_status()
        sdnotify.notify("STATUS=connecting to the broker")
        reloader = threading.Thread(target=self._reloader, name="workflowd-reload", daemon=True)
        reloader.start()
        self._intake_thread = threading.Thread(
            target=self._run_intake, name="workflowd-intake", daemon=True
        )
        self._intake_thread.start()
        self._exit_code = 1
        try:
            self._exit_code = self._supervise()
        finally:
            self._shutdown()
        return self._exit_code

    def _shutdown(self) -> None:
        started = time.monotonic()
        sdnotify.notify("STOPPING=1\nSTATUS=stopping: finishing running actions")
        # A last resort: whatever hangs (a broker publish, a thread at exit), the
        # process is gone within the deadline. Unfinished runs already read
        # "interrupted" in the history, and a restart never re-runs them.
        guard = threading.Timer(SHUTDOWN_DEADLINE - 0.5, _exit_now, [self._exit_code])
        guard.daemon = True
        guard.start()
        self.stop_event.set()
        if self._intake_thread is not None:
            self._intake_thread.join(INTAKE_JOIN)
        log.info("stopping: intake closed, finishing running actions")
        budget = max(1.0, DRAIN_BUDGET - (time.monotonic() - started))
        self.engine.stop(budget)
        self.intake.close()
        if self._http is not None:
            self._http.shutdown()
        signal.set_wakeup_fd(-1)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        log.info("stopped", seconds=round(time.monotonic() - started, 2))


def _exit_now(code: int) -> None:
    log.error("shutdown overran its deadline; exiting now", deadline_seconds=SHUTDOWN_DEADLINE)
    os._exit(code)


def _thresholds(snap: loader.Snapshot) -> tuple[float, ...]:
    return tuple(
        lw.workflow.trigger.threshold_seconds
        for lw in snap.workflows.values()
        if lw.workflow.enabled and lw.workflow.trigger.threshold_seconds is not None
    )


def run(settings: Settings, *, log_level: str = "info") -> int:
    redact = logs.Redact()
    logs.configure(log_level, redact=redact)
    return Daemon(settings, redact=redact).run()
