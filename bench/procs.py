"""Starting the two daemons with one command line, and reading their /proc counters."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from typing import Callable, Iterator

from tests.support.daemons import DaemonProcess, oracle_path

KINDS = ("qmpjobd", "qsd")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Called with the pid of each daemon once it serves (bench.profile attaches here).
ON_START: list[Callable[[int], None]] = []


@contextmanager
def daemon(kind: str, monitors: int = 1, extra: list[str] | None = None) -> Iterator[DaemonProcess]:
    """A fresh daemon with ``monitors`` sockets, always stopped afterwards."""
    proc = DaemonProcess(kind, list(extra or []), monitors=monitors)
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
    out = subprocess.run([oracle_path(), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


