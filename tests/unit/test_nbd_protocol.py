"""qmpjobd.nbd.protocol with byte strings: no sockets, no block nodes."""

from __future__ import annotations

import errno
import struct

import pytest

from qmpjobd.nbd import protocol as p

DISK = p.ExportView(name="disk", size=4194304, description="Test disk",
                    flags=p.export_flags(writable=True, multi_conn=True), allocation_depth=True,
                    bitmaps=("b0",))
RO = p.ExportView(name="ro", size=1048576, flags=p.export_flags(writable=False, multi_conn=True))


class Directory:
    def __init__(self, *views: p.ExportView) -> None:
        self.views = {v.name: v for v in views}

    def find(self, name):
        return self.views.get(name)

    def listing(self):
        return list(self.views.values())


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", p.OPTS_MAGIC, opt, len(payload)) + payload


def name(text: str, *infos: int) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta(export: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def replies(events) -> list[tuple[int, int, bytes]]:
    """Decode option replies (Send events) into (option, type, payload)."""
    out = []
    for event in events:
        assert isinstance(event, p.Send)
        magic, opt, kind, size = struct.unpack(">QIII", event.data[:20])
        assert magic == p.REP_MAGIC and size == len(event.data) - 20
        out.append((opt, kind, event.data[20:]))
    return out


@pytest.fixture
def conn() -> p.ServerConnection:
    connection = p.ServerConnection(Directory(DISK, RO))
    assert connection.receive(struct.pack(">I", 3)) == []
    return connection


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    assert p.ServerConnection.greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


@pytest.mark.parametrize("flags", [4, 0x80000000])
def test_unknown_client_flags_drop_the_connection(flags):
    connection = p.ServerConnection(Directory(DISK))
    events = connection.receive(struct.pack(">I", flags | 1))
    assert [type(e) for e in events] == [p.Close] and connection.closed


def test_option_bytes_may_arrive_one_at_a_time(conn):
    data = option(p.Opt.LIST)
    events = []
    for i in range(len(data)):
        events += conn.receive(data[i:i + 1])
    assert [(o, k) for o, k, _ in replies(events)] == [(3, p.REP_SERVER), (3, p.REP_SERVER),
                                                      (3, p.REP_ACK)]
    assert replies(events)[0][2] == b"\0\0\0\x04diskTest disk"


def test_bad_option_magic_and_huge_option_drop(conn):
    assert isinstance(conn.receive(b"IHAVEOPX")[-1], p.Close)
    other = p.ServerConnection(Directory(DISK))
    other.receive(struct.pack(">I", 3))
    events = other.receive(struct.pack(">QII", p.OPTS_MAGIC, 3, p.MAX_BUFFER_SIZE + 1))
    assert isinstance(events[-1], p.Close)


def test_errors_of_simple_options(conn):
    got = replies(conn.receive(option(p.Opt.LIST, b"x") + option(p.Opt.STARTTLS) + option(99, b"abc")
                               + option(p.Opt.EXTENDED_HEADERS)))
    assert got == [(3, p.REP_ERR_INVALID, b"option 'list' has unexpected length"),
                   (5, p.REP_ERR_POLICY, b"TLS not configured"),
                   (99, p.REP_ERR_UNSUP, b"Unsupported option 99 (<unknown>)"),
                   (11, p.REP_ERR_UNSUP, b"Unsupported option 11 (<unknown>)")]


def test_info_order_and_block_sizes(conn):
    got = replies(conn.receive(option(p.Opt.INFO, name("disk", p.INFO_NAME))))
    assert [(k, body[:2]) for _, k, body in got] == [
        (p.REP_INFO, b"\0\x01"), (p.REP_INFO, b"\0\x02"), (p.REP_INFO, b"\0\x03"),
        (p.REP_INFO, b"\0\x00"), (p.REP_ACK, b"")]
    assert got[2][2][2:] == struct.pack(">III", 1, 4096, 33554432)
    assert got[3][2][2:] == struct.pack(">QH", 4194304, 0x0D6D)
    assert not conn.transmitting


def test_info_of_unknown_export_and_lying_payloads(conn):
    got = replies(conn.receive(option(p.Opt.INFO, name("x" * 100))
                               + option(p.Opt.GO, struct.pack(">I", 9) + b"disk")
                               + option(p.Opt.GO, name("disk") + b"!")))
    assert got == [(6, p.REP_ERR_UNKNOWN, ("export '" + "x" * 80 + "...' not present").encode()),
                   (7, p.REP_ERR_INVALID, b"Inconsistent lengths in option go"),
                   (7, p.REP_ERR_INVALID, b"option 'go' has unexpected length")]


def test_meta_contexts_ids_and_selection(conn):
    listed = replies(conn.receive(option(p.Opt.LIST_META_CONTEXT, meta("disk"))))
    assert [b for _, _, b in listed] == [b"\0\0\0\0base:allocation", b"\0\0\0\0qemu:allocation-depth",
                                         b"\0\0\0\0qemu:dirty-bitmap:b0", b""]
    refused = replies(conn.receive(option(p.Opt.SET_META_CONTEXT, meta("disk", "base:allocation"))))
    assert refused[0][1] == p.REP_ERR_INVALID
    conn.receive(option(p.Opt.STRUCTURED_REPLY))
    chosen = replies(conn.receive(option(p.Opt.SET_META_CONTEXT,
                                         meta("disk", "qemu:dirty-bitmap:b0", "qemu:", "base:allocation"))))
    assert [b for _, _, b in chosen] == [b"\0\0\0\0base:allocation", b"\0\0\0\x02qemu:dirty-bitmap:b0", b""]


def go(conn: p.ServerConnection, export: str = "disk") -> None:
    events = conn.receive(option(p.Opt.GO, name(export)))
    assert isinstance(events[-1], p.Started) and conn.transmitting


def request(command: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


def test_requests_are_checked_in_qemus_order(conn):
    conn.receive(option(p.Opt.STRUCTURED_REPLY))
    go(conn, "ro")
    events = conn.receive(request(p.Cmd.WRITE, 1048576, 512, 0x10, payload=b"\0" * 512)
                          + request(p.Cmd.READ, 1048576, 1, 0x10)
                          + request(p.Cmd.READ, 0, 1, 0x10)
                          + request(99))
    messages = [e.data[20 + 6:].decode() for e in events]
    assert messages == ["Export is read-only",
                        "operation past EOF; From: 1048576, Len: 1, Size: 1048576",
                        "unsupported flags for command read (got 0x10)",
                        "invalid request type (99) received"]


def test_write_split_across_reads_becomes_one_request(conn):
    go(conn)
    data = request(p.Cmd.WRITE, 4096, 8, payload=b"abcdefgh")
    assert conn.receive(data[:30]) == []
    events = conn.receive(data[30:])
    assert len(events) == 1 and isinstance(events[0], p.Request)
    assert events[0].data == b"abcdefgh" and events[0].offset == 4096


def test_overlong_write_is_answered_then_dropped(conn):
    go(conn)
    events = conn.receive(request(p.Cmd.WRITE, 0, p.MAX_BUFFER_SIZE + 1))
    assert isinstance(events[0], p.Send) and isinstance(events[1], p.Close)
    assert events[0].data == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.NBD_EINVAL, 7)


def test_bad_request_magic_is_answered_with_its_cookie_then_dropped(conn):
    go(conn)
    events = conn.receive(struct.pack(">IHHQQI", 0x1234, 0, 0, 99, 0, 0))
    assert events[0].data == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.NBD_EINVAL, 99)
    assert isinstance(events[1], p.Close)


def test_over_long_read_message_per_version():
    for stray, text in ((True, b"len (33554433 ) is"), (False, b"len (33554433) is")):
        conn = p.ServerConnection(Directory(DISK), p.ProtocolFeatures(stray_space_in_len_message=stray))
        conn.receive(struct.pack(">I", 3) + option(p.Opt.STRUCTURED_REPLY))
        go(conn)
        events = conn.receive(request(p.Cmd.READ, 0, p.MAX_BUFFER_SIZE + 1))
        assert text in events[0].data and not conn.closed


def test_block_status_needs_a_context_and_a_length(conn):
    conn.receive(option(p.Opt.STRUCTURED_REPLY))
    go(conn)
    first, second = conn.receive(request(p.Cmd.BLOCK_STATUS, 0, 0) + request(p.Cmd.BLOCK_STATUS, 0, 1))
    assert first.data.endswith(b"need non-zero length")
    assert second.data.endswith(b"CMD_BLOCK_STATUS not negotiated")


def test_reply_builders_follow_the_mode():
    conn = p.ServerConnection(Directory(DISK), p.ProtocolFeatures(extended_headers=True))
    conn.receive(struct.pack(">I", 3) + option(p.Opt.EXTENDED_HEADERS))
    req = p.Request(p.Cmd.READ, 0, 5, 4096, 8)
    assert conn.ok_reply(req) == struct.pack(">IHHQQQ", p.EXTENDED_REPLY_MAGIC, 1, 0, 5, 4096, 0)
    assert conn.hole_chunk(req, 4096, 8, True)[-12:] == struct.pack(">QI", 4096, 8)
    chunk = conn.block_status_chunk(req, 0, [(8, 3)], True)
    assert chunk[32:] == struct.pack(">IIQQ", 0, 1, 8, 3)


def test_extent_list_merges_and_stops_at_its_limit():
    extents = p.ExtentList(1)
    assert extents.add(10, 0) and extents.add(5, 0)
    assert not extents.add(3, 1) and not extents.add(3, 0)
    assert extents.extents == [(15, 0)]


@pytest.mark.parametrize("host,wire", [(errno.EROFS, 1), (errno.EIO, 5), (errno.EFBIG, 28),
                                       (errno.EOPNOTSUPP, 95), (errno.EACCES, 22), (0, 0)])
def test_error_mapping(host, wire):
    assert p.nbd_errno(host) == wire
