"""The pytest plugin, as a user's project sees it: test files in a temporary
project run by a separate pytest, in pytest-asyncio's auto and strict modes;
and the event recorder behind ``qmp_events``, against an embedded daemon.

The separate pytest loads the plugin by module name with entry-point autoloading
off, so these tests do not depend on how qmpjobd is installed here;
test_docs_testing.py proves the entry point from a non-editable install.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qmpjobd.testing import Daemon, EventTimeout, QMPEvents
from tests.support.daemons import REPO

PLUGIN_ARGS = ["-p", "pytest_asyncio.plugin", "-p", "qmpjobd.testing.pytest_plugin"]


def run_project(tmp_path: Path, tests: str, *args: str, mode: str = "auto",
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run pytest on a one-file project in ``tmp_path``."""
    (tmp_path / "pytest.ini").write_text(textwrap.dedent(f"""\
        [pytest]
        asyncio_mode = {mode}
        asyncio_default_fixture_loop_scope = function
        """))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(tests))
    environment = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **(env or {}))
    environment.pop("QMPJOBD_QEMU_VERSION", None)
    environment["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           *PLUGIN_ARGS, *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)


def outcomes(result: subprocess.CompletedProcess) -> dict[str, int]:
    counts = re.findall(r"(\d+) (passed|failed|error|errors|skipped)", result.stdout)
    return {kind: int(number) for number, kind in counts}


BACKUP_TEST = '''
    import pytest

    NODES = [{"driver": "null-co", "node-name": "src", "size": 4194304},
             {"driver": "null-co", "node-name": "tgt", "size": 4194304}]

    @pytest.mark.qmpjobd(version="7.2", blockdevs=NODES)
    ASYNCIO_MARK
    async def test_backup(qmpjobd, qmp, qmp_events):
        await qmp.execute("blockdev-backup", {"job-id": "j0", "device": "src",
                                              "target": "tgt", "sync": "full",
                                              "auto-finalize": False})
        pending = await qmp_events.wait("BLOCK_JOB_PENDING", id="j0", timeout=30)
        assert pending["data"] == {"type": "backup", "id": "j0"}
        await qmp.execute("job-finalize", {"id": "j0"})
        done = await qmp_events.wait("BLOCK_JOB_COMPLETED", id="j0", timeout=30)
        assert done["data"]["offset"] == 4194304
        assert qmp_events.statuses("j0")[-2:] == ["concluded", "null"]
        version = await qmp.execute("query-version")
        assert version["qemu"]["minor"] == 2
'''


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_fixtures_work_in_both_pytest_asyncio_modes(tmp_path: Path, mode: str) -> None:
    mark = "@pytest.mark.asyncio" if mode == "strict" else ""
    result = run_project(tmp_path, BACKUP_TEST.replace("ASYNCIO_MARK", mark), mode=mode)
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result) == {"passed": 1}


def test_version_comes_from_the_marker_then_the_option_then_the_default(tmp_path: Path) -> None:
    tests = '''
        import pytest

        async def minor_of(qmp):
            return (await qmp.execute("query-version"))["qemu"]

        async def test_default(qmp):
            assert (await minor_of(qmp))["major"] == int(EXPECTED.split(".")[0])

        @pytest.mark.qmpjobd(version="7.2")
        async def test_marker_wins(qmp):
            assert (await minor_of(qmp))["major"] == 7

        import os
        EXPECTED = os.environ["EXPECTED_VERSION"]
    '''
    default = run_project(tmp_path, tests, env={"EXPECTED_VERSION": "11.1"})
    assert outcomes(default) == {"passed": 2}, default.stdout
    option = run_project(tmp_path, tests, "--qmpjobd-version", "10.0",
                         env={"EXPECTED_VERSION": "10.0"})
    assert outcomes(option) == {"passed": 2}, option.stdout


def test_clock_comes_from_the_marker_then_the_option(tmp_path: Path) -> None:
    tests = '''
        import os
        import pytest

        @pytest.mark.qmpjobd(test_controls=True)
        async def test_option_or_default(qmp):
            clock = await qmp.execute("x-qmpjobd-clock-query")
            assert clock["clock"] == os.environ["EXPECTED_CLOCK"]

        @pytest.mark.qmpjobd(test_controls=True, clock="virtual")
        async def test_marker_wins(qmp):
            assert (await qmp.execute("x-qmpjobd-clock-query"))["now-ns"] == 0

        async def test_no_controls_unless_asked(qmp):
            from qemu.qmp import ExecuteError
            with pytest.raises(ExecuteError, match="has not been found"):
                await qmp.execute("x-qmpjobd-clock-query")
    '''
    default = run_project(tmp_path, tests, env={"EXPECTED_CLOCK": "real"})
    assert outcomes(default) == {"passed": 3}, default.stdout
    # A virtual clock brings the controls that move it.
    tests = tests.replace("        @pytest.mark.qmpjobd(test_controls=True)\n", "")
    option = run_project(tmp_path, tests, "-k", "not no_controls", "--qmpjobd-clock", "virtual",
                         env={"EXPECTED_CLOCK": "virtual"})
    assert outcomes(option) == {"passed": 2}, option.stdout


def test_a_failing_test_leaves_no_daemon_directory_or_process(tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    tests = f'''
        import os
        import pytest

        def note(line):
            with open({str(record)!r}, "a") as f:
                f.write(line + "\\n")

        async def test_embedded_fails(qmpjobd, qmp):
            note(os.path.dirname(qmpjobd.socket_path))
            assert False, "on purpose"

        @pytest.mark.qmpjobd(process=True)
        async def test_process_fails(qmpjobd, qmp_events):
            note(os.path.dirname(qmpjobd.socket_path))
            note(str(qmpjobd.pid))
            raise RuntimeError("on purpose")
    '''
    result = run_project(tmp_path, tests)
    assert outcomes(result) == {"failed": 2}, result.stdout
    embedded_dir, process_dir, pid = record.read_text().split()
    assert not os.path.exists(embedded_dir)
    assert not os.path.exists(process_dir)
    assert not os.path.exists(f"/proc/{pid}"), "the daemon process outlived its test"


def test_a_marker_with_unknown_options_is_a_usage_error(tmp_path: Path) -> None:
    tests = '''
        import pytest

        @pytest.mark.qmpjobd(verison="7.2")
        async def test_typo(qmpjobd):
            pass
    '''
    result = run_project(tmp_path, tests)
    assert result.returncode != 0
    assert "unknown option(s) ['verison']" in result.stdout + result.stderr


def test_the_marker_and_options_are_registered(tmp_path: Path) -> None:
    markers = run_project(tmp_path, "", "--markers")
    assert "@pytest.mark.qmpjobd(version=None, clock=None" in markers.stdout
    usage = run_project(tmp_path, "", "--help")
    assert "--qmpjobd-version=VERSION" in usage.stdout and "--qmpjobd-clock" in usage.stdout


def test_this_repositorys_own_tests_run_unchanged_with_the_plugin() -> None:
    """Once installed, the plugin is active in this repository's test run too:
    its names must not clash with the suite's fixtures, markers or options."""
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *PLUGIN_ARGS, "tests/unit/test_cli.py", "tests/unit/test_validate.py"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_plugin_loads_neither_the_daemon_nor_qemu_qmp() -> None:
    probe = ("import sys, qmpjobd.testing.pytest_plugin; "
             "print(sorted(m for m in ('qmpjobd.server', 'qmpjobd.cli', 'qemu.qmp', 'jsonschema') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_daemon_never_imports_the_testing_package() -> None:
    probe = ("import sys, qmpjobd.cli, qmpjobd.commands; qmpjobd.commands.load_all(); "
             "print('qmpjobd.testing' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


# -- the event recorder behind qmp_events -------------------------------------

# 16 MiB: at speed=1 a backup copies its first chunk and then waits, for ever.
NODES = [{"driver": "null-co", "node-name": "src", "size": 16 << 20},
         {"driver": "null-co", "node-name": "tgt", "size": 16 << 20}]


async def backup(client, job_id: str, **extra: object) -> None:
    await client.execute("blockdev-backup", {"job-id": job_id, "device": "src", "target": "tgt",
                                             "sync": "full", **extra})


async def test_events_before_the_reply_are_recorded_when_execute_returns() -> None:
    async with Daemon(version="7.2", blockdevs=NODES) as daemon:
        client = await daemon.client()
        events = QMPEvents().attach(client)
        await backup(client, "j0", speed=1)
        # QEMU writes these before blockdev-backup's reply.
        assert events.statuses("j0")[:2] == ["created", "running"]


async def test_wait_reads_forward_and_id_also_matches_device() -> None:
    async with Daemon(version="7.2", blockdevs=NODES) as daemon:
        client = await daemon.client()
        events = QMPEvents().attach(client)
        await backup(client, "j0")
        statuses = [(await events.wait("JOB_STATUS_CHANGE", id="j0"))["data"]["status"]
                    for _ in range(4)]
        assert statuses == events.statuses("j0")[:4]
        completed = await events.wait("BLOCK_JOB_COMPLETED", id="j0")
        assert completed["data"]["device"] == "j0" and "id" not in completed["data"]
        # The next status after BLOCK_JOB_COMPLETED, not the first one again.
        after = await events.wait("JOB_STATUS_CHANGE", id="j0")
        assert after["data"]["status"] == "concluded"
        assert [e["event"] for e in events.seen(id="j0")] == [e["event"] for e in events.seen()
                                                              if e["data"].get("id", e["data"].get("device")) == "j0"]


async def test_wait_times_out_listing_what_came() -> None:
    async with Daemon(version="7.2", blockdevs=NODES) as daemon:
        client = await daemon.client()
        events = QMPEvents().attach(client)
        await backup(client, "j0", speed=1)
        with pytest.raises(EventTimeout) as timeout:
            await events.wait("BLOCK_JOB_COMPLETED", id="j0", timeout=0.05)
        message = str(timeout.value)
        assert message.startswith("no BLOCK_JOB_COMPLETED(id='j0') within 0.05 s")
        assert "JOB_STATUS_CHANGE(status='running', id='j0')" in message


async def test_underscores_in_keywords_stand_for_hyphens() -> None:
    async with Daemon(version="7.2", blockdevs=NODES) as daemon:
        client = await daemon.client()
        events = QMPEvents().attach(client)
        await client.execute("block-set-write-threshold", {"node-name": "tgt", "write-threshold": 1})
        await backup(client, "j0")
        hit = await events.wait("BLOCK_WRITE_THRESHOLD", node_name="tgt")
        assert hit["data"]["write-threshold"] == 1
        assert events.seen("BLOCK_WRITE_THRESHOLD", node_name="src") == []


async def test_detach_stops_recording_and_wakes_waiters() -> None:
    async with Daemon(version="7.2", blockdevs=NODES) as daemon:
        client = await daemon.client()
        events = QMPEvents().attach(client)
        waiter = asyncio.ensure_future(events.wait("NEVER", timeout=30))
        await asyncio.sleep(0)
        events.detach()
        await backup(client, "j0")
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(events) == 0
