"""Prometheus metrics. Hot-path counts live in plain ints on the state object and are
read at scrape time, so event intake pays nothing for being observed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _Snapshot(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        values = self.read()
        events = CounterMetricFamily(
            "workflowd_events", "Celery events received, by type", labels=["type"]
        )
        for kind, n in sorted(values.get("events_by_type", {}).items()):
            events.add_metric([kind], n)
        yield events
        yield CounterMetricFamily(
            "workflowd_events_malformed",
            "Events that were malformed and skipped",
            value=values.get("malformed", 0),
        )
        yield GaugeMetricFamily(
            "workflowd_tasks_tracked", "Tasks held in memory", value=values.get("tasks", 0)
        )
        yield GaugeMetricFamily(
            "workflowd_workers_online", "Workers seen online", value=values.get("workers", 0)
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.triggers = Counter("workflowd_triggers", "Triggers detected", ["trigger"], registry=r)
        self.runs = Counter(
            "workflowd_runs", "Workflow runs recorded", ["workflow", "outcome"], registry=r
        )
        self.action_seconds = Histogram(
            "workflowd_action_duration_seconds",
            "Action latency",
            ["type", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.circuit_open = Gauge(
            "workflowd_circuit_open",
            "1 while a workflow's circuit breaker is open",
            ["workflow"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "workflowd_broker_connected", "1 while the event consumer is connected", registry=r
        )
        self.intake_gaps = Counter(
            "workflowd_intake_gaps",
            "Times the event stream was interrupted (events lost)",
            registry=r,
        )
        self.reload_success = Gauge(
            "workflowd_config_last_reload_successful",
            "1 when every workflow file loaded at the last reload",
            registry=r,
        )
        self.reload_time = Gauge(
            "workflowd_config_last_reload_success_timestamp_seconds",
            "Time of the last fully successful reload",
            registry=r,
        )
        self.file_errors = Gauge(
            "workflowd_workflow_files_failed", "Workflow files failing to load", registry=r
        )
        self.workflows_loaded = Gauge("workflowd_workflows_loaded", "Workflows running", registry=r)
        self.reload_errors = Counter(
            "workflowd_reload_errors", "Workflow file load errors seen at reloads", registry=r
        )

    def watch_state(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_Snapshot(read))
