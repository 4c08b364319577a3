"""The 50 workflows ``workflowd run`` carries in the benchmark, written into a directory.

A mix an operator of the simulated cluster could keep in git: all four triggers,
globs (``*``, ``?``, ``[..]``, lists), regexes, queue and worker conditions,
failure-count escalations, slack, webhook (default and templated bodies) and retry
actions, some with several actions. Most target one task family and one error
class, a few cover whole modules, and some are dormant for this traffic (tasks it
never runs, triggers it never produces) while still being evaluated.

Two workflows serve the latency measurement: ``probe-retry`` (retry into a queue
nobody consumes) and ``probe-slack`` (a post whose text carries the task id).

Circuit breakers: the background workflows allow 10,000 executions an hour, so no
breaker opens within a rate probe (a few hundred runs per workflow at most); in
the 1M-task run a busy one may open, as it would in a cluster failing that hard.
The probe workflows allow 1,000,000 so they never suppress a measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench import catalog

PROBE_RETRY_QUEUE = "bench-probe-retries"
BACKGROUND_BREAKER = {"max_executions": 10_000, "time_window_hours": 1}
PROBE_BREAKER = {"max_executions": 1_000_000, "time_window_hours": 1}


def _slack(sink: str, slug: str, message: str) -> dict[str, Any]:
    return {"type": "slack", "webhook_url": f"{sink}/slack/{slug}", "message": message}


def _hook(sink: str, slug: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    action: dict[str, Any] = {
        "type": "webhook",
        "url": f"{sink}/hook/{slug}",
        "headers": {"Authorization": "Bearer ${BENCH_HOOK_TOKEN}"},
        "timeout_seconds": 5,
        "retries": 2,
    }
    if body is not None:
        action["body"] = body
    return action


def _retry(**kw: Any) -> dict[str, Any]:
    return {"type": "retry", "delay_seconds": 30, "max_attempts": 3, **kw}


def definitions(sink: str) -> list[dict[str, Any]]:
    """The workflow documents; ``sink`` is the HTTP sink's base URL."""
    s = sink
    failed: list[tuple[str, dict[str, Any], Any]] = [
        # (name, conditions, action or list of actions)
        (
            "billing-charge-network-retry",
            {
                "task_name_pattern": "app.billing.tasks.charge_*",
                "error_pattern": "ConnectionError|ConnectionRefusedError|Timeout",
            },
            _retry(exponential_backoff=True, max_delay_seconds=600),
        ),
        (
            "billing-integrity-alert",
            {
                "task_name_pattern": "app.billing.tasks.invoice_*",
                "error_pattern": r"IntegrityError\(",
            },
            _slack(s, "billing", ":moneybag: {task_name} failed on {worker}: {error_message}"),
        ),
        (
            "emails-5xx-retry",
            {
                "task_name_pattern": "app.emails.tasks.send_[wr]*",
                "error_pattern": r"HTTPError\('5\d\d",
            },
            _retry(delay_seconds=10, exponential_backoff=True, backoff_multiplier=3),
        ),
        (
            "reports-soft-timeout",
            {
                "task_name_pattern": "app.reports.tasks.build_*",
                "error_pattern": "SoftTimeLimitExceeded",
            },
            _hook(s, "reports"),
        ),
        (
            "search-db-down",
            {
                "task_name_pattern": ["app.search.tasks.index_*", "app.search.tasks.reindex_*"],
                "error_pattern": r"OperationalError\('could not connect",
            },
            [
                _slack(s, "search", "search indexing cannot reach the db: {exception}"),
                _hook(s, "search-page", {"summary": "{task_name} {error_message}", "sev": "P2"}),
            ],
        ),
        (
            "media-oom",
            {
                "task_name_pattern": "app.media.tasks.transcode_*",
                "queue": "media",
                "error_pattern": "^MemoryError",
            },
            _hook(
                s,
                "media",
                {"task": "{task_id}", "name": "{task_name}", "args": "{task_args}", "n": "x"},
            ),
        ),
        (
            "notifications-rate-limited",
            {
                "task_name_pattern": [
                    "app.notifications.tasks.push_*",
                    "app.notifications.tasks.sms_*",
                ],
                "error_pattern": "RateLimitExceeded|429",
            },
            _retry(delay_seconds=60, max_attempts=5),
        ),
        (
            "sync-crm-upstream",
            {
                "task_name_pattern": "app.sync.tasks.pull_crm",
                "error_pattern": r"ConnectionError|HTTPError\('50[234]",
            },
            _retry(delay_seconds=120, queue="sync-retries"),
        ),
        (
            "etl-duplicate-orders",
            {
                "task_name_pattern": "app.etl.tasks.load_*",
                "error_pattern": r"IntegrityError\(.*orders_pkey",
            },
            _slack(s, "etl", "duplicate order rows in {task_name}: {error_message}"),
        ),
        (
            "auth-permissions",
            {
                "task_name_pattern": "app.auth.tasks.rotate_*",
                "error_pattern": r"^PermissionError\(13,",
            },
            _hook(s, "security"),
        ),
        (
            "orders-bad-payload",
            {
                "task_name_pattern": "app.orders.tasks.fulfil_order",
                "error_pattern": r"^(KeyError|ValueError)\(",
            },
            _slack(s, "orders", "order {task_args} could not be fulfilled: {exception}"),
        ),
        (
            "inventory-db-west",
            {
                "task_name_pattern": "app.inventory.tasks.reserve_*",
                "worker_pattern": "celery@worker-0[1-3]",
                "error_pattern": "OperationalError",
            },
            _retry(delay_seconds=15),
        ),
        (
            "analytics-heavy",
            {
                "task_name_pattern": "app.analytics.tasks.rollup_*",
                "error_pattern": "MemoryError|SoftTimeLimitExceeded",
            },
            _slack(s, "analytics", "rollup {task_name} died: {exception_type}"),
        ),
        (
            "billing-escalate-3",
            {"task_name_pattern": "app.billing.*", "failure_count_threshold": 3},
            _slack(s, "oncall", ":rotating_light: {task_name} failed {failure_count} times"),
        ),
        (
            "emails-escalate-2",
            {"task_name_pattern": "app.emails.*", "failure_count_threshold": 2},
            _hook(s, "oncall"),
        ),
        (
            "media-thumbnail-retry",
            {
                "task_name_pattern": "app.media.tasks.thumbnail_?????",
                "error_pattern": "Timeout|ConnectionError",
            },
            _retry(delay_seconds=5, max_attempts=2),
        ),
        (
            "etl-extract-upstream",
            {
                "task_name_pattern": "app.etl.tasks.extract_*",
                "queue": ["etl", "etl-priority"],
                "error_pattern": r"HTTPError\('503",
            },
            [_retry(delay_seconds=300), _slack(s, "etl", "retrying {task_name} in 5 min")],
        ),
        (
            "reports-ledger-any",
            {
                "task_name_pattern": "app.reports.tasks.export_ledger",
                "error_pattern": "^(OperationalError|IntegrityError)",
            },
            _hook(s, "finance", {"text": "{task_name} failed: {error_message}", "id": "{task_id}"}),
        ),
        (
            "sync-erp-on-worker-9",
            {"task_name_pattern": "app.sync.tasks.*_erp", "worker_pattern": "celery@worker-09"},
            _slack(s, "sync", "{task_name} failed on {worker}"),
        ),
        (
            "orders-ship-carrier",
            {
                "task_name_pattern": "app.orders.tasks.ship_parcel",
                "error_pattern": r"HTTPError\('5\d\d|Timeout",
            },
            _retry(delay_seconds=60, max_attempts=4, exponential_backoff=True),
        ),
        # Dormant for this traffic: families the simulated cluster does not run.
        (
            "payments-any",
            {"task_name_pattern": "payments.process_*"},
            _slack(s, "payments", "payment task {task_name} failed: {error_message}"),
        ),
        (
            "legacy-cron",
            {"task_name_pattern": ["legacy.*", "cron.*"], "error_pattern": "Error"},
            _hook(s, "legacy"),
        ),
        (
            "ml-training-oom",
            {"task_name_pattern": "ml.train_*", "error_pattern": "MemoryError|CUDA"},
            _slack(s, "ml", "training {task_name} ran out of memory"),
        ),
        (
            "gpu-queue",
            {"queue": "gpu", "error_pattern": "Error"},
            _retry(delay_seconds=600, max_attempts=1),
        ),
        (
            "webhooks-out-5xx",
            {"task_name_pattern": "app.webhooks.deliver_*", "error_pattern": r"HTTPError\('5"},
            _retry(delay_seconds=30, max_attempts=8, exponential_backoff=True),
        ),
        (
            "exports-s3",
            {"task_name_pattern": "exports.*", "error_pattern": "S3|NoSuchBucket|AccessDenied"},
            _hook(s, "exports"),
        ),
        (
            "worker-20-anything",
            {"worker_pattern": "celery@worker-2?"},
            _slack(s, "ops", "{task_name} failed on {worker}"),
        ),
        (
            "kafka-consumers",
            {"task_name_pattern": "streams.*", "error_pattern": "KafkaError|NoBrokersAvailable"},
            _retry(delay_seconds=10),
        ),
        (
            "pdf-render",
            {"task_name_pattern": "docs.render_pdf", "error_pattern": "WeasyPrint|OSError"},
            _slack(s, "docs", "PDF render failed: {error_message}"),
        ),
        (
            "geo-lookups",
            {"task_name_pattern": "geo.*", "queue": ["geo", "geo-batch"]},
            _hook(s, "geo"),
        ),
        (
            "probe-retry",
            {"task_name_pattern": "bench.probe.*"},
            {"type": "retry", "delay_seconds": 0, "max_attempts": 3, "queue": PROBE_RETRY_QUEUE},
        ),
        (
            "probe-slack",
            {"task_name_pattern": "bench.probe.*"},
            _slack(s, "probe", "probe {task_id} failed: {exception}"),
        ),
    ]
    orphaned: list[tuple[str, dict[str, Any], Any]] = [
        ("orphans-retry-billing", {"task_name_pattern": "app.billing.*"}, _retry(max_attempts=1)),
        (
            "orphans-retry-orders",
            {"queue": ["orders"]},
            _retry(delay_seconds=300, max_attempts=1),
        ),
        (
            "orphans-alert",
            {},
            _slack(s, "ops", "{task_name} ({task_id}) orphaned by {worker}"),
        ),
        ("orphans-etl-hook", {"task_name_pattern": "app.etl.*"}, _hook(s, "etl")),
        (
            "orphans-media",
            {"task_name_pattern": "app.media.tasks.transcode_*"},
            [_retry(delay_seconds=60, max_attempts=1), _slack(s, "media", "{task_id} re-sent")],
        ),
        (
            "orphans-west",
            {"worker_pattern": ["celery@worker-0[1-3]"]},
            _hook(s, "west"),
        ),
    ]
    slow: list[tuple[str, float, dict[str, Any], Any]] = [
        (
            "reports-slow",
            600,
            {"task_name_pattern": "app.reports.*"},
            _slack(s, "reports", "{task_name} running for {elapsed_seconds}s"),
        ),
        ("etl-slow", 1800, {"queue": "etl"}, _hook(s, "etl")),
        (
            "media-slow",
            300,
            {"task_name_pattern": "app.media.tasks.transcode_*"},
            _slack(s, "media", "{task_id} over {threshold_seconds}s"),
        ),
        ("any-very-slow", 3600, {}, _hook(s, "ops")),
        (
            "billing-slow",
            120,
            {"task_name_pattern": "app.billing.tasks.charge_*"},
            _slack(s, "billing", "charge {task_id} slow"),
        ),
        (
            "sync-slow-west",
            900,
            {"task_name_pattern": "app.sync.*", "worker_pattern": "celery@worker-0[1-3]"},
            _hook(s, "sync"),
        ),
    ]
    offline: list[tuple[str, dict[str, Any], Any]] = [
        ("workers-offline", {}, _slack(s, "ops", "{worker} went offline")),
        ("workers-west-offline", {"worker_pattern": "celery@worker-0[1-3]"}, _hook(s, "west")),
        ("workers-east-offline", {"worker_pattern": "celery@worker-0[4-9]"}, _hook(s, "east")),
        (
            "worker-10-offline",
            {"worker_pattern": "celery@worker-10"},
            _slack(s, "ops", "{worker} offline"),
        ),
        ("gpu-offline", {"worker_pattern": "gpu@*"}, _slack(s, "ml", "{worker} offline")),
        ("beat-offline", {"worker_pattern": ["beat@*", "scheduler@*"]}, _hook(s, "ops")),
    ]

    docs: list[dict[str, Any]] = []

    def add(name: str, trigger: dict[str, Any], cond: dict[str, Any], action: Any) -> None:
        doc: dict[str, Any] = {"name": name, "trigger": trigger}
        if cond:
            doc["conditions"] = cond
        if isinstance(action, list):
            doc["actions"] = action
        else:
            doc["action"] = action
        doc["circuit_breaker"] = PROBE_BREAKER if name.startswith("probe-") else BACKGROUND_BREAKER
        docs.append(doc)

    for name, cond, action in failed:
        add(name, {"event": "task.failed"}, cond, action)
    for name, cond, action in orphaned:
        add(name, {"event": "task.orphaned"}, cond, action)
    for name, threshold, cond, action in slow:
        add(
            name,
            {"event": "task.execution_time_exceeded", "threshold_seconds": threshold},
            cond,
            action,
        )
    for name, cond, action in offline:
        add(name, {"event": "worker.offline"}, cond, action)
    return docs


def write(directory: Path, sink: str) -> list[Path]:
    """One file per workflow (a few files hold two documents, as teams do)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = definitions(sink)
    paths = []
    i = 0
    while i < len(docs):
        group = docs[i : i + (2 if i % 7 == 0 else 1)]
        path = directory / f"{i:02d}-{group[0]['name']}.yaml"
        path.write_text(yaml.safe_dump_all(group, sort_keys=False))
        paths.append(path)
        i += len(group)
    return paths


ENV = {"BENCH_HOOK_TOKEN": "bench-token-0123456789"}


def expected_match_rate(directory: Path, workers: int = 10) -> dict[str, float]:
    """Runs per 1,000 background failures each workflow would record, from the catalog.

    Uses workflowd's own loader and (pure) condition matching over every task kind,
    failure and worker the publisher draws from, weighted as it draws them. Chain
    escalations (failure_count_threshold) need retries that fail again, which the
    background never produces, so they count as zero here.
    """
    import os

    from workflowd import loader, matching
    from workflowd.context import TriggerContext

    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        snap = loader.load_paths([directory])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if snap.errors:
        raise RuntimeError("bench workflows do not load: " + "; ".join(map(str, snap.errors)))
    kinds, failures, _ = catalog.build()
    wfs = [
        lw.workflow for lw in snap.workflows.values() if lw.workflow.trigger.event == "task.failed"
    ]
    per: dict[str, float] = {wf.name: 0.0 for wf in wfs}
    total = len(kinds) * len(failures) * workers
    for kind in kinds:
        for f in failures:
            for w in range(workers):
                ctx = TriggerContext(
                    trigger="task.failed",
                    timestamp=0.0,
                    task_id="x",
                    task_name=kind.name,
                    queue=kind.queue,
                    worker=f"celery@worker-{w + 1:02d}",
                    exception=f.exception,
                    failure_count=1,
                )
                for wf in wfs:
                    if matching.matches(matching.evaluate(wf, ctx)):
                        per[wf.name] += 1000.0 / total
    return {k: round(v, 2) for k, v in per.items() if v}
