"""object-add/-del and the qom-* commands, played on qmpjobd --qemu-version V
and on the real qemu-storage-daemon V: every reply must be identical.

Only the daemons' own temporary directories (inside socket paths) are
normalised.  A missing oracle fails these tests (tests.support.oracles).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.procs import negotiated
from tests.support.daemons import DaemonProcess
from qmpjobd.versions import KNOWN_VERSIONS


def sequence(workdir: Path) -> list[tuple[str, dict]]:
    secret_file = workdir / "secret.txt"
    secret_file.write_text("from-a-file")
    b64_file = workdir / "secret.b64"
    b64_file.write_text("aGVsbG8=")
    return [
        ("qom-list", {"path": "/"}),
        ("qom-list", {"path": "/objects"}),
        ("qom-list", {"path": "/chardevs"}),
        ("qom-list", {"path": "c0"}),
        ("qom-get", {"path": "/chardevs/c0", "property": "addr"}),
        ("qom-get", {"path": "/chardevs/c0", "property": "connected"}),
        # iothread: range checks at creation, defaults, qom-set
        ("object-add", {"qom-type": "iothread", "id": "io0", "poll-grow": -1}),
        ("object-add", {"qom-type": "iothread", "id": "io0", "aio-max-batch": -5}),
        ("object-add", {"qom-type": "iothread", "id": "io0", "thread-pool-min": 10,
                        "thread-pool-max": 5}),
        ("object-add", {"qom-type": "iothread", "id": "io0", "poll-max-ns": 1000}),
        ("object-add", {"qom-type": "iothread", "id": "io0"}),
        ("object-add", {"qom-type": "iothread", "id": "bad id"}),
        ("qom-list", {"path": "/"}),
        ("qom-list", {"path": "/objects/io0"}),
        ("qom-list", {"path": "io0"}),
        ("qom-list", {"path": "objects/io0"}),
        ("qom-list", {"path": "//objects/"}),
        ("qom-list", {"path": ""}),
        ("qom-list", {"path": "nope"}),
        ("qom-list", {"path": "/objects/nope"}),
        *[("qom-get", {"path": "/objects/io0", "property": p}) for p in (
            "type", "poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch",
            "thread-pool-min", "thread-pool-max", "nope")],
        ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 77}),
        ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}),
        ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": "x"}),
        ("qom-set", {"path": "/objects/io0", "property": "poll-shrink", "value": -1}),
        ("qom-set", {"path": "/objects/io0", "property": "type", "value": "x"}),
        ("qom-set", {"path": "/objects/io0", "property": "thread-pool-max", "value": 3}),
        ("qom-get", {"path": "/objects/io0", "property": "thread-pool-max"}),
        ("qom-get", {"path": "/objects", "property": "io0"}),
        ("qom-get", {"path": "/objects", "property": "type"}),
        ("qom-set", {"path": "/objects", "property": "type", "value": "x"}),
        # secrets
        ("object-add", {"qom-type": "secret", "id": "s0"}),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": "!!", "format": "base64"}),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": "x", "file": str(secret_file)}),
        ("object-add", {"qom-type": "secret", "id": "s0", "file": str(workdir / "missing")}),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": "aGVsbG8=", "format": "base64"}),
        ("object-add", {"qom-type": "secret", "id": "s1", "file": str(secret_file)}),
        ("object-add", {"qom-type": "secret", "id": "s2", "file": str(b64_file),
                        "format": "base64"}),
        ("object-add", {"qom-type": "secret", "id": "s3", "data": "x", "keyid": "s0"}),
        ("qom-list", {"path": "/objects/s0"}),
        *[("qom-get", {"path": f"/objects/{s}", "property": p})
          for s in ("s0", "s1") for p in ("data", "file", "format", "iv", "keyid", "loaded")],
        ("qom-set", {"path": "/objects/s0", "property": "format", "value": "raw"}),
        ("qom-get", {"path": "/objects/s0", "property": "format"}),
        # throttle groups
        ("object-add", {"qom-type": "throttle-group", "id": "t1", "limits": {"iops-total": -1}}),
        ("object-add", {"qom-type": "throttle-group", "id": "t1",
                        "limits": {"iops-total": 10, "iops-read": 5}}),
        ("object-add", {"qom-type": "throttle-group", "id": "t1", "limits": {"iops-total-max": 10}}),
        ("object-add", {"qom-type": "throttle-group", "id": "t1",
                        "limits": {"iops-total": 10, "iops-total-max": 5}}),
        ("object-add", {"qom-type": "throttle-group", "id": "t1",
                        "limits": {"bps-total": 10, "bps-total-max-length": 5}}),
        ("object-add", {"qom-type": "throttle-group", "id": "t1", "limits": {"iops-size": 4096}}),
        ("object-add", {"qom-type": "throttle-group", "id": "t1", "x-iops-total": 7,
                        "limits": {"bps-total": 5}}),
        ("qom-list", {"path": "/objects/t1"}),
        ("qom-get", {"path": "/objects/t1", "property": "limits"}),
        ("qom-get", {"path": "/objects/t1", "property": "x-iops-total"}),
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": {"bps-read": 9}}),
        ("qom-set", {"path": "/objects/t1", "property": "limits", "value": {"iops-total": 99}}),
        ("qom-get", {"path": "/objects/t1", "property": "limits"}),
        ("qom-set", {"path": "/objects/t1", "property": "x-bps-total", "value": 4}),
        # types the daemon lacks or qmpjobd does not make are refused
        ("object-add", {"qom-type": "memory-backend-ram", "id": "m0", "size": 1024}),
        ("object-add", {"qom-type": "can-bus", "id": "cb"}),
        ("object-add", {"qom-type": "iothread", "id": "t1"}),
        ("qom-list", {"path": "/objects"}),
        ("object-del", {"id": "s1"}),
        ("object-del", {"id": "s1"}),
        ("object-del", {"id": "chardevs"}),
        ("object-del", {"id": "compat_monitor0"}),
        ("qom-list", {"path": "/objects"}),
        # x-blockdev-set-iothread (safe cases only: QEMU aborts on some others)
        ("blockdev-add", {"driver": "raw", "node-name": "r0",
                          "file": {"driver": "null-co", "node-name": "n0"}}),
        ("x-blockdev-set-iothread", {"node-name": "nope", "iothread": "io0"}),
        ("x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io0"}),
        ("x-blockdev-set-iothread", {"node-name": "r0", "iothread": "nope"}),
        ("x-blockdev-set-iothread", {"node-name": "r0", "iothread": "io0"}),
        ("x-blockdev-set-iothread", {"node-name": "r0", "iothread": None}),
        # 11.1's qom-list-get (CommandNotFound before)
        ("qom-list-get", {"paths": ["/objects/io0", "/objects", "/chardevs/c0"]}),
        ("qom-list-get", {"paths": ["/objects/t1", "/nope"]}),
        # the class lists
        ("qom-list-types", {}),
        ("qom-list-types", {"abstract": True}),
        ("qom-list-types", {"implements": "chardev"}),
        ("qom-list-types", {"implements": "chardev", "abstract": True}),
        ("qom-list-types", {"implements": "user-creatable"}),
        ("qom-list-types", {"implements": "nope"}),
        *[("qom-list-properties", {"typename": t}) for t in (
            "iothread", "secret", "throttle-group", "chardev-socket", "chardev", "object",
            "secret_common", "nope", "container")],
    ]


def play(kind: str, version: str, steps: list[tuple[str, dict]]) -> list[str]:
    with DaemonProcess(kind, version=version) as daemon:
        client = negotiated(daemon.sockets[0])
        replies = []
        for name, arguments in steps:
            client.send(json.dumps({"execute": name, "arguments": arguments}))
            while True:
                message = client.recv_message(timeout=20).decode()
                if not message.startswith('{"event"'):
                    break
            replies.append(f"{name} {json.dumps(arguments)} -> "
                           + message.replace(str(daemon.tmp), "<tmp>").rstrip())
        return replies


OBJECT_OPTIONS = ["--object", "iothread,id=io0,poll-max-ns=5",
                  "--object", '{"qom-type": "secret", "id": "s0", "data": "aGk=", "format": "base64"}',
                  "--object", "throttle-group,id=tg,limits.iops-total=10,x-bps-read=3"]
OBJECT_QUERIES = [("qom-list", {"path": "/objects"}),
                  ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}),
                  ("qom-get", {"path": "/objects/s0", "property": "format"}),
                  ("qom-get", {"path": "/objects/tg", "property": "limits"})]


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_object_option_equals_qsd(version):
    """--object in keyval and JSON form: the same objects as qemu-storage-daemon."""
    def on(kind: str) -> list[str]:
        with DaemonProcess(kind, extra_args=OBJECT_OPTIONS, version=version) as daemon:
            client = negotiated(daemon.sockets[0])
            out = []
            for name, arguments in OBJECT_QUERIES:
                client.send(json.dumps({"execute": name, "arguments": arguments}))
                out.append(client.recv_message(timeout=20).decode())
            return out
    assert on("qmpjobd") == on("qsd")


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_qom_replies_equal_qsd(version, tmp_path):
    steps = sequence(tmp_path)
    ours = play("qmpjobd", version, steps)
    theirs = play("qsd", version, steps)
    assert ours == theirs
