"""The block job drivers (backup, mirror, commit, stream, blockdev-create).

Each is imported by its command on first use, so a daemon that never runs a job
never pays for them at start-up; :class:`WarmUp` imports them in idle loop turns
soon after, so the first job's command does not pay either (the commit job and
what it needs: about 2 ms with bytecode cached, 15-25 ms when every start compiles).
"""

from __future__ import annotations

import asyncio
import importlib
import sys

# In the order a management layer tends to need them; commit pulls in mirror
# and stream.
JOB_MODULES = ("qmpjobd.block.jobs.create", "qmpjobd.block.jobs.backup",
               "qmpjobd.block.jobs.commit")
# Long enough for the first client's greeting and capabilities negotiation,
# which a warm-up step would otherwise delay by one import.
WARM_UP_DELAY_S = 0.05


class WarmUp:
    """Imports :data:`JOB_MODULES` one per event-loop turn, so a command that
    arrives meanwhile waits for at most one module."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 modules: tuple[str, ...] = JOB_MODULES) -> None:
        self._loop = loop
        self._pending = [name for name in modules if name not in sys.modules]
        self._handle: asyncio.Handle | None = None

    def start(self, delay_s: float = WARM_UP_DELAY_S) -> "WarmUp":
        if self._pending:
            self._handle = self._loop.call_later(delay_s, self._step)
        return self

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def done(self) -> bool:
        return not self._pending

    def _step(self) -> None:
        importlib.import_module(self._pending.pop(0))
        self._handle = self._loop.call_soon(self._step) if self._pending else None
