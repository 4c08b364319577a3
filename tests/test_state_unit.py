"""ClusterState: trigger detection from event sequences, on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from workflowd.context import TriggerContext
from workflowd.state import ClusterState, TaskInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fired() -> list[TriggerContext]:
    return []


@pytest.fixture
def state(clock: Clock, fired: list[TriggerContext]) -> ClusterState:
    def emit(ctx: TriggerContext, _info: TaskInfo | None) -> None:
        fired.append(ctx)

    return ClusterState(emit, worker_timeout=10, clock=clock, wall=lambda: 1.7e9)


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "timestamp": 1.7e9, "utcoffset": 0, "pid": 1, "clock": 1, **fields}


def test_failed_joins_received_fields(state: ClusterState, fired: list[TriggerContext]) -> None:
    state.handle(
        ev(
            "task-sent",
            uuid="t1",
            name="a.b",
            args="(1,)",
            kwargs="{}",
            hostname="producer@web",
            queue="q1",
        )
    )
    state.handle(
        ev("task-received", uuid="t1", name="a.b", args="(1,)", kwargs="{}", hostname="celery@w1")
    )
    state.handle(ev("task-started", uuid="t1", hostname="celery@w1"))
    state.handle(ev("task-failed", uuid="t1", exception="KeyError('x')", hostname="celery@w1"))
    assert len(fired) == 1
    ctx = fired[0]
    assert (ctx.trigger, ctx.task_name, ctx.queue, ctx.queue_source, ctx.worker) == (
        "task.failed",
        "a.b",
        "q1",
        "task-sent",
        "celery@w1",
    )
    assert ctx.args == "(1,)" and ctx.exception == "KeyError('x')"
    assert "t1" not in state.tasks and not state.running


def test_failed_without_history_still_fires(
    state: ClusterState, fired: list[TriggerContext]
) -> None:
    state.handle(ev("task-failed", uuid="t9", exception="NotRegistered('x')", hostname="celery@w1"))
    assert fired[0].task_name is None and fired[0].worker == "celery@w1"


def test_task_sent_host_is_not_the_worker(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.handle(ev("worker-online", hostname="celery@web", freq=2))
    state.handle(ev("task-sent", uuid="t1", name="a", hostname="celery@web"))
    state.handle(ev("worker-offline", hostname="celery@web"))
    clock.now += 5
    state.tick()
    assert [c.trigger for c in fired] == ["worker.offline"]  # t1 is not its task


def test_silent_worker_goes_offline_once_and_orphans_its_tasks(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.handle(ev("worker-online", hostname="celery@w1", freq=2))
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w1"))
    state.handle(ev("task-received", uuid="s1", name="a", hostname="celery@w1"))
    state.handle(ev("task-started", uuid="s1", hostname="celery@w1"))
    state.handle(ev("task-received", uuid="done", name="a", hostname="celery@w1"))
    state.handle(ev("task-succeeded", uuid="done", hostname="celery@w1"))
    clock.now += 9
    state.tick()
    assert fired == []
    clock.now += 2
    state.tick()
    state.tick()
    assert [c.trigger for c in fired] == ["worker.offline", "task.orphaned", "task.orphaned"]
    assert sorted(c.task_id or "" for c in fired[1:]) == ["r1", "s1"]
    assert fired[0].extra["detected_by"] == "heartbeat timeout"
    # it comes back, then goes silent again: a new offline spell
    state.handle(ev("worker-heartbeat", hostname="celery@w1", freq=2, active=0))
    clock.now += 11
    state.tick()
    assert [c.trigger for c in fired].count("worker.offline") == 2


def test_redelivered_orphan_is_marked(state: ClusterState, clock: Clock) -> None:
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w1"))
    state.handle(ev("worker-offline", hostname="celery@w1"))
    clock.now += 5
    state.tick()
    assert state.tasks["r1"].orphaned
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w2"))
    assert state.tasks["r1"].redelivered


def test_task_moving_to_another_worker_is_not_orphaned(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w1"))
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w2"))
    state.handle(ev("worker-offline", hostname="celery@w1"))
    clock.now += 5
    state.tick()
    assert [c.trigger for c in fired] == ["worker.offline"]


def test_rejected_requeue_is_final_and_redelivery_is_recognised(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w1"))
    state.handle(ev("task-rejected", uuid="r1", requeue=True, hostname="celery@w1"))
    state.handle(ev("worker-offline", hostname="celery@w1"))
    clock.now += 5
    state.tick()
    assert [c.trigger for c in fired] == ["worker.offline"]
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w2"))
    assert state.tasks["r1"].redelivered


def test_execution_time_exceeded_once_per_threshold(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.set_thresholds([5.0, 2.0])
    state.handle(ev("worker-online", hostname="celery@w1"))
    state.handle(ev("task-received", uuid="t", name="a", hostname="celery@w1"))
    state.handle(ev("task-started", uuid="t", hostname="celery@w1"))
    for _ in range(3):
        clock.now += 1.0
        state.handle(ev("worker-heartbeat", hostname="celery@w1", active=1, freq=2))
        state.tick()
    assert [(c.trigger, c.threshold_seconds) for c in fired] == [
        ("task.execution_time_exceeded", 2.0)
    ]
    assert fired[0].elapsed_seconds == pytest.approx(2.0)
    for _ in range(5):
        clock.now += 1.0
        state.handle(ev("worker-heartbeat", hostname="celery@w1", active=1, freq=2))
        state.tick()
    assert [c.threshold_seconds for c in fired] == [2.0, 5.0]
    state.handle(ev("task-succeeded", uuid="t", hostname="celery@w1"))
    clock.now += 100
    state.tick()
    exceeded = [c for c in fired if c.trigger == "task.execution_time_exceeded"]
    assert len(exceeded) == 2


def test_wakeup_heartbeat_does_not_set_frequency(state: ClusterState) -> None:
    state.handle(ev("worker-heartbeat", hostname="celery@w1", freq=0.5, active=0))
    state.handle(ev("worker-heartbeat", hostname="celery@w1", freq=5.0))  # the wake-up one
    assert state.workers["celery@w1"].freq == 0.5


def test_malformed_events_are_counted(state: ClusterState) -> None:
    for bad in (
        {},
        {"type": "task-received"},
        {"type": "task-started", "uuid": 5, "hostname": "h"},
        "x",
        None,
        3,
    ):
        state.handle(bad)
    assert state.malformed == 6
    state.handle(ev("task-received", uuid="ok", name="a", hostname="celery@w1"))
    assert "ok" in state.tasks


def test_memory_is_bounded(clock: Clock) -> None:
    s = ClusterState(lambda c, i: None, max_tasks=1000, clock=clock)
    for i in range(10_000):
        s.handle(ev("task-sent", uuid=f"t{i}", name="a", hostname="p@h"))
    assert len(s.tasks) <= 1000
    assert "t9999" in s.tasks and "t0" not in s.tasks


def test_resync_ignores_tasks_finished_meanwhile(state: ClusterState) -> None:
    state.begin_resync()
    state.handle(ev("task-received", uuid="gone", name="a", hostname="celery@w1"))
    state.handle(ev("task-succeeded", uuid="gone", hostname="celery@w1"))
    n = state.resync(
        {
            "celery@w1": [
                {"id": "gone", "name": "a", "args": [], "kwargs": {}},
                {
                    "id": "live",
                    "name": "a",
                    "args": [1],
                    "kwargs": {"k": 2},
                    "delivery_info": {"routing_key": "q9"},
                },
            ]
        },
        "STARTED",
    )
    state.end_resync()
    assert n == 1 and "gone" not in state.tasks
    live = state.tasks["live"]
    assert live.exact == ([1], {"k": 2}) and (live.queue, live.queue_source) == ("q9", "inspect")
    assert "live" in state.running


def test_watched_tasks_report_state(state: ClusterState) -> None:
    seen: list[tuple[str, str]] = []
    state.watch = {"w"}
    state.on_state = lambda tid, st: seen.append((tid, st))
    state.handle(ev("task-received", uuid="w", name="a", hostname="celery@w1"))
    state.handle(ev("task-received", uuid="other", name="a", hostname="celery@w1"))
    state.handle(ev("task-succeeded", uuid="w", hostname="celery@w1"))
    assert seen == [("w", "RECEIVED"), ("w", "SUCCESS")]


def test_offline_then_online_within_confirmation_is_a_blip(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.handle(ev("worker-online", hostname="celery@w1", freq=2))
    state.handle(ev("task-received", uuid="r1", name="a", hostname="celery@w1"))
    state.handle(ev("worker-offline", hostname="celery@w1"))
    clock.now += 1.0
    state.tick()
    state.handle(ev("worker-online", hostname="celery@w1", freq=2))
    clock.now += 5.0
    state.tick()
    assert fired == []
    state.handle(ev("worker-offline", hostname="celery@w1"))
    state.tick()
    assert fired == []
    clock.now += 3.0
    state.tick()
    assert [c.trigger for c in fired] == ["worker.offline", "task.orphaned"]
    assert fired[0].extra["detected_by"] == "worker-offline"


def test_our_own_disconnect_is_not_worker_silence(
    state: ClusterState, clock: Clock, fired: list[TriggerContext]
) -> None:
    state.handle(ev("worker-online", hostname="celery@w1", freq=2))
    clock.now += 60  # the daemon was disconnected from the broker meanwhile
    state.heard_nothing_until_now()
    state.tick()
    assert fired == []
    clock.now += 11
    state.tick()
    assert [c.trigger for c in fired] == ["worker.offline"]
