"""A real ``workflowd run`` subprocess for tests, with a NOTIFY_SOCKET to see READY and friends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import wait_for

REPO = Path(__file__).resolve().parents[2]


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for _, msg in list(self.messages) for line in msg.splitlines()]

    def count(self, line: str) -> int:
        return sum(1 for x in self.lines() if x == line)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class DaemonProc:
    def __init__(
        self,
        workflows_dir: Path,
        database: Path,
        broker_url: str,
        *,
        result_backend: str | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.workflows_dir = workflows_dir
        self.database = database
        self.broker_url = broker_url
        self.result_backend = result_backend
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.tmp = Path(tempfile.mkdtemp(prefix="wfd-daemon-"))
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.tmp / "workflowd.yaml"
            import yaml

            self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifyListener | None = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "workflowd",
            "run",
            "--workflows-dir",
            str(self.workflows_dir),
            "--database",
            str(self.database),
            "--broker-url",
            self.broker_url,
        ]
        if self.result_backend:
            cmd += ["--result-backend", self.result_backend]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.extra_args

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> DaemonProc:
        self.notify = NotifyListener(self.tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKFLOWD_", "CELERY_"))}
        env.update(
            {
                "NOTIFY_SOCKET": self.notify.path,
                "WORKFLOWD_CONFIG": "",
                "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO),
            }
        )
        env.update(self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.tmp)
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.notify is not None and self.proc is not None

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            return "READY=1" in (self.notify.lines() if self.notify else [])

        wait_for(ready, timeout, message=f"daemon READY=1\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_text().splitlines():
            line = raw.strip()
            if line.startswith("<") and ">" in line[:4]:  # journald priority prefix
                line = line[line.index(">") + 1 :]
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    code = self.proc.wait(5)
            else:
                code = self.proc.returncode
            self._log.close()
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self._log.close()
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKFLOWD_")}
        env.update({"WORKFLOWD_CONFIG": "", "PYTHONPATH": str(REPO / "src")})
        res = subprocess.run(
            [sys.executable, "-m", "workflowd", *args, "--database", str(self.database)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        if check and res.returncode not in (0,):
            raise AssertionError(f"workflowd {args} exited {res.returncode}: {res.stderr}")
        return res

    def history(self, name: str | None = None, *extra: str) -> list[dict[str, Any]]:
        if not self.database.exists():
            return []
        args = ["history", *([name] if name else []), "--json", "--limit", "1000", *extra]
        data: list[dict[str, Any]] = json.loads(self.cli(*args).stdout)
        return data

    def wait_runs(
        self, name: str | None, n: int, timeout: float = 10.0, **match: Any
    ) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            runs = [
                r
                for r in self.history(name)
                if all(r.get(k) == v for k, v in match.items()) and r["outcome"] != "running"
            ]
            return runs if len(runs) >= n else None

        result: list[dict[str, Any]] = wait_for(
            enough,
            timeout,
            interval=0.1,
            message=f"{n} run(s) of {name!r} {match}\nlog:\n{self.log_text()[-3000:]}",
        )
        return result


MetricValues = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_metrics(port: int) -> MetricValues:
    """The daemon's /metrics, parsed: (sample name, sorted labels) -> value."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: MetricValues = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(values: MetricValues, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


@contextmanager
def running_daemon(
    tmp_path: Path, broker_url: str, workflows: dict[str, str], **kwargs: Any
) -> Iterator[DaemonProc]:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir(exist_ok=True)
    for name, text in workflows.items():
        (wf_dir / name).write_text(text)
    d = DaemonProc(wf_dir, tmp_path / "history.db", broker_url, **kwargs)
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[DaemonProc] = []

    def factory(
        broker_url: str, workflows: dict[str, str], *, start: bool = True, **kwargs: Any
    ) -> DaemonProc:
        wf_dir = tmp_path / "workflows"
        wf_dir.mkdir(exist_ok=True)
        for name, text in workflows.items():
            (wf_dir / name).write_text(text)
        d = DaemonProc(wf_dir, tmp_path / "history.db", broker_url, **kwargs)
        started.append(d)
        return d.start() if start else d

    yield factory
    for d in started:
        d.stop()
        request.node.add_report_section("teardown", "workflowd log", d.log_text()[-20000:])
