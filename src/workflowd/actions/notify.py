"""Slack and webhook actions: build the request from a workflow action and deliver it."""

from __future__ import annotations

from typing import Any

import httpx

from workflowd import model
from workflowd.actions.http import Delivery, deliver
from workflowd.envref import redact_url

SLACK_RETRIES = 3

DEFAULT_BODY_KEYS = (
    "trigger",
    "timestamp",
    "task_id",
    "task_name",
    "queue",
    "worker",
    "exception",
    "failure_count",
)


def webhook_body(action: model.WebhookAction, variables: dict[str, object]) -> Any:
    """The action's body with its templates rendered, or the default JSON document."""
    if action.body is not None:
        return model.render_body(action.body, variables)
    body: dict[str, Any] = {"workflow": variables["workflow_name"]}
    body.update({key: variables.get(key) for key in DEFAULT_BODY_KEYS})
    return body


def request_for(
    action: model.SlackAction | model.WebhookAction,
    variables: dict[str, object],
    *,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """method, url, json body, headers, timeout and re-sends of one action.

    ``body`` replaces what the action would render (a webhook's whole body, a Slack
    post's fields), for notices that are not about one task.
    """
    if isinstance(action, model.SlackAction):
        return {
            "method": "POST",
            "url": action.webhook_url,
            "json_body": body or {"text": action.template.render(variables)},
            "headers": None,
            "timeout": 10.0,
            "retries": SLACK_RETRIES,
        }
    return {
        "method": action.method,
        "url": action.url,
        "json_body": body if body is not None else webhook_body(action, variables),
        "headers": dict(action.headers) or None,
        "timeout": action.timeout_seconds,
        "retries": action.retries,
    }


async def send(
    client: httpx.AsyncClient, request: dict[str, Any], *, retries: int | None = None
) -> tuple[Delivery, dict[str, Any]]:
    """Deliver; return the delivery and the history detail (URL redacted)."""
    req = dict(request)
    if retries is not None:
        req["retries"] = retries
    delivery = await deliver(
        client,
        req["method"],
        req["url"],
        json_body=req["json_body"],
        headers=req["headers"],
        timeout=req["timeout"],
        retries=req["retries"],
    )
    detail = {
        "url": redact_url(req["url"]),
        "method": req["method"],
        "http_status": delivery.status,
        "attempts": delivery.attempts,
    }
    return delivery, detail
