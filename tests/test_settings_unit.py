"""Settings resolution: flags > WORKFLOWD_* env > config file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflowd import model
from workflowd.errors import ConfigError
from workflowd.settings import resolve


def test_defaults() -> None:
    s = resolve({}, env={})
    assert s.broker_url == "redis://localhost:6379/0" and s.default_queue == "celery"
    assert s.database == Path("workflowd.db") and s.worker_timeout_seconds == 30
    assert s.result_backend is None and s.metrics_address is None


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "broker_url: redis://file/0\ndefault_queue: fileq\ndatabase: f.db\n"
        "workflows_dir: wf\nreload_interval_seconds: 5\n"
    )
    env = {
        "WORKFLOWD_CONFIG": str(cfg),
        "WORKFLOWD_DEFAULT_QUEUE": "envq",
        "CELERY_BROKER_URL": "redis://celery-env/0",
    }
    s = resolve({"database": "flag.db"}, env=env)
    assert s.database == Path("flag.db")  # flag beats file
    assert s.default_queue == "envq"  # env beats file
    assert s.broker_url == "redis://celery-env/0"  # CELERY_BROKER_URL is an env source too
    assert s.workflows_dir == tmp_path / "wf"  # relative to the config file
    assert s.reload_interval_seconds == 5
    env["WORKFLOWD_BROKER_URL"] = "redis://wfd-env/0"
    assert resolve({}, env=env).broker_url == "redis://wfd-env/0"


def test_state_directory_under_systemd() -> None:
    s = resolve({}, env={"STATE_DIRECTORY": "/var/lib/workflowd:/other"})
    assert s.database == Path("/var/lib/workflowd/workflowd.db")


def test_notification_action_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("notifications:\n  circuit_breaker: {type: webhook, url: '${HOOK}'}\n")
    s = resolve({"config": str(cfg)}, env={"HOOK": "https://oncall.invalid/abc123"})
    assert isinstance(s.circuit_breaker_notification, model.WebhookAction)
    assert s.redactor()("posting to https://oncall.invalid/abc123") == "posting to ${HOOK}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("worker_timeout_seconds: 0\n", "1:25: worker_timeout_seconds: "),
        ("brokr_url: x\n", "1:1: brokr_url: unknown key 'brokr_url' (did you mean 'broker_url'?)"),
        (
            "notifications:\n  circuit_breaker: {type: slack, webhook_url: '${NOPE_X}'}\n",
            "2:47: notifications.circuit_breaker.webhook_url: environment variable NOPE_X",
        ),
        ("a: [\n", "YAML syntax error"),
    ],
)
def test_bad_config_file_is_located(tmp_path: Path, text: str, fragment: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve({"config": str(cfg)}, env={})
    assert str(cfg) in str(err.value) and fragment in str(err.value)
