"""blkdebug rules met by NBD requests, against qemu-storage-daemon 7.2, 10.0, 11.1.

Rule order: a raw node on a blkdebug node on a file is exported writable. The raw
parent announces ``read_aio``/``write_aio`` before each request, which activates
the rules of that event (replacing the active list); the first matching rule of
the active list, in the order the rules were given, fails the request.

Zero-length requests: the blkdebug node itself is exported with rules active from
the start (event ``none``). QEMU passes an aligned zero-length read or write down
to the driver, where the rules fail it; sent on the wire, in simple and structured
mode, they must get QEMU's answers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import nbd_wire as w
from tests.support.daemons import DaemonProcess, QMPSession

VERSIONS = ("7.2", "10.0", "11.1")

READ_EIO = {"event": "read_aio", "errno": 5, "iotype": "read"}
WRITE_ENOSPC = {"event": "write_aio", "errno": 28}
READ_ANY_ENOSPC = {"event": "read_aio", "errno": 28}
ONCE_ANY = {"event": "read_aio", "errno": 1, "once": True}

RULE_SETS = {
    "two-events": [READ_EIO, WRITE_ENOSPC],
    "two-events-reversed": [WRITE_ENOSPC, READ_EIO],
    "one-event": [READ_EIO, READ_ANY_ENOSPC],
    "one-event-reversed": [READ_ANY_ENOSPC, READ_EIO],
    "once-first": [ONCE_ANY, READ_EIO, WRITE_ENOSPC],
    "by-sector": [{"event": "read_aio", "errno": 5, "sector": 8}, WRITE_ENOSPC],
}

# Through the raw parent: requests with data (the raw driver announces the events).
RAW_REQUESTS = [
    (w.CMD_READ, 0, 4096), (w.CMD_WRITE, 0, 4096, 0, b"\x11" * 4096), (w.CMD_FLUSH,),
    (w.CMD_READ, 8192, 4096), (w.CMD_READ, 0, 4096), (w.CMD_READ, 4096, 512),
    (w.CMD_WRITE, 4096, 512, 0, b"\x22" * 512), (w.CMD_READ, 0, 4096),
    (w.CMD_FLUSH,), (w.CMD_READ, 0, 4096, 4),
]

# The blkdebug node exported itself, with rules active from the start ("none"):
# zero-length reads and writes reach the rules as they do in QEMU.
DIRECT_RULES = [{"event": "none", "errno": 5, "iotype": "read"},
                {"event": "none", "errno": 28}]
DIRECT_REQUESTS = [
    (w.CMD_READ, 0, 0), (w.CMD_WRITE, 0, 0), (w.CMD_READ, 512, 0), (w.CMD_READ, 0, 0, 4),
    (w.CMD_READ, 0, 4096), (w.CMD_WRITE, 0, 4096, 0, b"\x11" * 4096), (w.CMD_FLUSH,),
    (w.CMD_READ, 1048576, 0),
]


def session(sock: str, structured: bool, requests: list) -> list:
    client = w.WireClient(sock)
    out: list = [client.greeting()]
    client.client_flags(3)
    if structured:
        out.append(client.option(w.OPT_STRUCTURED_REPLY))
    out.append(client.option(w.OPT_GO, w.name_payload("img")))
    for request in requests:
        try:
            out.append(client.request(*request))
        except w.Closed:
            out.append("closed")
            break
    client.close()
    return out


def play(kind: str, version: str, work: Path, rules: list, structured: bool,
         direct: bool = False) -> list:
    subprocess.run(["qemu-img", "create", "-f", "raw", "a.raw", "1M"], cwd=work,
                   check=True, capture_output=True)
    sock = str(work / "nbd.sock")
    with DaemonProcess(kind, workdir=work, version=version) as daemon:
        s = QMPSession(daemon, timeout=60)
        blkdebug = {"driver": "blkdebug", "node-name": "d", "inject-error": rules,
                    "image": {"driver": "file", "filename": "a.raw"}}
        added = s.command("blockdev-add", blkdebug if direct else {
            "driver": "raw", "node-name": "r", "file": blkdebug})
        s.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        exported = s.command("block-export-add", {"type": "nbd", "id": "e", "node-name": "d" if direct else "r",
                                                  "name": "img", "writable": True})
        out = [added, exported,
               session(sock, structured, DIRECT_REQUESTS if direct else RAW_REQUESTS)]
        s.close()
    return out


def compare(tmp_path: Path, version: str, rules: list, structured: bool,
            direct: bool) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        work = tmp_path / kind
        work.mkdir()
        results[kind] = play(kind, version, work, rules, structured, direct)
    theirs, ours = results["qsd"], results["qmpjobd"]
    assert theirs[0] == {"return": {}} and theirs[1] == {"return": {}}, theirs
    assert ours == theirs


@pytest.mark.parametrize("rules", sorted(RULE_SETS))
@pytest.mark.parametrize("version", VERSIONS)
def test_rule_order_like_qsd(tmp_path: Path, version: str, rules: str) -> None:
    compare(tmp_path, version, RULE_SETS[rules], structured=False, direct=False)


@pytest.mark.parametrize("structured", (False, True), ids=("simple", "structured"))
@pytest.mark.parametrize("version", VERSIONS)
def test_zero_length_requests_like_qsd(tmp_path: Path, version: str,
                                       structured: bool) -> None:
    compare(tmp_path, version, DIRECT_RULES, structured, direct=True)
