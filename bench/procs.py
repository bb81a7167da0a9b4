"""Starting the two daemons with one command line, and reading their /proc counters."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from typing import Callable, Iterator

from qmpjobd.versions import DEFAULT_VERSION
from tests.support.daemons import DaemonProcess
from tests.support.oracles import oracle_command

KINDS = ("qmpjobd", "qsd")
# The personality benchmarked: qmpjobd --qemu-version V against qemu-storage-daemon V
# (`python -m bench --qemu-version V`; default qmpjobd's own default).
QEMU_VERSION = DEFAULT_VERSION
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Called with the pid of each daemon once it serves (bench.profile attaches here).
ON_START: list[Callable[[int], None]] = []


@contextmanager
def daemon(kind: str, monitors: int = 1, extra: list[str] | None = None) -> Iterator[DaemonProcess]:
    """A fresh daemon with ``monitors`` sockets, always stopped afterwards."""
    proc = new_process(kind, list(extra or []), monitors=monitors)
    try:
        proc.start(timeout=60.0)
        for hook in ON_START:
            hook(pid(proc))
        yield proc
    except Exception as exc:
        # The daemon's last words explain most failures (its log dies with it).
        tail = " | ".join(proc.stderr().strip().splitlines()[-3:])
        if tail:
            exc.add_note(f"{kind} stderr: {tail}")
        raise
    finally:
        proc.stop()


def use_bytecode_cache(prefix: "os.PathLike[str] | str") -> None:
    """Start every daemon of this run as an installed package runs: its bytecode
    cached (pip compiles .pyc files at install), here under ``prefix`` outside the
    repository. Without it an environment with PYTHONDONTWRITEBYTECODE=1 (CI's,
    this machine's) compiles each job module when the first job of its kind starts,
    10-20 ms inside the timed job. The start-up row measures the uncached case
    on its own."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)


def new_process(kind: str, args: list[str], monitors: int = 1) -> DaemonProcess:
    """A daemon of the benchmarked personality, not yet started."""
    return DaemonProcess(kind, args, monitors=monitors, version=QEMU_VERSION)


def pid(proc: DaemonProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


def cpu_seconds(pid_: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid_}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces; everything after ')' is fixed.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid_: int, key: str) -> int:
    """A ``kB`` value from /proc/PID/status, e.g. VmRSS or VmHWM."""
    with open(f"/proc/{pid_}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mib(kib: int) -> float:
    return kib / 1024.0


def qsd_version() -> str:
    out = subprocess.run([*oracle_command(QEMU_VERSION), "--version"],
                         capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


