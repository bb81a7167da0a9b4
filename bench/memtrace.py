"""``python -m bench.memtrace``: what qmpjobd's memory holds after a workload step.

Runs the ``memory`` workload's first step (n concluded jobs) against a qmpjobd
started under this wrapper: the wrapper turns on ``tracemalloc`` and, on SIGUSR1,
writes the biggest allocation sites (by line, and by file) to a report file before
the daemon continues. The daemon's own code is not touched.

    python -m bench.memtrace [--jobs 10000]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

REPORT = Path(__file__).resolve().parent / "results" / "memtrace.txt"


def daemon_main() -> None:
    """Entry point inside the daemon process (``python -m bench.memtrace --daemon ...``)."""
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, lambda *_: _write_report())
    from qmpjobd.cli import main

    sys.exit(main(sys.argv[2:]))


def _write_report(limit: int = 25) -> None:
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"traced: current {current / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB", "", "by line:"]
    lines += [str(stat) for stat in snapshot.statistics("lineno")[:limit]]
    lines += ["", "by file:"]
    lines += [str(stat) for stat in snapshot.statistics("filename")[:limit]]
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")


def run(jobs: int) -> None:
    from tests.support import daemons

    from bench.client import Conn, is_status
    from bench.procs import daemon, mib, pid, status_kib
    from bench.workloads.jobs import SMALL, add_null, backup_args

    # Start qmpjobd through this module instead of ``-m qmpjobd``.
    daemons.qmpjobd_command = lambda: [sys.executable, "-m", "bench.memtrace", "--daemon"]
    REPORT.unlink(missing_ok=True)
    with daemon("qmpjobd") as d, Conn(d.sockets[0]) as conn:
        conn.handshake()
        add_null(conn, "s", SMALL)
        add_null(conn, "t", SMALL)
        for i in range(jobs):
            conn.cmd("blockdev-backup", backup_args(f"j{i}", "s", "t", **{"auto-dismiss": False}))
            conn.wait_event(is_status(f"j{i}", "concluded"))
        print(f"RSS {mib(status_kib(pid(d), 'VmRSS')):.1f} MiB (tracemalloc adds its own)")
        os.kill(pid(d), signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not REPORT.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    print(REPORT.read_text())


def main() -> None:
    if sys.argv[1:2] == ["--daemon"]:
        daemon_main()
        return
    parser = argparse.ArgumentParser(prog="python -m bench.memtrace")
    parser.add_argument("--jobs", type=int, default=10000)
    run(parser.parse_args().jobs)


if __name__ == "__main__":
    main()
