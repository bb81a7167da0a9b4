"""The daemon's state, shared by every connection: schema, jobs, block graph, clock.

The server owns the sockets; this object owns everything a command can change. It is
built once at start-up and handed to each handler through ``commands.Context``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qmpjobd.block.graph import BlockGraph
from qmpjobd.job.clock import Clock, RealClock
from qmpjobd.job.manager import JobManager
from qmpjobd.objects import ObjectRegistry
from qmpjobd.qapi import SCHEMA_DEFAULT_VERSION, Schema
from qmpjobd.versions import Personality, personality

EventSink = Callable[[str, dict], None]


@dataclass
class DaemonOptions:
    """Behaviour switches a user may set on the command line."""

    # Reproduce QEMU's drain artefacts (the extra paused/running pairs around
    # transaction-style commands). On by default so transcripts match QEMU.
    drain_artefacts: bool = True
    # Bytes of unsent output a connection may hold before it is cut off.
    max_output_bytes: int = 16 * 1024 * 1024
    # --allow-dir: every path the daemon opens or creates must resolve inside one of
    # these directories (qmpjobd.confine); empty means unconfined, as QEMU.
    allowed_dirs: tuple[str, ...] = ()


@dataclass
class Daemon:
    """Everything a command handler can look up or change."""

    schema: Schema
    options: DaemonOptions = field(default_factory=DaemonOptions)
    clock: Clock = field(default_factory=RealClock)
    sinks: list[EventSink] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.jobs = JobManager(emit=self.emit, clock=self.clock)
        self.graph = BlockGraph(self.jobs, options=self.options)
        # object-add's objects (iothread, secret, throttle-group), by id.
        self.objects = ObjectRegistry(lambda: self.personality)
        self.quit_requested = False

    @property
    def personality(self) -> "Personality":
        """The QEMU release this daemon impersonates (the schema's view decides it).
        Layers ask ``daemon.personality.has(BEHAVIOUR)``, never compare versions."""
        if self.schema is None:  # lower-layer tests build a Daemon without a schema
            return personality(SCHEMA_DEFAULT_VERSION)
        return self.schema.personality

    def emit(self, name: str, data: dict) -> None:
        """Announce an event now; every sink (the server's fan-out) gets it at once."""
        for sink in self.sinks:
            sink(name, data)
