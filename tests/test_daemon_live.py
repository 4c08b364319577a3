"""The daemon against a real redis-server, real Celery workers and a loopback HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import REPO, metric, scrape_metrics
from tests.support.httpsink import HttpSink
from tests.support.procs import free_port, wait_for

pytestmark = pytest.mark.integration

FAIL = "tests.celeryapp.tasks.fail_connection"


def slack_wf(
    name: str,
    url: str,
    conditions: str = "",
    trigger: str = "task.failed",
    message: str = "{workflow_name}: {task_name} failed on {worker}: {exception}",
) -> str:
    return (
        f"name: {name}\ntrigger:\n  event: {trigger}\n"
        + (f"conditions:\n{conditions}" if conditions else "")
        + f"action:\n  type: slack\n  webhook_url: '{url}'\n  message: '{message}'\n"
    )


def test_failed_task_posts_slack_and_records_history(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    worker = celery_worker_factory(broker_url)
    d = daemon_factory(broker_url, {"alert.yaml": slack_wf("alert", http_sink.url("/slack"))})
    t0 = time.monotonic()
    result = celery_client.send_task(FAIL, args=[1, "x"])
    reqs = http_sink.wait_for_requests("/slack", 1, timeout=2.0)
    assert reqs[0].received_at - t0 < 2.0
    assert reqs[0].json == {
        "text": f"alert: {FAIL} failed on {worker.hostname}: ConnectionError('upstream refused')"
    }
    runs = d.wait_runs("alert", 1, timeout=2.0)
    run = runs[0]
    assert run["task_id"] == result.id and run["task_name"] == FAIL
    assert run["worker"] == worker.hostname and run["outcome"] == "success"
    assert run["trigger"] == "task.failed" and run["workflow_version"]
    assert run["actions"][0]["type"] == "slack" and run["actions"][0]["status"] == "success"
    assert run["actions"][0]["detail"]["http_status"] == 200
    assert run["circuit_breaker"] == {
        "state": "closed",
        "count": 1,
        "limit": 100,
        "window_hours": 1,
    }


def test_execution_time_exceeded_fires_once(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    celery_worker_factory(broker_url)
    wf = slack_wf(
        "slow",
        http_sink.url("/slow"),
        trigger="task.execution_time_exceeded\n  threshold_seconds: 1",
        message="{task_name} ran {elapsed_seconds}s > {threshold_seconds}s",
    )
    d = daemon_factory(broker_url, {"slow.yaml": wf})
    res = celery_client.send_task("tests.celeryapp.tasks.sleep_for", args=[3.0])
    fast = celery_client.send_task("tests.celeryapp.tasks.sleep_for", args=[0.1])
    runs = d.wait_runs("slow", 1, timeout=6)
    time.sleep(3.0)  # the task ends; nothing more may fire for it
    runs = d.history("slow")
    assert len(runs) == 1
    assert runs[0]["task_id"] == res.id and runs[0]["task_id"] != fast.id
    text = http_sink.requests("/slow")[0].json["text"]
    assert text.startswith("tests.celeryapp.tasks.sleep_for ran 1.") and text.endswith("> 1.0s")


def test_kill9_worker_gives_offline_and_orphaned(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    timeout = 3
    victim = celery_worker_factory(
        broker_url, heartbeat=0.5, concurrency=1, name=f"victim-{time.monotonic_ns()}@%h"
    )
    workflows = {
        "offline.yaml": slack_wf(
            "offline",
            http_sink.url("/offline"),
            trigger="worker.offline",
            message="{worker} offline",
        ),
        "orphan.yaml": slack_wf(
            "orphan",
            http_sink.url("/orphan"),
            trigger="task.orphaned",
            message="{task_id} orphaned on {worker}",
        ),
    }
    d = daemon_factory(broker_url, workflows, config={"worker_timeout_seconds": timeout})
    res = celery_client.send_task("tests.celeryapp.tasks.sleep_for", args=[30.0])
    wait_for(lambda: _started(d, res.id), 10, message="task started on the victim")
    killed_at = time.monotonic()
    victim.kill9()
    offline = d.wait_runs("offline", 1, timeout=timeout + 5)
    orphan = d.wait_runs("orphan", 1, timeout=timeout + 5)
    assert time.monotonic() - killed_at < timeout + 5
    assert offline[0]["worker"] == victim.hostname
    assert orphan[0]["task_id"] == res.id and orphan[0]["worker"] == victim.hostname
    assert http_sink.requests("/orphan")[0].json["text"] == (
        f"{res.id} orphaned on {victim.hostname}"
    )
    time.sleep(1.5)
    assert len(d.history("offline")) == 1 and len(d.history("orphan")) == 1


def _started(d: Any, task_id: str) -> bool:
    """The worker reports the task as active (ask the worker, not the daemon)."""
    from tests.celeryapp import make_app

    app = make_app(d.broker_url)
    try:
        active = app.control.inspect(timeout=0.5).active() or {}
    finally:
        app.close()
    return any(t["id"] == task_id for tasks in active.values() for t in tasks)


def test_conditions_match_and_mismatch(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    w1 = celery_worker_factory(
        broker_url, queues=("celery", "priority-high"), name=f"alpha-{time.monotonic_ns()}@%h"
    )
    u = http_sink.url("/x")
    workflows = {
        "glob.yaml": slack_wf("glob", u, "  task_name_pattern: 'payments.process_*'\n"),
        "glob-miss.yaml": slack_wf("glob-miss", u, "  task_name_pattern: 'payments.refund_?'\n"),
        "queue.yaml": slack_wf("queue", u, "  queue: priority-high\n"),
        "queue-miss.yaml": slack_wf("queue-miss", u, "  queue: [email, bulk]\n"),
        "error.yaml": slack_wf("error", u, "  error_pattern: 'card (declined|expired)'\n"),
        "error-miss.yaml": slack_wf("error-miss", u, "  error_pattern: '^Timeout'\n"),
        "worker.yaml": slack_wf("worker", u, "  worker_pattern: 'alpha-*'\n"),
        "worker-miss.yaml": slack_wf("worker-miss", u, "  worker_pattern: 'beta-*'\n"),
    }
    d = daemon_factory(broker_url, workflows)
    paid = celery_client.send_task("payments.process_card", args=[10], queue="priority-high")
    d.wait_runs("worker", 1, timeout=5)
    time.sleep(1.0)
    names = sorted(r["workflow"] for r in d.history())
    assert names == ["error", "glob", "queue", "worker"]
    by = {r["workflow"]: r for r in d.history()}
    assert all(r["task_id"] == paid.id for r in by.values())
    conds = {c["key"]: c for r in by.values() for c in r["conditions"]}
    assert conds["queue"]["value"] == "priority-high" and conds["queue"]["matched"]
    assert conds["worker_pattern"]["value"] == w1.hostname
    assert conds["error_pattern"]["value"] == "ValueError('card declined')"


def test_broker_restart_reconnects(
    redis_server_factory: Any,
    celery_worker_factory: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    from tests.celeryapp import make_app

    server = redis_server_factory()
    url = server.url(0)
    celery_worker_factory(url)
    d = daemon_factory(
        url,
        {
            "alert.yaml": slack_wf("alert", http_sink.url("/s")),
            "offline.yaml": slack_wf("offline", http_sink.url("/off"), trigger="worker.offline"),
        },
        config={"worker_timeout_seconds": 10},
    )
    server.restart()
    # the daemon notices, reconnects, and records the gap
    wait_for(
        lambda: any(e.get("event", "").startswith("event stream resumed") for e in d.log_events()),
        20,
        message="reconnect",
    )
    app = make_app(url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not http_sink.requests("/s"):
            app.send_task(FAIL)  # the worker reconnects on its own schedule
            time.sleep(1.0)
    finally:
        app.close()
    assert http_sink.requests("/s")
    assert d.proc is not None and d.proc.poll() is None
    # the worker's consumer reconnected (offline + online): not a worker going away
    time.sleep(4)
    assert d.history("offline") == []


def test_hanging_webhook_does_not_delay_slack(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    celery_worker_factory(broker_url)
    http_sink.respond("/hang", delay=20.0)
    workflows = {
        "a-hang.yaml": (
            "name: a-hang\ntrigger: {event: task.failed}\naction:\n  type: webhook\n"
            f"  url: '{http_sink.url('/hang')}'\n  timeout_seconds: 15\n  retries: 0\n"
        ),
        "b-slack.yaml": slack_wf("b-slack", http_sink.url("/slack")),
    }
    daemon_factory(broker_url, workflows)
    for i in range(3):
        sent = time.monotonic()
        celery_client.send_task(FAIL, args=[i])
        reqs = http_sink.wait_for_requests("/slack", i + 1, timeout=5)
        assert reqs[i].received_at - sent < 1.0, f"slack post {i} delayed"
    assert len(http_sink.requests("/hang")) == 3  # all three hang at once


def test_history_readable_while_daemon_writes(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    celery_worker_factory(broker_url, concurrency=4)
    d = daemon_factory(broker_url, {"alert.yaml": slack_wf("alert", http_sink.url("/s"))})
    stop = threading.Event()
    reads: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "workflowd",
                    "history",
                    "alert",
                    "--json",
                    "--limit",
                    "500",
                    "--database",
                    str(d.database),
                ],
                capture_output=True,
                text=True,
                timeout=30,
                env={"PYTHONPATH": str(REPO / "src"), "WORKFLOWD_CONFIG": "", "PATH": "/usr/bin"},
                check=False,
            )
            if res.returncode != 0:
                errors.append(res.stderr)
            else:
                reads.append(len(json.loads(res.stdout)))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            celery_client.send_task(FAIL, args=[i])
        d.wait_runs("alert", 60, timeout=30)
    finally:
        stop.set()
        t.join(30)
    assert errors == []
    assert len(reads) >= 2
    assert reads == sorted(reads)  # every read saw a consistent, growing history


def test_malformed_events_are_counted_and_skipped(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    from celery.events.event import get_exchange
    from kombu import Connection, Producer

    celery_worker_factory(broker_url)
    port = free_port()
    d = daemon_factory(
        broker_url,
        {"alert.yaml": slack_wf("alert", http_sink.url("/s"))},
        config={"metrics_address": f"127.0.0.1:{port}"},
    )
    with Connection(broker_url) as conn:
        producer = Producer(conn.default_channel, exchange=get_exchange(conn))
        for body in (
            [1, 2, 3],
            {"no": "type"},
            {"type": "task-failed"},
            {"type": "task-received", "uuid": 5, "hostname": None},
            "junk",
        ):
            producer.publish(body, routing_key="task.multi", serializer="json")
        producer.publish(
            b"\xff\xfe not json",
            routing_key="task.x",
            content_type="application/json",
            content_encoding="binary",
        )
    celery_client.send_task(FAIL)
    d.wait_runs("alert", 1, timeout=5)
    assert metric(scrape_metrics(port), "workflowd_events_malformed_total") >= 5
    assert d.proc is not None and d.proc.poll() is None


def test_status_from_a_second_process(
    broker_url: str,
    celery_worker_factory: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
    tmp_path: Path,
) -> None:
    d = daemon_factory(broker_url, {"alert.yaml": slack_wf("alert", http_sink.url("/s"))})
    res = wait_for(
        lambda: (
            (
                r := d.cli("status", "--json", "--workflows-dir", str(d.workflows_dir), check=False)
            ).returncode
            == 0
            and "alert" in r.stdout
            and r
        ),
        10,
    )
    data = json.loads(res.stdout)
    assert data[0]["name"] == "alert" and data[0]["circuit_breaker"]["limit"] == 100
