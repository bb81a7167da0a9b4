"""The pytest plugin (entry point ``pytest11``, name ``qmpjobd``): fixtures
``qmpjobd``, ``qmp`` and ``qmp_events``.

* ``qmpjobd``: a started ``qmpjobd.testing.Daemon`` in the test's event loop;
  options from ``@pytest.mark.qmpjobd(version=..., clock=..., test_controls=...,
  blockdevs=[...], extra_args=[...], process=False)``, else from the command
  line (``--qmpjobd-version``, ``--qmpjobd-clock``), else the defaults.
  ``process=True`` gives a ``DaemonProcess`` instead (a separate process).
* ``qmp``: a ``qemu.qmp.QMPClient`` connected to it, capabilities negotiated.
* ``qmp_events``: a ``qmpjobd.testing.QMPEvents`` recording ``qmp``'s events.

Every fixture cleans up in its teardown, so a failing test leaves no daemon,
process, socket or directory behind. The fixtures are async (pytest-asyncio's
``fixture``), which works in both of pytest-asyncio's modes; in strict mode the
tests themselves need ``@pytest.mark.asyncio``. This module imports nothing
heavy: the daemon and qemu.qmp load when a fixture is first used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

MARKER = "qmpjobd"
# The marker's keywords, and what each becomes.
MARKER_OPTIONS = ("version", "clock", "test_controls", "blockdevs", "extra_args",
                  "shutdown_timeout", "process")
MISSING_EXTRA = "pip install 'qmpjobd[pytest]'"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qmpjobd", "qmpjobd test daemons")
    group.addoption("--qmpjobd-version", default=None, metavar="VERSION",
                    help="QEMU version of the qmpjobd fixture's daemon where a test's "
                    "qmpjobd marker names none (7.2, 10.0, 11.1; default: "
                    "$QMPJOBD_QEMU_VERSION, else 11.1)")
    group.addoption("--qmpjobd-clock", default=None, choices=("real", "virtual"),
                    help="clock of the qmpjobd fixture's daemon where a test's qmpjobd "
                    "marker names none (default real)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(version=None, clock=None, test_controls=False, blockdevs=(), "
        "extra_args=(), shutdown_timeout=None, process=False): how the qmpjobd "
        "fixture starts its daemon (see docs/testing.md)")


def daemon_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The fixture's options: the closest qmpjobd marker, then the command line."""
    options: dict[str, Any] = {}
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{MARKER} takes keywords only: {MARKER_OPTIONS}")
        unknown = sorted(set(marker.kwargs) - set(MARKER_OPTIONS))
        if unknown:
            raise pytest.UsageError(f"@pytest.mark.{MARKER}: unknown option(s) {unknown}; "
                                    f"known: {', '.join(MARKER_OPTIONS)}")
        options.update(marker.kwargs)
    config = request.config
    if options.get("version") is None:
        options["version"] = config.getoption("qmpjobd_version")
    if options.get("clock") is None:
        options["clock"] = config.getoption("qmpjobd_clock") or "real"
    if options["clock"] == "virtual":
        # Only x-qmpjobd-clock-step moves a virtual clock: it comes with the
        # controls unless the marker refuses them (then start-up says why).
        options.setdefault("test_controls", True)
    return options


def _async_fixture() -> Callable:
    """pytest-asyncio's fixture decorator (accepted in auto and strict mode), or,
    without pytest-asyncio, fixtures that fail saying what to install."""
    try:
        import pytest_asyncio
    except ImportError:
        def missing(function: Callable) -> Callable:
            @pytest.fixture(name=function.__name__)
            def fail() -> None:
                pytest.fail(f"the {function.__name__} fixture needs pytest-asyncio: {MISSING_EXTRA}")
            return fail
        return missing
    return pytest_asyncio.fixture


async_fixture = _async_fixture()


@async_fixture
async def qmpjobd(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A started qmpjobd daemon (``qmpjobd.testing.Daemon``), stopped at teardown."""
    from qmpjobd.testing.daemon import Daemon

    options = daemon_options(request)
    as_process = options.pop("process", False)
    daemon = Daemon.process(**options) if as_process else Daemon(**options)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.stop()


@async_fixture
async def qmp(qmpjobd: Any) -> AsyncIterator[Any]:
    """A ``qemu.qmp.QMPClient`` connected to the ``qmpjobd`` daemon, negotiated."""
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        pytest.fail(f"the qmp fixture needs qemu.qmp: {MISSING_EXTRA}")
    client = await qmpjobd.client("pytest-qmp")
    try:
        yield client
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001
            # disconnect() re-raises what ended the connection: the daemon closed
            # it (x-qmpjobd-disconnect, quit, a killed process), as the test wanted.
            pass


@async_fixture
async def qmp_events(qmp: Any) -> AsyncIterator[Any]:
    """Every event ``qmp`` receives, in order (``qmpjobd.testing.QMPEvents``)."""
    from qmpjobd.testing.events import QMPEvents

    events = QMPEvents().attach(qmp)
    try:
        yield events
    finally:
        events.detach()
