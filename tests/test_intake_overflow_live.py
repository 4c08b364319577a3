"""A burst that overflows Redis's pub/sub output buffer: the daemon reconnects, records the gap
in its log and metrics, and goes on handling failures."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import pytest

from tests.support.daemon import metric, scrape_metrics
from tests.support.httpsink import HttpSink
from tests.support.procs import free_port, wait_for

pytestmark = pytest.mark.integration

# Redis drops a subscriber whose output buffer passes 1 MB at once (or stays over 512 kB
# for 5 s). The burst below is far larger than that plus what the kernel's socket buffers
# of a stopped reader absorb on loopback (a few MB).
PUBSUB_LIMIT = ["--client-output-buffer-limit", "pubsub 1mb 512kb 5"]
BURST_EVENTS = 3000
TRACEBACK = (
    "Traceback (most recent call last):\n"
    + '  File "/srv/app/tasks.py", line 42, in run\n    client.submit(payload)\n' * 100
    + "ConnectionError: upstream refused\n"
)  # ~8 kB, as a deep stack's traceback is
WORKER = "celery@overflow-worker"
TASK = "tests.overflow.charge"


def test_pubsub_overflow_ends_in_reconnect_and_recorded_gap(
    redis_server_factory: Any, http_sink: HttpSink, daemon_factory: Any
) -> None:
    from celery import Celery

    server = redis_server_factory(PUBSUB_LIMIT)
    url = server.url(0)
    port = free_port()
    d = daemon_factory(
        url,
        {
            "alert.yaml": (
                "name: alert\ntrigger:\n  event: task.failed\n"
                "conditions:\n  task_name_pattern: 'tests.overflow.*'\n"
                f"action:\n  type: slack\n  webhook_url: '{http_sink.url('/s')}'\n"
                "  message: '{task_id} failed: {exception}'\n"
            )
        },
        config={"metrics_address": f"127.0.0.1:{port}"},
    )
    app = Celery("overflow-test", broker=url, set_as_current=False)
    conn = app.connection_for_write()
    dispatcher = app.events.Dispatcher(conn, hostname=WORKER, enabled=True)

    def heartbeats_counted() -> float:
        return metric(scrape_metrics(port), "workflowd_events_total", type="worker-heartbeat")

    def wait_consuming(timeout: float) -> None:
        """Live heartbeats until the daemon has counted a new one (it is subscribed)."""
        before = heartbeats_counted()

        def counted() -> bool:
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
            return heartbeats_counted() > before

        wait_for(counted, timeout, interval=0.2, message="the daemon to count live events")

    try:
        wait_consuming(15)
        assert d.proc is not None
        d.signal(signal.SIGSTOP)
        try:
            for i in range(BURST_EVENTS):
                dispatcher.send(
                    "task-failed",
                    uuid=f"burst-{i}-{uuid.uuid4()}",
                    exception="ConnectionError('upstream refused')",
                    traceback=TRACEBACK,
                )
            wait_for(
                lambda: "overcoming of output buffer limits" in server.log_text(),
                10,
                message=f"redis to drop the stopped subscriber\n{server.log_text()[-2000:]}",
            )
        finally:
            d.signal(signal.SIGCONT)

        wait_for(
            lambda: any(
                str(e.get("event", "")).startswith("event stream resumed after a gap")
                for e in d.log_events()
            ),
            30,
            message=f"the gap in the log\n{d.log_text()[-3000:]}",
        )
        gap = next(
            e
            for e in d.log_events()
            if str(e.get("event", "")).startswith("event stream resumed after a gap")
        )
        assert gap["level"] == "warning"
        assert metric(scrape_metrics(port), "workflowd_intake_gaps_total") >= 1
        assert d.proc.poll() is None, d.log_text()[-3000:]

        # Still handling failures afterwards.
        wait_consuming(30)
        task_id = str(uuid.uuid4())
        dispatcher.send(
            "task-received",
            uuid=task_id,
            name=TASK,
            args="(1,)",
            kwargs="{}",
            root_id=task_id,
            parent_id=None,
            retries=0,
            eta=None,
            expires=None,
        )
        dispatcher.send("task-started", uuid=task_id)
        dispatcher.send(
            "task-failed",
            uuid=task_id,
            exception="ConnectionError('after the gap')",
            traceback="Traceback ...\nConnectionError: after the gap\n",
        )
        runs = d.wait_runs("alert", 1, timeout=15, task_id=task_id)
        assert runs[0]["outcome"] == "success"
        assert runs[0]["task_name"] == TASK
        posts = http_sink.wait_for_requests("/s", 1, timeout=5)
        assert posts[-1].json["text"] == f"{task_id} failed: ConnectionError('after the gap')"
        assert metric(scrape_metrics(port), "workflowd_broker_connected") == 1
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.signal(signal.SIGCONT)
        dispatcher.close()
        conn.release()
        app.close()
