"""--pidfile as qemu-storage-daemon keeps it: private, locked for the daemon's life,
a second daemon refused with QEMU's message before it touches anything, removed at
exit by its owner only. The lock is the kind QEMU takes, so the two daemons also
refuse each other."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.procs import negotiated
from tests.support.daemons import REPO, DaemonProcess, oracle_path, qmpjobd_command

LOCKED = "cannot create PID file: Cannot lock pid file: Resource temporarily unavailable"


def run_second(kind: str, pidfile: Path, socket_path: Path) -> subprocess.CompletedProcess:
    """A second daemon with the same pid file; it must fail at once."""
    base = qmpjobd_command() if kind == "qmpjobd" else [oracle_path()]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        base + ["--chardev", f"socket,id=m,path={socket_path},server=on,wait=off",
                "--monitor", "m", "--pidfile", str(pidfile)],
        env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_pidfile_is_private_holds_the_pid_and_goes_at_exit(tmp_path):
    pidfile = tmp_path / "pid"
    with DaemonProcess("qmpjobd", ["--pidfile", str(pidfile)]) as daemon:
        negotiated(daemon.sockets[0]).close()   # up and serving
        assert pidfile.read_text() == f"{daemon.proc.pid}\n"
        assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
    assert not pidfile.exists()


@pytest.mark.parametrize("first, second", [("qmpjobd", "qmpjobd"), ("qsd", "qmpjobd"),
                                           ("qmpjobd", "qsd"), ("qsd", "qsd")])
def test_a_second_daemon_is_refused_and_touches_nothing(tmp_path, first, second):
    pidfile = tmp_path / "pid"
    with DaemonProcess(first, ["--pidfile", str(pidfile)]) as daemon:
        client = negotiated(daemon.sockets[0])
        before = pidfile.read_text()
        # The same socket path as the first one's: a refused daemon must not have
        # replaced it (qemu-storage-daemon does, having created its sockets first);
        # qmpjobd is checked with it, QEMU with a path of its own.
        socket_path = Path(daemon.sockets[0]) if second == "qmpjobd" else tmp_path / "other.sock"
        result = run_second(second, pidfile, socket_path)
        program = "qmpjobd" if second == "qmpjobd" else "qemu-storage-daemon"
        assert (result.returncode, result.stderr) == (1, f"{program}: {LOCKED}\n")
        assert pidfile.read_text() == before
        # The first daemon still owns its socket: a new client reaches it (after
        # the first one left: qemu-storage-daemon serves one at a time).
        client.close()
        again = negotiated(daemon.sockets[0])
        again.send(b'{"execute":"query-jobs","id":1}')
        assert again.recv_message() == b'{"return": [], "id": 1}\r\n'
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
    assert not pidfile.exists()


def test_an_unlocked_stale_pidfile_is_taken_over(tmp_path):
    pidfile = tmp_path / "pid"
    pidfile.write_text("999999999 stale and longer than a pid\n")
    with DaemonProcess("qmpjobd", ["--pidfile", str(pidfile)]) as daemon:
        negotiated(daemon.sockets[0]).close()
        assert pidfile.read_text() == f"{daemon.proc.pid}\n"


@pytest.mark.parametrize("kind", ["qsd", "qmpjobd"])
def test_an_impossible_pidfile_fails_with_qemus_message(tmp_path, kind):
    missing = tmp_path / "no-such-dir" / "pid"
    result = run_second(kind, missing, tmp_path / "m.sock")
    program = "qmpjobd" if kind == "qmpjobd" else "qemu-storage-daemon"
    assert (result.returncode, result.stderr) == (
        1, f"{program}: cannot create PID file: Could not create '{missing}': "
           "No such file or directory\n")
