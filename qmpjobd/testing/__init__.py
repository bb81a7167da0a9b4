"""qmpjobd as a test tool: an embeddable daemon, a pytest plugin, command checks.

``Daemon`` runs qmpjobd in the caller's asyncio loop (``Daemon.process`` as a
child process); ``validate``/``command_errors`` check commands against a QEMU
version's JSON Schema; the pytest plugin (``qmpjobd.testing.pytest_plugin``,
registered as the ``qmpjobd`` pytest11 entry point) gives the ``qmpjobd``,
``qmp`` and ``qmp_events`` fixtures. See docs/testing.md.

The daemon never imports this package; names load on first use, so importing it
(as pytest does for the plugin) costs next to nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmpjobd.testing.daemon import Daemon, DaemonProcess, Setup
    from qmpjobd.testing.events import EventTimeout, QMPEvents
    from qmpjobd.testing.schema_check import InvalidCommand, command_errors, validate

_WHERE = {
    "Daemon": "daemon", "DaemonProcess": "daemon", "Setup": "daemon",
    "QMPEvents": "events", "EventTimeout": "events",
    "validate": "schema_check", "command_errors": "schema_check", "InvalidCommand": "schema_check",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'qmpjobd.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qmpjobd.testing.{_WHERE[name]}"), name)
