"""What a trigger knows about its task and worker, and the template variables drawn from it."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

_EXC = re.compile(r"^\s*([A-Za-z_][\w.]*)\((.*)\)\s*$", re.S)


def split_exception(text: str | None) -> tuple[str | None, str | None]:
    """``ConnectionError('refused')`` -> (``ConnectionError``, ``refused``)."""
    if not text:
        return None, None
    m = _EXC.match(text)
    if not m:
        return None, text
    etype, inner = m.group(1), m.group(2)
    try:
        value: Any = ast.literal_eval(f"({inner},)") if inner.strip() else ()
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return etype, inner
    if len(value) == 1:
        return etype, str(value[0])
    return etype, ", ".join(str(v) for v in value)


@dataclass(frozen=True, slots=True)
class TriggerContext:
    """One occurrence of a trigger: the inputs of conditions and templates."""

    trigger: str
    timestamp: float
    task_id: str | None = None
    task_name: str | None = None
    args: str | None = None  # as Celery reports them (repr)
    kwargs: str | None = None
    queue: str | None = None
    queue_source: str | None = None
    worker: str | None = None
    exception: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    failure_count: int | None = None
    attempt: int | None = None
    elapsed_seconds: float | None = None
    threshold_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> TriggerContext:
        return replace(self, **changes)

    def variables(self, workflow_name: str) -> dict[str, object]:
        etype, message = split_exception(self.exception)
        ts = datetime.fromtimestamp(self.timestamp, UTC).isoformat(timespec="milliseconds")
        return {
            "workflow_name": workflow_name,
            "trigger": self.trigger,
            "timestamp": ts.replace("+00:00", "Z"),
            "task_id": self.task_id,
            "task_name": self.task_name,
            "task_args": self.args,
            "task_kwargs": self.kwargs,
            "queue": self.queue,
            "worker": self.worker,
            "exception": self.exception,
            "exception_type": etype,
            "error_message": message,
            "root_id": self.root_id,
            "failure_count": self.failure_count,
            "attempt": self.attempt,
            "elapsed_seconds": None
            if self.elapsed_seconds is None
            else round(self.elapsed_seconds, 1),
            "threshold_seconds": self.threshold_seconds,
        }
