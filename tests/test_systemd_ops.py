"""The shipped systemd unit: ``systemd-analyze verify`` accepts it, without a single warning."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "workflowd.service"
SYSUSERS = REPO / "systemd" / "workflowd.sysusers.conf"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        msg = "systemd-analyze not installed (apt-get install -y systemd)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _workflowd_binary() -> str:
    # verify checks that ExecStart's program exists: point it at this checkout's.
    exe = Path(sys.executable).parent / "workflowd"
    found = str(exe) if exe.exists() else shutil.which("workflowd")
    assert found, "the workflowd console script is not installed"
    return found


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    text = UNIT.read_text()
    assert "ExecStart=/opt/workflowd/bin/workflowd run" in text
    unit = tmp_path / "workflowd.service"
    unit.write_text(text.replace("/opt/workflowd/bin/workflowd", _workflowd_binary()))
    res = subprocess.run(
        [exe, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on a misspelt key ("Unknown key ..., ignoring"): demand silence too
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def test_unit_has_the_settings_operations_rely_on() -> None:
    s = _settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "User": "workflowd",
        "StateDirectory": "workflowd",
        "EnvironmentFile": "-/etc/workflowd/secrets.env",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictNamespaces": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
    }
    for key, value in expected.items():
        assert value in s.get(key, []), f"{key}={value} missing"
    assert "@system-service" in s["SystemCallFilter"]
    assert s["ConfigurationDirectory"][0].split()[0] == "workflowd"
    # the watchdog must leave room for the daemon's 15 s stall detection
    assert re.fullmatch(r"\d+s", s["WatchdogSec"][0]) and int(s["WatchdogSec"][0][:-1]) >= 20
    # stopping takes at most 10 s; systemd must not SIGKILL before that
    assert int(s["TimeoutStopSec"][0].rstrip("s")) > 10


def test_sysusers_snippet_creates_the_unit_user(tmp_path: Path) -> None:
    lines = [line.split() for line in SYSUSERS.read_text().splitlines() if line and line[0] != "#"]
    assert lines and lines[0][:2] == ["u", "workflowd"]
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        return  # the parse check below needs systemd; the unit test above covers CI
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("")
    (tmp_path / "etc" / "group").write_text("")
    conf = tmp_path / "usr" / "lib" / "sysusers.d"
    conf.mkdir(parents=True)
    shutil.copy(SYSUSERS, conf / "workflowd.conf")
    res = subprocess.run(
        [exe, "--dry-run", f"--root={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Creating user 'workflowd'" in out and "garbage" not in out.lower(), out
