"""Reference templates load verbatim; dry runs show what the daemon would do; secrets hidden."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import EXAMPLE_ENV, EXAMPLES, cli, write
from workflowd import loader, model

# The four whole workflows of the reference page, as printed there.
REFERENCE_TEMPLATES = {
    "auto-retry-network-errors.yaml": """\
name: "Auto-retry network errors"
trigger:
  event: task.failed
conditions:
  error_pattern: "ConnectionError|Timeout|ConnectionRefusedError"
action:
  type: retry
  delay_seconds: 60
  max_attempts: 3
circuit_breaker:
  max_executions: 100
  time_window_hours: 1
""",
    "alert-payment-failures.yaml": """\
name: "Alert on payment processing failures"
trigger:
  event: task.failed
conditions:
  task_name_pattern: "payments.process_*"
action:
  type: slack
  webhook_url: "https://hooks.slack.com/services/YOUR/WEBHOOK"
  message: "💳 Payment task {task_name} failed: {error_message}"
circuit_breaker:
  max_executions: 50
  time_window_hours: 1
""",
    "recover-orphaned-tasks.yaml": """\
name: "Recover orphaned tasks"
trigger:
  event: task.orphaned
action:
  type: retry
  delay_seconds: 300  # Wait 5 minutes before retry
  max_attempts: 1     # Only retry once
circuit_breaker:
  max_executions: 200
  time_window_hours: 24
""",
    "escalate-after-3-failures.yaml": """\
name: "Escalate after 3 failures"
trigger:
  event: task.failed
conditions:
  failure_count_threshold: 3  # Only trigger after 3rd failure
action:
  type: slack
  webhook_url: "https://hooks.slack.com/services/ONCALL/WEBHOOK"
  message: "🚨 Task {task_name} failed 3 times. Manual intervention needed."
""",
}

REFERENCE_PAGE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "reference"
    / ("kanchi-workflow-automation.txt")
)


@pytest.mark.parametrize("name", sorted(REFERENCE_TEMPLATES))
def test_reference_templates_load_verbatim(name: str) -> None:
    text = REFERENCE_TEMPLATES[name]
    result = loader.load_text(text, name, env={})
    assert result.ok, result.issues
    assert result.warnings == []
    assert len(result.workflows) == 1
    # the example file is the template, byte for byte
    assert (EXAMPLES / name).read_text() == text


@pytest.mark.skipif(not REFERENCE_PAGE.exists(), reason="reference page not beside the checkout")
def test_templates_are_copied_from_the_reference_page() -> None:
    page = REFERENCE_PAGE.read_text()
    for text in REFERENCE_TEMPLATES.values():
        assert text.rstrip("\n") in page


def test_reference_templates_keep_their_values() -> None:
    wf = loader.load_text(REFERENCE_TEMPLATES["auto-retry-network-errors.yaml"], "x", {})
    w = wf.workflows[0].workflow
    assert w.trigger.event == "task.failed"
    assert isinstance(w.action, model.RetryAction)
    assert (w.action.delay_seconds, w.action.max_attempts, w.action.same_arguments) == (60, 3, True)
    assert w.circuit_breaker.max_executions == 100


def test_validate_examples_exits_zero() -> None:
    run = cli("validate", str(EXAMPLES), env=EXAMPLE_ENV)
    assert run.code == 0, run.err
    assert "0 error(s)" in run.out


def test_exponential_backoff_delays_printed() -> None:
    run = cli("test", str(EXAMPLES / "exponential-backoff.yaml"))
    assert run.code == 0, run.err
    assert "delays (s): 10, 20, 40, 80, 160" in run.out
    for n, d in enumerate([10, 20, 40, 80, 160], 1):
        assert f"attempt {n}: delay {d} s" in run.out
    data = json.loads(cli("test", "--json", str(EXAMPLES / "exponential-backoff.yaml")).out)
    retry = data[0]["actions"][0]
    assert [s["delay_seconds"] for s in retry["schedule"]] == [10, 20, 40, 80, 160]


def test_backoff_cap_applies(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "w.yaml",
        (
            "name: cap\ntrigger: {event: task.failed}\naction:\n  type: retry\n"
            "  delay_seconds: 10\n"
            "  max_attempts: 7\n  exponential_backoff: true\n  backoff_multiplier: 3\n"
            "  max_delay_seconds: 300\ncircuit_breaker: {max_executions: 5}\n"
        ),
    )
    data = json.loads(cli("test", "--json", str(path)).out)
    delays = [s["delay_seconds"] for s in data[0]["actions"][0]["schedule"]]
    assert delays == [10, 30, 90, 270, 300, 300, 300]


def test_dry_run_sample_satisfies_conditions() -> None:
    run = cli("test", "--json", str(EXAMPLES / "auto-retry-network-errors.yaml"))
    report = json.loads(run.out)[0]
    assert report["would_run"] is True
    assert report["conditions"] == [
        {
            "key": "error_pattern",
            "expected": "ConnectionError|Timeout|ConnectionRefusedError",
            "value": "ConnectionError('sample failure')",
            "matched": True,
        }
    ]
    assert report["circuit_breaker"] == {"max_executions": 100, "time_window_hours": 1}


def test_dry_run_renders_messages(tmp_path: Path) -> None:
    run = cli("test", "--json", str(EXAMPLES / "alert-payment-failures.yaml"))
    report = json.loads(run.out)[0]
    assert report["conditions"][0]["value"] == "payments.process_sample"
    assert report["actions"][0]["message"] == (
        "💳 Payment task payments.process_sample failed: sample failure"
    )


def test_dry_run_with_recorded_events(tmp_path: Path) -> None:
    events = [
        {
            "type": "task-received",
            "uuid": "u-1",
            "name": "payments.process_card",
            "args": "(7,)",
            "kwargs": "{}",
            "hostname": "celery@pay-1",
            "root_id": "u-1",
        },
        {
            "type": "task-failed",
            "uuid": "u-1",
            "exception": "ValueError('card declined')",
            "hostname": "celery@pay-1",
        },
    ]
    ev = write(tmp_path, "ev.json", json.dumps(events))
    run = cli("test", "--json", "--event", str(ev), str(EXAMPLES / "alert-payment-failures.yaml"))
    assert run.code == 0, run.err
    report = json.loads(run.out)[0]
    assert report["event_source"] == str(ev)
    assert report["event"]["worker"] == "celery@pay-1"
    assert report["would_run"] is True
    assert report["actions"][0]["message"] == (
        "💳 Payment task payments.process_card failed: card declined"
    )
    # a non-matching real event is reported as such
    events[0]["name"] = "reports.build"
    write(tmp_path, "ev.json", json.dumps(events))
    report = json.loads(
        cli("test", "--json", "--event", str(ev), str(EXAMPLES / "alert-payment-failures.yaml")).out
    )[0]
    assert report["would_run"] is False
    assert report["conditions"][0]["matched"] is False


def test_dry_run_of_invalid_file_exits_1(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "w.yaml",
        "name: x\ntrigger: {event: task.failed}\naction:\n"
        "  type: slack\n  webhook_url: http://h.invalid/\n  message: '{nope}'\n",
    )
    run = cli("test", str(path))
    assert run.code == 1
    assert f"{path}:6:12: action.message: unknown template variable {{nope}}" in run.err


@pytest.mark.parametrize("placeholder", ["{task_name.__class__}", "{nope}"])
def test_unsafe_or_unknown_placeholders_rejected(tmp_path: Path, placeholder: str) -> None:
    path = write(
        tmp_path,
        "w.yaml",
        "name: x\ntrigger: {event: task.failed}\naction:\n"
        f"  type: slack\n  webhook_url: http://h.invalid/\n  message: 'a {placeholder}'\n",
    )
    for args in (("validate", str(path)), ("test", str(path))):
        run = cli(*args)
        assert run.code == 1
        assert placeholder in run.err and f"{path}:6:" in run.err


SECRET_URL = "https://hooks.slack.com/services/T0SECRET/B0SECRET/xyzzy-very-secret"


def _secret_file(tmp_path: Path, url_var: str = "SLACK_URL") -> Path:
    return write(
        tmp_path,
        "secret.yaml",
        (
            "name: secret\ntrigger: {event: task.failed}\nactions:\n"
            f"  - type: slack\n    webhook_url: '${{{url_var}}}'\n"
            "    message: 'failed {task_name}'\n"
            f"  - type: webhook\n    url: '${{{url_var}}}'\n"
            "    headers: {Authorization: 'Bearer ${TOKEN}'}\n"
            "    body: {text: '{exception}'}\n"
        ),
    )


def test_secret_url_never_printed(tmp_path: Path) -> None:
    path = _secret_file(tmp_path)
    env = {"SLACK_URL": SECRET_URL, "TOKEN": "tok-abcdef-123"}
    outputs = []
    for args in (
        ("validate", str(path)),
        ("validate", "--json", str(path)),
        ("test", str(path)),
        ("test", "--json", str(path)),
    ):
        run = cli(*args, env=env)
        assert run.code == 0, run.err
        outputs.append(run.out + run.err)
    joined = "\n".join(outputs)
    assert "hooks.slack.com" in joined  # the host is shown, so the operator can tell
    for secret in (SECRET_URL, "T0SECRET", "xyzzy-very-secret", "tok-abcdef-123"):
        assert secret not in joined


def test_schema_is_valid_and_accepts_examples() -> None:
    run = cli("schema")
    schema = json.loads(run.out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    count = 0
    for f in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            errors = list(validator.iter_errors(doc))
            assert errors == [], (f, [e.message for e in errors])
            count += 1
    assert count >= 11
    bad = {
        "name": "x",
        "trigger": {"event": "task.failed"},
        "action": {"type": "retry"},
        "bogus": 1,
    }
    assert list(validator.iter_errors(bad))


def test_send_posts_for_real_and_keeps_the_secret(tmp_path: Path, http_sink: Any) -> None:
    secret_path = "/services/T0SECRET/B0SECRET/xyzzy-very-secret"
    path = _secret_file(tmp_path)
    env = {"SLACK_URL": http_sink.url(secret_path), "TOKEN": "tok-abcdef-123"}
    for args in (("test", "--send", str(path)), ("test", "--send", "--json", str(path))):
        run = cli(*args, env=env)
        assert run.code == 0, run.err
        joined = run.out + run.err
        for secret in ("T0SECRET", "xyzzy-very-secret", "tok-abcdef-123"):
            assert secret not in joined
        assert "127.0.0.1" in joined
    reqs = http_sink.requests(secret_path)
    assert len(reqs) == 4  # slack + webhook, twice
    slack = [r for r in reqs if "text" in r.json and r.json["text"].startswith("failed ")]
    assert slack and slack[0].json == {"text": "failed myapp.tasks.example"}
    hooks = [r for r in reqs if r.header("authorization")]
    assert hooks and hooks[0].header("authorization") == "Bearer tok-abcdef-123"
    assert hooks[0].json == {"text": "ConnectionError('sample failure')"}
    data = json.loads(cli("test", "--send", "--json", str(path), env=env).out)
    assert [s["status"] for s in data[0]["sent"]] == ["sent", "sent"]
    assert data[0]["sent"][0]["http_status"] == 200


def test_send_reports_a_failing_endpoint(tmp_path: Path, http_sink: Any) -> None:
    http_sink.respond("/down", statuses=[503])
    path = write(
        tmp_path,
        "w.yaml",
        "name: d\ntrigger: {event: task.failed}\naction:\n"
        f"  type: slack\n  webhook_url: '{http_sink.url('/down')}'\n",
    )
    data = json.loads(cli("test", "--send", "--json", str(path)).out)
    assert data[0]["sent"] == [
        {
            "type": "slack",
            "status": "failed",
            "http_status": 503,
            "error": f"POST http://127.0.0.1:{http_sink.port}/***: HTTP 503 after 1 attempt(s)",
        }
    ]
    assert len(http_sink.requests("/down")) == 1  # never re-sent in a dry run
