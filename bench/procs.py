"""Processes the benchmark runs and watches: redis-server, the consumers, /proc readings.

Every consumer is measured from outside: CPU time (user + system, all threads) and
peak RSS come from ``/proc/<pid>``; events handled come from a shared counter
(Celery's receivers) or from the daemon's own ``/metrics``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOCALHOST = "127.0.0.1"


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the bench dies, so nothing is left behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads included."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (every core)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already inside user/nice
    return (sum(fields) - idle - guest) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- redis


class Redis:
    """A private redis-server on a free loopback port, with Celery's default limits."""

    def __init__(self, extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.log_path = self.dir / "redis.log"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self) -> Redis:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        cmd = [exe, "--port", str(self.port), "--bind", LOCALHOST, "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.log_path),
               *self.extra_args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - it only calls prctl
        )
        wait_until(self._ping, 10, what=f"redis-server on port {self.port}")
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=5)

    def _ping(self) -> bool:
        try:
            c = self.client()
            try:
                return bool(c.ping())
            finally:
                c.close()
        except Exception:
            return False

    def version(self) -> str:
        c = self.client()
        try:
            return str(c.info("server")["redis_version"])
        finally:
            c.close()

    def dropped(self) -> int:
        """Clients redis closed for overrunning their output buffer (from its log)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count("for overcoming of output buffer limits")

    def pubsub_backlog(self, client: Any) -> int:
        """Largest output buffer (bytes) among pub/sub subscribers right now."""
        worst = 0
        for c in client.client_list(_type="pubsub"):
            worst = max(worst, int(c.get("omem", 0)))
        return worst

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- consumers


def _receiver_main(broker_url: str, mode: str, counter: Any, drops: Any) -> None:
    """(a) EventReceiver with a no-op handler; (b) the same feeding ``State`` as Flower does."""
    from celery import Celery

    app = Celery("bench-receiver", broker=broker_url, set_as_current=False)
    if mode == "state":
        # Flower 2.x: EventsState(State) with max_tasks_in_memory=10000, handler state.event
        state = app.events.State(max_tasks_in_memory=10_000, max_workers_in_memory=5_000)
        event = state.event

        def handler(e: dict[str, Any]) -> None:
            event(e)
            counter.value += 1

    else:

        def handler(e: dict[str, Any]) -> None:
            counter.value += 1

    while True:
        try:
            with app.connection_for_read() as conn:
                recv = app.events.Receiver(conn, handlers={"*": handler})
                recv.capture(limit=None, timeout=None, wakeup=False)
        except Exception:
            drops.value += 1  # redis dropped us (or went away): reconnect, as Flower does
            time.sleep(0.2)


class Consumer:
    """Common face of the three consumers under test."""

    label = ""
    pid: int

    def start(self) -> None: ...

    def counts(self) -> dict[str, int]:
        """Events handled so far, by type where the consumer tells types apart ("*" else)."""
        raise NotImplementedError

    def count(self) -> int:
        return sum(self.counts().values())

    def drops(self) -> int:
        raise NotImplementedError

    def stop(self) -> None: ...

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def extra(self) -> dict[str, Any]:
        return {}


class ReceiverConsumer(Consumer):
    def __init__(self, broker_url: str, mode: str) -> None:
        self.mode = mode
        self.label = "a" if mode == "noop" else "b"
        ctx = multiprocessing.get_context("spawn")
        self._count = ctx.RawValue("q", 0)
        self._drops = ctx.RawValue("q", 0)
        self.proc = ctx.Process(
            target=_receiver_main,
            args=(broker_url, mode, self._count, self._drops),
            daemon=True,
        )

    def start(self) -> None:
        self.proc.start()
        assert self.proc.pid is not None
        self.pid = self.proc.pid

    def counts(self) -> dict[str, int]:
        return {"*": int(self._count.value)}

    def drops(self) -> int:
        return int(self._drops.value)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


_METRIC = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if m:
            labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric_sum(metrics: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= set(lab))


class DaemonConsumer(Consumer):
    """(c) the real ``workflowd run`` subprocess with its config file, workflows and SQLite."""

    label = "c"

    def __init__(
        self,
        broker_url: str,
        workflows_dir: Path,
        *,
        env: dict[str, str] | None = None,
        profile: str | None = None,
        extra_config: dict[str, Any] | None = None,
        src: Path | None = None,
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-workflowd-"))
        self.port = free_port()
        self.metrics_url = f"http://{LOCALHOST}:{self.port}/metrics"
        self.database = self.tmp / "workflowd.db"
        self.config = self.tmp / "workflowd.yaml"
        config = {
            "workflows_dir": str(workflows_dir),
            "database": str(self.database),
            "broker_url": broker_url,
            "metrics_address": f"{LOCALHOST}:{self.port}",
            **(extra_config or {}),
        }
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = self.tmp / "workflowd.log"
        self.env = dict(env or {})
        self.profile = profile
        self.src = src  # run workflowd from this source tree instead of the installed one
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable]
        if self.profile:  # cProfile sees the main thread: the intake loop
            cmd += ["-m", "cProfile", "-o", self.profile]
        return [*cmd, "-m", "workflowd", "run", "--config", str(self.config)]

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKFLOWD_", "CELERY_"))}
        env.update({"WORKFLOWD_CONFIG": "", **self.env})
        env.pop("NOTIFY_SOCKET", None)
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.src), env.get("PYTHONPATH", "")) if p
            )
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.tmp),
            preexec_fn=die_with_parent,  # noqa: PLW1509 - it only calls prctl
        )
        self.pid = self.proc.pid

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"workflowd exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                scrape(self.metrics_url, timeout=1)
                return True
            except OSError:
                return False

        wait_until(up, 60, what=f"workflowd metrics on {self.metrics_url}\n{self.log_tail()}")

    def metrics(self) -> dict[Any, float]:
        return scrape(self.metrics_url)

    def counts(self) -> dict[str, int]:
        """``workflowd_events_total`` by type. Its task-sent count may include the events
        of retries the daemon sent itself; the bench caps each type at what it published."""
        out: dict[str, int] = {}
        for (name, labels), v in self.metrics().items():
            if name == "workflowd_events_total":
                kind = dict(labels).get("type", "?")
                out[kind] = out.get(kind, 0) + int(v)
        return out

    def drops(self) -> int:
        return int(metric_sum(self.metrics(), "workflowd_intake_gaps_total"))

    def extra(self) -> dict[str, Any]:
        m = self.metrics()
        runs: dict[str, float] = {}
        for (name, labels), v in m.items():
            if name == "workflowd_runs_total":
                outcome = dict(labels).get("outcome", "?")
                runs[outcome] = runs.get(outcome, 0) + v
        return {
            "runs": {k: int(v) for k, v in sorted(runs.items())},
            "triggers": int(metric_sum(m, "workflowd_triggers_total")),
            "tasks_tracked": int(metric_sum(m, "workflowd_tasks_tracked")),
            "retries_sent": int(
                metric_sum(
                    m, "workflowd_action_duration_seconds_count", type="retry", status="success"
                )
            ),
            "actions_failed": int(
                metric_sum(m, "workflowd_action_duration_seconds_count", status="failure")
            ),
            "circuits_open": int(metric_sum(m, "workflowd_circuit_open")),
            "malformed": int(metric_sum(m, "workflowd_events_malformed_total")),
        }

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            with contextlib.suppress(Exception):
                self._log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
