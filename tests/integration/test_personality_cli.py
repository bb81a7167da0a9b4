"""Choosing the QEMU personality: --qemu-version, $QMPJOBD_QEMU_VERSION, the default.

Each case starts a real daemon process and reads what a client sees: the greeting
and query-version name the chosen release (micro 0) and a package naming qmpjobd.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpjobd.versions import DEFAULT_VERSION, KNOWN_VERSIONS

REPO = Path(__file__).resolve().parents[2]


def environment(version_variable: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("QMPJOBD_QEMU_VERSION", None)
    if version_variable is not None:
        env["QMPJOBD_QEMU_VERSION"] = version_variable
    return env


def greeting_and_version(tmp_path: Path, args: list[str], variable: str | None) -> tuple[dict, dict]:
    path = tmp_path / "q.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qmpjobd", "--socket", str(path), *args],
                            env=environment(variable), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            reader = sock.makefile("rb")
            greeting = json.loads(reader.readline())
            sock.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-version"}')
            assert json.loads(reader.readline()) == {"return": {}}
            version = json.loads(reader.readline())["return"]
        return greeting["QMP"]["version"], version
    finally:
        proc.terminate()
        proc.wait(20)


def expected(release: str) -> dict:
    major, minor = (int(part) for part in release.split("."))
    return {"major": major, "minor": minor, "micro": 0}


@pytest.mark.parametrize("release", KNOWN_VERSIONS)
def test_option_selects_the_release(tmp_path, release):
    greeting, version = greeting_and_version(tmp_path, ["--qemu-version", release], None)
    assert greeting == version
    assert version["qemu"] == expected(release)
    assert version["package"].startswith("qmpjobd ")
    assert f"QEMU {release} personality" in version["package"]


def test_default_is_the_newest_release(tmp_path):
    assert DEFAULT_VERSION == "11.1"
    _, version = greeting_and_version(tmp_path, [], None)
    assert version["qemu"] == expected(DEFAULT_VERSION)


def test_environment_variable_selects_when_no_option(tmp_path):
    _, version = greeting_and_version(tmp_path, [], "10.0")
    assert version["qemu"] == expected("10.0")


def test_option_wins_over_environment_variable(tmp_path):
    _, version = greeting_and_version(tmp_path, ["--qemu-version", "7.2"], "11.1")
    assert version["qemu"] == expected("7.2")


@pytest.mark.parametrize("args, variable, source", [
    (["--qemu-version", "9.0"], None, "--qemu-version"),
    ([], "8", "QMPJOBD_QEMU_VERSION"),
])
def test_unknown_release_is_refused_with_the_known_ones(tmp_path, args, variable, source):
    proc = subprocess.run([sys.executable, "-m", "qmpjobd", "--socket", str(tmp_path / "q.sock"), *args],
                          env=environment(variable), capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert source in proc.stderr
    assert "known versions: 7.2, 10.0, 11.1" in proc.stderr
    assert not (tmp_path / "q.sock").exists()
