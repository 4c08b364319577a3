"""Smoke tests proving the real-component test infrastructure works.

redis-server, Celery workers and the HTTP sink are all real processes/servers
on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support.events import EventCollector
from tests.support.httpsink import HttpSink
from tests.support.procs import RedisServer, group_pids, pid_alive, wait_for

if TYPE_CHECKING:  # not imported at runtime: pytest_plugins below imports it
    from tests.support.fixtures import CeleryWorkerFactory, RedisServerFactory

# Makes the fixtures available even before tests/conftest.py imports them
# (a conftest definition of the same fixture takes precedence).

# --------------------------------------------------------------------------- broker / worker


@pytest.mark.integration
def test_task_failed_event_received_for_fail_connection(
    celery_worker_factory: CeleryWorkerFactory,
    event_collector: EventCollector,
    celery_client: Any,
) -> None:
    worker = celery_worker_factory()
    assert worker.hostname.startswith("w") and "@" in worker.hostname

    result = celery_client.send_task(
        "tests.celeryapp.tasks.fail_connection",
        args=[42, "order-7"],
        kwargs={"region": "eu"},
    )

    failed = event_collector.wait_for_event("task-failed", uuid=result.id, timeout=15)
    assert "ConnectionError" in failed["exception"]
    assert "upstream refused" in failed["exception"]
    assert failed["hostname"] == worker.hostname

    received = event_collector.wait_for_event("task-received", uuid=result.id, timeout=5)
    assert received["name"] == "tests.celeryapp.tasks.fail_connection"
    assert "order-7" in received["args"]
    # task_send_sent_event is on in tests.celeryapp
    sent = event_collector.wait_for_event("task-sent", uuid=result.id, timeout=5)
    assert sent["name"] == "tests.celeryapp.tasks.fail_connection"


@pytest.mark.integration
def test_kill9_leaves_no_process_and_sends_no_worker_offline(
    celery_worker_factory: CeleryWorkerFactory,
    event_collector: EventCollector,
) -> None:
    victim = celery_worker_factory(name=f"victim-{uuid.uuid4().hex[:6]}@%h", heartbeat=0.5)
    control = celery_worker_factory(concurrency=1)

    # The collector sees the victim (so "no worker-offline" below means something),
    # and the fractional heartbeat interval made it to the worker.
    beat = event_collector.wait_for_event("worker-heartbeat", hostname=victim.hostname, timeout=10)
    assert beat["freq"] == pytest.approx(0.5)
    pids_before = victim.pids()
    assert len(pids_before) >= 3, f"expected main + 2 prefork children, got {pids_before}"

    killed = victim.kill9()
    killed_at = time.monotonic()
    assert set(pids_before) <= set(killed)
    assert not [pid for pid in killed if pid_alive(pid)]
    assert group_pids(killed[0]) == []
    assert not victim.running
    assert victim.returncode == -9

    # Positive control: a graceful stop does send worker-offline on this same stream.
    control.stop()
    event_collector.wait_for_event("worker-offline", hostname=control.hostname, timeout=10)

    remaining = 3.0 - (time.monotonic() - killed_at)
    if remaining > 0:
        time.sleep(remaining)
    assert event_collector.events("worker-offline", hostname=victim.hostname) == []
    # And the victim's heartbeats stopped.
    last_beats = event_collector.events("worker-heartbeat", hostname=victim.hostname)
    assert all(e["local_received"] <= time.time() - 2.0 for e in last_beats)


@pytest.mark.integration
def test_task_catalogue_behaves_as_documented(
    celery_worker_factory: CeleryWorkerFactory,
    event_collector: EventCollector,
    celery_client: Any,
    redis_server: RedisServer,
    broker_url: str,
) -> None:
    from tests.celeryapp import make_app

    worker = celery_worker_factory(backend_url=broker_url)
    db = int(broker_url.rsplit("/", 1)[1])
    rds = redis_server.client(db)

    def failed_exc(task_name: str, *args: Any) -> str:
        res = celery_client.send_task(task_name, args=list(args))
        event = event_collector.wait_for_event("task-failed", uuid=res.id, timeout=15)
        return str(event["exception"])

    assert failed_exc("payments.process_card", 1) == "ValueError('card declined')"
    assert failed_exc("myapp.tasks.send_email", "a@b.c").startswith("SMTPException(")
    assert failed_exc("tests.celeryapp.tasks.fail_with", "KeyError", "boom") == "KeyError('boom')"
    assert failed_exc("tests.celeryapp.tasks.fail_with", "TimeoutError", "slow").startswith(
        "TimeoutError("
    )

    # record_call: stores the arguments exactly as received, then fails.
    key = f"calls-{uuid.uuid4().hex}"
    res = celery_client.send_task(
        "tests.celeryapp.tasks.record_call", args=[key, 1, "two", {"3": [4]}], kwargs={"k": "v"}
    )
    event_collector.wait_for_event("task-failed", uuid=res.id, timeout=15)
    records = [json.loads(raw) for raw in rds.lrange(key, 0, -1)]
    assert len(records) == 1
    assert records[0]["task_id"] == res.id
    assert records[0]["args"] == [key, 1, "two", {"3": [4]}]
    assert records[0]["kwargs"] == {"k": "v"}
    assert records[0]["retries"] == 0
    assert records[0]["hostname"] == worker.hostname

    # fail_until: fails until the 2nd call, counter kept in redis.
    counter = f"count-{uuid.uuid4().hex}"
    first = celery_client.send_task("tests.celeryapp.tasks.fail_until", args=[counter, 2])
    assert "ConnectionError" in str(
        event_collector.wait_for_event("task-failed", uuid=first.id, timeout=15)["exception"]
    )
    second = celery_client.send_task("tests.celeryapp.tasks.fail_until", args=[counter, 2])
    event_collector.wait_for_event("task-succeeded", uuid=second.id, timeout=15)

    # echo + result backend (result_extended is on when a backend is set).
    backend_app = make_app(broker_url, broker_url)
    try:
        echoed = backend_app.send_task("tests.celeryapp.tasks.echo", args=[1, "x"], kwargs={"y": 2})
        assert echoed.get(timeout=15) == {"args": [1, "x"], "kwargs": {"y": 2}}
        meta = backend_app.backend.get_task_meta(echoed.id)
        assert meta["name"] == "tests.celeryapp.tasks.echo"  # only with result_extended
    finally:
        backend_app.close()
        rds.close()


@pytest.mark.integration
def test_redis_restart_keeps_port_and_answers_ping(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory(extra_args=["--client-output-buffer-limit", "pubsub 0 0 0"])
    port, pid = server.port, server.pid
    client = server.client()
    client.set("before-restart", "1")

    server.restart()

    assert server.port == port
    assert server.pid != pid
    assert server.url(3) == f"redis://127.0.0.1:{port}/3"
    fresh = server.client()
    try:
        assert wait_for(fresh.ping, timeout=5)
        # No persistence: --save '' --appendonly no.
        assert fresh.get("before-restart") is None
        # An old client reconnects transparently on its next command.
        assert wait_for(lambda: _ping_quietly(client), timeout=5)
    finally:
        fresh.close()
        client.close()

    server.stop()
    assert not server.running
    assert not _ping_quietly(server.client(retries=0, socket_connect_timeout=0.5))


@pytest.mark.integration
def test_worker_and_collector_survive_broker_restart(
    redis_server_factory: RedisServerFactory,
    celery_worker_factory: CeleryWorkerFactory,
) -> None:
    from tests.celeryapp import make_app

    server = redis_server_factory()
    url = server.url(1)
    worker = celery_worker_factory(url, heartbeat=0.5)
    with EventCollector(url) as collector:
        collector.wait_for_event("worker-heartbeat", hostname=worker.hostname, timeout=10)

        server.restart()
        collector.clear()

        # Celery reconnects (first retry after 2 s) and events flow again.
        collector.wait_for_event("worker-heartbeat", hostname=worker.hostname, timeout=30)
        client = make_app(url)
        try:
            res = client.send_task("tests.celeryapp.tasks.fail_connection", args=["after"])
            failed = collector.wait_for_event("task-failed", uuid=res.id, timeout=30)
        finally:
            client.close()
        assert "ConnectionError" in failed["exception"]
        assert worker.running


def _ping_quietly(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


# --------------------------------------------------------------------------- http sink


def test_http_sink_status_sequence_and_retry_after(http_sink: HttpSink) -> None:
    http_sink.respond("/hook", statuses=[503, 503, 200], retry_after=7)
    payload = {"task_id": "abc", "n": 1}

    with httpx.Client(timeout=5) as client:
        answers = [client.post(http_sink.url("/hook"), json=payload) for _ in range(4)]
        other = client.get(http_sink.url("/other?x=1"), headers={"X-Token": "t"})

    assert [a.status_code for a in answers] == [503, 503, 200, 200]
    assert [a.headers.get("retry-after") for a in answers] == ["7", "7", None, None]
    assert other.status_code == 200

    got = http_sink.wait_for_requests("/hook", 4, timeout=2)
    assert [r.status for r in got] == [503, 503, 200, 200]
    assert [r.index for r in got] == [0, 1, 2, 3]
    assert all(r.method == "POST" and r.json == payload for r in got)
    assert got[0].header("content-type") == "application/json"
    assert json.loads(got[0].body) == payload
    assert got[0].received_at <= got[-1].received_at

    (req,) = http_sink.requests("/other")
    assert req.method == "GET" and req.query == "x=1" and req.header("X-Token") == "t"
    assert req.json is None
    assert len(http_sink.requests()) == 5

    with pytest.raises(TimeoutError):
        http_sink.wait_for_requests("/never", 1, timeout=0.2)


def test_http_sink_delay_is_cut_short_on_stop() -> None:
    sink = HttpSink().start()
    sink.respond("/hang", statuses=[200], delay=30.0)
    sink.respond("/slow-then-fast", statuses=[200], delay=[0.3, 0.0])
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            with httpx.Client(timeout=60) as client:
                outcome["response"] = client.post(sink.url("/hang"), content=b"x")
        except httpx.HTTPError as exc:
            outcome["error"] = exc
        outcome["done_at"] = time.monotonic()

    try:
        with httpx.Client(timeout=5) as client:
            t0 = time.monotonic()
            client.get(sink.url("/slow-then-fast"))
            t1 = time.monotonic()
            client.get(sink.url("/slow-then-fast"))
            t2 = time.monotonic()
        assert t1 - t0 >= 0.3 > t2 - t1

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        (hanging,) = sink.wait_for_requests("/hang", 1, timeout=5)
        assert hanging.body == b"x"
        time.sleep(0.2)
        assert "done_at" not in outcome  # really hanging
    finally:
        stop_started = time.monotonic()
        sink.stop()
        stop_took = time.monotonic() - stop_started

    assert stop_took < 2.0
    caller.join(5)
    assert not caller.is_alive()
    assert "error" in outcome, outcome  # connection dropped, no answer
    assert outcome["done_at"] - stop_started < 2.0

    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=2) as client:
        client.get(sink.url("/hang"))
