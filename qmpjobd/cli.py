"""Command line: qemu-storage-daemon's options where they overlap, plus shorthands.

A test can swap ``qemu-storage-daemon`` for ``qmpjobd`` on the same command line:
``--chardev socket,id=ID,path=PATH,server=on,wait=off`` (or ``host=``/``port=``),
``--monitor [chardev=]ID[,pretty=on|off]`` and ``--blockdev`` (keyval or JSON) mean
what they mean there. qemu-storage-daemon options that qmpjobd does not implement
fail with a message instead of being ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from qmpjobd import __version__
from qmpjobd.confine import PathPolicy
from qmpjobd.errors import QMPError
from qmpjobd.server import MonitorSpec
from qmpjobd.versions import DEFAULT_VERSION, KNOWN_VERSIONS, UnknownVersion, personality

if TYPE_CHECKING:
    from qmpjobd.block.jobs import WarmUp
    from qmpjobd.daemon import Daemon
    from qmpjobd.qapi import Schema
    from qmpjobd.server import Server

# Lets a test that runs qmpjobd on a qemu-storage-daemon command line pick the release.
QEMU_VERSION_ENV = "QMPJOBD_QEMU_VERSION"

log = logging.getLogger("qmpjobd")

# qemu-storage-daemon options we recognise but do not implement.
UNSUPPORTED_QSD_OPTIONS = ("--daemonize", "--trace", "-T")

# ``qmpjobd check-commands FILE``: validate commands instead of running a daemon.
# A subcommand only as the very first argument; every other argument is an option.
CHECK_COMMANDS = "check-commands"

ON_VALUES = {"on": True, "yes": True, "true": True, "y": True, "off": False, "no": False, "false": False, "n": False}


class UsageError(Exception):
    """A bad command line; printed as ``qmpjobd: <option>: <message>``."""


class StartupError(UsageError):
    """Start-up refused for a reason outside the command line (a locked pid file);
    printed the same way, exit status 1."""


def split_keyval(text: str, implied_key: str) -> dict[str, str]:
    """Split QEMU's ``a=b,c=d`` syntax (``,,`` is a literal comma).

    A first element without ``=`` is the value of ``implied_key``.
    """
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    result: dict[str, str] = {}
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if index != 0:
                raise UsageError(f"Expected '=' after parameter '{part}'")
            key, value = implied_key, part
        if key in result:
            raise UsageError(f"Parameter '{key}' given more than once")
        result[key] = value
    return result


def parse_bool(option: str, key: str, value: str) -> bool:
    try:
        return ON_VALUES[value]
    except KeyError:
        raise UsageError(f"Parameter '{key}' expects 'on' or 'off'") from None


@dataclass
class Chardev:
    id: str
    path: str | None = None
    # "" (an explicit empty host=) listens on every address, IPv4 and IPv6, as QEMU.
    host: str | None = None
    port: int | None = None

    @property
    def listens(self) -> bool:
        """False for ``port=`` without ``host=``: QEMU 7.2 then makes a socket
        chardev with no address at all (query-chardev says ``disconnected:fd:``),
        which listens nowhere."""
        return self.path is not None or self.host is not None


def parse_chardev(text: str) -> Chardev:
    opts = split_keyval(text, "backend")
    backend = opts.pop("backend", None)
    if backend != "socket":
        raise UsageError(f"chardev backend '{backend}' is not supported by qmpjobd (only 'socket')")
    chardev_id = opts.pop("id", None)
    if not chardev_id:
        raise UsageError("Parameter 'id' is missing")
    if not parse_bool("--chardev", "server", opts.pop("server", "off")):
        raise UsageError("qmpjobd only listens: use server=on")
    if parse_bool("--chardev", "wait", opts.pop("wait", "on")):
        raise UsageError("qmpjobd never blocks at start-up waiting for a client: use wait=off")
    path = opts.pop("path", None)
    host = opts.pop("host", None)
    port = opts.pop("port", None)
    opts.pop("telnet", None)
    if opts:
        raise UsageError(f"Parameter '{next(iter(opts))}' is not supported by qmpjobd")
    if path is not None:
        if host is not None or port is not None:
            raise UsageError("give either path= or host=/port=, not both")
        return Chardev(chardev_id, path=path)
    if port is None:
        raise UsageError("chardev: socket needs either 'path' or 'port' set")
    return Chardev(chardev_id, host=host, port=parse_port(port))


def non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid number of seconds '{text}'")
    return value


def parse_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise UsageError(f"invalid port '{text}'")
    return int(text)


def parse_monitor(text: str, chardevs: dict[str, Chardev], used: set[str]) -> MonitorSpec:
    opts = split_keyval(text, "chardev")
    name = opts.pop("chardev", None)
    if not name:
        raise UsageError("Parameter 'chardev' is missing")
    mode = opts.pop("mode", "control")
    if mode != "control":
        raise UsageError("Only QMP is supported")
    pretty = parse_bool("--monitor", "pretty", opts.pop("pretty", "off"))
    opts.pop("id", None)
    if opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
    if name not in chardevs:
        raise UsageError(f"chardev \"{name}\" not found")
    if name in used:
        raise UsageError(f"Device '{name}' is in use")
    used.add(name)
    dev = chardevs[name]
    return chardev_spec(dev, pretty=pretty)


def chardev_spec(dev: Chardev, pretty: bool = False, frontend: bool = True) -> MonitorSpec:
    return MonitorSpec(dev.id, path=dev.path, host=dev.host, port=dev.port,
                       pretty=pretty, frontend=frontend)


def parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    return host or "127.0.0.1", parse_port(port)


@dataclass
class Config:
    # The endpoints that listen, in creation order.
    monitors: list[MonitorSpec] = field(default_factory=list)
    # Every --chardev in creation order, those that listen nowhere included
    # (query-chardev lists them all).
    chardevs: list[MonitorSpec] = field(default_factory=list)
    blockdevs: list[str] = field(default_factory=list)
    # --object texts (keyval or JSON), created before the block nodes.
    objects: list[str] = field(default_factory=list)
    pidfile: str | None = None
    demo: bool = False
    demo_dir: str = "qmpjobd-demo"
    drain_artefacts: bool = True
    max_output_bytes: int = 16 * 1024 * 1024
    log_level: str = "warning"
    event_loop: str = "auto"
    shutdown_timeout: float = 10.0
    allowed_dirs: list[str] = field(default_factory=list)
    # The QEMU release to impersonate (qmpjobd.versions.KNOWN_VERSIONS).
    qemu_version: str = DEFAULT_VERSION
    # --test-controls: the x-qmpjobd-* commands (faults, holds, clock steps).
    test_controls: bool = False
    # --clock: "real", or "virtual" (time moves only with x-qmpjobd-clock-step).
    clock: str = "real"
    # --nbd-server and --export, as ("nbd-server" | "export", text) in command-line
    # order: qemu-storage-daemon acts on them in that order.
    nbd_options: list[tuple[str, str]] = field(default_factory=list)


class _InOrder(argparse.Action):
    """Collect --nbd-server and --export in one list, keeping their order."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        collected = list(getattr(namespace, self.dest) or [])
        collected.append((self.option_strings[0].lstrip("-"), values))
        setattr(namespace, self.dest, collected)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmpjobd",
        description="A QMP server that speaks QEMU's monitor protocol and runs QEMU's "
        "block-job lifecycle (compatible with qemu-storage-daemon 7.2).",
    )
    p.add_argument("--chardev", action="append", default=[], metavar="socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off",
                   help="a listening socket, as in qemu-storage-daemon")
    p.add_argument("--monitor", action="append", default=[], metavar="[chardev=]ID[,pretty=on|off]",
                   help="serve QMP on the chardev ID")
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                   help="add a block node at start-up (keyval or JSON, as blockdev-add takes)")
    p.add_argument("--object", action="append", default=[], metavar="OPTIONS",
                   help="create an object at start-up (iothread, secret, throttle-group; "
                   "keyval or JSON, as object-add takes)")
    p.add_argument("--nbd-server", action=_InOrder, dest="nbd_options", default=[],
                   metavar="addr.type=unix,addr.path=PATH|addr.type=inet,addr.host=H,addr.port=P",
                   help="start the NBD server, as nbd-server-start (flat address)")
    p.add_argument("--export", action=_InOrder, dest="nbd_options", default=[],
                   metavar="[type=]nbd,id=ID,node-name=NODE[,name=NAME][,writable=on]",
                   help="export a node, as block-export-add")
    p.add_argument("--socket", action="append", default=[], metavar="PATH",
                   help="shorthand: QMP on a unix socket at PATH")
    p.add_argument("--tcp", action="append", default=[], metavar="[HOST:]PORT",
                   help="shorthand: QMP on TCP (HOST defaults to 127.0.0.1)")
    p.add_argument("--pretty", action="store_true", help="pretty-print on the --socket/--tcp monitors")
    p.add_argument("--pidfile", metavar="PATH", help="write the process id to PATH")
    p.add_argument("--demo", action="store_true", help="add the demo block nodes (what `make run` uses)")
    p.add_argument("--demo-dir", default="qmpjobd-demo", metavar="DIR",
                   help="where --demo puts its image files (default ./qmpjobd-demo)")
    p.add_argument("--no-drain-artefacts", action="store_true",
                   help="do not reproduce QEMU's extra paused/running events around transaction-style commands")
    p.add_argument("--max-output-bytes", type=int, default=16 * 1024 * 1024, metavar="N",
                   help="disconnect a client once N bytes of its output are unsent (default 16 MiB)")
    p.add_argument("--shutdown-timeout", type=non_negative_seconds, default=10.0, metavar="SECONDS",
                   help="at exit, how long to wait for cancelled jobs to stop (default 10)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="confine every file and unix socket the daemon opens or creates to DIR "
                   "(repeatable; default: no confinement, as QEMU)")
    p.add_argument("--qemu-version", metavar="|".join(KNOWN_VERSIONS),
                   help=f"the QEMU release to be (default: ${QEMU_VERSION_ENV} if set, else {DEFAULT_VERSION})")
    p.add_argument("--test-controls", action="store_true",
                   help="offer the x-qmpjobd-* test controls (faults, holds, reply delays, "
                   "disconnects, clock steps); without it the daemon has QEMU's commands only")
    p.add_argument("--clock", default="real", choices=["real", "virtual"],
                   help="real (default), or virtual: every wait in the daemon waits on a clock "
                   "that moves only with x-qmpjobd-clock-step (needs --test-controls)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                   help="event loop implementation (default: uvloop if installed, else asyncio)")
    p.add_argument("-V", "--version", action="version",
                   version=f"qmpjobd {__version__} (QMP compatible with qemu-storage-daemon 7.2)")
    return p


def choose_qemu_version(option: str | None, environment: str | None) -> str:
    """--qemu-version wins over $QMPJOBD_QEMU_VERSION (set by whoever owns a command
    line written for qemu-storage-daemon); neither means the newest release."""
    chosen = option if option is not None else environment
    if chosen is None or (option is None and not chosen.strip()):
        return DEFAULT_VERSION
    try:
        return personality(chosen).version
    except UnknownVersion as exc:
        source = "--qemu-version" if option is not None else QEMU_VERSION_ENV
        raise UsageError(f"{source}: {exc}") from None


def parse_args(argv: list[str]) -> Config:
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in UNSUPPORTED_QSD_OPTIONS:
            raise UsageError(f"option {name} of qemu-storage-daemon is not supported by qmpjobd")
    ns = build_parser().parse_args(argv)
    config = Config(
        blockdevs=ns.blockdev, objects=ns.object, pidfile=ns.pidfile, demo=ns.demo, demo_dir=ns.demo_dir,
        drain_artefacts=not ns.no_drain_artefacts, max_output_bytes=ns.max_output_bytes,
        log_level=ns.log_level, event_loop=ns.event_loop,
        shutdown_timeout=ns.shutdown_timeout, allowed_dirs=ns.allow_dir,
        qemu_version=choose_qemu_version(ns.qemu_version, os.environ.get(QEMU_VERSION_ENV)),
        test_controls=ns.test_controls, clock=ns.clock, nbd_options=ns.nbd_options,
    )
    if config.clock == "virtual" and not config.test_controls:
        # Nothing could move a virtual clock: every timed wait would last for ever.
        raise UsageError("--clock virtual: needs --test-controls (x-qmpjobd-clock-step moves it)")
    chardevs: dict[str, Chardev] = {}
    for text in ns.chardev:
        dev = parse_chardev(text)
        if dev.id in chardevs:
            raise UsageError(f"attempt to add duplicate property '{dev.id}' to object (type 'container')")
        chardevs[dev.id] = dev
    used: set[str] = set()
    monitors = {spec.chardev_id: spec
                for spec in (parse_monitor(text, chardevs, used) for text in ns.monitor)}
    # Every chardev with an address listens, in creation order; those without a
    # monitor too (as in qemu-storage-daemon, where query-chardev lists them).
    for dev in chardevs.values():
        spec = monitors.get(dev.id) or chardev_spec(dev, frontend=False)
        config.chardevs.append(spec)
        if dev.listens:
            config.monitors.append(spec)
    shorthands = [MonitorSpec(f"socket{index}", path=path, pretty=ns.pretty)
                  for index, path in enumerate(ns.socket)]
    for index, text in enumerate(ns.tcp):
        host, port = parse_tcp(text)
        shorthands.append(MonitorSpec(f"tcp{index}", host=host, port=port, pretty=ns.pretty))
    config.monitors += shorthands
    config.chardevs += shorthands
    return config


def parse_blockdev(schema, text: str) -> dict:
    """--blockdev: blockdev-add's arguments, keyval or JSON (Schema.parse_keyval)."""
    return schema.parse_keyval("BlockdevOptions", text.strip())


def add_object(daemon, text: str) -> None:
    """--object: object-add's arguments, keyval (``qom-type`` is the implied
    key) or JSON; an error ends start-up as it does qemu-storage-daemon's."""
    try:
        args = dict(daemon.schema.parse_keyval("ObjectOptions", text))
        qom_type, ident = args.pop("qom-type"), args.pop("id")
        daemon.objects.add(qom_type, ident, args)
    except QMPError as exc:
        raise UsageError(f"--object {text}: {exc.desc}") from None


DEMO_IMAGE_SIZE = 16 * 1024 * 1024


def demo_blockdevs(directory: str) -> list[str]:
    """The demo setup of ``make run``: nodes of every driver, on images in ``directory``.

    ``disk.raw`` holds random data; ``backup.raw`` and ``mirror.raw`` are empty
    targets of the same size, so a backup or mirror can be checked with ``cmp``.
    """
    os.makedirs(directory, exist_ok=True)
    disk = os.path.join(directory, "disk.raw")
    if not os.path.exists(disk):
        with open(disk, "wb") as f:
            f.write(os.urandom(DEMO_IMAGE_SIZE))
    for name in ("backup.raw", "mirror.raw"):
        with open(os.path.join(directory, name), "wb") as f:
            f.truncate(DEMO_IMAGE_SIZE)

    def raw_file(node: str, image: str) -> str:
        path = os.path.join(directory, image)
        return json.dumps({"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": path}})

    return [
        json.dumps({"driver": "null-co", "node-name": "demo-src", "size": 64 << 20}),
        json.dumps({"driver": "null-co", "node-name": "demo-tgt", "size": 64 << 20}),
        # 1 ms per request: slow enough to pause, cancel and watch progress.
        json.dumps({"driver": "null-co", "node-name": "demo-slow-src", "size": 1 << 30, "latency-ns": 1_000_000}),
        json.dumps({"driver": "null-co", "node-name": "demo-slow-tgt", "size": 1 << 30}),
        raw_file("demo-disk", "disk.raw"),
        raw_file("demo-backup", "backup.raw"),
        raw_file("demo-mirror", "mirror.raw"),
        # Reads of the second MiB fail with EIO, once: try on-source-error=stop.
        json.dumps({"driver": "raw", "node-name": "demo-flaky", "file": {
            "driver": "blkdebug", "image": {"driver": "null-co", "size": 64 << 20},
            "inject-error": [{"event": "read_aio", "errno": 5, "sector": 2048, "once": True}]}}),
    ]


# Signals that end the daemon as `quit` does (qemu-storage-daemon's termination
# signals): jobs are cancelled, clients get the events, sockets and pid file go.
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Signals qemu-storage-daemon ignores (SIGPIPE, which Python ignores already) or
# blocks (SIGALRM); Python's default for them would kill us without clean-up.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGPIPE, signal.SIGALRM)


class PidFile:
    """A pid file kept as qemu-storage-daemon keeps it: mode 0600, held under a
    POSIX record lock for the daemon's lifetime (the kind QEMU takes, so the two
    daemons exclude each other too), and removed at exit by its owner only.

    Taking the lock comes first, before any socket exists, so that a daemon refused
    here has touched nothing of the one that holds it (QEMU locks only after
    creating its sockets, and replaces a running daemon's socket of the same path).
    The pid itself is written once the sockets listen: a pid in the file still means
    the daemon is ready, as QEMU documents.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = self._open_locked()

    def _open_locked(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StartupError(f"cannot create PID file: Could not create "
                                   f"'{self.path}': {os.strerror(exc.errno)}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                raise StartupError("cannot create PID file: Cannot lock pid file: "
                                   f"{os.strerror(exc.errno)}") from None
            if self._names(fd):
                break
            # The holder removed (or replaced) the file between our open and our
            # lock: what we locked is no longer the pid file. Try the new one.
            os.close(fd)
        os.ftruncate(fd, 0)   # a stale pid of an earlier run must not linger
        return fd

    def _names(self, fd: int) -> bool:
        """Does ``self.path`` still name the file open as ``fd``?"""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except OSError:
            return False

    def write_pid(self) -> None:
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def remove(self) -> None:
        # Unlink before closing: closing drops the lock, and a daemon waiting for
        # it must find either our locked file or none.
        if self._names(self.fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)


def check_socket_paths(config: Config, allowed_dirs: list[str]) -> None:
    """With --allow-dir, every unix socket the daemon creates must lie inside."""
    try:
        policy = PathPolicy(allowed_dirs)
    except ValueError as exc:
        raise UsageError(f"--allow-dir: {exc}") from None
    for spec in config.chardevs:
        if spec.path is not None:
            try:
                policy.check_create(spec.path)
            except QMPError as exc:
                raise UsageError(f"socket of '{spec.chardev_id}': {exc.desc}") from None


@dataclass
class Running:
    """A started daemon: its state and its listening server, in the current loop.

    Built by ``start()``; the command line (``run``) and the embedding API
    (``qmpjobd.testing.Daemon``) both drive one of these, so they wire the
    daemon identically.
    """

    daemon: "Daemon"
    server: "Server"
    warm_up: "WarmUp | None" = None

    def request_stop(self) -> None:
        """Begin the exit that ``quit`` and SIGTERM begin (idempotent)."""
        if self.warm_up is not None:
            self.warm_up.cancel()
        self.server.shutdown()

    async def wait_stopped(self) -> None:
        """Until the daemon has stopped (quit, a signal or ``stop()``)."""
        await self.server.serve_until_stopped()

    async def stop(self) -> list:
        """Exit as ``quit`` does and wait for it; the jobs that did not stop in
        the grace period are returned (empty when all stopped)."""
        self.request_stop()
        await self.wait_stopped()
        return list(self.server.abandoned_jobs)


@functools.lru_cache(maxsize=None)
def load_schema(version: str, test_controls: bool = False) -> "Schema":
    """The schema view of one QEMU version, loaded once per process.

    Parsing the QAPI files is most of a start-up's work; a Schema is read-only
    once built, so the daemons one program embeds (a test suite starts many)
    share it.
    """
    from qmpjobd.daemon import load_schema as load_schema_view

    # With test controls the view has the x-qmpjobd-* commands too.
    return load_schema_view(version, test_controls)


def build_daemon(config: Config) -> "Daemon":
    """The daemon's state as the command line describes it: schema of the chosen
    QEMU version, options, --object and --blockdev (or --demo) nodes."""
    from qmpjobd.daemon import Daemon, DaemonOptions, make_clock

    options = DaemonOptions(drain_artefacts=config.drain_artefacts,
                            max_output_bytes=config.max_output_bytes,
                            allowed_dirs=tuple(config.allowed_dirs),
                            test_controls=config.test_controls)
    daemon = Daemon(schema=load_schema(config.qemu_version, config.test_controls),
                    options=options, clock=make_clock(config.clock))
    for text in config.objects:
        add_object(daemon, text)
    blockdevs = demo_blockdevs(config.demo_dir) if config.demo else []
    blockdevs += config.blockdevs
    for text in blockdevs:
        try:
            daemon.graph.add(parse_blockdev(daemon.schema, text))
        except QMPError as exc:
            # QEMU prints a hint on the next line (a lock error names the image).
            hint = getattr(exc, "hint", "").rstrip("\n")
            raise UsageError(f"--blockdev {text}: {exc.desc}" + (f"\n{hint}" if hint else "")) from None
    return daemon


async def start(config: Config) -> Running:
    """Build the daemon and listen on every monitor, in the running event loop.

    Installs no signal handlers and writes no pid file (``run`` adds those for
    the process), so an embedding program keeps control of both. On failure
    nothing is left listening.
    """
    from qmpjobd.block import iowait
    from qmpjobd.block.jobs import WarmUp
    from qmpjobd.commands import load_all
    from qmpjobd.dispatch import Dispatcher
    from qmpjobd.server import Server

    check_socket_paths(config, config.allowed_dirs)
    # File I/O through an executor whose requests a drain can wait for.
    iowait.install(asyncio.get_running_loop())
    daemon = build_daemon(config)
    server = Server(daemon, Dispatcher(daemon, load_all()), config.monitors)
    server.shutdown_grace_s = config.shutdown_timeout
    # query-chardev also lists the chardevs that listen nowhere.
    server.all_chardevs = config.chardevs
    # The NBD options go first: a bad --export then fails before any monitor
    # socket exists, so nobody connects to a daemon that is about to exit
    # (qemu-storage-daemon, given its monitors last, fails the same way).
    try:
        start_nbd_options(daemon, config.nbd_options)
        await server.start()
    except BaseException:
        if config.nbd_options:
            from qmpjobd.nbd.exports import close_exports
            close_exports(daemon)
        close_started_listeners(server)
        raise
    # The job modules load in idle turns from now on, not in the first job's command.
    warm_up = WarmUp(asyncio.get_running_loop()).start()
    return Running(daemon, server, warm_up)


def start_nbd_options(daemon: "Daemon", options: list[tuple[str, str]]) -> None:
    """--nbd-server (NbdServerOptions, a flat address) and --export
    (BlockExportOptions), in command-line order, in the running loop."""
    from qmpjobd.commands.block_export import add_export, start_server

    for option, text in options:
        try:
            if option == "nbd-server":
                args = daemon.schema.parse_keyval("NbdServerOptions", text)
                start_server(daemon, args, args["addr"])
            else:
                add_export(daemon, daemon.schema.parse_keyval("BlockExportOptions", text))
        except QMPError as exc:
            raise UsageError(f"--{option} {text}: {exc.desc}") from None


def close_started_listeners(server: "Server") -> None:
    """Undo a start-up that failed part way: close the listeners that were
    opened and remove only their socket files (a later path may be another
    program's)."""
    for listener in server.listeners:
        listener.close()
    for monitor in server.monitors:
        if monitor.path is not None and monitor.chardev_id in server.listener_of:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(monitor.path)


async def run(config: Config) -> int:
    """The daemon as a process: signals, pid file, serve until told to stop."""
    loop = asyncio.get_running_loop()
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # A termination signal during start-up is acted on once the server is up.
    exit_requested = asyncio.Event()
    for signum in EXIT_SIGNALS:
        loop.add_signal_handler(signum, exit_requested.set)
    # Checked before the pid file is taken, so a bad path touches nothing.
    check_socket_paths(config, config.allowed_dirs)
    pidfile = PidFile(config.pidfile) if config.pidfile else None
    try:
        running = await start(config)
        if pidfile is not None:
            pidfile.write_pid()
        for signum in EXIT_SIGNALS:
            loop.add_signal_handler(signum, running.request_stop)
        if exit_requested.is_set():
            running.request_stop()
        await running.wait_stopped()
        abandoned = bool(running.server.abandoned_jobs)
    finally:
        if pidfile is not None:
            pidfile.remove()
    if abandoned:
        exit_abandoning_jobs()
    return 0


def exit_abandoning_jobs() -> None:
    """Exit now, leaving jobs that did not stop within the grace period.

    Their coroutines cannot be finished (one may wait in a request for ever, and a
    thread-pool read that hangs would also hold up the interpreter's exit), so the
    process ends here, as QEMU's exit() would, once sockets and pid file are gone.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for, or by default when it is installed; else asyncio's.

    uvloop (a dependency where it has wheels) is a drop-in event loop in C: it cuts the per-command
    round trip by about a third. Everything above the loop is the same code.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--event-loop uvloop: uvloop is not installed on this platform")
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHECK_COMMANDS]:
        # A tool, not the daemon: loaded only when asked for.
        from qmpjobd.testing.schema_check import check_commands_main
        return check_commands_main(argv[1:])
    try:
        config = parse_args(argv)
        logging.basicConfig(level=config.log_level.upper(), format="qmpjobd: %(levelname)s: %(message)s")
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            return runner.run(run(config))
    except UsageError as exc:
        print(f"qmpjobd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"qmpjobd: {exc}", file=sys.stderr)
        return 1
