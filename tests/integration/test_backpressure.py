"""Output bound, back-pressure and fairness over real sockets.

The bound (``--max-output-bytes``) is for clients that do not read. A client that
reads gets every reply, however its requests arrived and however large one reply
is; a client bursting requests must not make another client wait for the whole
burst. None of these tests measures time: fairness shows in the order of the
messages one client sees, and stalls in what the daemon does about them.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.support.daemons import RawClient

CAPS = b'{"execute":"qmp_capabilities"}'
BOUND = 1_000_000
SCHEMA_REPLY_MIN = 50_000      # one query-qmp-schema reply is about 66 KB


def negotiated(path: str) -> RawClient:
    client = RawClient(path, timeout=60.0)
    client.recv_message()  # greeting
    client.send(CAPS)
    assert client.recv_message() == b'{"return": {}}\r\n'
    return client


def schema_burst(count: int) -> bytes:
    return b"".join(b'{"execute":"query-qmp-schema","id":%d}' % i for i in range(count))


def reply_id(message: bytes) -> object:
    return json.loads(message).get("id")


@pytest.fixture
def bounded(qmpjobd_factory):
    """A daemon whose bound is small next to the output the tests ask for."""
    return qmpjobd_factory(
        "--max-output-bytes", str(BOUND),
        "--blockdev", "null-co,node-name=src,size=1048576",
        "--blockdev", "null-co,node-name=tgt,size=1048576",
    )


def test_a_burst_in_one_write_is_answered_in_full_to_a_reading_client(bounded):
    count = 60  # about 4 MB of replies, four times the bound
    client = negotiated(bounded.sockets[0])
    client.send(schema_burst(count))
    replies = [client.recv_message() for _ in range(count)]
    assert [reply_id(r) for r in replies] == list(range(count))
    assert all(len(r) > SCHEMA_REPLY_MIN for r in replies)
    assert len(set(r.replace(b'"id": %d}' % i, b"") for i, r in enumerate(replies))) == 1
    assert "disconnecting" not in bounded.stderr()


def test_one_reply_larger_than_the_bound_reaches_a_reading_client_whole(bounded):
    ident = "x" * (3 * BOUND)
    client = negotiated(bounded.sockets[0])
    client.send(json.dumps({"execute": "query-jobs", "id": ident}))
    assert client.recv_message() == b'{"return": [], "id": "%s"}\r\n' % ident.encode()
    client.send(b'{"execute":"query-jobs","id":"after"}')
    assert client.recv_message() == b'{"return": [], "id": "after"}\r\n'


def test_another_client_is_served_before_a_burst_is_finished(daemon):
    count = 200  # about 13 MB of replies: within the default bound, so none is cut
    burster, other = negotiated(daemon.sockets[0]), negotiated(daemon.sockets[0])
    burster.send(schema_burst(count))
    first = burster.recv_message()  # the burst has begun
    assert reply_id(first) == 0
    # The other client's job sends events to every client, the burster included:
    # where they land in the burster's stream shows when the job ran.
    other.send(b'{"execute":"blockdev-backup","arguments":{"job-id":"j","device":"src",'
               b'"target":"tgt","sync":"full"},"id":"b"}')
    while json.loads(other.recv_message()).get("id") != "b":
        pass
    stream: list[bytes] = []
    replies_left, job_done = count - 1, False
    while replies_left or not job_done:
        stream.append(burster.recv_message())
        replies_left -= stream[-1].startswith(b'{"return"')
        job_done = job_done or b'"status": "null"' in stream[-1]
    replies = [reply_id(m) for m in stream if m.startswith(b'{"return"')]
    assert replies == list(range(1, count))
    first_event = next(i for i, m in enumerate(stream) if m.startswith(b'{"timestamp"'))
    # Burst replies still came after the other client's job had started.
    assert any(m.startswith(b'{"return"') for m in stream[first_event:])


def test_requests_beyond_socket_buffers_are_read_as_the_client_reads(bounded):
    count = 50_000  # 1.7 MB of requests: the daemon must pause and resume reading
    client = negotiated(bounded.sockets[0])
    requests = b"".join(b'{"execute":"query-jobs","id":%d}' % i for i in range(count))
    sender = threading.Thread(target=client.sock.sendall, args=(requests,))
    sender.start()
    try:
        received = [client.recv_message() for _ in range(count)]
    finally:
        sender.join()
    assert received[0] == b'{"return": [], "id": 0}\r\n'
    assert [reply_id(m) for m in received] == list(range(count))


def test_replies_queued_before_a_half_close_are_all_sent(bounded):
    count = 40
    client = negotiated(bounded.sockets[0])
    client.send(schema_burst(count))
    client.sock.shutdown(socket.SHUT_WR)
    messages, closed = client.recv_until_quiet(30.0)
    assert [reply_id(m) for m in messages] == list(range(count))
    assert closed


def test_a_client_that_stops_reading_its_big_reply_is_cut_off(bounded):
    ident = "y" * (3 * BOUND)
    stuck = negotiated(bounded.sockets[0])
    stuck.send(json.dumps({"execute": "query-jobs", "id": ident}))
    # It never reads: once the daemon sees no progress it frees the output.
    deadline = time.monotonic() + 60.0
    while "disconnecting client" not in bounded.stderr():
        assert time.monotonic() < deadline, "the stalled client was never cut off"
        time.sleep(0.05)
    received = b""
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            received += stuck.recv_message()
    assert len(received) < len(ident)
    good = negotiated(bounded.sockets[0])
    good.send(b'{"execute":"query-jobs","id":"ok"}')
    assert good.recv_message() == b'{"return": [], "id": "ok"}\r\n'
