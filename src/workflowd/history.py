"""The SQLite store: workflow runs, retry chains and circuit-breaker state (SPEC §3, §6).

One writer (the daemon, from one thread) and any number of readers (the CLI),
in WAL mode so ``workflowd history`` reads while the daemon writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from workflowd.errors import StoreError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    workflow TEXT NOT NULL,
    workflow_version TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    trigger TEXT NOT NULL,
    task_id TEXT,
    task_name TEXT,
    worker TEXT,
    root_id TEXT,
    conditions TEXT NOT NULL DEFAULT '[]',
    actions TEXT NOT NULL DEFAULT '[]',
    circuit_breaker TEXT NOT NULL DEFAULT '{}',
    outcome TEXT NOT NULL,
    reason TEXT,
    executed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_workflow_started ON runs (workflow, started_at);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at);
CREATE INDEX IF NOT EXISTS runs_task ON runs (task_id);
CREATE INDEX IF NOT EXISTS runs_open ON runs (outcome) WHERE outcome = 'running';

CREATE TABLE IF NOT EXISTS chain_tasks (
    task_id TEXT PRIMARY KEY,
    parent_id TEXT,
    root_id TEXT NOT NULL,
    task_name TEXT,
    attempt INTEGER NOT NULL,
    workflow TEXT NOT NULL DEFAULT '',
    run_id INTEGER,
    sent_at REAL,
    state TEXT,
    updated_at REAL,
    queue TEXT
);
CREATE INDEX IF NOT EXISTS chain_root ON chain_tasks (root_id);

CREATE TABLE IF NOT EXISTS threshold_fired (
    workflow TEXT NOT NULL,
    root_id TEXT NOT NULL,
    fired_at REAL NOT NULL,
    PRIMARY KEY (workflow, root_id)
);

CREATE TABLE IF NOT EXISTS breakers (
    workflow TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    opened_at REAL,
    suppressed INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

OUTCOMES = ("success", "failure", "skipped", "interrupted")
JSON_COLUMNS = ("conditions", "actions", "circuit_breaker")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Run:
    """One workflow run, as recorded."""

    workflow: str
    workflow_version: str
    trigger: str
    started_at: float
    task_id: str | None = None
    task_name: str | None = None
    worker: str | None = None
    root_id: str | None = None
    conditions: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    circuit_breaker: dict[str, Any] = field(default_factory=dict)
    outcome: str = "running"
    reason: str | None = None
    finished_at: float | None = None
    executed: bool = False
    id: int | None = None

    def row(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "workflow_version": self.workflow_version,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "trigger": self.trigger,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "worker": self.worker,
            "root_id": self.root_id,
            "conditions": json.dumps(self.conditions, default=str),
            "actions": json.dumps(self.actions, default=str),
            "circuit_breaker": json.dumps(self.circuit_breaker, default=str),
            "outcome": self.outcome,
            "reason": self.reason,
            "executed": int(self.executed),
        }


def public_run(row: dict[str, Any]) -> dict[str, Any]:
    """A runs row as the CLI shows it (SPEC §6 field names, ISO 8601 times)."""
    out = {
        "id": row["id"],
        "workflow": row["workflow"],
        "workflow_version": row["workflow_version"],
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "trigger": row["trigger"],
        "task_id": row["task_id"],
        "task_name": row["task_name"],
        "worker": row["worker"],
        "conditions": json.loads(row["conditions"]),
        "actions": json.loads(row["actions"]),
        "circuit_breaker": json.loads(row["circuit_breaker"]),
        "outcome": row["outcome"],
        "reason": row["reason"],
    }
    return out


class Store:
    """The history database. Not thread-safe: the daemon uses it from one thread."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.exists():
                    raise StoreError(f"{self.path}: no history database (has the daemon run?)")
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(self.path), timeout=10, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 10000")
            self.db = Database(conn)
            if not readonly:
                self.db.enable_wal()
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(SCHEMA)
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self.conn = conn

    def close(self) -> None:
        self.conn.close()

    # --- runs -------------------------------------------------------------

    def insert_run(self, run: Run) -> int:
        cur = self.conn.execute(
            "INSERT INTO runs (workflow, workflow_version, started_at, finished_at, trigger, "
            "task_id, task_name, worker, root_id, conditions, actions, circuit_breaker, outcome, "
            "reason, executed) VALUES (:workflow, :workflow_version, :started_at, :finished_at, "
            ":trigger, :task_id, :task_name, :worker, :root_id, :conditions, :actions, "
            ":circuit_breaker, :outcome, :reason, :executed)",
            run.row(),
        )
        run.id = int(cur.lastrowid or 0)
        return run.id

    def update_run(self, run: Run) -> None:
        row = run.row()
        row["id"] = run.id
        self.conn.execute(
            "UPDATE runs SET finished_at = :finished_at, actions = :actions, outcome = :outcome, "
            "reason = :reason, executed = :executed, circuit_breaker = :circuit_breaker "
            "WHERE id = :id",
            row,
        )

    def annotate_action(self, run_id: int, index: int, key: str, value: Any) -> None:
        """Add a fact to one action's detail after the run (e.g. a retry revoked later)."""
        row = self.conn.execute("SELECT actions FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return
        actions = json.loads(row[0])
        if 0 <= index < len(actions):
            actions[index].setdefault("detail", {})[key] = value
            self.conn.execute(
                "UPDATE runs SET actions = ? WHERE id = ?", (json.dumps(actions), run_id)
            )

    def interrupt_open_runs(self, now: float) -> list[dict[str, Any]]:
        """Runs left 'running' by a crash: mark them interrupted; never re-run them."""
        rows = list(self.db.query("SELECT * FROM runs WHERE outcome = 'running'"))
        for row in rows:
            actions = json.loads(row["actions"])
            for a in actions:
                if a.get("status") in ("running", "pending", "sending"):
                    a["status"] = "interrupted"
            self.conn.execute(
                "UPDATE runs SET outcome = 'interrupted', finished_at = ?, actions = ?, "
                "reason = COALESCE(reason, 'daemon stopped before the run finished') "
                "WHERE id = ?",
                (now, json.dumps(actions), row["id"]),
            )
        return rows

    def runs(
        self,
        workflow: str | None = None,
        *,
        since: float | None = None,
        outcome: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        if since is not None:
            where.append("started_at >= ?")
            params.append(since)
        if outcome is not None:
            where.append("outcome = ?")
            params.append(outcome)
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        params.append(limit)
        return [public_run(r) for r in self.db.query(sql, params)]

    def executed_times(self, workflow: str, since: float) -> list[float]:
        """Start times of runs whose actions ran, in the breaker window, oldest first."""
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT started_at FROM runs WHERE workflow = ? AND executed = 1 "
                "AND started_at >= ? ORDER BY started_at",
                (workflow, since),
            )
        ]

    def prune(self, older_than: float) -> int:
        cur = self.conn.execute("DELETE FROM runs WHERE started_at < ?", (older_than,))
        self.conn.execute(
            "DELETE FROM chain_tasks WHERE COALESCE(updated_at, sent_at) < ?", (older_than,)
        )
        self.conn.execute("DELETE FROM threshold_fired WHERE fired_at < ?", (older_than,))
        return cur.rowcount

    # --- chains -------------------------------------------------------------

    def chain_of(self, task_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM chain_tasks WHERE task_id = ?", [task_id]))
        return rows[0] if rows else None

    def chain(self, root_id: str) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "SELECT * FROM chain_tasks WHERE root_id = ? ORDER BY attempt, sent_at", [root_id]
            )
        )

    def upsert_chain_task(self, **row: Any) -> None:
        row.setdefault("updated_at", time.time())
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        updates = ", ".join(f"{c} = excluded.{c}" for c in row if c != "task_id")
        self.conn.execute(
            f"INSERT INTO chain_tasks ({cols}) VALUES ({marks}) "
            f"ON CONFLICT (task_id) DO UPDATE SET {updates}",
            row,
        )

    def set_chain_state(self, task_id: str, state: str) -> None:
        self.conn.execute(
            "UPDATE chain_tasks SET state = ?, updated_at = ? WHERE task_id = ?",
            (state, time.time(), task_id),
        )

    def threshold_fired(self, workflow: str, root_id: str) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM threshold_fired WHERE workflow = ? AND root_id = ?",
                (workflow, root_id),
            ).fetchone()
            is not None
        )

    def mark_threshold_fired(self, workflow: str, root_id: str, now: float) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO threshold_fired VALUES (?, ?, ?)", (workflow, root_id, now)
        )

    # --- breakers -------------------------------------------------------------

    def breaker_states(self) -> dict[str, dict[str, Any]]:
        return {r["workflow"]: r for r in self.db.query("SELECT * FROM breakers")}

    def save_breaker(
        self, workflow: str, state: str, opened_at: float | None, suppressed: int
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO breakers VALUES (?, ?, ?, ?)",
            (workflow, state, opened_at, suppressed),
        )

    def iter_rows(self, sql: str, params: list[Any] | None = None) -> Iterator[dict[str, Any]]:
        yield from self.db.query(sql, params or [])


def set_meta(store: Store, key: str, value: Any) -> None:
    store.conn.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str))
    )


def get_meta(store: Store, key: str) -> Any:
    row = store.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else None
