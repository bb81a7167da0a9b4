"""The export server's behaviour across clients, on qmpjobd and qemu-storage-daemon:
a client sending garbage is dropped and nobody else notices, many clients share one
export, max-connections holds later clients in the backlog, and block-export-del
(safe and hard) and nbd-server-stop treat connected clients as QEMU does.
"""

from __future__ import annotations

import subprocess

from tests.support import nbd_wire as w
from tests.support.nbd_setup import nbd_daemon, uri


def go(sock: str, export: str = "disk") -> w.WireClient:
    client = w.WireClient(sock)
    client.greeting()
    client.client_flags(3)
    assert client.option(w.OPT_STRUCTURED_REPLY)[-1][2] == hex(w.REP_ACK)
    assert client.option(w.OPT_GO, w.name_payload(export))[-1][2] == hex(w.REP_ACK)
    return client


def garbage_session(sock: str) -> list:
    readers = [go(sock) for _ in range(3)]
    out = [r.request(w.CMD_READ, 0, 4096) for r in readers]
    handshaking = w.WireClient(sock)
    handshaking.greeting()
    bad = go(sock)
    bad.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
    out.append(bad.at_eof())
    early = w.WireClient(sock)
    early.greeting()
    early.send(b"\xff" * 64)
    out.append(early.at_eof())
    # Everybody else goes on as before.
    out += [r.request(w.CMD_READ, 1048576, 65536) for r in readers]
    out.append(readers[0].request(w.CMD_WRITE, 2097152, 512, 0, b"\x11" * 512))
    out.append(readers[1].request(w.CMD_READ, 2097152, 512))
    handshaking.client_flags(3)
    out.append(handshaking.option(w.OPT_LIST))
    for client in readers + [handshaking, bad, early]:
        client.close()
    return out


def compare(session, **options) -> list:
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, **options) as (daemon, qmp, sock):
            results.append(session(qmp, sock))
    assert results[1] == results[0]
    return results[1]


def test_garbage_client_is_dropped_and_nobody_else_notices():
    out = compare(lambda qmp, sock: garbage_session(sock))
    assert out[3] is True and out[4] is True
    assert out[-1][-1][2] == hex(w.REP_ACK)


def delete_session(qmp, sock: str) -> list:
    client = go(sock)
    out: list = [qmp.cmd("block-export-del", id="e0"),
                 qmp.cmd("block-export-del", id="e0", mode="safe"),
                 qmp.cmd("query-block-exports"),
                 client.request(w.CMD_READ, 0, 512)]
    out.append(qmp.cmd("block-export-del", id="e0", mode="hard"))
    out.append(client.at_eof())
    out.append(qmp.cmd("query-block-exports"))   # by now the deletion has happened
    out.append(list(qmp.events))
    qmp.events.clear()
    # (A client still in its handshake would hold up QEMU's nbd-server-stop until
    # the handshake times out; qmpjobd drops it at once. Not compared.)
    reader = go(sock, "nul")
    out.append(qmp.cmd("nbd-server-stop"))
    out.append(list(qmp.events))
    out.append(reader.at_eof())
    for c in (client, reader):
        c.close()
    return out


def test_export_deletion_with_clients():
    out = compare(delete_session)
    assert out[0]["error"]["desc"] == "export 'e0' still in use"
    assert out[5] is True


def test_many_clients_and_nbdcopy_connections():
    def session(qmp, sock):
        clients = [go(sock) for _ in range(20)]
        replies = [c.request(w.CMD_READ, 65536 * (i % 4), 65536) for i, c in enumerate(clients)]
        for c in clients:
            c.close()
        done = subprocess.run(["nbdcopy", "--connections=4", "--requests=16", uri(sock), "null:"],
                              capture_output=True, text=True, timeout=60)
        return replies, done.returncode, done.stderr

    replies, status, _ = compare(session)
    assert status == 0


def test_max_connections_holds_later_clients_in_the_backlog():
    def session(qmp, sock):
        first = w.WireClient(sock)
        first.greeting()
        first.client_flags(3)
        # Connected (in the backlog) but not served while the first is there.
        second = w.WireClient(sock, timeout=10)
        info = first.option(w.OPT_INFO, w.name_payload("nul"))   # no CAN_MULTI_CONN
        aborted = first.option(w.OPT_ABORT)
        first.close()
        greeting = second.greeting()                 # served once the first left
        second.close()
        return info, aborted, greeting

    info, aborted, greeting = compare(session, max_connections=1)
    assert info[-2][3][-2:] == b"\x04\x8f"[:0] + (0x040F).to_bytes(2, "big")
    assert greeting[0] == b"NBDMAGIC"
