"""The intake benchmark's building blocks, small and fast, so the harness cannot rot."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from bench import run as bench_run
from bench.procs import Redis
from bench.traffic import Plan, Pool, render, task_stream

pytestmark = pytest.mark.integration


def test_stream_is_a_celery_cluster() -> None:
    """Every task: sent, received, started, then succeeded or failed; about half fail."""
    events = list(task_stream(Plan(broker_url="redis://unused", tasks=400), random.Random(1)))
    by_task: dict[str, list[str]] = {}
    for kind, _host, fields in events:
        by_task.setdefault(fields["uuid"], []).append(kind)
    assert len(by_task) == 400
    for kinds in by_task.values():
        assert kinds[:3] == ["task-sent", "task-received", "task-started"]
        assert kinds[3] in ("task-succeeded", "task-failed") and len(kinds) == 4
    failed = sum(1 for k in by_task.values() if k[3] == "task-failed")
    assert 150 < failed < 250


def test_rendered_messages_are_what_celery_sends() -> None:
    """kombu envelope on /0.celeryev/<routing key>; events with the dispatcher's fields."""
    server = Redis().start()
    try:
        pool = render(Pool(), Plan(broker_url=server.url, tasks=300))
    finally:
        server.stop()
    assert pool.events == 1200
    seen_keys = set()
    for topic, payload, codes in pool.messages:
        envelope = json.loads(payload)
        assert envelope["content-type"] == "application/json"
        props = envelope["properties"]
        assert props["body_encoding"] == "base64"
        key = props["delivery_info"]["routing_key"]
        assert topic == f"/0.celeryev/{key}"
        assert props["delivery_info"]["exchange"] == "celeryev"
        body = json.loads(base64.b64decode(envelope["body"]))
        seen_keys.add(key)
        events = body if key == "task.multi" else [body]
        assert len(events) == len(codes)
        for e in events:
            for field in ("type", "hostname", "utcoffset", "pid", "clock", "timestamp", "uuid"):
                assert field in e, (field, e)
            assert envelope["headers"]["hostname"] == e["hostname"]
            if e["type"] == "task-sent":
                assert key == "task.sent"
                assert e["hostname"].startswith("gen") and e["queue"] == e["routing_key"]
            else:
                assert key == "task.multi" and e["hostname"].startswith("celery@worker-")
            if e["type"] == "task-failed":
                assert e["traceback"].startswith("Traceback (most recent call last):")
    assert seen_keys == {"task.sent", "task.multi"}


def test_quick_bench_phases(tmp_path: Any) -> None:
    """Every phase end to end at small sizes: the consumers count what was published."""
    settings = bench_run.Settings(
        quick=True,
        seconds=2.0,
        start_rate=2000,
        max_rate=2000,
        bisect_steps=0,
        burst_events=4000,
        latency_seconds=3.0,
        probe_rate=5.0,
        background_rate=1000.0,
        rss_tasks=2000,
        rss_rate_cap=4000,
        rss_rate=4000,
        profile="none",
        phases=("rates", "burst", "latency", "rss"),
        quiet_wait=0.0,
        busy_attempts=1,
    )
    bench = bench_run.Bench(settings)
    try:
        results = bench.run()
    finally:
        bench.close()
    for label in "abc":
        r = results["rates"][label]
        probe = r["probes"][0]
        assert probe["ok"], probe
        assert probe["handled"] == probe["published"] >= 4000
        assert r["sustained_rate"] == 2000
        assert probe["cpu_per_100k"] and probe["cpu_per_100k"] > 0
        burst = results["burst"][label]
        assert burst["extra"]["consuming_after_burst"]
    daemon = results["rates"]["c"]["probes"][0]["extra"]
    assert daemon["triggers"] > 0 and daemon["malformed"] == 0
    lat = results["latency"]
    assert lat["probes"] > 0
    for what in ("retry", "slack"):
        assert lat[what]["n"] == lat["probes"], lat
        assert lat[what]["p50_ms"] is not None and lat[what]["p50_ms"] < 1000
    rss = results["rss"]
    assert rss["steady"]["handled"] >= 8000 and rss["peak_rss_mib"] > 0
    assert rss["alive_at_end"]
    assert set(results["ratios"]) == {"c_over_a", "c_over_b", "latency_p99_ms", "rss_mib"}
    assert results["workload"]["workflows"] == 50
    json.dumps(results)
    assert "sustained ev/s" in bench_run.table(results)
