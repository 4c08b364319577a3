"""HTTP delivery for Slack and webhooks: timeouts, bounded re-sends with backoff, Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from workflowd.envref import redact_url
from workflowd.errors import DeliveryError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0


@dataclass(frozen=True, slots=True)
class Delivery:
    status: int
    attempts: int
    duration_ms: int


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def backoff(attempt: int) -> float:
    """Wait before re-send number ``attempt`` (1-based): 0.5, 1, 2, 4 ... capped."""
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))


async def deliver(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    retries: int = 3,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Delivery:
    """Send one request; re-send on connection errors, timeouts, 5xx and 429 up to ``retries``.

    Raises DeliveryError with the redacted URL and last status when it never succeeds.
    """
    start = time.monotonic()
    last_status: int | None = None
    last_error = ""
    for attempt in range(retries + 1):
        wait: float | None = None
        try:
            response = await client.request(
                method, url, json=json_body, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException:
            last_error, last_status = f"timed out after {timeout:g} s", None
        except httpx.TransportError as exc:
            last_error, last_status = f"connection failed: {type(exc).__name__}", None
        else:
            last_status = response.status_code
            if 200 <= response.status_code < 300:
                return Delivery(
                    response.status_code, attempt + 1, int((time.monotonic() - start) * 1000)
                )
            last_error = f"HTTP {response.status_code}"
            if response.status_code not in RETRY_STATUSES:
                break
            wait = _retry_after(response.headers.get("Retry-After"), time.time())
            if wait is not None:
                wait = min(wait, RETRY_AFTER_CAP)
        if attempt < retries:
            await sleep(wait if wait is not None else backoff(attempt + 1))
    raise DeliveryError(
        f"{method} {redact_url(url)}: {last_error} after {attempt + 1} attempt(s)",
        status=last_status,
        attempts=attempt + 1,
    )
