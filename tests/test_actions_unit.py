"""HTTP delivery (re-sends, Retry-After, no re-send on 4xx) and retry argument parsing."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from workflowd.actions.http import backoff, deliver
from workflowd.actions.retry import EVENT_REPR_LIMIT, parse_event_repr
from workflowd.errors import DeliveryError


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def transport(answers: list[Any]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen) - 1, len(answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), seen


def test_resends_on_5xx_and_429_honouring_retry_after() -> None:
    mt, seen = transport(
        [
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(200),
        ]
    )
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    async def go() -> Any:
        async with httpx.AsyncClient(transport=mt) as c:
            return await deliver(
                c, "POST", "http://h.invalid/x", json_body={"a": 1}, retries=3, sleep=sleep
            )

    d = run(go())
    assert (d.status, d.attempts) == (200, 3)
    assert sleeps == [backoff(1), 7.0]
    assert seen[0].read() == b'{"a":1}'


def test_gives_up_after_retries_and_redacts_url() -> None:
    mt, seen = transport([httpx.Response(500)])

    async def sleep(s: float) -> None:
        return None

    async def go() -> Any:
        async with httpx.AsyncClient(transport=mt) as c:
            return await deliver(
                c, "POST", "https://hooks.example.invalid/T0/B0/secret", retries=2, sleep=sleep
            )

    with pytest.raises(DeliveryError) as err:
        run(go())
    assert len(seen) == 3 and err.value.status == 500 and err.value.attempts == 3
    assert "secret" not in str(err.value) and "hooks.example.invalid" in str(err.value)


def test_no_resend_on_4xx() -> None:
    mt, seen = transport([httpx.Response(404)])

    async def go() -> Any:
        async with httpx.AsyncClient(transport=mt) as c:
            return await deliver(c, "POST", "http://h.invalid/", retries=3)

    with pytest.raises(DeliveryError):
        run(go())
    assert len(seen) == 1


def test_connection_errors_and_timeouts_are_resent() -> None:
    mt, seen = transport(
        [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(204)]
    )

    async def sleep(s: float) -> None:
        return None

    async def go() -> Any:
        async with httpx.AsyncClient(transport=mt) as c:
            return await deliver(c, "GET", "http://h.invalid/", retries=2, sleep=sleep)

    assert run(go()).status == 204 and len(seen) == 3


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(20) == 30.0


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ("(1, 'a', [2, 3])", "{'k': {'n': None}}", ([1, "a", [2, 3]], {"k": {"n": None}})),
        ("()", "{}", ([], {})),
        ("[1]", "{}", ([1], {})),
        ("(1, ...)", "{}", None),  # saferepr's mark of a cut nesting level
        ("(<object at 0x1>,)", "{}", None),
        ("(1,)", "{1: 2}", None),  # kwargs keys must be names
        ("'x'" + "a" * EVENT_REPR_LIMIT, "{}", None),  # at the size where Celery cuts
        (None, "{}", None),
    ],
)
def test_event_repr_parsing(args: str | None, kwargs: str, expected: Any) -> None:
    assert parse_event_repr(args, kwargs) == expected
