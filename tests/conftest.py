"""Suite-wide hooks."""

from __future__ import annotations

import os

import pytest

from tests.support.oracles import SUPPORTED_VERSIONS, oracle_command, oracle_version


# Tests that start qmpjobd without naming a QEMU version compare it with the 7.2
# oracle (the host's own qemu-storage-daemon), so the suite's default personality is
# 7.2; tests of other personalities pass --qemu-version, and the test of the real
# default (11.1) removes this variable.
os.environ.setdefault("QMPJOBD_QEMU_VERSION", "7.2")


def oracle_lines() -> list[str]:
    """One line per oracle with its exact version: their micro versions move with
    Debian's stable updates, so a log must say which ones ran."""
    lines = []
    for version in SUPPORTED_VERSIONS:
        try:
            lines.append(f"oracle qemu-storage-daemon {version}: {oracle_version(version)} "
                         f"({oracle_command(version)[-1]})")
        except RuntimeError as missing:
            # The tests that need it fail; the header only reports.
            lines.append(f"oracle qemu-storage-daemon {version}: MISSING: {missing}")
    return lines


def pytest_report_header(config: pytest.Config) -> list[str]:
    return oracle_lines()


def pytest_sessionstart(session: pytest.Session) -> None:
    # `pytest -q` (what `make test` runs) shows no header; print the versions anyway.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not reporter.showheader:
        for line in oracle_lines():
            reporter.write_line(line)
