"""Retry chains in memory: who belongs to which chain, its failures, what is still open.

The database holds every chain for ``history_retention_days``; memory holds only
chains that can still change. A chain is forgotten once every task in it has a
final state and it has been quiet for a while (nothing more can fail in it), or
after a long silence (its final events were lost). Marks that guard against
double action ("this task was retried", "this threshold fired") are kept for a day.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FINAL = frozenset({"SUCCESS", "FAILURE", "ORPHANED", "REVOKED", "SEND_FAILED"})
COMPLETE_GRACE_SECONDS = 600.0  # late or duplicate events of a finished chain
IDLE_LIMIT_SECONDS = 7 * 86400.0  # a chain whose final events were lost
MARK_SECONDS = 86400.0


@dataclass
class Chain:
    root: str
    failures: int = 0
    open: set[str] = field(default_factory=set)
    members: list[str] = field(default_factory=list)
    last: float = 0.0


@dataclass(slots=True)
class Member:
    chain: Chain
    attempt: int
    queue: str | None = None  # where workflowd sent it


class ChainBook:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.chains: dict[str, Chain] = {}
        self.members: dict[str, Member] = {}
        self.retried: dict[str, float] = {}
        self.fired: dict[tuple[str, str], float] = {}
        # task ids whose events the intake reports back (read from the intake thread)
        self.watch: set[str] = set()

    # --- questions -------------------------------------------------------------------

    def member(self, task_id: str) -> Member | None:
        return self.members.get(task_id)

    def was_retried(self, task_id: str) -> bool:
        return task_id in self.retried

    def threshold_fired(self, workflow: str, root: str) -> bool:
        return (workflow, root) in self.fired

    # --- changes ---------------------------------------------------------------------

    def failed(self, task_id: str, trigger_counts: bool) -> tuple[str, int, int]:
        """(root, attempt, failures) for a trigger of ``task_id``; a failure is counted."""
        m = self.members.get(task_id)
        if m is None:
            return task_id, 0, 1 if trigger_counts else 0
        chain = m.chain
        if trigger_counts:
            chain.failures += 1
            chain.open.discard(task_id)
            chain.last = self.clock()
            self.watch.discard(task_id)
        return chain.root, m.attempt, chain.failures

    def mark_retried(self, task_id: str) -> None:
        self.retried[task_id] = self.clock()

    def mark_fired(self, workflow: str, root: str) -> None:
        self.fired[(workflow, root)] = self.clock()

    def add_retry(
        self, failed_id: str, new_id: str, root: str, attempt: int, queue: str | None
    ) -> None:
        now = self.clock()
        m = self.members.get(failed_id)
        if m is None:
            chain = self.chains.get(root)
            if chain is None:
                chain = self.chains[root] = Chain(root, failures=1, members=[failed_id])
            self.members[failed_id] = Member(chain, 0)
        else:
            chain = m.chain
        chain.members.append(new_id)
        chain.open.add(new_id)
        chain.last = now
        self.members[new_id] = Member(chain, attempt, queue)
        self.watch.add(new_id)

    def follow(self, task_id: str) -> None:
        """Report this task's events (an orphan that Celery may redeliver)."""
        self.watch.add(task_id)
        m = self.members.get(task_id)
        if m is not None:
            m.chain.open.add(task_id)

    def state(self, task_id: str, state: str) -> None:
        m = self.members.get(task_id)
        if state in FINAL:
            self.watch.discard(task_id)
        if m is None:
            return
        chain = m.chain
        chain.last = self.clock()
        if state in FINAL:
            chain.open.discard(task_id)
        elif state in ("RECEIVED", "STARTED", "SENT", "SENDING"):
            chain.open.add(task_id)

    # --- memory ------------------------------------------------------------------------

    def prune(self) -> int:
        """Forget chains that can no longer change, and old marks. Returns chains dropped."""
        now = self.clock()
        dropped = 0
        for root, chain in list(self.chains.items()):
            quiet = now - chain.last
            if (not chain.open and quiet > COMPLETE_GRACE_SECONDS) or quiet > IDLE_LIMIT_SECONDS:
                for tid in chain.members:
                    self.members.pop(tid, None)
                    self.watch.discard(tid)
                del self.chains[root]
                dropped += 1
        cutoff = now - MARK_SECONDS
        self.retried = {k: t for k, t in self.retried.items() if t > cutoff or k in self.members}
        self.fired = {k: t for k, t in self.fired.items() if t > cutoff or k[1] in self.chains}
        return dropped

    def load(self, rows: Iterable[Mapping[str, Any]], fired: Iterable[Mapping[str, Any]]) -> None:
        """Rebuild from the database's chain rows (oldest first) and threshold marks."""
        for r in rows:
            root = r["root_id"]
            chain = self.chains.get(root)
            if chain is None:
                chain = self.chains[root] = Chain(root)
            chain.members.append(r["task_id"])
            chain.last = max(chain.last, float(r["updated_at"] or r["sent_at"] or 0.0))
            self.members[r["task_id"]] = Member(chain, int(r["attempt"]), r["queue"])
            if r["parent_id"]:
                self.retried[r["parent_id"]] = chain.last
            state = r["state"]
            if state in ("FAILURE", "ORPHANED"):
                chain.failures += 1
            if state not in FINAL and state != "REJECTED":
                chain.open.add(r["task_id"])
                self.watch.add(r["task_id"])
        for f in fired:
            self.fired[(f["workflow"], f["root_id"])] = float(f["fired_at"])
