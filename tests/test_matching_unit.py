"""The fast trigger-only check agrees with the full condition evaluation."""

from __future__ import annotations

import itertools

from workflowd import matching
from workflowd.context import TriggerContext
from workflowd.loader import load_text

WORKFLOWS = """
name: all
trigger: {event: task.failed}
conditions:
  task_name_pattern: ["payments.*", "myapp.tasks.send_?mail"]
  queue: [high, low]
  error_pattern: "Connection(Error|Refused)|Timeout"
  worker_pattern: "celery@web-[0-9]*"
action: {type: slack, webhook_url: "http://h.invalid/"}
---
name: none
trigger: {event: task.failed}
action: {type: slack, webhook_url: "http://h.invalid/"}
---
name: name-only
trigger: {event: task.failed}
conditions: {task_name_pattern: "*.process_card"}
action: {type: slack, webhook_url: "http://h.invalid/"}
"""


def test_static_match_agrees_with_evaluate() -> None:
    result = load_text(WORKFLOWS, "w.yaml", env={})
    assert result.ok, result.issues
    names = [None, "payments.process_card", "myapp.tasks.send_email", "other.thing"]
    queues = [None, "high", "celery"]
    excs = [None, "ConnectionError('x')", "ValueError('Timeout')", "KeyError('k')"]
    workers = [None, "celery@web-1", "celery@db-1"]
    checked = 0
    for lw in result.workflows:
        for name, queue, exc, worker in itertools.product(names, queues, excs, workers):
            ctx = TriggerContext(
                trigger="task.failed",
                timestamp=0.0,
                task_id="t",
                task_name=name,
                queue=queue,
                exception=exc,
                worker=worker,
            )
            full = matching.matches(matching.evaluate(lw.workflow, ctx))
            assert matching.static_match(lw.workflow, ctx) == full, (lw.name, ctx)
            checked += full
    assert checked > 10  # some combinations match every workflow
