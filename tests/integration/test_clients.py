"""Real QMP clients against qmpjobd: qemu.qmp's QMPClient and qmp-shell."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import shutil
import subprocess
import sys
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.support.daemons import REPO


async def test_qmpclient_negotiates_executes_and_gets_events(daemon):
    client = QMPClient("test")
    await client.connect(daemon.sockets[0])
    try:
        assert client.greeting.QMP.version["qemu"]["major"] == 7
        version = await client.execute("query-version")
        assert version["package"].startswith("qmpjobd")
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"qmp_capabilities", "query-jobs", "blockdev-backup", "quit"} <= names
        try:
            await client.execute("job-dismiss", {"id": "nope"})
        except ExecuteError as err:
            assert err.error_class == "GenericError" and str(err) == "Job not found"
        else:
            raise AssertionError("job-dismiss of an unknown job succeeded")
        listener = EventListener()
        with client.listen(listener):
            await client.execute("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full", "job-id": "j0"})
            statuses = []
            async for event in listener:
                if event["event"] == "JOB_STATUS_CHANGE":
                    statuses.append(event["data"]["status"])
                if statuses[-1:] == ["null"]:
                    break
        assert statuses[0] == "created" and "waiting" in statuses and statuses[-1] == "null"
    finally:
        await client.disconnect()


def qmp_shell() -> str:
    path = shutil.which("qmp-shell") or os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    assert os.path.exists(path), "qmp-shell (from qemu.qmp) is not installed"
    return path


def read_until(fd: int, needle: bytes, timeout: float = 15) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {needle!r}; got {data!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data


def test_qmp_shell_session_banner_query_and_completion(daemon):
    """qmp-shell in a pseudo-terminal: banner, a query, and tab completion that
    comes from query-commands."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(qmp_shell(), [qmp_shell(), daemon.sockets[0]])
    try:
        banner = read_until(fd, b"(QEMU) ")
        assert b"Welcome to the QMP low-level shell!" in banner
        assert b"Connected to QEMU 7.2.0" in banner
        os.write(fd, b"query-version\n")
        out = read_until(fd, b"(QEMU) ")
        assert b'"package": "qmpjobd' in out
        os.write(fd, b"query-block-j\t")
        completed = read_until(fd, b"query-block-jobs")
        assert b"query-block-jobs" in completed
        os.write(fd, b"\n")
        out = read_until(fd, b"(QEMU) ")
        assert b'{"return": []}' in out
        os.write(fd, b"job-dismiss id=nope\n")
        out = read_until(fd, b"(QEMU) ")
        assert b"Job not found" in out
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)


def test_readme_quickstart_runs_against_the_demo_setup(qmpjobd_factory):
    daemon = qmpjobd_factory("--demo")
    result = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), daemon.sockets[0]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "JOB_STATUS_CHANGE {'status': 'created', 'id': 'b0'}"
    assert "BLOCK_JOB_COMPLETED" in result.stdout
    assert "'status': 'concluded'" in lines[-1] and "'current-progress': 67108864" in lines[-1]


def test_legacy_sync_api_commands_and_events(daemon):
    """qemu.qmp.legacy.QEMUMonitorProtocol: the synchronous API of iotests and
    older management scripts (cmd, cmd_obj with no id, pull_event, get_events)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(daemon.sockets[0])
    greeting = qmp.connect(negotiate=True)
    try:
        assert greeting["QMP"]["capabilities"] == ["oob"]
        assert qmp.cmd_obj({"execute": "query-jobs"}) == {"return": []}
        reply = qmp.cmd_raw("job-dismiss", {"id": "nope"})
        assert reply["error"] == {"class": "GenericError", "desc": "Job not found"}
        qmp.cmd("blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt", "sync": "full"})
        statuses = []
        while not statuses or statuses[-1] != "null":
            event = qmp.pull_event(wait=10.0)
            if event and event["event"] == "JOB_STATUS_CHANGE":
                statuses.append(event["data"]["status"])
        assert statuses == ["created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]
    finally:
        qmp.close()
