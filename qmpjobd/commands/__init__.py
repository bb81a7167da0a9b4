"""Command handlers, one module per QAPI area, and the table that finds them.

A handler is a plain synchronous function ``handler(ctx, args) -> value``: QEMU runs a
command to completion under its big lock, so nothing else happens while it runs and
the events it raises are queued before its reply. Arguments arrive already validated
against the QAPI schema; a handler never re-checks what the schema says.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.daemon import Daemon
    from qmpjobd.wire.session import Session

Handler = Callable[["Context", dict], Any]

HANDLERS: dict[str, Handler] = {}

# The modules that register handlers; each holds one QAPI area.
MODULES = (
    "control",
    "jobs",
    "block_nodes",
    "backup",
    "transaction",
    "mirror",
    "create",
    "drive",
    "block_export",
    "char",
    "qom",
    # Issues 11 and 12: each area in its own module (absent modules are skipped).
    "snapshot",          # blockdev-snapshot(-sync), change-backing-file, block_resize
    "stream_commit",     # block-stream, block-commit
    "graph_debug",       # x-debug-query-block-graph, blockdev-reopen
    "qcow2_snapshot",    # internal snapshots, x-blockdev-amend
    "bitmaps",           # block-dirty-bitmap-*, x-debug-block-dirty-bitmap-sha256
    # The test controls: always registered, but reachable only in a daemon whose
    # schema has them (--test-controls loads schema/qapi-schema-testing.json).
    "testing",
)


@dataclass
class Context:
    """What a handler may touch: the daemon's state and the calling connection."""

    daemon: "Daemon"
    session: "Session"
    connection: Any = None


def command(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of QMP command ``name``."""

    def register(fn: Handler) -> Handler:
        if name in HANDLERS:
            raise RuntimeError(f"command {name} registered twice")
        HANDLERS[name] = fn
        return fn

    return register


def load_all() -> dict[str, Handler]:
    """Import every handler module (each registers itself) and return the table."""
    for module in MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise
    return HANDLERS
