"""Character devices: the queries, chardev-add/-change/-remove/-send-break and the
ring buffer commands.

The chardevs themselves live in the server's registry (``Server.chardevs``): the
command-line ones and those added here. This module turns QAPI arguments into
chardevs and keeps the parts without I/O: the ``null`` and ``ringbuf``/``memory``
backends, the ring's byte semantics, GLib's lenient base64 decoder and the checks
and messages QEMU gives, in QEMU's order. Sockets and ptys are opened by the server
(``Server.open_socket_chardev``, ``Server.open_pty_chardev``).
"""

from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING, Any

from qmpjobd.commands import Context, command
from qmpjobd.confine import PathPolicy
from qmpjobd.errors import QMPError
from qmpjobd.versions import Behaviour
from qmpjobd.wire.lexer import c_string_text as qemu_c_string_text

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.server import Server

# What ``query-chardev-backends`` of qemu-storage-daemon 7.2 (Debian build) lists, in
# its order.
QSD_CHARDEV_BACKENDS = ("serial", "mux", "pipe", "parallel", "null", "ringbuf", "stdio",
                        "socket", "file", "memory", "udp", "pty")
# From 10.0 on (observed on 10.0 and 11.1): the new ``hub`` backend first, and the
# registration order of socket/stdio and file changed.
CHARDEV_HUB_ORDER = Behaviour("query-chardev-backends lists hub first, in the new "
                              "registration order", since="10.0")
QSD_CHARDEV_BACKENDS_HUB = ("hub", "serial", "mux", "pipe", "parallel", "null", "ringbuf",
                            "socket", "stdio", "memory", "udp", "file", "pty")

# query-chardev's filename of a socket chardev with no address (``port=`` without
# ``host=``): QEMU 7.2 turns it into an ``fd`` socket with no descriptor, which
# never listens.
NO_ADDRESS_FILENAME = "disconnected:fd:,server=on"

# Backend kinds the schema knows but qemu-storage-daemon was built without: QEMU
# finds no class for them and says so.
NOT_BUILT_BACKENDS = frozenset({"msmouse", "wctablet", "braille", "testdev", "spicevmc",
                                "spiceport", "qemu-vdagent", "dbus", "vc", "console"})
# Backends qemu-storage-daemon would really create but qmpjobd does not implement:
# refused with a clear error rather than faked.
UNSUPPORTED_BACKENDS = frozenset({"stdio", "pipe", "serial", "parallel", "udp", "mux",
                                  "hub"})
# Backends that open a device path first: a missing path gets QEMU's own error.
DEVICE_PATH_BACKENDS = frozenset({"serial", "parallel", "pipe"})

RINGBUF_DEFAULT_SIZE = 65536


# ---------------------------------------------------------------------------------
# Byte helpers (no I/O)
# ---------------------------------------------------------------------------------

_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_RANK = {c: i for i, c in enumerate(_BASE64_ALPHABET)} | {"=": 0}
# QEMU also lets newlines through (MIME line breaks); GLib skips them.
_BASE64_ACCEPTED = frozenset(_BASE64_RANK) | {"\n"}


def qemu_base64_decode(text: str) -> bytes:
    """QEMU's ``qbase64_decode``: refuse any character outside the base64 alphabet,
    ``=`` and newline, then decode as GLib's ``g_base64_decode`` does. GLib is lenient:
    it emits bytes per complete group of four, ignores a trailing partial group
    (``"YQ"`` decodes to nothing) and counts ``=`` as a zero digit anywhere,
    dropping output bytes only when the last one or two digits of a group are ``=``.
    """
    if any(c not in _BASE64_ACCEPTED for c in text):
        raise QMPError("Base64 data contains invalid characters")
    out = bytearray()
    value = count = 0
    last = prev = ""
    for char in text:
        if char == "\n":
            continue
        prev, last = last, char
        value = (value << 6) | _BASE64_RANK[char]
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if prev != "=":
                out.append((value >> 8) & 0xFF)
            if last != "=":
                out.append(value & 0xFF)
            value = count = 0
    return bytes(out)


def qemu_string_bytes(text: str) -> bytes:
    """A QMP string as QEMU holds it: modified UTF-8 (U+0000 is ``C0 80``), so
    ``strlen`` of it is the whole string."""
    return text.encode("utf-8").replace(b"\x00", b"\xc0\x80")


class RingBuffer:
    """QEMU's ring buffer chardev store: writes always succeed and overwrite the
    oldest unread bytes once ``size`` are unread; reads take the oldest bytes.

    Only unread bytes are kept (never more than ``size``), so a large ring costs
    memory only when it is filled. A ring of size 0 (QEMU accepts it: 0 passes the
    power-of-two test) holds nothing.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.unread = bytearray()

    def write(self, data: bytes) -> None:
        self.unread += data
        excess = len(self.unread) - self.size
        if excess > 0:
            del self.unread[:excess]

    def read(self, size: int) -> bytes:
        taken = bytes(self.unread[:size])
        del self.unread[:size]
        return taken


# ---------------------------------------------------------------------------------
# Backends without sockets
# ---------------------------------------------------------------------------------

class SimpleChardev:
    """A run-time chardev whose state is a few descriptors at most (null, ringbuf,
    file). No frontend ever uses one (qemu-storage-daemon cannot attach a monitor
    at run time), so nothing is ever written to it or read from it."""

    qom_type = "chardev"
    frontend = False

    def __init__(self, chardev_id: str, kind: str, fds: list[int] | None = None) -> None:
        self.chardev_id = chardev_id
        self.kind = kind
        self.fds = fds or []

    def filename(self) -> str:
        # QEMU's filename for these backends is the backend's name.
        return self.kind

    def qom_value(self, prop: str) -> object:
        raise QMPError(f"Property '{self.qom_type}.{prop}' not found")

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class NullChardev(SimpleChardev):
    qom_type = "chardev-null"


class FileChardev(SimpleChardev):
    qom_type = "chardev-file"


class RingbufChardev(SimpleChardev):
    """``ringbuf`` and its deprecated alias ``memory`` (a subclass in QEMU)."""

    def __init__(self, chardev_id: str, kind: str, size: int, fds: list[int]) -> None:
        super().__init__(chardev_id, kind, fds)
        self.qom_type = f"chardev-{kind}"
        self.ring = RingBuffer(size)


# ---------------------------------------------------------------------------------
# Opening a backend from chardev-add's arguments
# ---------------------------------------------------------------------------------

def _server(ctx: Context) -> "Server":
    server = getattr(ctx.connection, "server", None)
    if server is None:
        raise QMPError("chardevs need a running server")
    return server


def _policy(ctx: Context) -> PathPolicy:
    return PathPolicy(ctx.daemon.options.allowed_dirs)


def _open_file(policy: PathPolicy, path: str, flags: int, verb: str) -> int:
    """Open as QEMU's chardevs do (mode 0666 before the umask), in its words."""
    try:
        return policy.open(path, flags | os.O_CLOEXEC, 0o666, create=bool(flags & os.O_CREAT))
    except OSError as exc:
        raise QMPError(f"Could not {verb} '{path}': {os.strerror(exc.errno or 0)}") from None


def _open_logfile(policy: PathPolicy, data: dict) -> list[int]:
    """The common ``logfile``/``logappend`` members: QEMU creates the log before it
    opens the backend (nothing is ever logged here: no frontend writes)."""
    path = data.get("logfile")
    if path is None:
        return []
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if data.get("logappend") else os.O_TRUNC)
    return [_open_file(policy, path, flags, "create")]


def _refuse(kind: str) -> QMPError:
    return QMPError(f"chardev backend '{kind}' is not supported by qmpjobd")


def _check_unsupported(server: "Server", kind: str, data: dict) -> None:
    """Backends qmpjobd refuses, after the errors QEMU would give first."""
    if kind == "mux" and server.find_chardev(data["chardev"]) is None:
        raise QMPError(f"mux: base chardev {data['chardev']} not found")
    if kind in DEVICE_PATH_BACKENDS:
        device = data["device"]
        candidates = [device] if kind != "pipe" else [device + ".in", device]
        if not any(os.path.exists(path) for path in candidates):
            raise QMPError(f"Could not open '{device}': {os.strerror(2)}")
    raise _refuse(kind)


def open_backend(ctx: Context, server: "Server", chardev_id: str,
                 backend: dict) -> tuple[Any, dict]:
    """Create the chardev ``backend`` describes: (chardev, chardev-add's return).
    Errors are QEMU's texts without the ``Failed to add chardev`` prefix."""
    kind = backend["type"]
    data = backend.get("data", {})
    if kind in NOT_BUILT_BACKENDS:
        raise QMPError(f"'{kind}' is not a valid char driver name")
    if kind in UNSUPPORTED_BACKENDS:
        _check_unsupported(server, kind, data)
    policy = _policy(ctx)
    fds = _open_logfile(policy, data)
    try:
        return _open_with_log(ctx, server, chardev_id, kind, data, policy, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _open_with_log(ctx: Context, server: "Server", chardev_id: str, kind: str,
                   data: dict, policy: PathPolicy, fds: list[int]) -> tuple[Any, dict]:
    if kind == "null":
        return NullChardev(chardev_id, kind, fds), {}
    if kind in ("ringbuf", "memory"):
        size = data.get("size", RINGBUF_DEFAULT_SIZE)
        # QEMU tests ``size & (size - 1)``: 0 passes, negative sizes do not.
        if size & (size - 1):
            raise QMPError("size of ringbuf chardev must be power of two")
        return RingbufChardev(chardev_id, kind, size, fds), {}
    if kind == "file":
        return FileChardev(chardev_id, kind, fds + _open_file_backend(policy, data)), {}
    if kind == "socket":
        return server.open_socket_chardev(ctx.daemon, chardev_id, data, policy, fds), {}
    if kind == "pty":
        chardev = server.open_pty_chardev(chardev_id, data, policy, fds)
        return chardev, {"pty": chardev.pty_name}
    raise _refuse(kind)


def _open_file_backend(policy: PathPolicy, data: dict) -> list[int]:
    """``out`` is created (or truncated unless ``append``) before ``in`` is opened,
    so a missing ``in`` still leaves ``out`` behind, as in QEMU."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if data.get("append") else os.O_TRUNC)
    out = _open_file(policy, data["out"], flags, "open")
    if "in" not in data:
        return [out]
    try:
        return [out, _open_file(policy, data["in"], os.O_RDONLY, "open")]
    except QMPError:
        os.close(out)
        raise


def _add(ctx: Context, server: "Server", chardev_id: str, backend: dict) -> dict:
    try:
        chardev, returned = open_backend(ctx, server, chardev_id, backend)
    except QMPError as exc:
        raise QMPError(f"Failed to add chardev '{chardev_id}': {exc.desc}") from None
    server.register_chardev(chardev)
    return returned


# ---------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------

@command("query-chardev")
def query_chardev(ctx: Context, args: dict) -> list:
    server = getattr(ctx.connection, "server", None)
    return server.chardev_info() if server is not None else []


@command("query-chardev-backends")
def query_chardev_backends(ctx: Context, args: dict) -> list:
    hub = ctx.daemon.personality.has(CHARDEV_HUB_ORDER)
    return [{"name": name}
            for name in (QSD_CHARDEV_BACKENDS_HUB if hub else QSD_CHARDEV_BACKENDS)]


@command("chardev-add")
def chardev_add(ctx: Context, args: dict) -> dict:
    server = _server(ctx)
    chardev_id = args["id"]
    if server.find_chardev(chardev_id) is not None:
        raise QMPError(f"Chardev with id '{chardev_id}' already exists")
    return _add(ctx, server, chardev_id, args["backend"])


@command("chardev-change")
def chardev_change(ctx: Context, args: dict) -> dict:
    """Without a frontend QEMU removes the old chardev and then adds the new one, so a
    new backend that fails to open leaves no chardev of that id at all."""
    server = _server(ctx)
    chardev_id = args["id"]
    chardev = server.find_chardev(chardev_id)
    if chardev is None:
        raise QMPError(f"Chardev '{chardev_id}' does not exist")
    if chardev.frontend:
        raise QMPError("Chardev user does not support chardev hotswap")
    server.remove_chardev(chardev_id)
    return _add(ctx, server, chardev_id, args["backend"])


@command("chardev-remove")
def chardev_remove(ctx: Context, args: dict) -> dict:
    server = _server(ctx)
    chardev_id = args["id"]
    chardev = server.find_chardev(chardev_id)
    if chardev is None:
        raise QMPError(f"Chardev '{chardev_id}' not found")
    if chardev.frontend:
        raise QMPError(f"Chardev '{chardev_id}' is busy")
    server.remove_chardev(chardev_id)
    return {}


@command("chardev-send-break")
def chardev_send_break(ctx: Context, args: dict) -> dict:
    # No backend qmpjobd opens has a line to send a break on: QEMU ignores it too.
    if _server(ctx).find_chardev(args["id"]) is None:
        raise QMPError(f"Chardev '{args['id']}' not found")
    return {}


def _ring(ctx: Context, device: str) -> RingBuffer:
    chardev = _server(ctx).find_chardev(device)
    if chardev is None:
        raise QMPError(f"Device '{device}' not found")
    if not isinstance(chardev, RingbufChardev):
        raise QMPError(f"{device} is not a ringbuf device")
    return chardev.ring


@command("ringbuf-write")
def ringbuf_write(ctx: Context, args: dict) -> dict:
    ring = _ring(ctx, args["device"])
    if args.get("format") == "base64":
        ring.write(qemu_base64_decode(args["data"]))
    else:
        ring.write(qemu_string_bytes(args["data"]))
    return {}


@command("ringbuf-read")
def ringbuf_read(ctx: Context, args: dict) -> str:
    """``utf8`` hands the raw bytes to QEMU's JSON writer as a C string: it ends at
    the first NUL byte and invalid UTF-8 comes out as U+FFFD (QEMU's documentation
    admits this); ``base64`` gives every byte."""
    ring = _ring(ctx, args["device"])
    if args["size"] <= 0:
        raise QMPError("size must be greater than zero")
    data = ring.read(args["size"])
    if args.get("format") == "base64":
        return base64.b64encode(data).decode("ascii")
    return qemu_c_string_text(data)
