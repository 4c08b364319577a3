"""Workflow files and directories to an immutable snapshot, with per-file located errors.

A file either loads whole or not at all; a directory load keeps the last good
version of a file that stopped loading, so one bad edit never takes down the
workflows that were running.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workflowd import envref, model
from workflowd.errors import Issue, Severity
from workflowd.yamlsrc import MAX_FILE_BYTES, Document, load_documents

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedWorkflow:
    workflow: model.Workflow
    file: str
    line: int
    version: str  # hash of the definition as written (before ${ENV} expansion)

    @property
    def name(self) -> str:
        return self.workflow.name


def summary(
    lw: LoadedWorkflow, snapshot: Snapshot, breaker: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One workflow as ``workflowd status`` shows it (``breaker``: the daemon's live state)."""
    cb = lw.workflow.circuit_breaker
    return {
        "name": lw.name,
        "version": lw.version,
        "file": lw.file,
        "line": lw.line,
        "trigger": lw.workflow.trigger.event,
        "enabled": lw.workflow.enabled,
        # the file fails to load now; this is its last good version
        "kept_last_good": lw.file in snapshot.held,
        "circuit_breaker": {
            **(breaker if breaker is not None else {"state": "unknown"}),
            "limit": cb.max_executions,
            "window_hours": cb.time_window_hours,
        },
    }


@dataclass
class FileResult:
    path: str
    digest: str
    workflows: list[LoadedWorkflow] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity is Severity.WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors


def key_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def data_path(loc: tuple[str | int, ...], data: Any) -> tuple[str | int, ...]:
    """Pydantic's error location with union-member and tag names taken out."""
    path: list[str | int] = []
    cur = data
    for part in loc:
        if (isinstance(cur, dict) and part in cur) or (
            isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        ):
            path.append(part)
            cur = cur[part]  # type: ignore[index]
        elif (
            isinstance(cur, dict)
            and isinstance(part, str)
            and part not in cur
            and (
                part in model.ACTION_TYPES
                or "[" in part
                or part in ("str", "list", "function-before")
            )
        ):
            continue  # a union member's name, not a key
        else:
            path.append(part)
            cur = None
    return tuple(path)


def _allowed_keys(path: tuple[str | int, ...], data: Any) -> tuple[str, ...]:
    """The keys allowed in the mapping at ``path`` (for "did you mean")."""
    if not path:
        return model.MODEL_KEYS["workflow"]
    head = path[0]
    if head in ("trigger", "conditions", "circuit_breaker"):
        return model.MODEL_KEYS[str(head)]
    if head in ("action", "actions"):
        node = data
        for p in path:
            node = node[p] if isinstance(node, dict | list) else None  # type: ignore[index]
        if isinstance(node, dict) and node.get("type") in model.ACTION_TYPES:
            return model.MODEL_KEYS[node["type"]]
    return ()


AllowedKeys = Callable[[tuple[str | int, ...], Any], tuple[str, ...]]


def error_message(
    err: Mapping[str, Any],
    path: tuple[str | int, ...],
    data: Any,
    allowed_keys: AllowedKeys | None = None,
) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(path[-1])
        allowed = (allowed_keys or _allowed_keys)(path[:-1], data)
        hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        text = f"unknown key '{key}'"
        if hint:
            text += f" (did you mean '{hint[0]}'?)"
        elif allowed:
            text += f"; allowed: {', '.join(allowed)}"
        return text
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        value = err.get("input")
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip(" '") for c in expected.replace(" or ", ", ").split(",")]
        hint = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
        what = "trigger event" if path[-1:] == ("event",) else "value"
        text = f"unknown {what} {value!r}"
        if hint:
            text += f" (did you mean {hint[0]!r}?)"
        return f"{text}; expected one of {expected}"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        hint = difflib.get_close_matches(str(tag), model.ACTION_TYPES, n=1)
        text = f"unknown action type {tag!r}"
        if hint:
            text += f" (did you mean {hint[0]!r}?)"
        return f"{text}; expected one of {', '.join(model.ACTION_TYPES)}"
    if kind == "union_tag_not_found":
        return f"an action needs a 'type': one of {', '.join(model.ACTION_TYPES)}"
    if kind in {"model_type", "dict_type"}:
        return f"expected a mapping, got {_type_name(err.get('input'))}"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        msg += f", got {_type_name(err.get('input'))} {err.get('input')!r}"
    return msg


def _type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a mapping",
        type(None): "nothing (null)",
    }.get(type(value), type(value).__name__)


def expand_env(
    data: Any,
    path: tuple[str | int, ...],
    env: Mapping[str, str],
    secrets: dict[str, str],
    problems: list[tuple[tuple[str | int, ...], str]],
) -> Any:
    if isinstance(data, str):
        try:
            return envref.expand(data, env, secrets)
        except envref.EnvRefError as exc:
            problems.append((path, str(exc)))
            return data
    if isinstance(data, dict):
        return {k: expand_env(v, (*path, k), env, secrets, problems) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, (*path, i), env, secrets, problems) for i, v in enumerate(data)]
    return data


def _version(data: Any) -> str:
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def load_text(text: str, filename: str, env: Mapping[str, str] | None = None) -> FileResult:
    """Load the workflows in ``text`` (the content of ``filename``)."""
    env = os.environ if env is None else env
    result = FileResult(path=filename, digest=hashlib.sha256(text.encode()).hexdigest())
    docs, issues = load_documents(text, filename)
    result.issues.extend(issues)
    if issues:
        return result
    if not docs:
        result.issues.append(Issue(filename, 1, 1, "", "file is empty; it holds no workflow"))
        return result
    for doc in docs:
        result.issues.extend(_load_document(doc, filename, env, result))
    if result.errors:
        result.workflows.clear()
    return result


def _issue(
    doc: Document,
    filename: str,
    path: tuple[str | int, ...],
    message: str,
    *,
    key: bool = False,
    severity: Severity = Severity.ERROR,
) -> Issue:
    mark = doc.mark_for(path, key=key)
    return Issue(filename, mark.line, mark.column, key_path(path), message, severity)


def _load_document(
    doc: Document, filename: str, env: Mapping[str, str], result: FileResult
) -> list[Issue]:
    if not isinstance(doc.data, dict):
        what = "empty document" if doc.data is None else f"{_type_name(doc.data)}"
        return [
            Issue(
                filename,
                doc.start.line,
                doc.start.column,
                "",
                f"a workflow document must be a mapping of keys, not {what}",
            )
        ]
    problems: list[tuple[tuple[str | int, ...], str]] = []
    secrets: dict[str, str] = {}
    data = expand_env(doc.data, (), env, secrets, problems)
    issues = [_issue(doc, filename, p, m) for p, m in problems]
    result.secrets.update(secrets)
    if issues:
        return issues
    try:
        wf = model.Workflow.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            path = data_path(tuple(err["loc"]), data)
            if err["type"] == "union_tag_invalid":
                path = (*path, "type")
            issues.append(
                _issue(
                    doc,
                    filename,
                    path,
                    error_message(err, path, data),
                    key=err["type"] == "extra_forbidden",
                )
            )
        return _dedupe(issues)
    issues.extend(_issue(doc, filename, p, m) for p, m in model.cross_check(wf))
    issues.extend(
        _issue(doc, filename, p, m, severity=Severity.WARNING) for p, m in model.risk_warnings(wf)
    )
    if not any(i.severity is Severity.ERROR for i in issues):
        result.workflows.append(LoadedWorkflow(wf, filename, doc.start.line, _version(doc.data)))
    return issues


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen: set[tuple[int, int, str]] = set()
    out = []
    for i in issues:
        k = (i.line, i.column, i.key)
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def load_file(path: str | Path, env: Mapping[str, str] | None = None) -> FileResult:
    p = Path(path)
    name = str(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            message = f"file is {size} bytes; the limit is {MAX_FILE_BYTES} (1 MiB)"
            return FileResult(name, "", issues=[Issue(name, 1, 1, "", message)])
        raw = p.read_bytes()
    except OSError as exc:
        return FileResult(name, "", issues=[Issue(name, 1, 1, "", f"cannot read: {exc.strerror}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FileResult(name, "", issues=[Issue(name, 1, 1, "", f"not UTF-8 text: {exc.reason}")])
    return load_text(text, name, env)


def is_workflow_file(path: Path) -> bool:
    """``*.yaml``/``*.yml`` that is not a dotfile, editor backup or temp file."""
    name = path.name
    if name.startswith(".") or name.startswith("#") or name.endswith("~"):
        return False
    return name.endswith(YAML_SUFFIXES)


def discover(paths: list[Path]) -> list[Path]:
    """Workflow files under ``paths`` (files given by name are taken as they are).

    Symlinks are followed, so Kubernetes ConfigMap volumes work: their files live
    in ``..data`` -> ``..<timestamp>/`` and are exposed as top-level symlinks, which
    are read (the dot-directories are skipped). A file reached by two paths is
    loaded once, under the first path found; a symlink loop is walked once.
    """
    found: list[Path] = []
    seen_files: set[str] = set()
    for p in paths:
        if not p.is_dir():
            found.append(p)
            continue
        seen_dirs: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(p, followlinks=True):
            try:
                st = os.stat(root)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            # os.walk goes top-down, so top-level symlinks win over what they point at
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                fp = Path(root) / f
                if not is_workflow_file(fp):
                    continue
                real = os.path.realpath(fp)
                if real in seen_files:
                    continue
                seen_files.add(real)
                found.append(fp)
    return found


@dataclass(frozen=True)
class Snapshot:
    """What the daemon runs: the workflows by name, and the last load's per-file outcome."""

    workflows: Mapping[str, LoadedWorkflow]
    files: Mapping[str, FileResult]
    # files whose current content failed, whose last good version is still running
    held: Mapping[str, FileResult]
    redactor: envref.Redactor

    @property
    def errors(self) -> list[Issue]:
        return [i for r in self.files.values() for i in r.errors]

    @property
    def warnings(self) -> list[Issue]:
        return [i for r in self.files.values() for i in r.warnings]

    @property
    def ok(self) -> bool:
        return not self.errors


def build_snapshot(results: list[FileResult], previous: Snapshot | None = None) -> Snapshot:
    """Combine per-file results; keep the previous good version of files that fail now."""
    files = {r.path: r for r in results}
    effective: dict[str, FileResult] = {}
    held: dict[str, FileResult] = {}
    for path, r in files.items():
        if r.ok:
            effective[path] = r
        elif previous is not None:
            last = previous.held.get(path) or previous.files.get(path)
            if last is not None and last.ok:
                effective[path] = last
                held[path] = last
    # Duplicate names: both files named; the earlier file (by path) keeps the name
    # only when it was already running it, else neither runs it.
    by_name: dict[str, list[LoadedWorkflow]] = {}
    for path in sorted(effective):
        for lw in effective[path].workflows:
            by_name.setdefault(lw.name, []).append(lw)
    workflows: dict[str, LoadedWorkflow] = {}
    for name, defs in by_name.items():
        if len(defs) == 1:
            workflows[name] = defs[0]
            continue
        where = " and ".join(f"{d.file}:{d.line}" for d in defs)
        for d in defs:
            files[d.file].issues.append(
                Issue(d.file, d.line, 1, "name", f"duplicate workflow name {name!r} (in {where})")
            )
        if previous is not None and name in previous.workflows:
            prev = previous.workflows[name]
            keep = next((d for d in defs if d.file == prev.file), None)
            if keep is not None:
                workflows[name] = keep
    redactor = envref.Redactor()
    for r in effective.values():
        redactor.add(r.secrets)
    return Snapshot(workflows=workflows, files=files, held=held, redactor=redactor)


def load_paths(
    paths: list[Path], env: Mapping[str, str] | None = None, previous: Snapshot | None = None
) -> Snapshot:
    return build_snapshot([load_file(p, env) for p in discover(paths)], previous)
