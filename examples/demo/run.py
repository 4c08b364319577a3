"""The live demo: redis-server, a Celery worker with failing tasks, a Slack stand-in, workflowd.

Run by ``scripts/demo``. Everything listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".demo"
SECONDS = float(os.environ.get("DEMO_SECONDS", "25"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"== {text}", flush=True)


class SlackStandIn(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            text = json.loads(body).get("text") or json.dumps(json.loads(body))
        except (json.JSONDecodeError, AttributeError):
            text = body.decode(errors="replace")
        print(f"   [{self.path.strip('/')}] {text}", flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    port, sink_port = free_port(), free_port()
    broker, backend = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"
    sink = ThreadingHTTPServer(("127.0.0.1", sink_port), SlackStandIn)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    slack = f"http://127.0.0.1:{sink_port}"

    # The example workflows, with their Slack/PagerDuty URLs pointed at the stand-in.
    wf_dir = WORK / "workflows"
    shutil.copytree(ROOT / "examples" / "workflows", wf_dir)
    for f in wf_dir.rglob("*.yaml"):
        text = re.sub(r"https://hooks\.slack\.com/services/[^\"']+", f"{slack}/slack", f.read_text())
        text = text.replace("https://events.pagerduty.com/v2/enqueue", f"{slack}/pagerduty")
        f.write_text(text)
    env = {
        **os.environ,
        "SLACK_WEBHOOK_URL": f"{slack}/slack",
        "PAGERDUTY_ROUTING_KEY": "demo-routing-key",
        "ONCALL_WEBHOOK_URL": f"{slack}/oncall",
        "ONCALL_TOKEN": "demo-token",
        "DEMO_BROKER_URL": broker,
        "DEMO_RESULT_BACKEND": backend,
        "PYTHONPATH": str(ROOT),
        "WORKFLOWD_CONFIG": str(WORK / "workflowd.yaml"),
    }
    (WORK / "workflowd.yaml").write_text(
        f"workflows_dir: {wf_dir}\ndatabase: {WORK / 'workflowd.db'}\nbroker_url: {broker}\n"
        f"result_backend: {backend}\nworker_timeout_seconds: 6\n"
    )

    def start(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(WORK / log, "wb")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        say(f"redis-server on 127.0.0.1:{port}")
        start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"], "redis.log")
        time.sleep(0.5)
        say("Celery worker (examples/demo/app.py) with failing tasks")
        worker = start([sys.executable, "-m", "celery", "-A", "examples.demo.app", "worker",
                        "-n", "celery@demo-%h", "-c", "2", "-E", "--without-mingle",
                        "--without-gossip", "-l", "warning"], "worker.log")
        say(f"workflowd run, with {wf_dir} (logs in .demo/daemon.log)")
        daemon = start([sys.executable, "-m", "workflowd", "run"], "daemon.log")
        if not wait_log(WORK / "daemon.log", '"ready"', 30):
            print((WORK / "daemon.log").read_text())
            return 1
        wait_log(WORK / "worker.log", "ready", 20)
        time.sleep(1.0)
        os.environ.update(DEMO_BROKER_URL=broker, DEMO_RESULT_BACKEND=backend)
        from examples.demo.app import app

        say("sending tasks that fail; Slack stand-in posts appear below")
        app.send_task("payments.process_card", args=[1001, 4999])
        app.send_task("myapp.tasks.fetch_prices", args=[["ACME", "INIT"]])
        app.send_task("myapp.tasks.send_email", args=["ops@example.com", "weekly report"])
        feed = app.send_task("ingest.load_feed", args=["orders", "2026-11-21"])
        time.sleep(SECONDS)
        say("stopping the worker: workflowd sees it go offline")
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
        time.sleep(3)
        say("workflowd history")
        subprocess.run([sys.executable, "-m", "workflowd", "history", "--limit", "30"],
                       env=env, check=False)
        say(f"workflowd chain {feed.id}")
        subprocess.run([sys.executable, "-m", "workflowd", "chain", feed.id], env=env,
                       check=False)
        say("workflowd status")
        subprocess.run([sys.executable, "-m", "workflowd", "status"], env=env, check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        app.close()
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        sink.shutdown()


def wait_log(path: Path, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    sys.exit(main())
