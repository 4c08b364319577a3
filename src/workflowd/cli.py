"""The ``workflowd`` command line: a thin layer over loader, dry runs, store and daemon."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from workflowd import dryrun, history, loader, model, settings
from workflowd.durations import format_seconds, parse_duration
from workflowd.errors import ConfigError, Issue, StoreError

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_WARNINGS = 0, 1, 2, 3


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _err(text: str) -> None:
    click.echo(text, err=True)


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The settings flags a command uses (SPEC §1)."""
    flags: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        "config": click.option(
            "--config",
            type=click.Path(dir_okay=False),
            default=None,
            help="config file (default: $WORKFLOWD_CONFIG, /etc/workflowd/workflowd.yaml)",
        ),
        "workflows_dir": click.option(
            "--workflows-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="directory of workflow files",
        ),
        "database": click.option(
            "--database",
            type=click.Path(dir_okay=False),
            default=None,
            help="SQLite history database",
        ),
        "broker_url": click.option("--broker-url", default=None, help="Celery broker URL"),
        "result_backend": click.option(
            "--result-backend",
            default=None,
            help="Celery result backend URL (for exact retry args)",
        ),
    }

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for n in reversed(names):
            f = flags[n](f)
        return f

    return decorate


def load_settings(**flags: Any) -> settings.Settings:
    try:
        return settings.resolve(flags)
    except ConfigError as exc:
        _err(f"error: {exc}")
        sys.exit(EXIT_INVALID)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="workflowd")
def main() -> None:
    """Self-healing automation for Celery clusters, configured by YAML workflows."""


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="issues as a JSON array")
@settings_options("config", "workflows_dir")
def validate(paths: tuple[Path, ...], as_json: bool, **flags: Any) -> None:
    """Check workflow files or directories (no broker needed).

    Exit 0 when valid, 1 on errors, 3 on warnings only.
    """
    if not paths:
        paths = (load_settings(**flags).workflows_dir,)
    files = loader.discover(list(paths))
    snap = loader.build_snapshot([loader.load_file(p) for p in files])
    issues: list[Issue] = [i for r in snap.files.values() for i in r.issues]
    issues.sort(key=lambda i: (i.file, i.line, i.column))
    if as_json:
        _emit_json([i.to_dict() for i in issues])
    else:
        for i in issues:
            _err(str(i))
    errors = [i for i in issues if i.severity.value == "error"]
    if not as_json:
        status = "invalid" if errors else "ok"
        n_wf = sum(len(r.workflows) for r in snap.files.values())
        click.echo(
            f"{status}: {len(files)} file(s), {n_wf} workflow(s), {len(errors)} error(s), "
            f"{len(issues) - len(errors)} warning(s)"
        )
    if errors or not files:
        if not files:
            _err(f"error: no workflow files (*.yaml, *.yml) under {', '.join(map(str, paths))}")
        sys.exit(EXIT_INVALID)
    sys.exit(EXIT_WARNINGS if issues else EXIT_OK)


@main.command("test")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--event",
    "event_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a recorded Celery event (or list of events) as JSON",
)
@click.option("--send", is_flag=True, help="post the slack and webhook actions for real")
@click.option("--json", "as_json", is_flag=True, help="the dry run as a JSON array")
@settings_options("config")
def test_cmd(file: Path, event_file: Path | None, send: bool, as_json: bool, **flags: Any) -> None:
    """Dry-run the workflows of FILE against a sample (or --event) event."""
    cfg = load_settings(**flags)
    snap = loader.build_snapshot([loader.load_file(file)])
    result = snap.files[str(file)]
    for i in result.issues:
        _err(str(i))
    if not result.ok:
        sys.exit(EXIT_INVALID)
    event_data = None
    if event_file is not None:
        try:
            event_data = dryrun.load_event_file(event_file)
        except ValueError as exc:
            _err(f"error: {exc}")
            sys.exit(EXIT_INVALID)
    redactor = snap.redactor
    reports = []
    for lw in result.workflows:
        try:
            ctx = (
                dryrun.context_from_event(event_data, lw)
                if event_data is not None
                else dryrun.sample_context(lw)
            )
        except (ValueError, TypeError) as exc:
            _err(f"error: {event_file}: {exc}")
            sys.exit(EXIT_INVALID)
        report = dryrun.plan(
            lw,
            ctx,
            redactor,
            event_source=str(event_file or "sample"),
            default_queue=cfg.default_queue,
        )
        if send:
            report["sent"] = dryrun.run_send(lw, ctx, redactor)
        reports.append(report)
    if as_json:
        _emit_json(reports)
    else:
        for report in reports:
            click.echo(render_plan(report))
    sys.exit(EXIT_OK)


def render_plan(r: dict[str, Any]) -> str:
    out = [
        f"== {r['workflow']}  ({r['file']}:{r['line']}, version {r['version']}"
        f"{'' if r['enabled'] else ', DISABLED'})"
    ]
    trig = r["trigger"]
    extra = (
        f", threshold {format_seconds(trig['threshold_seconds'])} s"
        if "threshold_seconds" in trig
        else ""
    )
    out.append(f"trigger: {trig['event']}{extra}")
    out.append(f"event ({r['event_source']}):")
    for k, v in r["event"].items():
        out.append(f"  {k}: {v}")
    out.append("conditions:" if r["conditions"] else "conditions: none (every event matches)")
    for c in r["conditions"]:
        verdict = "match" if c["matched"] else "NO MATCH"
        out.append(
            f"  [{verdict}] {c['key']}: {json.dumps(c['expected'])}  "
            f"value: {c['value'] if c['value'] is not None else 'unknown'}"
        )
    out.append(
        "result: actions would run"
        if r["would_run"]
        else "result: actions would NOT run" + ("" if r["enabled"] else " (disabled)")
    )
    out.append("actions:")
    for n, a in enumerate(r["actions"], 1):
        if a["type"] == "retry":
            delays = [s["delay_seconds"] for s in a["schedule"]]
            args = a["arguments"] if isinstance(a["arguments"], str) else json.dumps(a["arguments"])
            out.append(
                f"  {n}. retry on queue {a['queue']} ({a['queue_source']}), {args}, "
                f"at most {a['max_attempts']} per chain"
            )
            out.append(f"     delays (s): {', '.join(format_seconds(d) for d in delays)}")
            for s in a["schedule"]:
                out.append(
                    f"     attempt {s['attempt']}: delay {format_seconds(s['delay_seconds'])} s"
                )
        elif a["type"] == "slack":
            out.append(f"  {n}. slack POST {a['url']}")
            out.append("     message: " + a["message"].replace("\n", "\n              "))
        else:
            out.append(
                f"  {n}. webhook {a['method']} {a['url']} (timeout "
                f"{format_seconds(a['timeout_seconds'])} s, {a['retries']} re-send(s))"
            )
            if a["headers"]:
                out.append(f"     headers: {', '.join(f'{k}: ***' for k in a['headers'])}")
            out.append("     body: " + json.dumps(a["body"], ensure_ascii=False))
    cb = r["circuit_breaker"]
    out.append(
        f"circuit breaker: at most {cb['max_executions']} runs per "
        f"{format_seconds(cb['time_window_hours'])} h (rolling window)"
    )
    for s in r.get("sent", []):
        out.append(f"sent: {json.dumps(s)}")
    return "\n".join(out) + "\n"


@main.command()
@settings_options("config", "workflows_dir", "database", "broker_url", "result_backend")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(log_level: str, **flags: Any) -> None:
    """Run the daemon: load workflows, consume events, act, record history."""
    from workflowd import daemon

    cfg = load_settings(**flags)
    if not cfg.workflows_dir.is_dir():
        _err(f"error: workflows directory {cfg.workflows_dir} does not exist")
        sys.exit(EXIT_INVALID)
    sys.exit(daemon.run(cfg, log_level=log_level))


def _open_store(cfg: settings.Settings) -> history.Store:
    try:
        return history.Store(cfg.database, readonly=True)
    except StoreError as exc:
        _err(f"error: {exc}")
        sys.exit(EXIT_INVALID)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _duration(_: Any, __: Any, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("history")
@click.argument("name", required=False)
@click.option("--since", callback=_duration, help="only runs started this long ago: 90s, 2h, 7d")
@click.option("--outcome", type=click.Choice(history.OUTCOMES), help="only runs with this outcome")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="a JSON array")
@settings_options("config", "database")
def history_cmd(
    name: str | None,
    since: float | None,
    outcome: str | None,
    limit: int,
    as_json: bool,
    **flags: Any,
) -> None:
    """Workflow runs, newest first (all workflows, or NAME)."""
    cfg = load_settings(**flags)
    store = _open_store(cfg)
    rows = store.runs(
        name, since=None if since is None else time.time() - since, outcome=outcome, limit=limit
    )
    if as_json:
        _emit_json(rows)
        return
    for r in rows:
        acts = ", ".join(f"{a['type']}:{a['status']}" for a in r["actions"]) or "-"
        r["actions_summary"] = acts
        r["breaker"] = "{state} {count}/{limit}".format(
            **{"state": "?", "count": "?", "limit": "?", **r["circuit_breaker"]}
        )
    click.echo(
        _table(
            rows,
            [
                "id",
                "started_at",
                "workflow",
                "trigger",
                "task_id",
                "task_name",
                "outcome",
                "reason",
                "actions_summary",
                "breaker",
            ],
        )
    )


STATUS_STALE_SECONDS = 30.0


@main.command()
@click.option("--json", "as_json", is_flag=True, help="a JSON array of workflows")
@settings_options("config", "workflows_dir", "database")
def status(as_json: bool, **flags: Any) -> None:
    """Loaded workflows, versions, circuit breakers and the last reload. Exit 1 on load errors.

    Asks the running daemon (through the status it keeps in the database); when no
    daemon runs, loads the workflows directory itself.
    """
    cfg = load_settings(**flags)
    info: dict[str, Any] | None = None
    if cfg.database.exists():
        store = _open_store(cfg)
        info = history.get_meta(store, "status")
        store.close()
    running = info is not None and _pid_alive(int(info.get("pid", 0)))
    notes: list[str] = []
    if info is None or not running:
        snap = loader.load_paths([cfg.workflows_dir])
        errors = [str(i) for i in snap.errors]
        workflows: list[dict[str, Any]] = [
            loader.summary(lw, snap) for lw in sorted(snap.workflows.values(), key=lambda w: w.name)
        ]
        last: dict[str, Any] = {"at": None, "success": not errors, "errors": errors}
        source = f"daemon not running; loaded {cfg.workflows_dir} directly"
    else:
        assert info is not None
        workflows, last = info["workflows"], info["last_reload"]
        errors = last.get("errors", [])
        source = f"daemon pid {info['pid']}, status at {info['updated_at']}"
        notes.append(
            "broker: "
            + ("connected" if info.get("broker_connected") else "disconnected, reconnecting")
            + f"; event stream gaps: {info.get('intake_gaps', 0)}"
        )
        if info.get("problem"):
            notes.append(f"unhealthy: {info['problem']}")
        age = _age_seconds(info.get("updated_at"))
        if age is not None and age > STATUS_STALE_SECONDS:
            notes.append(f"warning: the daemon has not updated its status for {age:.0f}s")
        for path in last.get("held", []):
            notes.append(f"kept last good version of {path}: its current content fails to load")
    if as_json:
        _emit_json(workflows)
    else:
        click.echo(source)
        for w in workflows:
            w["breaker"] = "{state} {count}/{limit}".format(
                **{"count": "-", **w["circuit_breaker"]}
            )
            if w.get("kept_last_good"):
                w["version"] = f"{w['version']} (last good)"
        click.echo(_table(workflows, ["name", "version", "trigger", "enabled", "breaker", "file"]))
        click.echo(
            f"last reload: {last.get('at') or '-'} "
            f"({'ok' if not errors else str(len(errors)) + ' error(s)'})"
        )
        for n in notes:
            click.echo(n)
    for e in errors:
        _err(e)
    sys.exit(EXIT_INVALID if errors else EXIT_OK)


def _age_seconds(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return time.time() - then.timestamp()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="a JSON array, oldest first")
@settings_options("config", "database")
def chain(task_id: str, as_json: bool, **flags: Any) -> None:
    """The retry chain TASK_ID belongs to, oldest first."""
    cfg = load_settings(**flags)
    store = _open_store(cfg)
    me = store.chain_of(task_id)
    if me is None:
        _err(f"error: {task_id} is in no retry chain (workflowd never retried it or its retries)")
        sys.exit(EXIT_INVALID)
    rows = [
        {
            "task_id": r["task_id"],
            "parent_id": r["parent_id"],
            "root_id": r["root_id"],
            "task_name": r["task_name"],
            "attempt": r["attempt"],
            "workflow": r["workflow"] or "",
            "sent_at": history.iso(r["sent_at"]),
            "state": r["state"],
        }
        for r in store.chain(me["root_id"])
    ]
    if as_json:
        _emit_json(rows)
    else:
        click.echo(
            _table(
                rows,
                ["attempt", "task_id", "parent_id", "task_name", "workflow", "sent_at", "state"],
            )
        )


@main.command()
def schema() -> None:
    """Print the JSON Schema of the workflow file format."""
    _emit_json(model.json_schema())


if __name__ == "__main__":  # pragma: no cover
    main()
