"""The demo's Celery app: tasks that fail the way production tasks do.

Configured from the environment: DEMO_BROKER_URL and DEMO_RESULT_BACKEND.
"""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery(
    "demo",
    broker=os.environ.get("DEMO_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("DEMO_RESULT_BACKEND") or None,
)
app.conf.update(
    worker_send_task_events=True,  # -E: workflowd reads the task events
    task_send_sent_event=True,  # task-sent carries the queue
    result_extended=True,  # exact args for retries, from the result backend
    worker_hijack_root_logger=False,
)


class SMTPException(Exception):
    pass


@app.task(name="payments.process_card")
def process_card(order_id: int, amount_cents: int) -> None:
    raise ValueError("card declined")


@app.task(name="myapp.tasks.fetch_prices")
def fetch_prices(symbols: list[str]) -> None:
    raise ConnectionError("price feed refused the connection")


@app.task(name="myapp.tasks.send_email")
def send_email(to: str, subject: str) -> None:
    raise SMTPException("421 service not available")


@app.task(name="ingest.load_feed")
def load_feed(feed: str, since: str) -> None:
    raise OSError(f"feed {feed} unavailable")


@app.task(name="reports.build")
def build(report: str, seconds: float = 1.0) -> str:
    time.sleep(seconds)
    return report
