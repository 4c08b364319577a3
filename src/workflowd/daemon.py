"""``workflowd run``: wire loader, intake, state and engine together; signals, reload, systemd."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
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

SHUTDOWN_BUDGET = 8.0
STATUS_EVERY = 5.0


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


class Daemon:
    def __init__(self, settings: Settings, *, redact: logs.Redact | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.redact = redact or logs.Redact()
        self.snapshot = loader.load_paths([settings.workflows_dir])
        self._fingerprint = fingerprint([settings.workflows_dir])
        self.last_reload: dict[str, Any] = {}
        self._note_reload(self.snapshot, time.time())
        self.engine = Engine(settings, self.snapshot, metrics=self.metrics)
        self.state = ClusterState(
            self.engine.submit, worker_timeout=settings.worker_timeout_seconds
        )
        self.state.watch = self.engine.watch
        self.state.on_state = self.engine.task_state
        self.state.set_thresholds(_thresholds(self.snapshot))
        self._pending_thresholds: tuple[float, ...] | None = None
        self.intake = Intake(
            settings,
            self.state,
            self.metrics,
            on_connected=self._on_connected,
            on_tick=self._on_tick,
        )
        self.metrics.watch_state(self._state_numbers)
        self._ready_sent = False
        self._watchdog = sdnotify.watchdog_interval()
        self._next_watchdog = 0.0
        self._next_status = 0.0
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
        fp = fingerprint([self.settings.workflows_dir])
        if fp == self._fingerprint and not force:
            return False
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={sdnotify.monotonic_usec()}")
        snap = loader.load_paths([self.settings.workflows_dir], previous=self.snapshot)
        self._fingerprint = fp
        old = self.snapshot
        self.snapshot = snap
        self.engine.set_snapshot(snap)
        self._pending_thresholds = _thresholds(snap)
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
        )
        self._publish_status()
        sdnotify.notify("READY=1\n" + self._status_line())
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
        if not self._ready_sent:
            self._ready_sent = True
            sdnotify.notify("READY=1\n" + self._status_line())
            log.info("ready", workflows=len(self.snapshot.workflows))

    def _on_tick(self) -> None:
        if self._pending_thresholds is not None:
            self.state.set_thresholds(self._pending_thresholds)
            self._pending_thresholds = None
        now = time.monotonic()
        if self._watchdog is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog
            sdnotify.notify("WATCHDOG=1")
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY
            self._publish_status()

    def _status_line(self) -> str:
        r = self.last_reload
        ok = "ok" if r.get("success") else f"{len(r.get('errors', []))} error(s)"
        n = len(self.snapshot.workflows)
        return f"STATUS={n} workflows loaded; last reload {r.get('at')}: {ok}"

    def _state_numbers(self) -> dict[str, Any]:
        return {
            "events_by_type": dict(self.state.counts),
            "malformed": self.state.malformed,
            "tasks": len(self.state.tasks),
            "workers": sum(1 for w in list(self.state.workers.values()) if w.online),
        }

    def status(self) -> dict[str, Any]:
        breakers = self.engine.breaker_summary()
        return {
            "pid": os.getpid(),
            "updated_at": history.iso(time.time()),
            "broker_connected": self.intake.connected,
            "intake_gaps": self.intake.gaps,
            "last_reload": self.last_reload,
            "workflows": [
                {
                    "name": lw.name,
                    "version": lw.version,
                    "file": lw.file,
                    "line": lw.line,
                    "trigger": lw.workflow.trigger.event,
                    "enabled": lw.workflow.enabled,
                    "circuit_breaker": {
                        **breakers.get(lw.name, {"state": "closed", "count": 0, "suppressed": 0}),
                        "limit": lw.workflow.circuit_breaker.max_executions,
                        "window_hours": lw.workflow.circuit_breaker.time_window_hours,
                    },
                }
                for lw in sorted(self.snapshot.workflows.values(), key=lambda w: w.name)
            ],
        }

    def _publish_status(self) -> None:
        store = self.engine.store
        if store is None:
            return
        status = self.status()
        self.engine.db_later(lambda: history.set_meta(store, "status", status))

    # --- metrics endpoint ------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        address = self.settings.metrics_address
        if not address:
            return
        host, _, port = address.rpartition(":")
        daemon = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body = generate_latest(daemon.metrics.registry)
                    self._reply(200, body, CONTENT_TYPE_LATEST)
                elif self.path.split("?")[0] == "/healthz":
                    alive = time.monotonic() - daemon.intake.last_loop < 10
                    text = b"ok\n" if alive else b"intake loop stalled\n"
                    self._reply(200 if alive else 503, text, "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

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
        def on_stop(signum: int, _: Any) -> None:
            log.info("stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        def on_hup(_: int, __: Any) -> None:
            self.reload_event.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def run(self) -> int:
        self._signals()
        self.engine.start()
        self._serve_metrics()
        self._publish_status()
        reloader = threading.Thread(target=self._reloader, name="workflowd-reload", daemon=True)
        reloader.start()
        try:
            self.intake.run(self.stop_event)
        finally:
            sdnotify.notify("STOPPING=1")
            log.info("stopping: intake closed, finishing running actions")
            self.stop_event.set()
            self.engine.stop(SHUTDOWN_BUDGET)
            self.intake.close()
            if self._http is not None:
                self._http.shutdown()
            log.info("stopped")
        return 0


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
