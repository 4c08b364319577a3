"""The workflow file format (SPEC §2) as strict pydantic models, plus the rules that span fields."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from workflowd import templates

TRIGGER_EVENTS = (
    "task.failed",
    "task.orphaned",
    "task.execution_time_exceeded",
    "worker.offline",
)
TriggerEvent = Literal[
    "task.failed", "task.orphaned", "task.execution_time_exceeded", "worker.offline"
]
ACTION_TYPES = ("retry", "slack", "webhook")
RETRYABLE_TRIGGERS = ("task.failed", "task.orphaned")
# Conditions that need a task; worker.offline has none.
TASK_CONDITIONS = ("task_name_pattern", "queue", "error_pattern", "failure_count_threshold")

DEFAULT_SLACK_MESSAGE = (
    "workflowd {workflow_name}: {trigger} for {task_name} [{task_id}] on {worker}: {exception}"
)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _nonempty(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("give at least one pattern")
    if any(v == "" for v in values):
        raise ValueError("patterns must not be empty strings")
    return values


Patterns = Annotated[
    list[str],
    BeforeValidator(_one_or_many, json_schema_input_type=str | list[str]),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Trigger(_Strict):
    event: TriggerEvent = Field(description="what starts the workflow")
    threshold_seconds: float | None = Field(
        default=None, gt=0, description="for task.execution_time_exceeded: seconds of running"
    )


class Conditions(_Strict):
    task_name_pattern: Patterns | None = Field(
        default=None, description="glob on the task name (*, ?, [..]); a string or a list (any)"
    )
    queue: Patterns | None = Field(default=None, description="exact queue name(s)")
    error_pattern: str | None = Field(
        default=None, description="Python regex searched in the exception text"
    )
    failure_count_threshold: int | None = Field(
        default=None, gt=0, description="fire once per chain when its failures reach this"
    )
    worker_pattern: Patterns | None = Field(default=None, description="glob on the worker hostname")

    @field_validator("task_name_pattern", "queue", "worker_pattern")
    @classmethod
    def _check_patterns(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _nonempty(v)

    @field_validator("error_pattern")
    @classmethod
    def _check_regex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            re.compile(v)
        except re.error as exc:
            pos = f" at position {exc.pos}" if exc.pos is not None else ""
            raise ValueError(f"invalid regular expression{pos}: {exc.msg}") from None
        return v

    @cached_property
    def error_regex(self) -> re.Pattern[str] | None:
        return re.compile(self.error_pattern) if self.error_pattern is not None else None

    @cached_property
    def task_name_regex(self) -> re.Pattern[str] | None:
        return _globs(self.task_name_pattern)

    @cached_property
    def worker_regex(self) -> re.Pattern[str] | None:
        return _globs(self.worker_pattern)

    @cached_property
    def queue_set(self) -> frozenset[str] | None:
        return frozenset(self.queue) if self.queue is not None else None


def _globs(patterns: list[str] | None) -> re.Pattern[str] | None:
    if patterns is None:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class RetryAction(_Strict):
    type: Literal["retry"]
    delay_seconds: float = Field(default=0, ge=0, description="countdown before the retry runs")
    max_attempts: int = Field(default=3, gt=0, description="retries sent for one chain, at most")
    same_arguments: bool = True
    args: list[Any] | None = Field(default=None, description="with same_arguments: false")
    kwargs: dict[str, Any] | None = Field(default=None, description="with same_arguments: false")
    exponential_backoff: bool = False
    backoff_multiplier: float = Field(default=2, ge=1)
    max_delay_seconds: float | None = Field(default=None, gt=0)
    queue: str | None = Field(default=None, min_length=1, description="default: the task's own")

    def delay_for(self, attempt: int) -> float:
        """Countdown for the ``attempt``-th retry of a chain (1-based)."""
        delay = self.delay_seconds
        if self.exponential_backoff:
            delay = self.delay_seconds * self.backoff_multiplier ** (attempt - 1)
        if self.max_delay_seconds is not None:
            delay = min(delay, self.max_delay_seconds)
        return float(delay)

    def schedule(self) -> list[float]:
        return [self.delay_for(n) for n in range(1, self.max_attempts + 1)]


class SlackAction(_Strict):
    type: Literal["slack"]
    webhook_url: str = Field(min_length=1, description="Slack incoming-webhook URL")
    message: str = Field(default=DEFAULT_SLACK_MESSAGE, description="template")

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        return _check_http_url(v)

    @field_validator("message")
    @classmethod
    def _check_message(cls, v: str) -> str:
        templates.parse(v)
        return v

    @cached_property
    def template(self) -> templates.Template:
        return templates.parse(self.message)


HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


class WebhookAction(_Strict):
    type: Literal["webhook"]
    url: str = Field(min_length=1)
    method: HttpMethod = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=10, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    body: dict[str, Any] | None = Field(
        default=None, description="JSON body; its string values are templates"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        return _check_http_url(v)


def _check_http_url(v: str) -> str:
    if not re.match(r"https?://[^/\s]+", v):
        raise ValueError("must be an http:// or https:// URL")
    return v


def _strings(
    value: Any, path: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, (*path, i))


def render_body(body: Any, values: dict[str, object]) -> Any:
    """Render every string of a webhook body as a template."""
    if isinstance(body, str):
        return templates.parse(body).render(values)
    if isinstance(body, dict):
        return {k: render_body(v, values) for k, v in body.items()}
    if isinstance(body, list):
        return [render_body(v, values) for v in body]
    return body


Action = Annotated[RetryAction | SlackAction | WebhookAction, Field(discriminator="type")]


class CircuitBreaker(_Strict):
    max_executions: int = Field(default=100, gt=0)
    time_window_hours: float = Field(default=1, gt=0)

    @property
    def window_seconds(self) -> float:
        return self.time_window_hours * 3600.0


class Workflow(_Strict):
    """One workflow document."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"title": "workflowd workflow"},
    )

    name: str = Field(min_length=1, description="unique across the workflow directory")
    description: str | None = None
    enabled: bool = True
    trigger: Trigger
    conditions: Conditions = Field(default_factory=Conditions)
    action: Action | None = None
    actions: list[Action] | None = Field(default=None, min_length=1)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)

    @field_validator("name")
    @classmethod
    def _strip_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @property
    def all_actions(self) -> list[RetryAction | SlackAction | WebhookAction]:
        if self.actions is not None:
            return list(self.actions)
        return [self.action] if self.action is not None else []

    def action_paths(self) -> list[tuple[tuple[str | int, ...], Any]]:
        if self.actions is not None:
            return [(("actions", i), a) for i, a in enumerate(self.actions)]
        return [(("action",), self.action)] if self.action is not None else []

    @property
    def retry_action(self) -> RetryAction | None:
        return next((a for a in self.all_actions if isinstance(a, RetryAction)), None)


MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "workflow": tuple(Workflow.model_fields),
    "trigger": tuple(Trigger.model_fields),
    "conditions": tuple(Conditions.model_fields),
    "circuit_breaker": tuple(CircuitBreaker.model_fields),
    "retry": tuple(RetryAction.model_fields),
    "slack": tuple(SlackAction.model_fields),
    "webhook": tuple(WebhookAction.model_fields),
}

Problem = tuple[tuple[str | int, ...], str]


def action_problems(action: RetryAction | SlackAction | WebhookAction) -> list[Problem]:
    """Checks inside one action whose location pydantic cannot give (templates in a body)."""
    problems: list[Problem] = []
    if isinstance(action, WebhookAction) and action.body is not None:
        for path, text in _strings(action.body, ("body",)):
            try:
                templates.parse(text)
            except templates.TemplateError as exc:
                problems.append((path, str(exc)))
    return problems


def cross_check(wf: Workflow) -> list[Problem]:
    """Rules that span fields; each problem is (path, message)."""
    problems: list[Problem] = []
    for path, action in wf.action_paths():
        problems.extend(((*path, *p), m) for p, m in action_problems(action))
    if (wf.action is None) == (wf.actions is None):
        problems.append(((), "give exactly one of 'action' (one action) or 'actions' (a list)"))
    event = wf.trigger.event
    if event == "task.execution_time_exceeded":
        if wf.trigger.threshold_seconds is None:
            problems.append(
                (("trigger",), "threshold_seconds is required for task.execution_time_exceeded")
            )
    elif wf.trigger.threshold_seconds is not None:
        problems.append(
            (
                ("trigger", "threshold_seconds"),
                f"threshold_seconds applies only to task.execution_time_exceeded, not {event}",
            )
        )
    if event == "worker.offline":
        for key in TASK_CONDITIONS:
            if getattr(wf.conditions, key) is not None:
                problems.append(
                    (("conditions", key), f"{key} needs a task; worker.offline has none")
                )
    elif event != "task.failed" and wf.conditions.error_pattern is not None:
        problems.append(
            (
                ("conditions", "error_pattern"),
                f"error_pattern needs an exception; only task.failed has one, not {event}",
            )
        )
    for path, action in wf.action_paths():
        if isinstance(action, RetryAction):
            if event not in RETRYABLE_TRIGGERS:
                problems.append(
                    (
                        (*path, "type"),
                        f"retry needs a task that finished or was abandoned "
                        f"({' or '.join(RETRYABLE_TRIGGERS)}); {event} has none",
                    )
                )
            if not action.same_arguments and action.args is None and action.kwargs is None:
                problems.append(
                    ((*path, "same_arguments"), "same_arguments: false needs args and/or kwargs")
                )
            if action.same_arguments and (action.args is not None or action.kwargs is not None):
                problems.append(
                    (
                        (*path, "args" if action.args is not None else "kwargs"),
                        "args/kwargs are used only with same_arguments: false",
                    )
                )
    if sum(isinstance(a, RetryAction) for a in wf.all_actions) > 1:
        problems.append((("actions",), "at most one retry action per workflow"))
    return problems


def risk_warnings(wf: Workflow) -> list[Problem]:
    """Legal but risky settings (``validate`` exits 3 on these alone)."""
    warnings: list[Problem] = []
    for path, action in wf.action_paths():
        if isinstance(action, RetryAction) and action.max_attempts > 10:
            warnings.append(
                (
                    (*path, "max_attempts"),
                    f"max_attempts {action.max_attempts} is over 10; a failing task will be "
                    "sent again and again",
                )
            )
    if wf.retry_action is not None and "circuit_breaker" not in wf.model_fields_set:
        warnings.append(
            (
                (),
                "retry workflow without a circuit_breaker; the default (100 runs an hour) "
                "applies - set it explicitly",
            )
        )
    if wf.conditions.task_name_pattern and "*" in wf.conditions.task_name_pattern:
        warnings.append(
            (("conditions", "task_name_pattern"), 'task_name_pattern "*" matches every task')
        )
    return warnings


def json_schema() -> dict[str, Any]:
    schema = Workflow.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://workflowd.dev/schema/workflow.json"
    return schema
