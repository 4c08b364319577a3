"""Does a workflow's condition set hold for a trigger? Pure, and shared with dry runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workflowd.context import TriggerContext
from workflowd.model import Conditions, Workflow


@dataclass(frozen=True, slots=True)
class ConditionResult:
    key: str
    expected: Any
    value: Any
    matched: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "expected": self.expected,
            "value": self.value,
            "matched": self.matched,
        }


def evaluate(
    wf: Workflow, ctx: TriggerContext, *, threshold_already_fired: bool = False
) -> list[ConditionResult]:
    """Every given condition with its value and verdict, in file order."""
    c: Conditions = wf.conditions
    out: list[ConditionResult] = []
    if c.task_name_pattern is not None:
        rx = c.task_name_regex
        ok = ctx.task_name is not None and rx is not None and rx.match(ctx.task_name) is not None
        out.append(
            ConditionResult("task_name_pattern", _one(c.task_name_pattern), ctx.task_name, ok)
        )
    if c.queue is not None:
        qs = c.queue_set
        ok = ctx.queue is not None and qs is not None and ctx.queue in qs
        out.append(ConditionResult("queue", _one(c.queue), ctx.queue, ok))
    if c.error_pattern is not None:
        rx2 = c.error_regex
        ok = ctx.exception is not None and rx2 is not None and rx2.search(ctx.exception) is not None
        out.append(ConditionResult("error_pattern", c.error_pattern, ctx.exception, ok))
    if c.failure_count_threshold is not None:
        n = ctx.failure_count or 0
        ok = n >= c.failure_count_threshold and not threshold_already_fired
        value: Any = n if not threshold_already_fired else f"{n} (already fired for this chain)"
        out.append(ConditionResult("failure_count_threshold", c.failure_count_threshold, value, ok))
    if c.worker_pattern is not None:
        rx3 = c.worker_regex
        ok = ctx.worker is not None and rx3 is not None and rx3.match(ctx.worker) is not None
        out.append(ConditionResult("worker_pattern", _one(c.worker_pattern), ctx.worker, ok))
    return out


def static_match(wf: Workflow, ctx: TriggerContext) -> bool:
    """The conditions that depend only on the trigger's own fields (not on chain history).

    Same verdicts as :func:`evaluate`, without building records: the daemon asks this
    of every workflow for every trigger, and :func:`evaluate` only of those that pass.
    """
    c = wf.conditions
    if c.task_name_pattern is not None:
        rx = c.task_name_regex
        if ctx.task_name is None or rx is None or rx.match(ctx.task_name) is None:
            return False
    if c.queue is not None:
        qs = c.queue_set
        if ctx.queue is None or qs is None or ctx.queue not in qs:
            return False
    if c.error_pattern is not None:
        rx2 = c.error_regex
        if ctx.exception is None or rx2 is None or rx2.search(ctx.exception) is None:
            return False
    if c.worker_pattern is not None:
        rx3 = c.worker_regex
        if ctx.worker is None or rx3 is None or rx3.match(ctx.worker) is None:
            return False
    return True


def matches(results: list[ConditionResult]) -> bool:
    return all(r.matched for r in results)


def _one(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else list(values)
