"""qmpjobd for tests: in the caller's event loop (``Daemon``) or as a process
(``Daemon.process``), on a unix socket in a private temporary directory.

Both are built from one command line: the options given here become the
arguments qmpjobd's command line takes, and the embedded daemon parses them with
``qmpjobd.cli.parse_args`` and starts with ``qmpjobd.cli.start``, exactly as the
``qmpjobd`` program does. So ``argv`` (what ``Daemon.process`` runs) and the
embedded daemon cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from qmpjobd.cli import Running

CLOCKS = ("real", "virtual")
# The chardev (and monitor) id of the one socket a test daemon listens on.
MONITOR_ID = "qmp0"
# How long a separate process may take to create its socket.
PROCESS_START_TIMEOUT_S = 30.0
# How long stop() lets a process exit after SIGTERM before SIGKILL.
PROCESS_STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Setup:
    """What a test daemon runs: the options shared by ``Daemon`` and
    ``Daemon.process``."""

    # The QEMU release to be; None: $QMPJOBD_QEMU_VERSION, else the default (11.1).
    version: str | None = None
    # "real" (default) or "virtual": time moves only through x-qmpjobd-clock-step.
    clock: str = "real"
    # The x-qmpjobd-* test control commands.
    test_controls: bool = False
    # Block nodes created at start-up: blockdev-add's arguments as dicts, or
    # --blockdev texts (keyval or JSON).
    blockdevs: Sequence[Mapping[str, Any] | str] = ()
    # Further qmpjobd options, as on its command line (["--no-drain-artefacts"]).
    extra_args: Sequence[str] = ()
    # How long stop() waits for cancelled jobs (qmpjobd's --shutdown-timeout).
    shutdown_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, not {self.clock!r}")
        if isinstance(self.blockdevs, (str, Mapping)):
            raise TypeError("blockdevs is a list of nodes, not one node")

    def resolved_version(self) -> str:
        from qmpjobd.cli import QEMU_VERSION_ENV, choose_qemu_version

        return choose_qemu_version(self.version, os.environ.get(QEMU_VERSION_ENV))

    def qsd_arguments(self, socket_path: str) -> list[str]:
        """The part of the command line qemu-storage-daemon takes too."""
        args = ["--chardev", f"socket,id={MONITOR_ID},path={socket_path},server=on,wait=off",
                "--monitor", f"chardev={MONITOR_ID}"]
        for node in self.blockdevs:
            text = node if isinstance(node, str) else json.dumps(dict(node))
            args += ["--blockdev", text]
        return args

    def qmpjobd_options(self) -> list[str]:
        """The options only qmpjobd has."""
        options = ["--qemu-version", self.resolved_version()]
        if self.clock != "real":
            options += ["--clock", self.clock]
        if self.test_controls:
            options.append("--test-controls")
        if self.shutdown_timeout is not None:
            options += ["--shutdown-timeout", str(self.shutdown_timeout)]
        return options + list(self.extra_args)


def _private_socket_dir() -> Path:
    # mkdtemp creates the directory with mode 0700: only we can reach the socket.
    return Path(tempfile.mkdtemp(prefix="qmpjobd-test-"))


class _TestDaemon:
    """What both kinds share: the setup, the socket, the command lines, clients."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.directory: Path | None = None
        self.socket_path = ""
        self._clients: list[QMPClient] = []

    def _make_directory(self) -> None:
        self.directory = _private_socket_dir()
        self.socket_path = str(self.directory / "qmp.sock")

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def qmp_command_line(self) -> list[str]:
        """qemu-storage-daemon's arguments for the same socket and nodes: run
        ``qemu-storage-daemon *d.qmp_command_line`` to get QEMU's answer."""
        return self.setup.qsd_arguments(self.socket_path)

    @property
    def qmpjobd_options(self) -> list[str]:
        """The qmpjobd-only options of this setup (--qemu-version, --clock,
        --test-controls, extra_args)."""
        return self.setup.qmpjobd_options()

    @property
    def argv(self) -> list[str]:
        """The complete qmpjobd command line, program name first."""
        return ["qmpjobd", *self.qmpjobd_options, *self.qmp_command_line]

    async def client(self, name: str = "qmpjobd-test") -> "QMPClient":
        """A connected, negotiated ``qemu.qmp.QMPClient`` (disconnected by stop())."""
        from qemu.qmp import QMPClient

        client = QMPClient(name)
        await client.connect(self.socket_path)
        self._clients.append(client)
        return client

    async def _disconnect_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


class Daemon(_TestDaemon):
    """qmpjobd inside the running event loop; ``async with Daemon(...) as d``.

    ``d.socket_path`` is its unix socket, in a temporary directory of mode 0700
    removed by ``stop()``. The options are those of ``Setup``.
    """

    def __init__(self, version: str | None = None, clock: str = "real",
                 test_controls: bool = False,
                 blockdevs: Sequence[Mapping[str, Any] | str] = (),
                 extra_args: Sequence[str] = (),
                 shutdown_timeout: float | None = None) -> None:
        super().__init__(Setup(version, clock, test_controls, tuple(blockdevs),
                               tuple(extra_args), shutdown_timeout))
        self._running: Running | None = None

    @classmethod
    def process(cls, version: str | None = None, clock: str = "real",
                test_controls: bool = False,
                blockdevs: Sequence[Mapping[str, Any] | str] = (),
                extra_args: Sequence[str] = (),
                shutdown_timeout: float | None = None) -> "DaemonProcess":
        """The same daemon as a separate process (for SIGKILL and the like)."""
        return DaemonProcess(Setup(version, clock, test_controls, tuple(blockdevs),
                                   tuple(extra_args), shutdown_timeout))

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.server.stopped.is_set()

    async def start(self) -> "Daemon":
        from qmpjobd import cli

        if self._running is not None:
            raise RuntimeError("this Daemon was started already")
        self._make_directory()
        try:
            config = _parse(self.argv[1:])
            self._running = await cli.start(config)
        except BaseException:
            self._remove_directory()
            raise
        return self

    async def wait_stopped(self) -> None:
        """Until the daemon has stopped by itself (``quit``) or through stop()."""
        if self._running is not None:
            await self._running.wait_stopped()

    async def stop(self) -> None:
        """Exit as ``quit`` does (jobs cancelled), then remove the directory.
        Idempotent; safe after a failed start."""
        await self._disconnect_clients()
        running = self._running
        if running is not None:
            abandoned = await running.stop()
            if abandoned:
                # The process would exit here; in a test's loop their coroutines
                # must not outlive the daemon.
                running.daemon.jobs.close()
                warnings.warn(f"qmpjobd: {len(abandoned)} job(s) did not stop in time "
                              "and were abandoned", RuntimeWarning, stacklevel=2)
        self._remove_directory()

    async def __aenter__(self) -> "Daemon":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _parse(args: list[str]) -> Any:
    """qmpjobd's own command-line parser, with its errors as exceptions."""
    from qmpjobd.cli import UsageError, parse_args

    try:
        return parse_args(args)
    except SystemExit:
        # argparse has printed why on stderr (an unknown option, a bad value).
        raise UsageError(f"qmpjobd refused the options {args}") from None


class DaemonProcess(_TestDaemon):
    """qmpjobd as a child process (``python -m qmpjobd``), same interface as
    ``Daemon`` plus ``pid``, ``kill()`` (SIGKILL) and ``wait()``."""

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the process has not been started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def stderr_text(self) -> str:
        """What the process wrote on stderr so far."""
        if self.directory is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.directory / "stderr.log").read_text(errors="replace")
        return ""

    async def start(self) -> "DaemonProcess":
        if self._proc is not None:
            raise RuntimeError("this process was started already")
        self._make_directory()
        try:
            await self._spawn()
            await self._until_listening()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _spawn(self) -> None:
        assert self.directory is not None
        env = dict(os.environ)
        # The child must run the very qmpjobd this process imported. Where that
        # came from a directory outside the interpreter's own path (a checkout
        # put on sys.path by hand), the child needs to be told.
        package_root = str(Path(__file__).resolve().parents[2])
        if package_root not in {os.path.abspath(entry) for entry in sys.path if entry}:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with open(self.directory / "stderr.log", "wb") as stderr:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmpjobd", *self.argv[1:], cwd=self.directory, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)

    async def _until_listening(self) -> None:
        # qmpjobd renames its socket into place once it listens, so the path
        # existing means a client can connect.
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROCESS_START_TIMEOUT_S
        while not os.path.exists(self.socket_path):
            if self._proc.returncode is not None:
                raise RuntimeError(f"qmpjobd exited at start-up: {self.stderr_text.strip()}")
            if loop.time() > deadline:
                raise RuntimeError(f"qmpjobd did not listen within {PROCESS_START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL: the daemon vanishes mid-whatever, its socket file stays."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Until the process has exited; its exit status."""
        if self._proc is None:
            raise RuntimeError("the process has not been started")
        return await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM (qmpjobd exits as on ``quit``), SIGKILL if it takes too long;
        then remove the directory. Idempotent."""
        await self._disconnect_clients()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), PROCESS_STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        self._remove_directory()

    async def __aenter__(self) -> "DaemonProcess":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
