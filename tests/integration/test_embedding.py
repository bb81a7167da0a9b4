"""qmpjobd.testing.Daemon (in this test's event loop) and Daemon.process (a child
process), over their real unix sockets; their command line checked on
qemu-storage-daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import tempfile

import pytest
from qemu.qmp import QMPClient

from qmpjobd.cli import UsageError
from qmpjobd.testing import Daemon, QMPEvents
from tests.support.oracles import oracle_command

NODES = [{"driver": "null-co", "node-name": "src", "size": 16 << 20},
         "null-co,node-name=tgt,size=16777216"]


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_embedded_daemon_serves_its_setup_and_cleans_up() -> None:
    async with Daemon(version="10.0", blockdevs=NODES) as daemon:
        directory = os.path.dirname(daemon.socket_path)
        assert mode_of(directory) == 0o700
        client = await daemon.client()
        version = await client.execute("query-version")
        assert (version["qemu"]["major"], version["qemu"]["minor"]) == (10, 0)
        nodes = await client.execute("query-named-block-nodes")
        assert sorted(node["node-name"] for node in nodes) == ["src", "tgt"]
    assert not os.path.exists(directory)
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(daemon.socket_path)


async def test_command_lines_name_everything_the_daemon_was_given() -> None:
    async with Daemon(version="7.2", blockdevs=NODES, extra_args=["--no-drain-artefacts"]) as daemon:
        path = daemon.socket_path
        assert daemon.qmp_command_line == [
            "--chardev", f"socket,id=qmp0,path={path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
            "--blockdev", json.dumps(NODES[0]),
            "--blockdev", NODES[1],
        ]
        assert daemon.qmpjobd_options == ["--qemu-version", "7.2", "--no-drain-artefacts"]
        assert daemon.argv == ["qmpjobd", *daemon.qmpjobd_options, *daemon.qmp_command_line]


async def test_without_a_version_the_environment_decides_as_on_the_command_line(monkeypatch) -> None:
    monkeypatch.setenv("QMPJOBD_QEMU_VERSION", "10.0")
    async with Daemon() as daemon:
        assert daemon.qmpjobd_options[:2] == ["--qemu-version", "10.0"]
        version = await (await daemon.client()).execute("query-version")
        assert version["qemu"]["major"] == 10
    monkeypatch.delenv("QMPJOBD_QEMU_VERSION")
    async with Daemon() as daemon:
        assert daemon.qmpjobd_options[:2] == ["--qemu-version", "11.1"]


async def test_qmp_command_line_gives_the_same_setup_on_qemu_storage_daemon() -> None:
    """The qsd-compatible part, run by the real daemon on a socket of its own,
    answers the node query exactly as the embedded daemon does."""
    async with Daemon(version="7.2", blockdevs=NODES) as daemon:
        ours = await (await daemon.client()).execute("query-named-block-nodes")
        qsd_dir = tempfile.mkdtemp(prefix="qsd-embed-")
        qsd_socket = os.path.join(qsd_dir, "qmp.sock")
        args = [arg.replace(daemon.socket_path, qsd_socket) for arg in daemon.qmp_command_line]
        proc = await asyncio.create_subprocess_exec(*oracle_command("7.2"), *args,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            theirs = await query_when_listening(qsd_socket, proc)
        finally:
            proc.terminate()
            await proc.wait()
            for name in os.listdir(qsd_dir):
                os.unlink(os.path.join(qsd_dir, name))
            os.rmdir(qsd_dir)
    assert ours == theirs


async def query_when_listening(path: str, proc: asyncio.subprocess.Process) -> object:
    client = QMPClient("oracle")
    for _ in range(2000):
        if proc.returncode is not None:
            raise RuntimeError((await proc.stderr.read()).decode())
        try:
            await client.connect(path)
            break
        except Exception:  # not listening yet
            await asyncio.sleep(0.005)
    try:
        return await client.execute("query-named-block-nodes")
    finally:
        await client.disconnect()


async def test_a_refused_setup_raises_and_leaves_nothing_behind() -> None:
    daemon = Daemon(blockdevs=[{"driver": "null-co", "node-name": "n", "size": "big"}])
    with pytest.raises(UsageError, match="--blockdev"):
        await daemon.start()
    assert daemon.directory is not None and not daemon.directory.exists()
    with pytest.raises(ValueError, match="clock"):
        Daemon(clock="sundial")


async def test_embedding_installs_no_signal_handler() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    async with Daemon():
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


async def test_two_embedded_daemons_are_independent() -> None:
    async with Daemon(blockdevs=NODES) as first, Daemon(blockdevs=NODES) as second:
        assert first.socket_path != second.socket_path
        one, two = await first.client(), await second.client()
        await one.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                              "sync": "full", "speed": 1, "auto-dismiss": False})
        assert [job["id"] for job in await one.execute("query-jobs")] == ["j"]
        assert await two.execute("query-jobs") == []


async def test_quit_stops_the_embedded_daemon_and_stop_stops_running_jobs() -> None:
    async with Daemon(blockdevs=NODES) as daemon:
        client = await daemon.client()
        events = QMPEvents().attach(client)
        await client.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                                 "sync": "full", "speed": 1})
        await client.execute("quit")
        await daemon.wait_stopped()
        assert not daemon.running
        # Exit cancels every job, as QEMU's does; the client saw it happen.
        assert (await events.wait("BLOCK_JOB_CANCELLED", id="j"))["data"]["type"] == "backup"


async def test_process_daemon_can_be_killed() -> None:
    async with Daemon.process(version="7.2", blockdevs=NODES) as proc:
        assert proc.pid > 0 and os.path.exists(f"/proc/{proc.pid}")
        client = await proc.client()
        version = await client.execute("query-version")
        assert (version["qemu"]["major"], version["qemu"]["minor"]) == (7, 2)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        # The socket file outlives a killed daemon, as QEMU's does.
        assert os.path.exists(proc.socket_path)
        directory = proc.directory
    assert directory is not None and not directory.exists()


async def test_process_daemon_stops_with_sigterm_and_a_failed_start_says_why() -> None:
    proc = Daemon.process(blockdevs=NODES)
    await proc.start()
    await proc.stop()
    assert proc.returncode == 0
    bad = Daemon.process(extra_args=["--log-level", "debug", "--blockdev", "driver=nope"])
    with pytest.raises(RuntimeError, match="exited at start-up: qmpjobd: --blockdev"):
        await bad.start()
    assert bad.directory is not None and not bad.directory.exists()


async def test_a_start_that_fails_part_way_closes_what_it_opened(tmp_path) -> None:
    """The second socket cannot be created: the first is closed and removed, and
    the file in the second one's way is not touched."""
    from qmpjobd import cli

    first = tmp_path / "first.sock"
    blocked_dir = tmp_path / "not-a-directory"
    blocked_dir.write_text("mine")
    config = cli.parse_args(["--socket", str(first), "--socket", str(blocked_dir / "second.sock")])
    with pytest.raises(OSError):
        await cli.start(config)
    assert not first.exists()
    assert blocked_dir.read_text() == "mine"


async def test_a_refused_export_fails_before_any_monitor_listens(tmp_path, monkeypatch) -> None:
    """A bad --export stops start-up before the monitor sockets exist, so no
    client can connect to a daemon that is about to exit; an NBD server that
    was already listening is closed again."""
    from qmpjobd import cli
    from qmpjobd.server import Server

    listened = []
    real_start = Server.start

    async def recording_start(self: Server) -> None:
        listened.append(self)
        await real_start(self)

    monkeypatch.setattr(Server, "start", recording_start)
    monitor, nbd = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
    config = cli.parse_args(["--socket", str(monitor),
                             "--blockdev", "null-co,node-name=n0",
                             "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                             "--export", "type=nbd,id=e0,node-name=n0,bitmaps.0=none"])
    with pytest.raises(UsageError, match="--export"):
        await cli.start(config)
    assert listened == [] and not monitor.exists()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_unix_connection(str(nbd))
