"""Real subprocesses for integration tests: ``redis-server`` and Celery workers.

Everything listens on / connects to 127.0.0.1 only and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "REPO_ROOT",
    "CeleryWorker",
    "RedisServer",
    "descendant_pids",
    "free_port",
    "group_pids",
    "pid_alive",
    "wait_for",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises :class:`TimeoutError` if it stays falsy for ``timeout`` seconds.
    Exceptions raised by the predicate propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """Return ``(state, ppid, pgrp)`` of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces/parens: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _live_procs() -> list[tuple[int, int, int]]:
    """``(pid, ppid, pgrp)`` of every live (non-zombie) process."""
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                procs.append((int(entry), stat[1], stat[2]))
    return procs


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (zombies count as dead)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendant_pids(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children, grandchildren...), from a /proc scan."""
    children: dict[int, list[int]] = {}
    for child, ppid, _pgrp in _live_procs():
        children.setdefault(ppid, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def group_pids(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    return [pid for pid, _ppid, pgrp in _live_procs() if pgrp == pgid]


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_proc(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait (bounded) for ``proc``; True if it exited."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A real ``redis-server`` subprocess bound to 127.0.0.1 on a free port.

    ``extra_args`` are appended to the command line verbatim, e.g.
    ``["--client-output-buffer-limit", "pubsub 1mb 1mb 0"]``.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        executable: str | None = None,
        databases: int = 16,
    ) -> None:
        self._auto_port = port is None
        self.port: int = port if port is not None else free_port()
        self.extra_args = list(extra_args)
        self.databases = databases
        exe = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.executable = exe
        self._tmp = tempfile.TemporaryDirectory(prefix="wfd-redis-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- info --------------------------------------------------------------------------
    @staticmethod
    def available(executable: str | None = None) -> bool:
        exe = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        return os.access(exe, os.X_OK)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, db: int = 0) -> str:
        return f"redis://{LOCALHOST}:{self.port}/{db}"

    def client(self, db: int = 0, *, retries: int | None = None, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for ``db`` (2 s socket timeouts by default).

        ``retries=N`` replaces redis-py's default retry policy (exponential backoff,
        several seconds against a dead server) by N immediate retries.
        """
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        if retries is not None:
            kwargs["retry"] = Retry(NoBackoff(), retries)
        return redis.Redis(host=LOCALHOST, port=self.port, db=db, **kwargs)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------
    def _command(self) -> list[str]:
        return [
            self.executable,
            "--save", "",
            "--appendonly", "no",
            "--bind", LOCALHOST,
            "--port", str(self.port),
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--databases", str(self.databases),
            *self.extra_args,
        ]  # fmt: skip

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115  # closed in stop()
        self._proc = subprocess.Popen(
            self._command(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING. Returns self."""
        if self.running:
            return self
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                self.wait_ready(timeout)
                return self
            except (TimeoutError, RuntimeError):
                self.stop()
                if attempt + 1 == attempts:
                    raise
                # The port we picked may have been taken meanwhile: pick another one.
                self.port = free_port()
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until the server answers PING."""

        def ready() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self.port} is not running:\n{self.log_text()[-2000:]}"
                )
            client = self.client(retries=0, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False
            finally:
                client.close()

        wait_for(ready, timeout, interval=0.05, message=f"redis-server PING on port {self.port}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, bounded wait, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if not _wait_proc(proc, timeout):
                _killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                _wait_proc(proc, 5.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the *same* port (data is not persisted)."""
        self.stop()
        self._spawn()
        self.wait_ready(timeout)

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url()} pid={self.pid}>"


# --------------------------------------------------------------------------- celery worker


_worker_seq = itertools.count(1)


class CeleryWorker:
    """A real ``celery -A tests.celeryapp worker`` subprocess.

    Started in its own session/process group with task events on (``-E``),
    ``--without-mingle --without-gossip``; stdout/stderr go to ``log_path``.
    ``heartbeat`` is the worker's *event* heartbeat interval in seconds (float ok);
    None keeps Celery's default of 2 s.
    """

    def __init__(
        self,
        broker_url: str,
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
        env: Mapping[str, str] | None = None,
        app_module: str = "tests.celeryapp",
    ) -> None:
        from celery.utils.nodenames import default_nodename, host_format

        if name is None:
            name = f"w{next(_worker_seq)}-{secrets.token_hex(3)}@%h"
        self.nodename_arg = name
        self._hostname: str = host_format(default_nodename(name))
        self.broker_url = broker_url
        self.backend_url = backend_url
        self.concurrency = concurrency
        self.pool = pool
        self.queues = list(queues)
        self.heartbeat = heartbeat
        self.result_extended = result_extended
        self.loglevel = loglevel
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.app_module = app_module
        self._tmp = tempfile.TemporaryDirectory(prefix="wfd-worker-")
        self.log_path = Path(self._tmp.name) / "worker.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: Any = None

    # -- info ----------------------------------------------------------------------------
    @property
    def hostname(self) -> str:
        """Full node name, e.g. ``w1-1a2b3c@myhost``."""
        return self._hostname

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def pids(self) -> list[int]:
        """Main worker pid followed by all its live descendants (pool processes)."""
        if self._proc is None:
            return []
        return [self._proc.pid, *descendant_pids(self._proc.pid)]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def client(self) -> Any:
        """A Celery client app bound to this worker's broker (used for ping)."""
        if self._client is None:
            from tests.celeryapp import make_app

            self._client = make_app(self.broker_url, self.backend_url)
        return self._client

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "celery",
            "-A", self.app_module,
            "worker",
            "-E",
            "--pool", self.pool,
            "-c", str(self.concurrency),
            "-n", self.nodename_arg,
            "-Q", ",".join(self.queues),
            "--without-mingle",
            "--without-gossip",
            "-l", self.loglevel,
        ]  # fmt: skip
        cmd.extend(self.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        from tests.celeryapp import (
            BACKEND_ENV,
            BROKER_ENV,
            HEARTBEAT_ENV,
            RESULT_EXTENDED_ENV,
        )

        env = dict(os.environ)
        for key in (BROKER_ENV, BACKEND_ENV, RESULT_EXTENDED_ENV, HEARTBEAT_ENV):
            env.pop(key, None)
        pythonpath = [str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env["PYTHONUNBUFFERED"] = "1"
        env[BROKER_ENV] = self.broker_url
        if self.backend_url:
            env[BACKEND_ENV] = self.backend_url
        if self.result_extended is not None:
            env[RESULT_EXTENDED_ENV] = "1" if self.result_extended else "0"
        if self.heartbeat is not None:
            env[HEARTBEAT_ENV] = repr(float(self.heartbeat))
        env.update(self.extra_env)
        return env

    # -- lifecycle -----------------------------------------------------------------------
    def ping(self, timeout: float = 0.5) -> bool:
        """True if the worker answers a broadcast ``ping`` within ``timeout``."""
        try:
            replies = self.client.control.ping(destination=[self.hostname], timeout=timeout)
        except Exception:  # broker briefly unreachable etc.
            return False
        return any(self.hostname in reply for reply in replies or [])

    def start(self, timeout: float = 30.0) -> CeleryWorker:
        """Spawn the worker and wait (bounded) until it answers ping. Returns self."""
        if self.running:
            return self
        self._log = open(self.log_path, "ab")  # noqa: SIM115  # closed in stop()
        self._proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(
                    f"celery worker {self.hostname} exited with {self.returncode}:\n"
                    f"{self.log_text()[-4000:]}"
                )
            return self.ping()

        try:
            wait_for(ready, timeout, interval=0.1, message=f"celery worker {self.hostname} ping")
        except TimeoutError as exc:
            log = self.log_text()[-4000:]
            self.kill9()
            raise TimeoutError(f"{exc}\n--- worker log ---\n{log}") from None
        return self

    def terminate(self) -> None:
        """Send SIGTERM (warm shutdown) without waiting; follow with :meth:`stop`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown: SIGTERM, bounded wait, then SIGKILL of the whole group."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if not _wait_proc(proc, timeout):
                    _killpg(proc.pid, signal.SIGKILL)
                    _wait_proc(proc, 5.0)
            # Pool children that outlived the main process (still in its group).
            if group_pids(proc.pid):
                _killpg(proc.pid, signal.SIGKILL)
        self._finish()

    def kill9(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL the main process and all pool children at once (no worker-offline).

        Returns the pids that were killed; waits (bounded) until none is alive.
        """
        proc = self._proc
        if proc is None:
            return []
        pids = self.pids()
        # Freeze everything first so that no process can react (or fork) meanwhile.
        _killpg(proc.pid, signal.SIGSTOP)
        pids = list(dict.fromkeys([*pids, *descendant_pids(proc.pid)]))
        _killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        _wait_proc(proc, timeout)
        wait_for(
            lambda: not any(pid_alive(pid) for pid in pids),
            timeout,
            message=f"processes {pids} of {self.hostname} to die",
        )
        self._finish()
        return pids

    def _finish(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def cleanup(self) -> None:
        """Stop if running and remove the temp dir (log included)."""
        if self.running:
            self.stop()
        else:
            self._finish()
        self._tmp.cleanup()

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<CeleryWorker {self.hostname} pid={self.pid} broker={self.broker_url}>"
