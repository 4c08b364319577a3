"""Operations against a running daemon: hot reload, systemd notify, shutdown, logs, metrics.

Real redis-server, real Celery workers, a loopback HTTP sink and a real
``workflowd run`` subprocess with a stand-in NOTIFY_SOCKET. Times measured here
are printed (``pytest -s``) so a run shows the numbers behind each assertion.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import DaemonProc, metric, scrape_metrics
from tests.support.httpsink import HttpSink
from tests.support.procs import free_port, wait_for
from workflowd import loader

pytestmark = pytest.mark.integration

FAIL = "tests.celeryapp.tasks.fail_connection"
INTERVAL = 1.0  # reload_interval_seconds in these tests
RELOAD_BOUND = INTERVAL + 1.0  # SPEC §4


def slack_wf(name: str, url: str, message: str) -> str:
    return (
        f"name: {name}\n"
        "trigger:\n"
        "  event: task.failed\n"
        "action:\n"
        "  type: slack\n"
        f"  webhook_url: '{url}'\n"
        f"  message: '{message}'\n"
    )


def version_of(text: str) -> str:
    res = loader.load_text(text, "x.yaml", env={})
    assert res.ok, res.issues
    return res.workflows[0].version


def wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def reloads(d: DaemonProc) -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("event") == "workflows reloaded"]


def wait_reload(
    d: DaemonProc,
    seen: int,
    match: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The first reload logged after the first ``seen`` ones that satisfies ``match``."""

    def found() -> dict[str, Any] | None:
        return next((e for e in reloads(d)[seen:] if match(e)), None)

    event: dict[str, Any] = wait_for(found, timeout, message=f"reload\n{d.log_text()[-3000:]}")
    return event


def wait_log(d: DaemonProc, event: str, timeout: float = 5.0) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: next((e for e in d.log_events() if e.get("event") == event), None),
        timeout,
        message=f"log event {event!r}",
    )
    return found


def status_json(d: DaemonProc) -> tuple[int, list[dict[str, Any]], str]:
    res = d.cli("status", "--json", "--workflows-dir", str(d.workflows_dir), check=False)
    return res.returncode, json.loads(res.stdout or "[]"), res.stderr


def configmap(root: Path, stamp: str, files: dict[str, str]) -> None:
    """What kubelet does to a ConfigMap volume: a new timestamped dir, ``..data`` swapped."""
    target = root / f"..{stamp}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    (root / "..data_tmp").symlink_to(target.name)
    os.replace(root / "..data_tmp", root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)
    if old is not None:
        shutil.rmtree(root / old)


# --- hot reload -----------------------------------------------------------------------------------


def test_reload_picks_up_each_kind_of_change_within_interval_plus_one_second(
    broker_url: str, http_sink: HttpSink, daemon_factory: Any
) -> None:
    url = http_sink.url("/s")
    d: DaemonProc = daemon_factory(
        broker_url,
        {"a.yaml": slack_wf("a", url, "a v1")},
        config={"reload_interval_seconds": INTERVAL},
        start=False,
    )
    wf = d.workflows_dir
    configmap(wf, "2026_01_01_00_00_00.000000001", {"k8s.yaml": slack_wf("k8s", url, "k8s v1")})
    d.start()
    latencies: dict[str, float] = {}

    def step(
        kind: str, change: Callable[[], None], match: Callable[[dict[str, Any]], bool]
    ) -> None:
        seen = len(reloads(d))
        change()
        changed_at = time.time()
        event = wait_reload(d, seen, match)
        latencies[kind] = wall(event) - changed_at
        # "status" shows what the daemon runs now
        code, _rows, err = status_json(d)
        assert code == 0, err

    b1, b2 = slack_wf("b", url, "b v1"), slack_wf("b", url, "b v2")
    step("create", lambda: (wf / "b.yaml").write_text(b1), lambda e: e["changed"] == ["b"])
    step("edit", lambda: (wf / "b.yaml").write_text(b2), lambda e: e["changed"] == ["b"])
    assert {r["name"]: r["version"] for r in status_json(d)[1]}["b"] == version_of(b2)

    # an editor: write a swap/temp file next to it, then rename it over the real name
    a2 = slack_wf("a", url, "a v2")
    seen = len(reloads(d))
    (wf / ".a.yaml.swp").write_text(a2)
    time.sleep(INTERVAL + 0.5)
    assert reloads(d)[seen:] == [], "a swap file was loaded"
    step(
        "atomic rename",
        lambda: os.replace(wf / ".a.yaml.swp", wf / "a.yaml"),
        lambda e: e["changed"] == ["a"],
    )
    step("rename", lambda: os.rename(wf / "b.yaml", wf / "c.yaml"), lambda e: True)
    assert {r["name"]: r["file"] for r in status_json(d)[1]}["b"] == str(wf / "c.yaml")
    step("delete", (wf / "c.yaml").unlink, lambda e: e["removed"] == ["b"])

    k2 = slack_wf("k8s", url, "k8s v2")
    step(
        "configmap ..data swap",
        lambda: configmap(wf, "2026_01_01_00_05_00.000000002", {"k8s.yaml": k2}),
        lambda e: e["changed"] == ["k8s"],
    )
    code, rows, err = status_json(d)
    assert code == 0, err  # no duplicate-name error: the file was loaded once
    k8s = [r for r in rows if r["name"] == "k8s"]
    assert len(k8s) == 1 and k8s[0]["file"] == str(wf / "k8s.yaml")
    assert k8s[0]["version"] == version_of(k2)
    assert sorted(r["name"] for r in rows) == ["a", "k8s"]

    print("\nreload latency (s) from the change to the daemon running it:")
    for kind, seconds in latencies.items():
        print(f"  {kind:22} {seconds:.3f}")
    slow = {k: v for k, v in latencies.items() if v > RELOAD_BOUND}
    assert not slow, f"reloads slower than {RELOAD_BOUND}s: {slow}"


def test_broken_edit_keeps_the_last_good_version_running(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    celery_worker_factory(broker_url)
    port = free_port()
    ua, ub = http_sink.url("/a"), http_sink.url("/b")
    d: DaemonProc = daemon_factory(
        broker_url,
        {"a.yaml": slack_wf("a", ua, "A v1 {task_id}"), "b.yaml": slack_wf("b", ub, "B v1")},
        config={"reload_interval_seconds": INTERVAL, "metrics_address": f"127.0.0.1:{port}"},
    )
    wf = d.workflows_dir
    a1 = slack_wf("a", ua, "A v1 {task_id}")
    # line 8 holds a misspelt key: the file fails as a whole
    broken = slack_wf("a", ua, "A v2 {task_id}") + "  mesage_format: plain\n"
    b2 = slack_wf("b", ub, "B v2 {task_id}")
    seen = len(reloads(d))
    (wf / "a.yaml").write_text(broken)
    (wf / "b.yaml").write_text(b2)
    wait_reload(d, seen, lambda e: e["changed"] == ["b"] and e["errors"] == 1)

    # the error: in the log with file and line, in status (exit 1), in the metrics
    errors = [e for e in d.log_events() if e.get("event") == "workflow file failed to load"]
    assert errors[-1]["file"] == str(wf / "a.yaml") and errors[-1]["line"] == 8
    assert errors[-1]["kept_last_good"] is True
    code, rows, err = status_json(d)
    assert code == 1
    assert f"{wf / 'a.yaml'}:8:3: action.mesage_format: unknown key 'mesage_format'" in err
    by_name = {r["name"]: r for r in rows}
    assert by_name["a"]["version"] == version_of(a1) and by_name["a"]["kept_last_good"]
    assert by_name["b"]["version"] == version_of(b2) and not by_name["b"]["kept_last_good"]
    human = d.cli("status", "--workflows-dir", str(wf), check=False)
    assert human.returncode == 1 and "kept last good version of" in human.stdout
    m = scrape_metrics(port)
    assert metric(m, "workflowd_config_last_reload_successful") == 0
    assert metric(m, "workflowd_workflow_files_failed") == 1
    assert metric(m, "workflowd_reload_errors_total") >= 1

    # a failure runs the OLD version of a and the NEW version of b
    res = celery_client.send_task(FAIL)
    assert http_sink.wait_for_requests("/a", 1, timeout=5)[0].json == {"text": f"A v1 {res.id}"}
    assert http_sink.wait_for_requests("/b", 1, timeout=5)[0].json == {"text": f"B v2 {res.id}"}
    runs = {r["workflow"]: r for r in d.wait_runs(None, 2, timeout=5)}
    assert runs["a"]["workflow_version"] == version_of(a1)
    assert runs["b"]["workflow_version"] == version_of(b2)

    # fixed: everything is green again
    a3 = slack_wf("a", ua, "A v3 {task_id}")
    seen = len(reloads(d))
    (wf / "a.yaml").write_text(a3)
    wait_reload(d, seen, lambda e: e["changed"] == ["a"] and e["errors"] == 0)
    code, rows, err = status_json(d)
    assert code == 0 and err == ""
    assert {r["name"]: r["version"] for r in rows}["a"] == version_of(a3)
    assert metric(scrape_metrics(port), "workflowd_config_last_reload_successful") == 1


# --- systemd notify -----------------------------------------------------------------------------


def _messages(d: DaemonProc, since: float = 0.0) -> list[tuple[float, str]]:
    assert d.notify is not None
    return [(t, m) for t, m in list(d.notify.messages) if t >= since]


def _watchdog_times(d: DaemonProc, since: float = 0.0) -> list[float]:
    return [t for t, m in _messages(d, since) if "WATCHDOG=1" in m.splitlines()]


def test_sd_notify_ready_reloading_watchdog_stopping(
    broker_url: str, http_sink: HttpSink, daemon_factory: Any
) -> None:
    url = http_sink.url("/s")
    d: DaemonProc = daemon_factory(
        broker_url,
        {"a.yaml": slack_wf("a", url, "v1")},
        config={"reload_interval_seconds": 60},  # only SIGHUP reloads in this test
        env={"WATCHDOG_USEC": "2000000"},
    )
    offset = time.time() - time.monotonic()
    ready_at = next(t for t, m in _messages(d) if "READY=1" in m.splitlines())
    subscribed = next(e for e in d.log_events() if e["event"] == "subscribed to the event stream")
    # READY=1 only once the consumer is subscribed (and so after the workflows loaded)
    assert ready_at + offset >= wall(subscribed) - 0.05
    ready_msg = next(m for _, m in _messages(d) if "READY=1" in m.splitlines())
    assert "STATUS=1 workflows loaded; broker connected" in ready_msg

    # WATCHDOG=1 at half of WATCHDOG_USEC (2 s -> every 1 s)
    t0 = time.monotonic()
    wait_for(lambda: len(_watchdog_times(d, t0)) >= 5, 8, message="5 watchdog pings")
    pings = _watchdog_times(d, t0)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(f"\nwatchdog ping gaps (s): {[round(g, 3) for g in gaps]}")
    assert 0.9 <= statistics.median(gaps) <= 1.15, gaps
    assert all(0.8 <= g <= 1.4 for g in gaps), gaps

    # SIGHUP: reloads at once, even with a 60 s poll, framed by RELOADING=1 ... READY=1
    (d.workflows_dir / "a.yaml").write_text(slack_wf("a", url, "v2"))
    seen = len(reloads(d))
    t0 = time.monotonic()
    d.signal(signal.SIGHUP)
    event = wait_reload(d, seen, lambda e: e["changed"] == ["a"], timeout=5)
    after = [(t, m) for t, m in _messages(d, t0) if "WATCHDOG=1" not in m.splitlines()]
    reloading = next((t, m) for t, m in after if "RELOADING=1" in m.splitlines())
    fields = dict(line.split("=", 1) for line in reloading[1].splitlines())
    usec = int(fields["MONOTONIC_USEC"])
    assert abs(usec / 1e6 - reloading[0]) < 1.0  # CLOCK_MONOTONIC, like time.monotonic()
    ready = next(t for t, m in after if "READY=1" in m.splitlines())
    assert t0 <= reloading[0] <= ready
    print(f"SIGHUP -> RELOADING=1 {reloading[0] - t0:.3f}s, -> READY=1 {ready - t0:.3f}s")
    assert ready - t0 < 1.0
    assert wall(event) - (t0 + offset) < 1.0

    # SIGTERM: STOPPING=1, exit 0
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc is not None
    assert d.proc.wait(12) == 0
    assert any("STOPPING=1" in m.splitlines() for _, m in _messages(d, t0))
    print(f"SIGTERM -> exit 0 in {time.monotonic() - t0:.2f}s")


def test_watchdog_is_fed_while_the_broker_is_down(
    redis_server_factory: Any, http_sink: HttpSink, daemon_factory: Any
) -> None:
    port, mport = free_port(), free_port()
    d: DaemonProc = daemon_factory(
        f"redis://127.0.0.1:{port}/0",
        {"a.yaml": slack_wf("a", http_sink.url("/s"), "x")},
        config={"metrics_address": f"127.0.0.1:{mport}"},
        env={"WATCHDOG_USEC": "2000000"},
        start=False,
    )
    d.start(wait_ready=False)
    # no broker yet: no READY=1, but the watchdog keeps coming and /healthz is 200
    t0 = time.monotonic()
    wait_for(lambda: len(_watchdog_times(d, t0)) >= 3, 6, message="pings before the broker")
    assert not any("READY=1" in m.splitlines() for _, m in _messages(d))
    assert any("STATUS=connecting to the broker" in m for _, m in _messages(d))
    assert httpx.get(f"http://127.0.0.1:{mport}/healthz", timeout=5).status_code == 200

    server = redis_server_factory(port=port)
    d.wait_ready(20)
    assert metric(scrape_metrics(mport), "workflowd_broker_connected") == 1

    def lost() -> int:
        return sum(1 for e in d.log_events() if e["event"].startswith("broker connection lost"))

    before = lost()
    server.stop()
    wait_for(lambda: lost() > before, 15, message="the daemon notices the broker is gone")
    t0 = time.monotonic()
    wait_for(lambda: len(_watchdog_times(d, t0)) >= 4, 8, message="pings while disconnected")
    pings = _watchdog_times(d, t0)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(f"\nwatchdog ping gaps while the broker is down (s): {[round(g, 3) for g in gaps]}")
    assert all(g <= 1.4 for g in gaps), gaps
    assert any("broker disconnected, reconnecting" in m for _, m in _messages(d))
    assert metric(scrape_metrics(mport), "workflowd_broker_connected") == 0
    assert httpx.get(f"http://127.0.0.1:{mport}/healthz", timeout=5).status_code == 200
    assert d.stop() == 0


# --- shutdown -------------------------------------------------------------------------------------


def test_sigterm_with_a_hanging_webhook_records_interrupted_and_exits_0_within_10s(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    celery_worker_factory(broker_url)
    http_sink.respond("/hang", delay=60.0)
    hook = (
        "name: hang\ntrigger:\n  event: task.failed\naction:\n  type: webhook\n"
        f"  url: '{http_sink.url('/hang')}'\n  timeout_seconds: 50\n  retries: 0\n"
    )
    d: DaemonProc = daemon_factory(broker_url, {"hang.yaml": hook})
    res = celery_client.send_task(FAIL)
    http_sink.wait_for_requests("/hang", 1, timeout=5)  # the action is in flight
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc is not None
    code = d.proc.wait(15)
    took = time.monotonic() - t0
    print(f"\nSIGTERM with a hanging webhook in flight -> exit {code} in {took:.2f}s")
    assert code == 0 and took <= 10.0
    assert any("STOPPING=1" in m.splitlines() for _, m in _messages(d, t0))
    runs = d.history("hang")
    assert len(runs) == 1 and runs[0]["task_id"] == res.id
    assert runs[0]["outcome"] == "interrupted"
    assert runs[0]["actions"][0]["status"] == "interrupted"


# --- logs ----------------------------------------------------------------------------------------


def test_journald_priority_prefixes_when_stderr_is_the_journal_stream(
    broker_url: str, http_sink: HttpSink, daemon_factory: Any
) -> None:
    d: DaemonProc = daemon_factory(
        broker_url,
        {
            "good.yaml": slack_wf("good", http_sink.url("/s"), "x"),
            "bad.yaml": "name: bad\ntrigger:\n  event: task.faild\n",
        },
        start=False,
    )
    d.log_path.touch()
    st = os.stat(d.log_path)  # systemd sets JOURNAL_STREAM to stderr's device:inode
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d.start()
    wait_log(d, "ready")
    lines = [line for line in d.log_text().splitlines() if line]
    assert lines and all(line[:1] == "<" and line[2:4] == ">{" for line in lines), lines
    by_event = {json.loads(line[3:])["event"]: line[:3] for line in lines}
    assert by_event["ready"] == "<6>"
    assert by_event["workflow file failed to load"] == "<3>"


def test_logs_are_json_lines_without_journal_stream(
    broker_url: str, http_sink: HttpSink, daemon_factory: Any
) -> None:
    d: DaemonProc = daemon_factory(
        broker_url,
        {"good.yaml": slack_wf("good", http_sink.url("/s"), "x")},
        env={"JOURNAL_STREAM": "1:1"},  # set, but not this stderr: a redirected child
    )
    wait_log(d, "ready")
    lines = [line for line in d.log_text().splitlines() if line]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"event", "level", "timestamp"} <= set(events[0])
    assert any(e["event"] == "ready" for e in events)


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_move_during_a_run_and_healthz_is_200(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    daemon_factory: Any,
) -> None:
    celery_worker_factory(broker_url)
    port = free_port()
    d: DaemonProc = daemon_factory(
        broker_url,
        {"alert.yaml": slack_wf("alert", http_sink.url("/s"), "{task_id} failed")},
        config={"metrics_address": f"127.0.0.1:{port}"},
    )
    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert health.status_code == 200 and health.text == "ok\n"
    before = scrape_metrics(port)
    for _ in range(3):
        celery_client.send_task(FAIL)
    d.wait_runs("alert", 3, timeout=10)
    after = wait_for(
        lambda: (
            m
            if metric(
                m := scrape_metrics(port),
                "workflowd_runs_total",
                workflow="alert",
                outcome="success",
            )
            == 3
            else None
        ),
        5,
    )
    moved = {
        "events task-failed": (
            metric(before, "workflowd_events_total", type="task-failed"),
            metric(after, "workflowd_events_total", type="task-failed"),
        ),
        "runs alert/success": (
            metric(before, "workflowd_runs_total", workflow="alert", outcome="success"),
            metric(after, "workflowd_runs_total", workflow="alert", outcome="success"),
        ),
        "slack action durations": (
            metric(
                before, "workflowd_action_duration_seconds_count", type="slack", status="success"
            ),
            metric(
                after, "workflowd_action_duration_seconds_count", type="slack", status="success"
            ),
        ),
        "triggers task.failed": (
            metric(before, "workflowd_triggers_total", trigger="task.failed"),
            metric(after, "workflowd_triggers_total", trigger="task.failed"),
        ),
    }
    print(f"\nmetrics before -> after 3 failures: {moved}")
    assert moved["events task-failed"][1] - moved["events task-failed"][0] >= 3
    assert moved["runs alert/success"] == (0, 3)
    assert moved["slack action durations"] == (0, 3)
    assert (
        metric(after, "workflowd_action_duration_seconds_sum", type="slack", status="success") > 0
    )
    assert metric(after, "workflowd_events_total", type="worker-heartbeat") >= 1
    assert metric(after, "workflowd_broker_connected") == 1
    assert metric(after, "workflowd_config_last_reload_successful") == 1
    assert metric(after, "workflowd_circuit_open", workflow="alert") == 0
    assert ("workflowd_intake_gaps_total", ()) in after
    assert metric(after, "workflowd_workflows_loaded") == 1


# --- MemoryDenyWriteExecute ---------------------------------------------------------------------

_MDWE_LAUNCHER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


class MdweDaemon(DaemonProc):
    """The daemon under the kernel's W^X rule, which MemoryDenyWriteExecute=yes enforces."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", _MDWE_LAUNCHER, *super().command()[1:]]


def test_daemon_runs_under_memory_deny_write_execute(
    broker_url: str,
    celery_worker_factory: Any,
    celery_client: Any,
    http_sink: HttpSink,
    tmp_path: Path,
) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", _MDWE_LAUNCHER, "-c", "pass"], timeout=30, check=False
    )
    if probe.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    celery_worker_factory(broker_url)
    wf = tmp_path / "workflows"
    wf.mkdir()
    (wf / "a.yaml").write_text(slack_wf("a", http_sink.url("/s"), "{task_id}"))
    d = MdweDaemon(wf, tmp_path / "history.db", broker_url, config={"reload_interval_seconds": 1})
    try:
        d.start()
        res = celery_client.send_task(FAIL)
        assert http_sink.wait_for_requests("/s", 1, timeout=5)[0].json == {"text": res.id}
        assert d.wait_runs("a", 1, timeout=5)[0]["outcome"] == "success"
        seen = len(reloads(d))
        (wf / "a.yaml").write_text(slack_wf("a", http_sink.url("/s"), "v2 {task_id}"))
        wait_reload(d, seen, lambda e: e["changed"] == ["a"])
    finally:
        code = d.stop()
    assert code == 0, d.log_text()[-3000:]
    assert "Traceback" not in d.log_text()
