"""NBD protocol corners byte for byte: every option and request below is sent to
qemu-storage-daemon and to qmpjobd of the same version, and the decoded replies
(and where the connection ends) must be identical. Covers what real clients never
send: bad flags, bad magics, over-long lengths, unknown options and commands,
option payloads that lie, meta-context queries of every shape, simple and
structured replies, and the extended headers of 10.0 and 11.1.
"""

from __future__ import annotations

from tests.support.oracles import SUPPORTED_VERSIONS

import struct

import pytest

from tests.support import nbd_wire as w
from tests.support.nbd_setup import nbd_daemon

VERSIONS = SUPPORTED_VERSIONS


def compare(version: str, session) -> list:
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, version) as (daemon, qmp, sock):
            results.append(session(sock))
    theirs, ours = results
    assert ours == theirs
    return ours


def connect(sock: str, flags: int = 3) -> tuple[w.WireClient, tuple]:
    client = w.WireClient(sock)
    greeting = client.greeting()
    client.client_flags(flags)
    return client, greeting


def options_session(sock: str) -> list:
    client, greeting = connect(sock)
    out: list = [greeting]
    for option, payload in [
        (w.OPT_LIST, b""), (w.OPT_LIST, b"x"), (w.OPT_STARTTLS, b""), (99, b"abc"),
        (w.OPT_EXTENDED_HEADERS, b"x"),
        (w.OPT_INFO, w.name_payload("nosuch")), (w.OPT_INFO, w.name_payload("disk")),
        (w.OPT_INFO, w.name_payload("disk", 1, 3)), (w.OPT_INFO, w.name_payload("nul", 2)),
        (w.OPT_INFO, w.name_payload("n" * 100)),
        (w.OPT_INFO, w.name_payload("disk") + b"z"),
        (w.OPT_INFO, struct.pack(">I", 9) + b"disk"),
        (w.OPT_INFO, struct.pack(">I", 5000)),
        (w.OPT_GO, b"\0\0"),
        (w.OPT_INFO, w.name_payload("di\0k")),
        (w.OPT_LIST_META, w.meta_payload("disk")),
        (w.OPT_LIST_META, w.meta_payload("disk", "qemu:")),
        (w.OPT_LIST_META, w.meta_payload("disk", "qemu:dirty-bitmap:")),
        (w.OPT_LIST_META, w.meta_payload("disk", "base:")),
        (w.OPT_LIST_META, w.meta_payload("disk", "base:allocation", "qemu:allocation-depth",
                                         "x:y", "qemu:nothing", "abc")),
        (w.OPT_LIST_META, w.meta_payload("nul", "qemu:allocation-depth", "base:allocation")),
        (w.OPT_LIST_META, w.meta_payload("nosuch")),
        (w.OPT_LIST_META, w.meta_payload("disk", "ba\0e:allocation")),
        (w.OPT_LIST_META, w.meta_payload("disk")[:-2]),
        (w.OPT_SET_META, w.meta_payload("disk", "base:allocation")),
        (w.OPT_STRUCTURED_REPLY, b"x"),
        (w.OPT_STRUCTURED_REPLY, b""), (w.OPT_STRUCTURED_REPLY, b""),
        (w.OPT_SET_META, w.meta_payload("disk", "qemu:", "base:")),
        (w.OPT_SET_META, w.meta_payload("disk", "qemu:allocation-depth", "base:allocation")),
        (w.OPT_INFO, w.name_payload("disk")),
        (w.OPT_SET_META, w.meta_payload("nosuch", "base:allocation")),
        (w.OPT_GO, w.name_payload("disk")),
    ]:
        out.append(client.option(option, payload))
    out.append(client.request(w.CMD_BLOCK_STATUS, 0, 1 << 20))
    client.close()
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_options(version):
    out = compare(version, options_session)
    assert out[1][-1][2] == hex(w.REP_ACK)


def transmission_session(sock: str, structured: bool) -> list:
    client, _ = connect(sock)
    out: list = []
    if structured:
        out.append(client.option(w.OPT_STRUCTURED_REPLY))
        out.append(client.option(w.OPT_SET_META, w.meta_payload(
            "disk", "base:allocation", "qemu:allocation-depth")))
    out.append(client.option(w.OPT_GO, w.name_payload("disk")))
    for args in [
        (w.CMD_READ, 0, 262144), (w.CMD_READ, 0, 131072, 4), (w.CMD_READ, 65536, 65536),
        (w.CMD_READ, 0, 0), (w.CMD_READ, 4193792, 1024), (w.CMD_READ, 4194304, 0),
        (w.CMD_READ, 0, 512, 0x10), (w.CMD_READ, 0, 512, 4), (w.CMD_READ, 0, 33554433),
        (w.CMD_BLOCK_STATUS, 0, 4194304), (w.CMD_BLOCK_STATUS, 0, 4194304, 8),
        (w.CMD_BLOCK_STATUS, 65536, 2000000), (w.CMD_BLOCK_STATUS, 0, 0),
        (w.CMD_BLOCK_STATUS, 0, 512, 1), (w.CMD_BLOCK_STATUS, 0, 512, 2),
        (w.CMD_WRITE, 2097152, 4096, 0, b"\xcc" * 4096),
        (w.CMD_WRITE, 2101248, 4096, 1, b"\xdd" * 4096),
        (w.CMD_WRITE, 4194304, 512, 0, b"\0" * 512),
        (w.CMD_WRITE_ZEROES, 3145728, 65536, 0x10), (w.CMD_WRITE_ZEROES, 3211264, 65536, 2),
        (w.CMD_WRITE_ZEROES, 3276800, 65536, 0), (w.CMD_WRITE_ZEROES, 4194304, 512),
        (w.CMD_WRITE_ZEROES, 0, 512, 4),
        (w.CMD_TRIM, 3342336, 65536), (w.CMD_TRIM, 3342336, 65536, 1), (w.CMD_TRIM, 0, 512, 2),
        (w.CMD_FLUSH,), (w.CMD_FLUSH, 0, 0, 2), (w.CMD_FLUSH, 0, 0, 1),
        (w.CMD_CACHE, 0, 65536), (w.CMD_CACHE, 0, 33554433), (w.CMD_CACHE, 0, 512, 4),
        (99,), (99, 0, 0, 2), (99, 4194304, 1),
        (w.CMD_READ, 2097152, 8192), (w.CMD_BLOCK_STATUS, 2097152, 2097152),
        (w.CMD_READ, 0, 512, 0, b"", 0x12345678),
    ]:
        out.append(client.request(*args))
    out.append(client.at_eof())
    client.close()
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("structured", [True, False])
def test_transmission(version, structured):
    out = compare(version, lambda sock: transmission_session(sock, structured))
    assert out[-1] is True          # a bad request magic ends the connection


def read_only_session(sock: str) -> list:
    client, _ = connect(sock)
    out = [client.option(w.OPT_STRUCTURED_REPLY),
           client.option(w.OPT_SET_META, w.meta_payload("nul", "base:allocation")),
           client.option(w.OPT_GO, w.name_payload("nul"))]
    for args in [(w.CMD_WRITE, 0, 512, 0, b"\0" * 512), (w.CMD_TRIM, 0, 512),
                 (w.CMD_WRITE_ZEROES, 0, 512), (w.CMD_WRITE, 1048576, 512, 0, b"\0" * 512),
                 (w.CMD_BLOCK_STATUS, 0, 1048576), (w.CMD_READ, 0, 4096)]:
        out.append(client.request(*args))
    out.append(client.request(w.CMD_DISC))
    client.close()
    return out


def test_read_only_export():
    out = compare("7.2", read_only_session)
    assert out[-1] == ["EOF"]


def ending_session(sock: str) -> list:
    """Each of these ends its connection (or not) in QEMU's way."""
    out = []
    for flags in (7, 0x100):
        client, _ = connect(sock, flags)
        out.append(client.at_eof())
        client.close()
    for magic in (0x1234, w.OPTS_MAGIC):
        client, _ = connect(sock)
        out.append(client.option(w.OPT_LIST, magic=magic, length=33554433 if magic == w.OPTS_MAGIC else 0))
        client.close()
    client, _ = connect(sock, 0)            # not fixed newstyle
    out.append(client.option(w.OPT_LIST))
    client.close()
    client, _ = connect(sock, 0)
    out.append(client.export_name("disk", 134))
    client.close()
    client, _ = connect(sock)
    out.append(client.option(w.OPT_ABORT))
    client.close()
    client, _ = connect(sock)
    out.append(client.option(w.OPT_STARTTLS, b"x"))
    client.close()
    for name, size in (("disk", 10), ("nosuch", 10), ("x" * 4097, 10)):
        client, _ = connect(sock)
        out.append(client.export_name(name, size))
        client.close()
    client, _ = connect(sock)
    out.append(client.option(w.OPT_STRUCTURED_REPLY))
    out.append(client.export_name("nul", 10))
    out.append(client.request(w.CMD_READ, 0, 4096))
    out.append(client.request(w.CMD_WRITE, 0, 33554433, 0, b"\0" * 16))
    client.close()
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_connection_endings(version):
    compare(version, ending_session)


def extended_session(sock: str) -> list:
    client, _ = connect(sock)
    out = [client.option(w.OPT_EXTENDED_HEADERS), client.option(w.OPT_EXTENDED_HEADERS),
           client.option(w.OPT_STRUCTURED_REPLY),
           client.option(w.OPT_SET_META, w.meta_payload("disk", "base:allocation",
                                                        "qemu:allocation-depth")),
           client.option(w.OPT_INFO, w.name_payload("disk")),
           client.option(w.OPT_GO, w.name_payload("disk"))]
    for args in [
        (w.CMD_READ, 0, 262144), (w.CMD_READ, 0, 131072, 4), (w.CMD_READ, 4194304, 512),
        (w.CMD_BLOCK_STATUS, 0, 4194304), (w.CMD_BLOCK_STATUS, 0, 4194304, 8),
        (w.CMD_BLOCK_STATUS, 0, 12, 0x20, struct.pack(">QI", 4194304, 1)),
        (w.CMD_BLOCK_STATUS, 0, 12, 0x20, struct.pack(">QI", 4194304, 7)),
        (w.CMD_BLOCK_STATUS, 0, 4, 0x20, b"\0" * 4),
        (w.CMD_FLUSH,), (w.CMD_WRITE, 3670016, 512, 0x20, b"\xee" * 512),
        (w.CMD_WRITE, 3670016, 512, 0, b"\xee" * 512),
        (w.CMD_WRITE_ZEROES, 3145728, 65536), (w.CMD_TRIM, 0, 512, 0x20, b"\0" * 512),
        (w.CMD_FLUSH, 0, 4, 0x20, b"abcd"), (w.CMD_READ, 0, 512, 0x20, b"\0" * 512),
        (w.CMD_READ, 0, 33554433), (99,),
        (w.CMD_READ, 0, 512, 0, b"", w.REQUEST_MAGIC),
    ]:
        out.append(client.request(*args))
    out.append(client.at_eof())
    client.close()
    client, _ = connect(sock)
    out.append(client.option(w.OPT_EXTENDED_HEADERS))
    out.append(client.option(w.OPT_GO, w.name_payload("disk")))
    out.append(client.request(w.CMD_READ, 0, 33554433, 0x20))
    client.close()
    client, _ = connect(sock)
    out.append(client.option(w.OPT_EXTENDED_HEADERS))
    out.append(client.export_name("disk", 10))
    client.close()
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_extended_headers(version):
    out = compare(version, extended_session)
    if version == "7.2":
        assert out[0][-1][3] == b"Unsupported option 11 (<unknown>)"
    else:
        assert out[0][-1][2] == hex(w.REP_ACK)
