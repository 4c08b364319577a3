"""SPEC §7: every class of bad input names the file, the line and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import cli, write

GOOD = """\
name: good
trigger:
  event: task.failed
action:
  type: slack
  webhook_url: "https://hooks.example.invalid/x"
  message: "{task_name} failed"
"""


def issue_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if re.match(r"^\S+:\d+:\d+: ", line)]


def validate_one(tmp_path: Path, text: str, name: str = "wf.yaml") -> tuple[int, list[str]]:
    path = write(tmp_path, name, text)
    run = cli("validate", str(path))
    return run.code, issue_lines(run.err)


def assert_issue(lines: list[str], file: Path, line: int, key: str, *fragments: str) -> str:
    prefix = f"{file}:{line}:"
    for entry in lines:
        if entry.startswith(prefix) and f": {key}: " in entry:
            for frag in fragments:
                assert frag in entry, entry
            return entry
    raise AssertionError(f"no issue at {prefix} for key {key!r} in {lines}")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, "name: x\ntrigger:\n  event: [task.failed\naction: {}\n")
    assert code == 1
    entry = lines[0]
    m = re.match(
        rf"{re.escape(str(tmp_path / 'wf.yaml'))}:(\d+):(\d+): \(document\): YAML syntax", entry
    )
    assert m, entry
    assert int(m.group(1)) in (3, 4)


def test_non_mapping_document(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, GOOD + "---\n- just\n- a list\n")
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 9, "(document)", "must be a mapping", "a list")


def test_empty_file(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, "# nothing but a comment\n")
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 1, "(document)", "empty")


def test_unknown_key_suggests(tmp_path: Path) -> None:
    text = GOOD.replace("trigger:", "triger:") + "circuit_breaker:\n  max_execution: 5\n"
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    f = tmp_path / "wf.yaml"
    assert_issue(lines, f, 2, "triger", "unknown key", "did you mean 'trigger'")
    assert_issue(lines, f, 9, "circuit_breaker.max_execution", "did you mean 'max_executions'")


def test_unknown_key_inside_action(tmp_path: Path) -> None:
    text = GOOD.replace('  message: "{task_name} failed"', "  mesage: hi")
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 7, "action.mesage", "did you mean 'message'")


def test_wrong_types(tmp_path: Path) -> None:
    text = (
        "name: w\nenabled: 'yes'\ntrigger:\n  event: task.failed\nconditions:\n  queue: 5\n"
        "action:\n  type: retry\n  max_attempts: '3'\ncircuit_breaker:\n  max_executions: 5\n"
    )
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    f = tmp_path / "wf.yaml"
    assert_issue(lines, f, 2, "enabled", "boolean")
    assert_issue(lines, f, 6, "conditions.queue", "list")
    assert_issue(lines, f, 9, "action.max_attempts", "integer", "'3'")


@pytest.mark.parametrize(
    ("snippet", "line", "key"),
    [
        ("action:\n  type: retry\n  delay_seconds: -5\n", 6, "action.delay_seconds"),
        ("action:\n  type: retry\n  max_attempts: 0\n", 6, "action.max_attempts"),
        (
            "action:\n  type: webhook\n  url: http://h.invalid/\n  timeout_seconds: 0\n",
            7,
            "action.timeout_seconds",
        ),
    ],
)
def test_negative_or_zero_numbers(tmp_path: Path, snippet: str, line: int, key: str) -> None:
    text = f"name: n\ntrigger:\n  event: task.failed\n{snippet}"
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", line, key, "greater than")


def test_zero_circuit_breaker_and_threshold(tmp_path: Path) -> None:
    text = (
        "name: n\ntrigger:\n  event: task.execution_time_exceeded\n  threshold_seconds: 0\n"
        + "action:\n  type: slack\n  webhook_url: http://h.invalid/\n"
        + "circuit_breaker:\n  time_window_hours: -1\n"
    )
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    f = tmp_path / "wf.yaml"
    assert_issue(lines, f, 4, "trigger.threshold_seconds", "greater than 0")
    assert_issue(lines, f, 9, "circuit_breaker.time_window_hours", "greater than 0")


def test_invalid_regex_has_position(tmp_path: Path) -> None:
    text = GOOD.replace(
        "action:", 'conditions:\n  error_pattern: "Connection(Error|Timeout"\naction:'
    )
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    assert_issue(
        lines,
        tmp_path / "wf.yaml",
        5,
        "conditions.error_pattern",
        "invalid regular expression at position 10",
        "missing )",
    )


def test_unknown_trigger_event(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, GOOD.replace("task.failed", "task.fialed"))
    assert code == 1
    assert_issue(
        lines,
        tmp_path / "wf.yaml",
        3,
        "trigger.event",
        "unknown trigger event",
        "did you mean 'task.failed'",
    )


def test_unknown_action_type(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, GOOD.replace("type: slack", "type: slak"))
    assert code == 1
    assert_issue(
        lines,
        tmp_path / "wf.yaml",
        5,
        "action.type",
        "unknown action type 'slak'",
        "did you mean 'slack'",
    )


@pytest.mark.parametrize("placeholder", ["{nope}", "{task_name.__class__}", "{task_args[0]}"])
def test_bad_template_variables(tmp_path: Path, placeholder: str) -> None:
    code, lines = validate_one(tmp_path, GOOD.replace("{task_name} failed", f"x {placeholder}"))
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 7, "action.message", placeholder)


def test_bad_template_in_webhook_body(tmp_path: Path) -> None:
    text = (
        "name: b\ntrigger:\n  event: task.failed\naction:\n  type: webhook\n"
        "  url: http://h.invalid/\n  body:\n    text: '{task_nam}'\n"
    )
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    assert_issue(
        lines, tmp_path / "wf.yaml", 8, "action.body.text", "{task_nam}", "did you mean {task_name}"
    )


def test_unset_env_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WFD_NOT_SET_ANYWHERE", raising=False)
    text = GOOD.replace('"https://hooks.example.invalid/x"', '"${WFD_NOT_SET_ANYWHERE}"')
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    assert_issue(
        lines, tmp_path / "wf.yaml", 6, "action.webhook_url", "WFD_NOT_SET_ANYWHERE", "not set"
    )


@pytest.mark.parametrize("event", ["worker.offline", "task.execution_time_exceeded"])
def test_retry_on_trigger_without_finished_task(tmp_path: Path, event: str) -> None:
    threshold = "  threshold_seconds: 5\n" if "exceeded" in event else ""
    text = (
        f"name: r\ntrigger:\n  event: {event}\n{threshold}actions:\n"
        "  - type: slack\n    webhook_url: http://h.invalid/\n  - type: retry\n"
    )
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    line = 8 if threshold else 7
    assert_issue(lines, tmp_path / "wf.yaml", line, "actions[1].type", "retry needs a task")


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", GOOD)
    b = write(tmp_path, "sub/b.yaml", "# second copy\n" + GOOD)
    run = cli("validate", str(tmp_path))
    assert run.code == 1
    lines = issue_lines(run.err)
    first = assert_issue(lines, a, 1, "name", "duplicate workflow name 'good'")
    second = assert_issue(lines, b, 2, "name", "duplicate workflow name 'good'")
    for entry in (first, second):
        assert f"{a}:1" in entry and f"{b}:2" in entry


def test_file_over_one_mebibyte(tmp_path: Path) -> None:
    text = GOOD + "description: '" + "x" * (1024 * 1024) + "'\n"
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 1, "(document)", "limit is 1048576")


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(bomb) + "\nname: bomb\n"
    code, lines = validate_one(tmp_path, text)
    assert code == 1
    entry = lines[0]
    assert "alias bomb" in entry
    assert re.match(rf"{re.escape(str(tmp_path / 'wf.yaml'))}:\d+:\d+: \(document\): ", entry)


def test_action_and_actions_both_or_neither(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, "name: z\ntrigger:\n  event: task.failed\n")
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 1, "(document)", "exactly one of 'action'")


def test_missing_required_key(tmp_path: Path) -> None:
    code, lines = validate_one(tmp_path, GOOD.replace("name: good\n", "description: d\n"))
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 1, "name", "required")


def test_threshold_required_for_execution_time(tmp_path: Path) -> None:
    code, lines = validate_one(
        tmp_path, GOOD.replace("task.failed", "task.execution_time_exceeded")
    )
    assert code == 1
    assert_issue(lines, tmp_path / "wf.yaml", 3, "trigger", "threshold_seconds is required")


def test_good_files_still_load_beside_a_bad_one(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD)
    write(tmp_path, "bad.yaml", "name: [\n")
    run = cli("validate", str(tmp_path))
    assert run.code == 1
    assert "1 workflow(s)" in run.out
    assert all("bad.yaml" in line for line in issue_lines(run.err))


@pytest.mark.parametrize(
    ("snippet", "key", "fragment"),
    [
        (
            "action:\n  type: retry\n  max_attempts: 11\ncircuit_breaker: {max_executions: 5}\n",
            "action.max_attempts",
            "over 10",
        ),
        ("action:\n  type: retry\n", "(document)", "without a circuit_breaker"),
        (
            "conditions:\n  task_name_pattern: '*'\naction:\n  type: slack\n"
            "  webhook_url: http://h.invalid/\n",
            "conditions.task_name_pattern",
            "every task",
        ),
    ],
)
def test_risky_settings_warn_with_exit_3(
    tmp_path: Path, snippet: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, "w.yaml", f"name: w\ntrigger:\n  event: task.failed\n{snippet}")
    run = cli("validate", str(path))
    assert run.code == 3, run.err
    lines = issue_lines(run.err)
    assert len(lines) == 1
    assert f": warning: {key}: " in lines[0] and fragment in lines[0]
    assert lines[0].startswith(f"{path}:")


def test_validate_json_output(tmp_path: Path) -> None:
    import json

    path = write(tmp_path, "w.yaml", GOOD.replace("task.failed", "task.fail"))
    run = cli("validate", "--json", str(path))
    assert run.code == 1
    data = json.loads(run.out)
    assert (
        data[0]["file"] == str(path) and data[0]["line"] == 3 and data[0]["key"] == "trigger.event"
    )
