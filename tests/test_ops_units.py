"""Pure parts of operations: sd_notify, liveness, file discovery, journald detection, metrics."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from workflowd import daemon, loader, logs, sdnotify

WF = "name: {name}\ntrigger:\n  event: task.failed\naction:\n  type: slack\n  webhook_url: http://127.0.0.1:9/x\n"


# --- sd_notify ------------------------------------------------------------------------------


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(2)
    try:
        yield sock
    finally:
        sock.close()


def test_notify_sends_one_datagram_to_a_path(dgram: socket.socket, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    assert sdnotify.notify("READY=1\nSTATUS=3 workflows loaded", env)
    assert dgram.recv(4096) == b"READY=1\nSTATUS=3 workflows loaded"


def test_notify_to_an_abstract_socket() -> None:
    name = f"workflowd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert sdnotify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd_or_listener_is_a_quiet_no(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_monotonic_usec_is_the_monotonic_clock() -> None:
    before = time.monotonic_ns() // 1000
    value = sdnotify.monotonic_usec()
    assert before <= value <= time.monotonic_ns() // 1000


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert sdnotify.watchdog_interval(env) == expected


# --- liveness -------------------------------------------------------------------------------


def _alive(**kw: object) -> str | None:
    args: dict[str, object] = {
        "intake_running": True,
        "connected": True,
        "intake_last_loop": 100.0,
        "engine_running": True,
        "engine_last_beat": 100.0,
    }
    args.update(kw)
    return daemon.liveness(100.5, stall=15, **args)  # type: ignore[arg-type]


def test_liveness() -> None:
    assert _alive() is None
    # the broker is down: intake is reconnecting, the daemon is alive
    assert _alive(connected=False, intake_last_loop=0.0) is None
    assert _alive(intake_last_loop=80.0) == "event intake stalled for 20s"
    assert _alive(intake_running=False) == "event intake stopped"
    assert _alive(engine_last_beat=70.0) == "engine loop unresponsive for 30s"
    assert _alive(engine_running=False) == "engine stopped"


# --- discovery --------------------------------------------------------------------------------


def _configmap(root: Path, stamp: str, files: dict[str, str]) -> None:
    """The layout kubelet writes for a ConfigMap volume, swapped atomically."""
    target = root / f"..{stamp}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, root / "..data")
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


def test_discover_reads_a_configmap_through_its_top_level_symlinks(tmp_path: Path) -> None:
    _configmap(tmp_path, "2026_01_01_00_00_00.000000001", {"a.yaml": WF.format(name="a")})
    (tmp_path / "plain.yml").write_text(WF.format(name="plain"))
    found = loader.discover([tmp_path])
    assert found == [tmp_path / "a.yaml", tmp_path / "plain.yml"]
    snap = loader.load_paths([tmp_path])
    assert snap.ok and sorted(snap.workflows) == ["a", "plain"]
    assert snap.workflows["a"].file == str(tmp_path / "a.yaml")


def test_discover_sees_a_configmap_swap(tmp_path: Path) -> None:
    _configmap(tmp_path, "2026_01_01_00_00_00.000000001", {"a.yaml": WF.format(name="a")})
    before = daemon.fingerprint([tmp_path])
    _configmap(tmp_path, "2026_01_01_00_01_00.000000002", {"a.yaml": WF.format(name="a2")})
    assert daemon.fingerprint([tmp_path]) != before
    assert sorted(loader.load_paths([tmp_path]).workflows) == ["a2"]


def test_discover_skips_editor_files_and_loads_a_file_once(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(WF.format(name="a"))
    for junk in (".a.yaml.swp", ".a.yaml", "a.yaml~", "#a.yaml#", "a.yaml.tmp", "4913"):
        (tmp_path / junk).write_text("junk: [")
    (tmp_path / "also-a.yaml").symlink_to("a.yaml")  # the same file by a second name
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.yaml").write_text(WF.format(name="b"))
    (sub / "loop").symlink_to("..")  # a symlink loop is walked once
    found = loader.discover([tmp_path])
    assert found == [tmp_path / "a.yaml", sub / "b.yaml"]


def test_fingerprint_changes_on_edit_rename_and_delete(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(WF.format(name="a"))
    seen = {daemon.fingerprint([tmp_path])}
    f.write_text(WF.format(name="b"))
    seen.add(daemon.fingerprint([tmp_path]))
    f.rename(tmp_path / "c.yaml")
    seen.add(daemon.fingerprint([tmp_path]))
    (tmp_path / "c.yaml").unlink()
    seen.add(daemon.fingerprint([tmp_path]))
    assert len(seen) == 4


# --- logs -------------------------------------------------------------------------------------


def test_on_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.on_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.on_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.on_journal(stream, {"JOURNAL_STREAM": "junk"})
        assert not logs.on_journal(stream, {})


def test_journald_priorities() -> None:
    assert logs._journald_prefix(None, "error", '{"a": 1}') == '<3>{"a": 1}'
    assert logs._journald_prefix(None, "info", "{}") == "<6>{}"
    assert logs._journald_prefix(None, "warning", "{}") == "<4>{}"
    assert logs._journald_prefix(None, "debug", "{}") == "<7>{}"


def test_redact_puts_references_back(tmp_path: Path) -> None:
    os.environ["WFD_TEST_SECRET"] = "https://hooks.example.invalid/very-secret"
    try:
        f = tmp_path / "a.yaml"
        f.write_text(WF.format(name="a").replace("http://127.0.0.1:9/x", "${WFD_TEST_SECRET}"))
        snap = loader.load_paths([tmp_path])
    finally:
        del os.environ["WFD_TEST_SECRET"]
    redact = logs.Redact()
    redact.redactor = snap.redactor
    with structlog.testing.capture_logs(processors=[redact]) as captured:
        structlog.get_logger().info("x", url="https://hooks.example.invalid/very-secret")
    assert "very-secret" not in repr(captured)
