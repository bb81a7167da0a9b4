"""A byte-level NBD client for the tests: exact bytes out, every reply decoded.

Each call waits for a complete answer (an option's final reply, a request's
last chunk, or the end of the connection), so a transcript does not depend on
timing. Used to compare qmpjobd with qemu-storage-daemon on protocol corners
that libnbd and the QEMU tools never produce (garbage, bad flags, extended
headers, which libnbd 1.14 does not speak).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

# The magics come from the module under test: every transcript is compared with
# qemu-storage-daemon's, so a wrong value there still shows as a difference.
from qmpjobd.nbd.protocol import (
    EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, OPTS_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
)

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, \
    CMD_BLOCK_STATUS = range(8)
REP_ACK = 1


class Closed(Exception):
    """The server closed the connection."""


def name_payload(name: str, *infos: int) -> bytes:
    """INFO/GO payload: name plus info requests."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query.encode())) + query.encode()
    return out


class WireClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.extended = False
        self.structured = False
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(data)
            data += chunk
        return data

    def at_eof(self) -> bool:
        """True when the server closed the connection (reads everything left)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except (TimeoutError, socket.timeout):
            return False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # --- handshake -------------------------------------------------------------

    def greeting(self) -> tuple:
        data = self.recv_exact(18)
        return (data[:8], *struct.unpack(">QH", data[8:]))

    def client_flags(self, flags: int) -> None:
        self.send(struct.pack(">I", flags))

    def option(self, option: int, payload: bytes = b"", magic: int = OPTS_MAGIC,
               length: int | None = None) -> list[Any]:
        """Send one option; the replies up to the final one, or "EOF"."""
        size = len(payload) if length is None else length
        replies: list[Any] = []
        try:
            self.send(struct.pack(">QII", magic, option, size) + payload)
            while True:
                magic_, opt, kind, size = struct.unpack(">QIII", self.recv_exact(20))
                body = self.recv_exact(size)
                replies.append((hex(magic_), opt, hex(kind), body))
                if kind == REP_ACK or kind & 0x80000000:
                    break
        except (Closed, BrokenPipeError, ConnectionResetError):
            replies.append("EOF")
            return replies
        if option == OPT_ABORT:
            replies.append("EOF" if self.at_eof() else "open")
        if option == OPT_STRUCTURED_REPLY and replies[-1][2] == hex(REP_ACK):
            self.structured = True
        if option == OPT_EXTENDED_HEADERS and replies[-1][2] == hex(REP_ACK):
            self.extended = self.structured = True
        return replies

    def export_name(self, name: str, reply_size: int) -> Any:
        self.send(struct.pack(">QII", OPTS_MAGIC, OPT_EXPORT_NAME, len(name)) + name.encode())
        try:
            return self.recv_exact(reply_size)
        except Closed:
            return "EOF"

    # --- transmission ----------------------------------------------------------

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", magic: int | None = None) -> list[Any]:
        """Send one request; its decoded reply chunks, or ending in "EOF"."""
        self.cookie += 1
        if self.extended:
            header = struct.pack(">IHHQQQ", magic or EXTENDED_REQUEST_MAGIC, flags, command,
                                 self.cookie, offset, length)
        else:
            header = struct.pack(">IHHQQI", magic or REQUEST_MAGIC, flags, command,
                                 self.cookie, offset, length)
        out: list[Any] = []
        try:
            self.send(header + payload)
            self._read_reply(command, length, out)
        except (Closed, BrokenPipeError, ConnectionResetError):
            out.append("EOF")
        return out

    def _read_reply(self, command: int, length: int, out: list[Any]) -> None:
        first = self.recv_exact(4)
        magic = struct.unpack(">I", first)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = b""
            if command == CMD_READ and error == 0:
                data = self.recv_exact(length)
            out.append(("simple", error, cookie, _digest(data)))
            return
        while True:
            if magic == EXTENDED_REPLY_MAGIC:
                flags, kind, cookie, offset, size = struct.unpack(">HHQQQ", self.recv_exact(28))
                head = ("ext", flags, kind, cookie, offset)
            else:
                flags, kind, cookie, size = struct.unpack(">HHQI", self.recv_exact(16))
                head = ("chunk", flags, kind, cookie)
            body = self.recv_exact(size)
            out.append(head + (_decode_chunk(kind, body, magic == EXTENDED_REPLY_MAGIC),))
            if flags & 1:
                return
            magic = struct.unpack(">I", self.recv_exact(4))[0]


def _digest(data: bytes) -> Any:
    """Data in a transcript: its length and distinct byte values, not the bytes."""
    return (len(data), sorted(set(data))[:4]) if data else b""


def _decode_chunk(kind: int, body: bytes, extended: bool) -> Any:
    if kind == 1:        # OFFSET_DATA
        return ("data", struct.unpack(">Q", body[:8])[0], _digest(body[8:]))
    if kind == 2:        # OFFSET_HOLE
        return ("hole",) + struct.unpack(">QI", body)
    if kind == 5:        # BLOCK_STATUS
        context = struct.unpack(">I", body[:4])[0]
        words = struct.unpack(f">{(len(body) - 4) // 4}I", body[4:])
        return ("status", context, list(zip(words[::2], words[1::2])))
    if kind == 6:        # BLOCK_STATUS_EXT
        context, count = struct.unpack(">II", body[:8])
        words = struct.unpack(f">{count * 2}Q", body[8:])
        return ("status-ext", context, list(zip(words[::2], words[1::2])))
    if kind in (32769, 32770):
        error, size = struct.unpack(">IH", body[:6])
        return ("error", error, body[6:6 + size].decode())
    return ("other", body)
