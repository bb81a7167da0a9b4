"""Fixtures that run a real qmpjobd process and talk to it over real sockets."""

from __future__ import annotations

import pytest

from tests.support.daemons import DaemonProcess


@pytest.fixture
def qmpjobd_factory():
    """Start qmpjobd daemons with extra arguments; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(*args: str, monitors: int = 1, pretty: set[int] | None = None) -> DaemonProcess:
        daemon = DaemonProcess("qmpjobd", list(args), monitors=monitors, pretty=pretty or set())
        started.append(daemon.start())
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(qmpjobd_factory):
    return qmpjobd_factory(
        "--blockdev", "null-co,node-name=src,size=16777216",
        "--blockdev", "null-co,node-name=tgt,size=16777216",
    )
