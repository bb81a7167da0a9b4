"""The NBD server protocol as QEMU's server speaks it, without any I/O.

Bytes from a client go in through :meth:`ServerConnection.receive`; what comes
out is a list of events: bytes to send, a request to carry out, the start of
the transmission phase, or the end of the connection. Replies to requests are
built by the ``*_reply``/``*_chunk`` methods, which know the mode the client
negotiated (simple, structured or extended headers). Nothing here knows about
sockets, asyncio or block nodes: the export server (``qmpjobd.nbd.server``)
does the I/O, and the handshake learns about exports through a small
:class:`ExportDirectory` interface.

What is QEMU's and must stay so (``docs/interop/nbd.rst``, the NBD protocol
document, and what qemu-storage-daemon 7.2/10.0/11.1 put on the wire):

* fixed newstyle only, handshake flags FIXED_NEWSTYLE | NO_ZEROES; unknown
  client flags, a bad option magic, an option longer than 32 MiB, or any
  option but EXPORT_NAME from a client without C_FIXED_NEWSTYLE end the
  connection without a reply;
* an option is answered once its whole payload is in (QEMU reads the rest of
  a payload it rejects before it answers), except EXPORT_NAME longer than
  4096 bytes, which ends the connection at once;
* the option error texts, the order of INFO replies, meta context selection
  and ids (0 base:allocation, 1 qemu:allocation-depth, 2+i bitmap i);
* the request checks in QEMU's order, all answered with EINVAL; a WRITE whose
  payload is refused unread (longer than 32 MiB) or a bad request magic ends
  the connection.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union

# --- constants (NBD protocol document; QEMU include/block/nbd.h) ------------------

INIT_PASSWORD = b"NBDMAGIC"
OPTS_MAGIC = 0x49484156454F5054          # "IHAVEOPT"
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


# QEMU's names for options in its messages (nbd_opt_lookup).
_OPTION_NAMES = {
    Opt.EXPORT_NAME: "export name", Opt.ABORT: "abort", Opt.LIST: "list",
    Opt.STARTTLS: "starttls", Opt.INFO: "info", Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply", Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context", Opt.EXTENDED_HEADERS: "extended headers",
}

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9
REP_ERR_EXT_HEADER_REQD = _REP_ERR + 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STAT_PAYLOAD = 1 << 12


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


# QEMU's names for commands in its messages (nbd_cmd_lookup).
_COMMAND_NAMES = {
    Cmd.READ: "read", Cmd.WRITE: "write", Cmd.DISC: "disconnect", Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim", Cmd.CACHE: "cache", Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# Errors on the wire.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Limits.
MAX_STRING_SIZE = 4096
MAX_BUFFER_SIZE = 32 * 1024 * 1024
MAX_REQUESTS = 16
MAX_BLOCK_STATUS_EXTENTS = (1024 * 1024) // 8
DEFAULT_PORT = 10809

# Fixed meta context ids of SET_META_CONTEXT.
META_ID_BASE_ALLOCATION = 0
META_ID_ALLOCATION_DEPTH = 1
META_ID_DIRTY_BITMAP = 2

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

_GREETING = INIT_PASSWORD + struct.pack(">QH", OPTS_MAGIC, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
_COMPACT_REQUEST = struct.Struct(">IHHQQI")     # magic flags type cookie offset length
_EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_HEADER = struct.Struct(">IHHQI")     # magic flags type cookie length
_EXTENDED_HEADER = struct.Struct(">IHHQQQ")      # magic flags type cookie offset length


_KNOWN_COMMANDS = frozenset(int(c) for c in Cmd)


def option_name(option: int) -> str:
    return _OPTION_NAMES.get(option, "<unknown>")  # type: ignore[call-overload]


def command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command, "<unknown>")  # type: ignore[call-overload]


def nbd_errno(host_errno: int) -> int:
    """QEMU's system_errno_to_nbd_errno: the few errors the protocol names, EINVAL
    for everything else."""
    if host_errno == 0:
        return 0
    if host_errno in (errno.EPERM, errno.EROFS):
        return NBD_EPERM
    if host_errno == errno.EIO:
        return NBD_EIO
    if host_errno == errno.ENOMEM:
        return NBD_ENOMEM
    if host_errno in (errno.EDQUOT, errno.EFBIG, errno.ENOSPC):
        return NBD_ENOSPC
    if host_errno == errno.EOVERFLOW:
        return NBD_EOVERFLOW
    if host_errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return NBD_ENOTSUP
    if host_errno == errno.ESHUTDOWN:
        return NBD_ESHUTDOWN
    return NBD_EINVAL


def sanitized_name(name: str) -> str:
    """QEMU's nbd_sanitize_name: export names in messages are cut to 80 characters."""
    return name if len(name) <= 80 else name[:80] + "..."


# --- what the protocol needs to know ------------------------------------------------

@dataclass(frozen=True)
class ProtocolFeatures:
    """The behaviour differences between QEMU releases that show on the wire."""

    # NBD_OPT_EXTENDED_HEADERS and the 64-bit request/reply headers (QEMU 9.0 on).
    extended_headers: bool = False
    # QEMU 7.2 prints the over-long request as "len (N ) is larger ...".
    stray_space_in_len_message: bool = False
    # Later releases name the expected magic in the bad-magic message.
    magic_message_names_expected: bool = False


@dataclass(frozen=True)
class ExportView:
    """One export as the protocol sees it: name, size, flags and contexts."""

    name: str
    size: int
    flags: int                      # transmission flags before per-client additions
    description: str | None = None
    request_alignment: int = 1
    max_transfer: int = MAX_BUFFER_SIZE
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()   # names of the exported dirty bitmaps, in order

    def context_names(self) -> list[tuple[int, str]]:
        """(fixed id, name) of every context this export offers, in QEMU's order."""
        names = [(META_ID_BASE_ALLOCATION, BASE_ALLOCATION)]
        if self.allocation_depth:
            names.append((META_ID_ALLOCATION_DEPTH, ALLOCATION_DEPTH))
        names += [(META_ID_DIRTY_BITMAP + i, DIRTY_BITMAP_PREFIX + b)
                  for i, b in enumerate(self.bitmaps)]
        return names


def export_flags(*, writable: bool, multi_conn: bool) -> int:
    """The flags QEMU's nbd_export_create gives an export."""
    flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE
    if multi_conn:
        flags |= FLAG_CAN_MULTI_CONN
    if writable:
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO
    else:
        flags |= FLAG_READ_ONLY
    return flags


class ExportDirectory(Protocol):
    """The exports of the server, in creation order."""

    def find(self, name: str) -> ExportView | None: ...

    def listing(self) -> Sequence[ExportView]: ...


# --- events -------------------------------------------------------------------------

@dataclass
class Send:
    """Bytes to write to the client."""

    data: bytes


@dataclass
class Close:
    """End the connection (after sending what came before). ``reason`` is what
    QEMU would log; the client sees only the connection go."""

    reason: str


@dataclass
class Started:
    """The handshake is over: transmission on ``export`` begins."""

    export: ExportView


@dataclass
class Request:
    """A request that passed every check; the server carries it out and answers
    with one of the connection's reply builders."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes = b""                          # WRITE payload
    # BLOCK_STATUS: ids of the contexts to report, in reply order.
    contexts: tuple[int, ...] = ()


Event = Union[Send, Close, Started, Request]


class Mode(enum.IntEnum):
    """What the client negotiated: the reply format (QEMU's NBDMode)."""

    SIMPLE = 0
    STRUCTURED = 1
    EXTENDED = 2


class _Phase(enum.Enum):
    CLIENT_FLAGS = 1
    OPTIONS = 2
    TRANSMISSION = 3
    CLOSED = 4


class _OptionError(Exception):
    """An option is refused: an error reply, and the option loop goes on."""

    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message


class _Fatal(Exception):
    """The connection ends without a further reply."""


class _Payload:
    """QEMU's nbd_opt_read over one option's payload: a short read or an
    embedded NUL is an ERR_INVALID reply."""

    def __init__(self, data: bytes, option: int) -> None:
        self.data = data
        self.pos = 0
        self.option = option

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int, check_nul: bool = False) -> bytes:
        if size > self.left:
            raise _OptionError(REP_ERR_INVALID,
                               f"Inconsistent lengths in option {option_name(self.option)}")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        if check_nul and b"\0" in chunk:
            raise _OptionError(REP_ERR_INVALID,
                               f"Unexpected embedded NUL in option {option_name(self.option)}")
        return chunk

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def skip(self, size: int) -> None:
        self.take(size)

    def name(self) -> str:
        """A length-prefixed string (QEMU's nbd_opt_read_name)."""
        length = self.u32()
        if length > MAX_STRING_SIZE:
            raise _OptionError(REP_ERR_INVALID, f"Invalid name length: {length}")
        return self.take(length, check_nul=True).decode("utf-8", "surrogateescape")


@dataclass
class _MetaSelection:
    """The contexts a SET_META_CONTEXT selected, tied to one export."""

    export: str | None = None
    ids: tuple[int, ...] = ()


def _c_string(raw: bytes) -> str:
    """A name as QEMU's C code sees it: up to the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass
class ServerConnection:
    """One client of the NBD server, from greeting to disconnect."""

    exports: ExportDirectory
    features: ProtocolFeatures = field(default_factory=ProtocolFeatures)

    def __post_init__(self) -> None:
        self._buffer = bytearray()
        self._phase = _Phase.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.mode = Mode.SIMPLE
        self.export: ExportView | None = None
        self._meta = _MetaSelection()
        # A request header waiting for its WRITE (or block-status) payload.
        self._pending: tuple[int, int, int, int, int] | None = None

    # --- input ------------------------------------------------------------------

    @staticmethod
    def greeting() -> bytes:
        """The 18 bytes the server sends first."""
        return _GREETING

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    @property
    def transmitting(self) -> bool:
        return self._phase is _Phase.TRANSMISSION

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns what to do, in order."""
        if self._phase is _Phase.CLOSED:
            return []
        self._buffer += data
        events: list[Event] = []
        try:
            while self._phase is not _Phase.CLOSED and self._step(events):
                pass
        except _Fatal as fatal:
            self._close(events, str(fatal))
        return events

    def _close(self, events: list[Event], reason: str) -> None:
        self._phase = _Phase.CLOSED
        self._buffer.clear()
        events.append(Close(reason))

    def _step(self, events: list[Event]) -> bool:
        """Consume one unit (client flags, an option, a request); False when more
        input is needed."""
        if self._phase is _Phase.CLIENT_FLAGS:
            return self._client_flags()
        if self._phase is _Phase.OPTIONS:
            return self._option(events)
        return self._request(events)

    def _client_flags(self) -> bool:
        if len(self._buffer) < 4:
            return False
        flags = struct.unpack(">I", self._buffer[:4])[0]
        del self._buffer[:4]
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        unknown = flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            raise _Fatal(f"Unknown client flags 0x{unknown:x} received")
        self._phase = _Phase.OPTIONS
        return True

    # --- options ----------------------------------------------------------------

    def _option(self, events: list[Event]) -> bool:
        if len(self._buffer) < _OPTION_HEADER.size:
            # QEMU checks the magic as soon as it has it.
            if len(self._buffer) >= 8 and struct.unpack(">Q", self._buffer[:8])[0] != OPTS_MAGIC:
                raise _Fatal("Bad magic received")
            return False
        magic, option, length = _OPTION_HEADER.unpack_from(self._buffer)
        if magic != OPTS_MAGIC:
            raise _Fatal("Bad magic received")
        if length > MAX_BUFFER_SIZE:
            raise _Fatal(f"len ({length}) is larger than max len ({MAX_BUFFER_SIZE})")
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            raise _Fatal(f"Unsupported option {option} ({option_name(option)}); option ignored")
        if option == Opt.EXPORT_NAME:
            self._refuse_export_name_early(length)
        if len(self._buffer) < _OPTION_HEADER.size + length:
            return False
        payload = bytes(self._buffer[_OPTION_HEADER.size:_OPTION_HEADER.size + length])
        del self._buffer[:_OPTION_HEADER.size + length]
        try:
            self._dispatch_option(option, _Payload(payload, option), events)
        except _OptionError as refused:
            events.append(Send(self._rep(option, refused.reply_type,
                                         refused.message.encode("utf-8", "surrogateescape"))))
        return True

    def _refuse_export_name_early(self, length: int) -> None:
        if self.mode is Mode.EXTENDED:
            raise _Fatal("Extended headers already negotiated, use NBD_OPT_GO instead")
        if length > MAX_STRING_SIZE:
            raise _Fatal("Bad length received")

    def _dispatch_option(self, option: int, payload: _Payload, events: list[Event]) -> None:
        if option == Opt.EXPORT_NAME:
            self._export_name(payload, events)
        elif option == Opt.ABORT:
            events.append(Send(self._rep(option, REP_ACK)))
            raise _Fatal("client sent NBD_OPT_ABORT")
        elif option == Opt.LIST:
            self._reject_length(payload)
            for view in self.exports.listing():
                events.append(Send(self._rep(option, REP_SERVER, _list_entry(view))))
            events.append(Send(self._rep(option, REP_ACK)))
        elif option in (Opt.INFO, Opt.GO):
            self._info(option, payload, events)
        elif option == Opt.STARTTLS:
            self._starttls(payload, events)
        elif option == Opt.STRUCTURED_REPLY:
            self._structured_reply(payload, events)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(option, payload, events)
        elif option == Opt.EXTENDED_HEADERS and self.features.extended_headers:
            self._extended_headers(payload, events)
        else:
            raise _OptionError(REP_ERR_UNSUP, f"Unsupported option {option} ({self._name_of(option)})")

    def _name_of(self, option: int) -> str:
        if option == Opt.EXTENDED_HEADERS and not self.features.extended_headers:
            return "<unknown>"
        return option_name(option)

    @staticmethod
    def _reject_length(payload: _Payload) -> None:
        if payload.left:
            raise _OptionError(REP_ERR_INVALID,
                               f"option '{option_name(payload.option)}' has unexpected length")

    def _starttls(self, payload: _Payload, events: list[Event]) -> None:
        if payload.left:
            # QEMU answers, then treats a STARTTLS with a payload as fatal.
            events.append(Send(self._rep(payload.option, REP_ERR_INVALID,
                                         b"option 'starttls' has unexpected length")))
            raise _Fatal("option 'starttls' has unexpected length")
        raise _OptionError(REP_ERR_POLICY, "TLS not configured")

    def _structured_reply(self, payload: _Payload, events: list[Event]) -> None:
        self._reject_length(payload)
        if self.mode is Mode.EXTENDED:
            raise _OptionError(REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
        if self.mode is Mode.STRUCTURED:
            raise _OptionError(REP_ERR_INVALID, "structured reply already negotiated")
        events.append(Send(self._rep(payload.option, REP_ACK)))
        self.mode = Mode.STRUCTURED

    def _extended_headers(self, payload: _Payload, events: list[Event]) -> None:
        self._reject_length(payload)
        if self.mode is Mode.EXTENDED:
            raise _OptionError(REP_ERR_INVALID, "extended headers already negotiated")
        events.append(Send(self._rep(payload.option, REP_ACK)))
        self.mode = Mode.EXTENDED

    def _export_name(self, payload: _Payload, events: list[Event]) -> None:
        view = self.exports.find(_c_string(payload.data))
        if view is None:
            raise _Fatal("export not found")
        reply = struct.pack(">QH", view.size, self._flags_for(view, Opt.EXPORT_NAME))
        if not self.no_zeroes:
            reply += bytes(124)
        events.append(Send(reply))
        self._begin_transmission(view, events)

    def _info(self, option: int, payload: _Payload, events: list[Event]) -> None:
        name = payload.name()
        want_name = want_block_size = False
        for _ in range(payload.u16()):
            request = payload.u16()
            want_name |= request == INFO_NAME
            want_block_size |= request == INFO_BLOCK_SIZE
        self._reject_length(payload)
        view = self.exports.find(name)
        if view is None:
            raise _OptionError(REP_ERR_UNKNOWN, f"export '{sanitized_name(name)}' not present")
        if want_name:
            events.append(Send(self._info_rep(option, INFO_NAME, name.encode("utf-8", "surrogateescape"))))
        if view.description is not None:
            events.append(Send(self._info_rep(option, INFO_DESCRIPTION, view.description.encode())))
        minimum = view.request_alignment if (option == Opt.INFO or want_block_size) else 1
        sizes = struct.pack(">III", minimum, max(4096, minimum),
                            min(view.max_transfer, MAX_BUFFER_SIZE))
        events.append(Send(self._info_rep(option, INFO_BLOCK_SIZE, sizes)))
        flags = self._flags_for(view, option)
        events.append(Send(self._info_rep(option, INFO_EXPORT, struct.pack(">QH", view.size, flags))))
        if option == Opt.INFO and not want_block_size and view.request_alignment > 1:
            raise _OptionError(REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export")
        events.append(Send(self._rep(option, REP_ACK)))
        if option == Opt.GO:
            self._begin_transmission(view, events)

    def _flags_for(self, view: ExportView, option: int) -> int:
        flags = view.flags
        if self.mode >= Mode.STRUCTURED:
            flags |= FLAG_SEND_DF
        if self.mode is Mode.EXTENDED and (option == Opt.INFO or self._selected_ids(view)):
            flags |= FLAG_BLOCK_STAT_PAYLOAD
        return flags

    def _selected_ids(self, view: ExportView) -> tuple[int, ...]:
        return self._meta.ids if self._meta.export == view.name else ()

    def _begin_transmission(self, view: ExportView, events: list[Event]) -> None:
        if self._meta.export != view.name:
            self._meta = _MetaSelection()
        self.export = view
        self._phase = _Phase.TRANSMISSION
        events.append(Started(view))

    def _meta_context(self, option: int, payload: _Payload, events: list[Event]) -> None:
        if option == Opt.SET_META_CONTEXT:
            if self.mode < Mode.STRUCTURED:
                raise _OptionError(REP_ERR_INVALID, f"request option '{option_name(option)}' "
                                                    "when structured reply is not negotiated")
            # A SET forgets the previous selection even if it fails.
            self._meta = _MetaSelection()
        name = payload.name()
        view = self.exports.find(name)
        if view is None:
            raise _OptionError(REP_ERR_UNKNOWN, f"export '{sanitized_name(name)}' not present")
        listing = option == Opt.LIST_META_CONTEXT
        count = payload.u32()
        offered = view.context_names()
        if listing and count == 0:
            chosen = {cid for cid, _ in offered}
        else:
            chosen = set()
            for _ in range(count):
                chosen |= self._meta_query(payload, view, listing)
        selected = [(cid, cname) for cid, cname in offered if cid in chosen]
        for cid, cname in selected:
            body = struct.pack(">I", 0 if listing else cid) + cname.encode()
            events.append(Send(self._rep(option, REP_META_CONTEXT, body)))
        events.append(Send(self._rep(option, REP_ACK)))
        if not listing:
            self._meta = _MetaSelection(view.name, tuple(cid for cid, _ in selected))

    @staticmethod
    def _meta_query(payload: _Payload, view: ExportView, listing: bool) -> set[int]:
        """The ids one query selects (QEMU's nbd_negotiate_meta_query)."""
        length = payload.u32()
        if length > MAX_STRING_SIZE or length < 5:
            payload.skip(length)
            return set()
        query = payload.take(length, check_nul=True).decode("utf-8", "surrogateescape")
        namespace, rest = query[:5], query[5:]
        if namespace == "base:":
            return {META_ID_BASE_ALLOCATION} if rest == "allocation" or (listing and not rest) else set()
        if namespace != "qemu:":
            return set()
        depth = {META_ID_ALLOCATION_DEPTH} if view.allocation_depth else set()
        bitmaps = {META_ID_DIRTY_BITMAP + i for i in range(len(view.bitmaps))}
        if not rest:
            return depth | bitmaps if listing else set()
        if rest == "allocation-depth":
            return depth
        if rest.startswith("dirty-bitmap:"):
            wanted = rest[len("dirty-bitmap:"):]
            if not wanted:
                return bitmaps if listing else set()
            return _first_bitmap(view, wanted)
        return set()

    @staticmethod
    def _rep(option: int, reply_type: int, payload: bytes = b"") -> bytes:
        return _OPTION_REPLY.pack(REP_MAGIC, option, reply_type, len(payload)) + payload

    def _info_rep(self, option: int, info: int, body: bytes) -> bytes:
        return self._rep(option, REP_INFO, struct.pack(">H", info) + body)

    # --- transmission -------------------------------------------------------------

    def _request(self, events: list[Event]) -> bool:
        if self._pending is not None:
            return self._payload(events)
        extended = self.mode is Mode.EXTENDED
        header = _EXTENDED_REQUEST if extended else _COMPACT_REQUEST
        if len(self._buffer) < header.size:
            return False
        magic, flags, command, cookie, offset, length = header.unpack_from(self._buffer)
        del self._buffer[:header.size]
        expected = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        if magic != expected:
            # QEMU reads the whole header, answers with its cookie, then hangs up.
            message = f"invalid magic (got 0x{magic:x})"
            if self.features.magic_message_names_expected:
                message = f"invalid magic (got 0x{magic:x}, expected 0x{expected:x})"
            events.append(Send(self.error_reply(Request(command, flags, cookie, offset, length),
                                                NBD_EINVAL, message)))
            raise _Fatal(message)
        if command == Cmd.DISC:
            raise _Fatal("client sent NBD_CMD_DISC")
        self._pending = (flags, command, cookie, offset, length)
        return self._payload(events)

    def _payload_length(self, flags: int, command: int, length: int) -> int:
        if command == Cmd.WRITE:
            return length
        if self.mode is Mode.EXTENDED and flags & CMD_FLAG_PAYLOAD_LEN:
            # Any command may carry a payload then; QEMU reads it before it
            # decides whether the flag was allowed.
            return length
        return 0

    def _payload(self, events: list[Event]) -> bool:
        assert self._pending is not None
        flags, command, cookie, offset, length = self._pending
        request = Request(command, flags, cookie, offset, length)
        if command in (Cmd.READ, Cmd.WRITE, Cmd.CACHE) and length > MAX_BUFFER_SIZE:
            self._pending = None
            events.append(Send(self.error_reply(request, NBD_EINVAL, self._too_long(length))))
            if command == Cmd.WRITE:
                # The payload was never read: the stream cannot be resynchronised.
                raise _Fatal("Request handling failed in intermediate state")
            return True
        payload_length = self._payload_length(flags, command, length)
        if payload_length > MAX_BUFFER_SIZE:
            self._pending = None
            events.append(Send(self.error_reply(request, NBD_EINVAL, self._too_long(length))))
            raise _Fatal("Request handling failed in intermediate state")
        if len(self._buffer) < payload_length:
            return False
        with memoryview(self._buffer) as view:     # one copy, not two
            payload = bytes(view[:payload_length])
        del self._buffer[:payload_length]
        self._pending = None
        if command == Cmd.WRITE:
            request.data = payload
        problem = self._check(request, payload)
        if problem is not None:
            events.append(Send(self.error_reply(request, NBD_EINVAL, problem)))
        else:
            events.append(request)
        return True

    def _too_long(self, length: int) -> str:
        space = " " if self.features.stray_space_in_len_message else ""
        return f"len ({length}{space}) is larger than max len ({MAX_BUFFER_SIZE})"

    def _check(self, request: Request, payload: bytes) -> str | None:
        """QEMU's sanity checks after the payload is in; a message means EINVAL."""
        view = self.export
        assert view is not None
        command = request.command
        block_status_payload = (command == Cmd.BLOCK_STATUS
                                and bool(request.flags & CMD_FLAG_PAYLOAD_LEN) and self.mode is Mode.EXTENDED)
        if block_status_payload:
            effect = self._block_status_payload(payload, view)
            if effect is None:
                return "CMD_BLOCK_STATUS payload not valid"
            request.length, request.contexts = effect
        if view.flags & FLAG_READ_ONLY and command in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM):
            return "Export is read-only"
        if request.offset > view.size or request.length > view.size - request.offset:
            return (f"operation past EOF; From: {request.offset}, Len: {request.length}, "
                    f"Size: {view.size}")
        unsupported = request.flags & ~self._valid_flags(command)
        if unsupported:
            return f"unsupported flags for command {command_name(command)} (got 0x{unsupported:x})"
        if command not in _KNOWN_COMMANDS:
            return f"invalid request type ({command}) received"
        if command == Cmd.BLOCK_STATUS:
            return self._check_block_status(request, block_status_payload)
        return None

    def _valid_flags(self, command: int) -> int:
        valid = CMD_FLAG_FUA
        if command == Cmd.READ and self.mode >= Mode.STRUCTURED:
            valid |= CMD_FLAG_DF
        elif command == Cmd.WRITE_ZEROES:
            valid |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        elif command == Cmd.BLOCK_STATUS:
            valid |= CMD_FLAG_REQ_ONE
        if self.mode is Mode.EXTENDED and command in (Cmd.WRITE, Cmd.BLOCK_STATUS):
            valid |= CMD_FLAG_PAYLOAD_LEN
        return valid

    def _check_block_status(self, request: Request, from_payload: bool) -> str | None:
        if not request.length:
            return "need non-zero length"
        assert self.export is not None
        if not from_payload:
            request.contexts = self._selected_ids(self.export)
        if not request.contexts:
            return "CMD_BLOCK_STATUS not negotiated"
        return None

    def _block_status_payload(self, payload: bytes, view: ExportView) -> tuple[int, tuple[int, ...]] | None:
        """Extended headers: effect length (64) and the context ids wanted (32 each),
        which must be among those negotiated."""
        if len(payload) < 12 or (len(payload) - 8) % 4:
            return None
        effect = struct.unpack(">Q", payload[:8])[0]
        wanted = struct.unpack(f">{(len(payload) - 8) // 4}I", payload[8:])
        selected = self._selected_ids(view)
        if any(cid not in selected for cid in wanted):
            return None
        return effect, tuple(cid for cid in selected if cid in wanted)

    # --- replies ------------------------------------------------------------------

    def _chunk_header(self, request: Request, flags: int, chunk_type: int, length: int) -> bytes:
        if self.mode is Mode.EXTENDED:
            return _EXTENDED_HEADER.pack(EXTENDED_REPLY_MAGIC, flags, chunk_type, request.cookie,
                                         request.offset, length)
        return _STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, request.cookie,
                                       length)

    def simple_reply(self, request: Request, error: int = 0) -> bytes:
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, request.cookie)

    def ok_reply(self, request: Request) -> bytes:
        """Success of a command without data: a simple reply, or in extended mode
        a NONE chunk with DONE (QEMU's nbd_send_generic_reply)."""
        if self.mode is Mode.EXTENDED:
            return self.done_chunk(request)
        return self.simple_reply(request)

    def done_chunk(self, request: Request) -> bytes:
        return self._chunk_header(request, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)

    def error_reply(self, request: Request, error: int, message: str) -> bytes:
        """A failed request: an ERROR chunk with the message once structured replies
        are on, else a simple reply with the error number alone. ``error`` is
        already an NBD error number."""
        if self.mode is Mode.SIMPLE:
            return self.simple_reply(request, error)
        text = message.encode("utf-8", "surrogateescape")
        body = struct.pack(">IH", error, len(text)) + text
        return self._chunk_header(request, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len(body)) + body

    def data_chunk_header(self, request: Request, offset: int, length: int, final: bool) -> bytes:
        """The header of an OFFSET_DATA chunk; ``length`` data bytes follow it."""
        flags = REPLY_FLAG_DONE if final else 0
        return (self._chunk_header(request, flags, REPLY_TYPE_OFFSET_DATA, 8 + length)
                + struct.pack(">Q", offset))

    def hole_chunk(self, request: Request, offset: int, length: int, final: bool) -> bytes:
        flags = REPLY_FLAG_DONE if final else 0
        return (self._chunk_header(request, flags, REPLY_TYPE_OFFSET_HOLE, 12)
                + struct.pack(">QI", offset, length))

    def read_reply_header(self, request: Request) -> bytes:
        """Simple mode: the reply that precedes ``request.length`` data bytes."""
        return self.simple_reply(request)

    def block_status_chunk(self, request: Request, context_id: int,
                           extents: Sequence[tuple[int, int]], final: bool) -> bytes:
        flags = REPLY_FLAG_DONE if final else 0
        if self.mode is Mode.EXTENDED:
            body = struct.pack(">II", context_id, len(extents)) + b"".join(
                struct.pack(">QQ", length, state) for length, state in extents)
            return self._chunk_header(request, flags, REPLY_TYPE_BLOCK_STATUS_EXT, len(body)) + body
        body = struct.pack(">I", context_id) + b"".join(
            struct.pack(">II", length, state) for length, state in extents)
        return self._chunk_header(request, flags, REPLY_TYPE_BLOCK_STATUS, len(body)) + body


def _first_bitmap(view: ExportView, wanted: str) -> set[int]:
    for index, name in enumerate(view.bitmaps):
        if name == wanted:
            return {META_ID_DIRTY_BITMAP + index}
    return set()


def _list_entry(view: ExportView) -> bytes:
    name = view.name.encode("utf-8", "surrogateescape")
    return struct.pack(">I", len(name)) + name + (view.description or "").encode()


class ExtentList:
    """Block-status extents as QEMU collects them: adjacent extents with equal
    flags merge, and the list stops growing at ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.extents: list[tuple[int, int]] = []
        self.full = False

    def add(self, length: int, state: int) -> bool:
        """Add one extent; False once the list is full (the caller stops)."""
        if self.full:
            return False
        if self.extents and self.extents[-1][1] == state:
            last_length, _ = self.extents[-1]
            self.extents[-1] = (last_length + length, state)
            return True
        if len(self.extents) >= self.limit:
            self.full = True
            return False
        self.extents.append((length, state))
        return True


def extent_limit(request: Request) -> int:
    return 1 if request.flags & CMD_FLAG_REQ_ONE else MAX_BLOCK_STATUS_EXTENTS
