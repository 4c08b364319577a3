"""Retries, chains, circuit breakers and crash safety against a real broker, backend and worker."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.httpsink import HttpSink
from tests.support.procs import RedisServer, wait_for
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

RECORD = "tests.celeryapp.tasks.record_call"
BREAKER = "circuit_breaker: {max_executions: 100}\n"


def retry_wf(
    name: str,
    *,
    pattern: str = RECORD,
    extra: str = "",
    breaker: str = BREAKER,
    conditions: str = "",
) -> str:
    return (
        f"name: {name}\ntrigger: {{event: task.failed}}\nconditions:\n"
        f"  task_name_pattern: '{pattern}'\n{conditions}action:\n  type: retry\n{extra}" + breaker
    )


@pytest.fixture
def backend_url(redis_server: RedisServer, broker_url: str) -> str:
    db = int(broker_url.rsplit("/", 1)[1])
    other = db + 128 if db < 128 else db - 127
    client = redis_server.client(other)
    client.flushdb()
    client.close()
    return redis_server.url(other)


@pytest.fixture
def calls(broker_url: str) -> Iterator[Any]:
    """Read the calls ``record_call`` logged under a key."""
    client = redis.Redis.from_url(broker_url)

    def read(key: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in client.lrange(key, 0, -1)]

    yield read
    client.close()


def test_truncated_args_are_retried_byte_identical(
    broker_url: str,
    backend_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url, backend_url)
    d = daemon_factory(
        broker_url,
        {"r.yaml": retry_wf("r", extra="  max_attempts: 1\n")},
        result_backend=backend_url,
    )
    big = 'é✓ "quoted" \\ ' + "x" * 1200
    args = ["k1", big, [1, 2.5, None, True, {"deep": {"deeper": {"deepest": [1, 2, 3]}}}]]
    kwargs = {"blob": "y" * 1500, "n": 1.25, "nested": {"a": [{"b": ["c"]}]}}
    original = celery_client.send_task(RECORD, args=args, kwargs=kwargs)
    records = wait_for(lambda: len(r := calls("k1")) >= 2 and r, 15, message="the retry ran")
    first, second = records
    assert first["task_id"] == original.id
    assert json.dumps(second["args"], sort_keys=True) == json.dumps(first["args"], sort_keys=True)
    assert json.dumps(second["kwargs"], sort_keys=True) == json.dumps(
        first["kwargs"], sort_keys=True
    )
    assert second["task_id"] != original.id
    assert second["parent_id"] == original.id and second["root_id"] == original.id
    run = d.wait_runs("r", 1, task_id=original.id)[0]
    detail = run["actions"][0]["detail"]
    assert detail["args_source"] == "result_backend"
    assert detail["task_id"] == second["task_id"]
    assert (detail["queue"], detail["queue_source"]) == ("celery", "task-sent")
    # the retry's own queue comes from the chain: workflowd sent it there


def test_truncated_args_without_backend_are_refused(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url)
    d = daemon_factory(broker_url, {"r.yaml": retry_wf("r", extra="  max_attempts: 1\n")})
    original = celery_client.send_task(RECORD, args=["k2", "z" * 1100])
    run = d.wait_runs("r", 1, timeout=10)[0]
    assert run["task_id"] == original.id
    assert run["outcome"] == "failure"
    assert "result_extended" in run["reason"] and "truncated" in run["reason"]
    assert run["actions"][0]["status"] == "failure"
    time.sleep(1.0)
    assert len(calls("k2")) == 1  # nothing was sent


def test_short_args_from_the_event_repr(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url)
    d = daemon_factory(broker_url, {"r.yaml": retry_wf("r", extra="  max_attempts: 1\n")})
    celery_client.send_task(RECORD, args=["k3", 7, "seven"], kwargs={"flag": False})
    records = wait_for(lambda: len(r := calls("k3")) >= 2 and r, 15)
    assert records[1]["args"] == ["k3", 7, "seven"] and records[1]["kwargs"] == {"flag": False}
    run = d.wait_runs("r", 1, outcome="success")[0]
    assert run["actions"][0]["detail"]["args_source"] == "event"


def test_exponential_backoff_chain_then_max_attempts(
    broker_url: str,
    backend_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url, backend_url)
    wf = retry_wf(
        "exp",
        extra="  delay_seconds: 1\n  max_attempts: 3\n"
        "  exponential_backoff: true\n  backoff_multiplier: 2\n",
    )
    d = daemon_factory(broker_url, {"exp.yaml": wf}, result_backend=backend_url)
    original = celery_client.send_task(RECORD, args=["k4"])
    seen: list[float] = []
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and len(seen) < 4:
        n = len(calls("k4"))
        seen.extend([time.monotonic()] * (n - len(seen)))
        time.sleep(0.02)
    assert len(seen) == 4, seen
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    for gap, expected in zip(gaps, [1, 2, 4], strict=True):
        assert expected - 0.1 <= gap <= expected + 1.0, gaps
    skipped = d.wait_runs("exp", 1, outcome="skipped")
    assert skipped[0]["reason"] == "max_attempts_reached"
    time.sleep(1.5)
    assert len(calls("k4")) == 4
    runs = d.history("exp")
    assert sorted(r["outcome"] for r in runs) == ["skipped", "success", "success", "success"]
    last = calls("k4")[-1]["task_id"]
    chain = json.loads(d.cli("chain", last, "--json").stdout)
    assert [c["attempt"] for c in chain] == [0, 1, 2, 3]
    assert chain[0]["task_id"] == original.id and chain[0]["parent_id"] is None
    assert chain[0]["workflow"] == ""
    for prev, cur in itertools.pairwise(chain):
        assert cur["parent_id"] == prev["task_id"]
        assert cur["root_id"] == original.id and cur["workflow"] == "exp"
    assert all(c["state"] == "FAILURE" for c in chain)
    assert [r["parent_id"] for r in calls("k4")[1:]] == [c["task_id"] for c in chain[:-1]]


def test_escalation_ladder_fires_each_step_once_per_chain(
    broker_url: str,
    backend_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    http_sink: HttpSink,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url, backend_url)
    workflows = {
        "1.yaml": retry_wf("retry", extra="  delay_seconds: 0.2\n  max_attempts: 6\n"),
        "2.yaml": (
            f"name: slack3\ntrigger: {{event: task.failed}}\nconditions:\n"
            f"  task_name_pattern: '{RECORD}'\n  failure_count_threshold: 3\n"
            f"action:\n  type: slack\n  webhook_url: '{http_sink.url('/slack')}'\n"
            "  message: '{task_name} failed {failure_count} times, chain {root_id}'\n"
        ),
        "3.yaml": (
            f"name: page5\ntrigger: {{event: task.failed}}\nconditions:\n"
            f"  task_name_pattern: '{RECORD}'\n  failure_count_threshold: 5\n"
            f"action:\n  type: webhook\n  url: '{http_sink.url('/page')}'\n"
        ),
    }
    d = daemon_factory(broker_url, workflows, result_backend=backend_url)
    chains = [celery_client.send_task(RECORD, args=[f"lad{i}"]) for i in range(2)]
    for i in range(2):
        wait_for(lambda i=i: len(calls(f"lad{i}")) >= 7, 20, message=f"chain {i} done")
    d.wait_runs("retry", 2, outcome="skipped")
    time.sleep(1.0)
    slack = [r.json["text"] for r in http_sink.requests("/slack")]
    pages = [r.json for r in http_sink.requests("/page")]
    assert sorted(slack) == sorted(f"{RECORD} failed 3 times, chain {c.id}" for c in chains)
    assert sorted(p["failure_count"] for p in pages) == [5, 5]
    assert sorted(p["task_id"] for p in pages) == sorted(
        calls(f"lad{i}")[4]["task_id"] for i in range(2)
    )
    assert len(d.history("slack3")) == 2 and len(d.history("page5")) == 2


def test_two_matching_workflows_send_one_retry(
    broker_url: str,
    backend_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url, backend_url)
    workflows = {
        "a.yaml": retry_wf("a", extra="  max_attempts: 1\n"),
        "b.yaml": retry_wf("b", pattern="tests.celeryapp.*", extra="  max_attempts: 1\n"),
    }
    d = daemon_factory(broker_url, workflows, result_backend=backend_url)
    original = celery_client.send_task(RECORD, args=["k5"])
    wait_for(lambda: len(calls("k5")) >= 2, 10)
    a = d.wait_runs("a", 1, task_id=original.id)[0]
    b = d.wait_runs("b", 1, task_id=original.id)[0]
    assert (a["outcome"], b["outcome"], b["reason"]) == ("success", "skipped", "already_retried")
    time.sleep(1.5)
    assert len(calls("k5")) == 2  # the original and one retry (which then hit max_attempts)


def test_circuit_breaker_opens_and_closes_with_one_notice_each(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    http_sink: HttpSink,
) -> None:
    celery_worker_factory(broker_url, concurrency=4)
    window_hours = 0.002  # 7.2 s
    wf = (
        f"name: cb\ntrigger: {{event: task.failed}}\naction:\n  type: slack\n"
        f"  webhook_url: '{http_sink.url('/cb')}'\n  message: 'failed {{task_id}}'\n"
        f"circuit_breaker:\n  max_executions: 5\n  time_window_hours: {window_hours}\n"
    )
    d = daemon_factory(broker_url, {"cb.yaml": wf})
    for i in range(20):
        celery_client.send_task("tests.celeryapp.tasks.fail_connection", args=[i])
    d.wait_runs("cb", 20, timeout=15)
    runs = d.history("cb")
    assert sorted(r["outcome"] for r in runs).count("success") == 5
    skipped = [r for r in runs if r["outcome"] == "skipped"]
    assert len(skipped) == 15 and {r["reason"] for r in skipped} == {"circuit_open"}
    assert all(r["circuit_breaker"]["state"] == "open" for r in skipped)
    texts = lambda: [r.json["text"] for r in http_sink.requests("/cb")]  # noqa: E731
    wait_for(lambda: any("OPEN" in t for t in texts()), 5)
    opens = [t for t in texts() if "OPEN" in t]
    assert len(opens) == 1 and "'cb'" in opens[0] and "5 executions" in opens[0]
    assert "0.002 h" in opens[0]
    closes = wait_for(lambda: [t for t in texts() if "CLOSED" in t], window_hours * 3600 + 12)
    assert len(closes) == 1 and "15 trigger(s) were suppressed" in closes[0]
    assert len([t for t in texts() if t.startswith("failed ")]) == 5
    time.sleep(2)
    assert len([t for t in texts() if "CLOSED" in t or "OPEN" in t]) == 2


def test_breaker_state_survives_restart(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    http_sink: HttpSink,
) -> None:
    celery_worker_factory(broker_url)
    wf = (
        f"name: cb2\ntrigger: {{event: task.failed}}\naction:\n  type: slack\n"
        f"  webhook_url: '{http_sink.url('/cb')}'\n"
        "circuit_breaker:\n  max_executions: 2\n  time_window_hours: 1\n"
    )
    d = daemon_factory(broker_url, {"cb.yaml": wf})
    for i in range(3):
        celery_client.send_task("tests.celeryapp.tasks.fail_connection", args=[i])
    d.wait_runs("cb2", 3)
    assert d.stop() == 0
    d.start()
    celery_client.send_task("tests.celeryapp.tasks.fail_connection", args=[9])
    d.wait_runs("cb2", 4)
    newest = d.history("cb2")[0]
    assert (newest["outcome"], newest["reason"]) == ("skipped", "circuit_open")
    opens = [r for r in http_sink.requests("/cb") if "OPEN" in r.json["text"]]
    assert len(opens) == 1  # no second "opened" notice after the restart


def test_sigkill_between_record_and_send_is_interrupted_not_resent(
    broker_url: str,
    backend_url: str,
    redis_server: RedisServer,
    celery_worker_factory: Any,
    celery_client: Any,
    daemon_factory: Any,
    calls: Any,
) -> None:
    celery_worker_factory(broker_url, backend_url)
    db = int(broker_url.rsplit("/", 1)[1])
    proxy = TcpProxy(redis_server.port).start()
    try:
        wf = {"r.yaml": retry_wf("r", extra="  max_attempts: 3\n")}
        d = daemon_factory(proxy.url(db), wf, result_backend=backend_url)
        wait_for(
            lambda: any(
                e.get("event") == "running tasks rebuilt from inspect" for e in d.log_events()
            ),
            10,
        )
        proxy.hold_new()  # the daemon's event stream keeps flowing; its publish will stall
        original = celery_client.send_task(RECORD, args=["k6"])

        def stuck_sending() -> dict[str, Any] | None:
            runs = d.history("r")
            return next(
                (
                    r
                    for r in runs
                    if r["outcome"] == "running" and r["actions"][0]["status"] == "sending"
                ),
                None,
            )

        run = wait_for(stuck_sending, 10, message="a run recorded as sending")
        retry_id = run["actions"][0]["detail"]["task_id"]
        d.kill9()
        proxy.release()
        d.start()
        interrupted = d.wait_runs("r", 1, outcome="interrupted")[0]
        assert interrupted["id"] == run["id"] and interrupted["task_id"] == original.id
        assert interrupted["actions"][0]["status"] == "interrupted"
        assert interrupted["actions"][0]["detail"]["task_id"] == retry_id
        time.sleep(3)
        assert [c["task_id"] for c in calls("k6")] == [original.id]  # never re-sent
        chain = json.loads(d.cli("chain", original.id, "--json").stdout)
        assert [(c["task_id"], c["state"]) for c in chain] == [
            (original.id, "FAILURE"),
            (retry_id, "SENDING"),
        ]
        assert len(d.history("r")) == 1
    finally:
        proxy.stop()
