"""Small helpers shared by tests that drive the CLI in-process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from workflowd.cli import main


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(*args: str, env: dict[str, str] | None = None) -> Run:
    runner = CliRunner()
    full_env = {"WORKFLOWD_CONFIG": "", **(env or {})}
    result = runner.invoke(main, list(args), env=full_env, catch_exceptions=False)
    return Run(result.exit_code, result.stdout, result.stderr)


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "workflows"
EXAMPLE_ENV = {
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/s3cr3tslackpath",
    "PAGERDUTY_ROUTING_KEY": "pd-routing-key-0123456789",
    "ONCALL_WEBHOOK_URL": "https://oncall.example.invalid/hook/abcdef",
    "ONCALL_TOKEN": "oncall-token-98765",
}


def set_env(values: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return old
