"""``workflowd test``: run a file's workflows against a sample or recorded event, side-effect free.

Uses the same matching and rendering code as the daemon, so what a dry run
prints is what the daemon would do with that event.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from workflowd import matching, model
from workflowd.actions import notify
from workflowd.actions.notify import webhook_body
from workflowd.context import TriggerContext
from workflowd.envref import Redactor, redact_url
from workflowd.errors import DeliveryError
from workflowd.loader import LoadedWorkflow
from workflowd.templates import VARIABLES

# Python's own regex parser (3.11+); only its parse tree is used, to build samples.
_sre_parse: Any = importlib.import_module("re._parser")
_sre_c: Any = importlib.import_module("re._constants")


def sample_for_glob(pattern: str, default: str) -> str:
    """A string the glob matches: ``*`` -> ``sample``, ``?`` -> ``x``, ``[ab]`` -> ``a``."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("sample")
        elif ch == "?":
            out.append("x")
        elif ch == "[":
            j = pattern.find("]", i + 2)
            if j == -1:
                out.append(ch)
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    out.append(next(c for c in "xyz0_" if c not in body))
                else:
                    out.append(body[0])
                i = j
        else:
            out.append(ch)
        i += 1
    candidate = "".join(out)
    return candidate if fnmatch.fnmatchcase(candidate, pattern) else default


def _gen(tree: Any) -> str:
    out: list[str] = []
    for op, arg in tree:
        if op is _sre_c.LITERAL:
            out.append(chr(arg))
        elif op is _sre_c.NOT_LITERAL:
            out.append("x" if chr(arg) != "x" else "y")
        elif op is _sre_c.ANY:
            out.append("x")
        elif op is _sre_c.IN:
            out.append(_gen_in(arg))
        elif op is _sre_c.BRANCH:
            out.append(_gen(arg[1][0]))
        elif op is _sre_c.SUBPATTERN:
            out.append(_gen(arg[-1]))
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", 0)):
            lo, _hi, sub = arg
            out.append(_gen(sub) * max(lo, 0))
        elif op is getattr(_sre_c, "ATOMIC_GROUP", None):
            out.append(_gen(arg))
        # AT (anchors), lookarounds and the like add nothing
    return "".join(out)


def _gen_in(items: Any) -> str:
    for op, arg in items:
        if op is _sre_c.NEGATE:
            return "x"
        if op is _sre_c.LITERAL:
            return chr(arg)
        if op is _sre_c.RANGE:
            return chr(arg[0])
        if op is _sre_c.CATEGORY:
            return {"CATEGORY_DIGIT": "0", "CATEGORY_SPACE": " "}.get(str(arg), "a")
    return "x"


def sample_exception(pattern: str | None) -> str:
    """An exception text, as Celery reports one, that ``pattern`` finds."""
    default = "ConnectionError('sample failure')"
    if not pattern:
        return default
    try:
        text = _gen(_sre_parse.parse(pattern))
    except Exception:  # the generator is best effort; the regex itself is valid
        return default
    rx = re.compile(pattern)
    for candidate in (
        f"{text}('sample failure')" if re.fullmatch(r"[A-Za-z_][\w.]*", text) else None,
        f"RuntimeError({text!r})",
        text,
    ):
        if candidate is not None and rx.search(candidate):
            return candidate
    return default


def sample_context(lw: LoadedWorkflow) -> TriggerContext:
    """A trigger built to satisfy the workflow's own conditions where it can."""
    wf = lw.workflow
    c = wf.conditions
    event = wf.trigger.event
    task_id = str(uuid.UUID(int=0x5A3E))
    threshold = wf.trigger.threshold_seconds
    worker = (
        sample_for_glob(c.worker_pattern[0], "celery@worker-1")
        if c.worker_pattern
        else ("celery@worker-1")
    )
    if event == "worker.offline":
        return TriggerContext(trigger=event, timestamp=time.time(), worker=worker)
    failures = c.failure_count_threshold or 1
    return TriggerContext(
        trigger=event,
        timestamp=time.time(),
        task_id=task_id,
        task_name=sample_for_glob(c.task_name_pattern[0], "myapp.tasks.example")
        if c.task_name_pattern
        else "myapp.tasks.example",
        args="(42, 'sample')",
        kwargs="{'retry': True}",
        queue=c.queue[0] if c.queue else "celery",
        worker=worker,
        exception=sample_exception(c.error_pattern) if event == "task.failed" else None,
        root_id=task_id,
        failure_count=failures if event in ("task.failed", "task.orphaned") else None,
        attempt=failures - 1 if event in ("task.failed", "task.orphaned") else 0,
        elapsed_seconds=threshold * 1.5 if threshold else None,
        threshold_seconds=threshold,
    )


_EVENT_KEYS = {
    "uuid": "task_id",
    "task_id": "task_id",
    "name": "task_name",
    "task_name": "task_name",
    "args": "args",
    "task_args": "args",
    "kwargs": "kwargs",
    "task_kwargs": "kwargs",
    "hostname": "worker",
    "worker": "worker",
    "queue": "queue",
    "routing_key": "queue",
    "exception": "exception",
    "root_id": "root_id",
    "parent_id": "parent_id",
    "failure_count": "failure_count",
    "attempt": "attempt",
    "retries": "attempt",
    "elapsed_seconds": "elapsed_seconds",
    "threshold_seconds": "threshold_seconds",
    "timestamp": "timestamp",
}


def context_from_event(data: Any, lw: LoadedWorkflow) -> TriggerContext:
    """A trigger from ``--event``: one Celery event, a list of them (merged), or variables."""
    events = data if isinstance(data, list) else [data]
    fields: dict[str, Any] = {}
    for ev in events:
        if not isinstance(ev, Mapping):
            raise ValueError("an event file holds a JSON object or a list of objects")
        for key, value in ev.items():
            target = _EVENT_KEYS.get(key)
            if target is None or value is None:
                continue
            if target == "worker" and ev.get("type") == "task-sent":
                continue  # task-sent's hostname is the producer's, not a worker's
            if target == "queue" and key == "routing_key" and "queue" in fields:
                continue
            fields[target] = value
    for key in ("args", "kwargs"):
        if key in fields and not isinstance(fields[key], str):
            fields[key] = repr(tuple(fields[key]) if key == "args" else fields[key])
    for key in ("failure_count", "attempt"):
        if key in fields:
            fields[key] = int(fields[key])
    for key in ("elapsed_seconds", "threshold_seconds", "timestamp"):
        if key in fields:
            fields[key] = float(fields[key])
    fields.setdefault("timestamp", time.time())
    if "threshold_seconds" not in fields and lw.workflow.trigger.threshold_seconds:
        fields["threshold_seconds"] = lw.workflow.trigger.threshold_seconds
    if "failure_count" not in fields and lw.workflow.trigger.event == "task.failed":
        fields["failure_count"] = int(fields.get("attempt", 0)) + 1
    return TriggerContext(trigger=lw.workflow.trigger.event, **fields)


def load_event_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None


def plan(
    lw: LoadedWorkflow,
    ctx: TriggerContext,
    redactor: Redactor,
    *,
    event_source: str,
    default_queue: str = "celery",
) -> dict[str, Any]:
    """The dry run of one workflow: a JSON-able report (secrets redacted)."""
    wf = lw.workflow
    results = matching.evaluate(wf, ctx)
    variables = ctx.variables(wf.name)
    actions: list[dict[str, Any]] = []
    for action in wf.all_actions:
        if isinstance(action, model.RetryAction):
            schedule = action.schedule()
            actions.append(
                {
                    "type": "retry",
                    "queue": action.queue or ctx.queue or default_queue,
                    "queue_source": "action"
                    if action.queue
                    else ("task" if ctx.queue else "default_queue"),
                    "arguments": "original args and kwargs"
                    if action.same_arguments
                    else {"args": action.args or [], "kwargs": action.kwargs or {}},
                    "max_attempts": action.max_attempts,
                    "schedule": [
                        {"attempt": n, "delay_seconds": d} for n, d in enumerate(schedule, 1)
                    ],
                }
            )
        elif isinstance(action, model.SlackAction):
            message = action.template.render(variables)
            actions.append(
                {
                    "type": "slack",
                    "url": redact_url(action.webhook_url),
                    "message": message,
                    "request": {"method": "POST", "json": {"text": message}},
                }
            )
        else:
            body = webhook_body(action, variables)
            actions.append(
                {
                    "type": "webhook",
                    "url": redact_url(action.url),
                    "method": action.method,
                    "headers": dict.fromkeys(action.headers, "***"),
                    "timeout_seconds": action.timeout_seconds,
                    "retries": action.retries,
                    "body": body,
                }
            )
    report = {
        "file": lw.file,
        "line": lw.line,
        "workflow": wf.name,
        "version": lw.version,
        "enabled": wf.enabled,
        "trigger": wf.trigger.model_dump(exclude_none=True),
        "event_source": event_source,
        "event": _event_dict(ctx),
        "conditions": [r.to_dict() for r in results],
        "would_run": matching.matches(results) and wf.enabled,
        "actions": actions,
        "circuit_breaker": wf.circuit_breaker.model_dump(),
    }
    redacted: dict[str, Any] = redactor.deep(report)
    return redacted


def _event_dict(ctx: TriggerContext) -> dict[str, Any]:
    v = ctx.variables("")
    keys = [k for k in VARIABLES if k not in ("workflow_name", "exception_type", "error_message")]
    return {k: v[k] for k in keys if v[k] is not None}


async def send(lw: LoadedWorkflow, ctx: TriggerContext, redactor: Redactor) -> list[dict[str, Any]]:
    """``--send``: post the slack and webhook actions once each (no re-sends, no retries)."""
    variables = ctx.variables(lw.workflow.name)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient() as client:
        for action in lw.workflow.all_actions:
            if isinstance(action, model.RetryAction):
                out.append({"type": "retry", "status": "not sent (dry run never retries)"})
                continue
            try:
                delivery, detail = await notify.send(
                    client, notify.request_for(action, variables), retries=0
                )
                out.append(
                    {
                        "type": action.type,
                        "status": "sent",
                        **detail,
                        "duration_ms": delivery.duration_ms,
                    }
                )
            except DeliveryError as exc:
                out.append(
                    {
                        "type": action.type,
                        "status": "failed",
                        "error": redactor(str(exc)),
                        "http_status": exc.status,
                    }
                )
    return out


def run_send(lw: LoadedWorkflow, ctx: TriggerContext, redactor: Redactor) -> list[dict[str, Any]]:
    return asyncio.run(send(lw, ctx, redactor))
