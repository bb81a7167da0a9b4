"""The daemon's state, shared by every connection: schema, jobs, block graph, clock.

The server owns the sockets; this object owns everything a command can change. It is
built once at start-up and handed to each handler through ``commands.Context``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qmpjobd.block.graph import BlockGraph
from qmpjobd.job.clock import Clock, RealClock, VirtualClock
from qmpjobd.job.faults import FaultTable
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
    # --test-controls: the x-qmpjobd-* commands exist (schema/testing.json) and
    # the job core consults armed faults and holds. Off: exactly QEMU's commands.
    test_controls: bool = False


CLOCK_KINDS = ("real", "virtual")
# The top schema file of a daemon with test controls (QEMU's schema + testing.json).
TESTING_TOP_FILE = "qapi-schema-testing.json"


def make_clock(kind: str) -> Clock:
    """--clock: ``real`` (the event loop's) or ``virtual`` (x-qmpjobd-clock-step)."""
    if kind == "virtual":
        return VirtualClock(wake_synchronously=True)
    if kind == "real":
        return RealClock()
    raise ValueError(f"unknown clock '{kind}' (expected one of {', '.join(CLOCK_KINDS)})")


def load_schema(version: str, test_controls: bool = False) -> Schema:
    """The schema view of QEMU ``version``; with ``test_controls``, plus the
    x-qmpjobd-* definitions. The switch is the schema itself: commands it lacks
    are CommandNotFound and absent from query-commands and query-qmp-schema."""
    if not test_controls:
        return Schema.load(version=version)
    from qmpjobd.qapi import default_schema_dir
    from qmpjobd.qapi.model import TypeModel
    from qmpjobd.qapi.parser import parse_file
    from qmpjobd.versions import ALL_SCHEMA_SYMBOLS, personality

    who = personality(version)
    symbols = who.schema_conditions
    exprs = parse_file(default_schema_dir() / TESTING_TOP_FILE, symbols=symbols,
                       known_symbols=ALL_SCHEMA_SYMBOLS)
    return Schema(TypeModel(exprs, symbols, known_symbols=ALL_SCHEMA_SYMBOLS), who)


@dataclass
class Daemon:
    """Everything a command handler can look up or change."""

    schema: Schema
    options: DaemonOptions = field(default_factory=DaemonOptions)
    clock: Clock = field(default_factory=RealClock)
    sinks: list[EventSink] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.jobs = JobManager(emit=self.emit, clock=self.clock)
        self.graph = BlockGraph(self.jobs, options=self.options, personality=self.personality)
        # object-add's objects (iothread, secret, throttle-group), by id.
        self.objects = ObjectRegistry(lambda: self.personality)
        # Nodes look secrets up by id (a qcow2 node's encrypt.key-secret).
        self.graph.has_secret = lambda ident: self.objects.get(ident, "secret") is not None
        self.quit_requested = False
        # Armed test faults and holds; None (nothing is consulted) without them.
        self.faults: FaultTable | None = FaultTable() if self.options.test_controls else None
        self.jobs.faults = self.faults  # type: ignore[attr-defined]

    def event_time(self) -> float | None:
        """Seconds for event timestamps: the virtual clock's time when there is one
        (transcripts are then the same on every run), else None (wall clock)."""
        if isinstance(self.clock, VirtualClock):
            return self.clock.now_ns() / 1_000_000_000
        return None

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
