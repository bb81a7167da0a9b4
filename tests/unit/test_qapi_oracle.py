"""Live comparison with qemu-storage-daemon of every version (the oracles must
be installed).

Random damage to valid arguments, and arguments that only some versions
accept; whenever QEMU rejects them during argument checking, our message for
that version must be QEMU's, and when QEMU gets past argument checking, we
must accept them too.
"""
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time

import pytest

from qmpjobd.errors import QMPError
from qmpjobd.qapi import Schema
from qmpjobd.versions import KNOWN_VERSIONS

from tests.support.oracles import oracle_command

ARG_ERROR = re.compile(r"^(Parameter '.*' (is missing|is unexpected|expects .*|does not accept "
                       r"value .*)|Invalid parameter type for .*)$")
BASE = [
    ("blockdev-backup", {"job-id": "j0", "device": "src", "target": "dst", "sync": "full",
                         "x-perf": {"max-workers": 2}}),
    ("blockdev-mirror", {"device": "a", "target": "b", "sync": "full", "granularity": 65536}),
    ("block-job-set-speed", {"device": "j0", "speed": 5}),
    ("qmp_capabilities", {"enable": ["oob"]}),
    ("transaction", {"actions": [{"type": "blockdev-backup", "data": {
        "device": "a", "target": "b", "sync": "full"}}, {"type": "block-dirty-bitmap-add",
        "data": {"node": "a", "name": "b", "granularity": 65536}}],
        "properties": {"completion-mode": "grouped"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {"driver": "null-co", "size": 5},
                      "backing": None, "cache": {"direct": True}}),
    ("blockdev-add", {"driver": "nbd", "node-name": "n", "server": {
        "type": "inet", "host": "127.0.0.1", "port": "1", "to": 3}}),
    ("job-dismiss", {"id": "j"}),
]
# Arguments on which the versions disagree (qemu-versions.md sections 3, 4.5
# and 6); each is played on every version.
VERSION_PROBES = [
    ("blockdev-add", {"driver": "null-co", "node-name": "act", "active": False}),
    ("blockdev-add", {"driver": "gluster"}),
    ("blockdev-add", {"driver": "gluster", "volume": 1}),
    ("blockdev-add", {"driver": "io_uring"}),
    ("blockdev-add", {"driver": "virtio-blk-vhost-vdpa", "path": 5}),
    ("blockdev-add", {"driver": "blkdebug", "node-name": "bd", "image": {
        "driver": "null-co", "size": 1024}, "inject-error": [{"event": "read_aio",
                                                             "delay-ns": 1000}]}),
    ("blockdev-add", {"driver": "https", "url": 1, "force-range": True}),
    ("blockdev-add", {"driver": "https", "url": "x", "force-range": 1}),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1",
                                                  "port": "1", "keep-alive-count": "x"}}),
    ("blockdev-add", {"driver": "rbd", "pool": "p", "image": "i", "encrypt": {
        "format": "luks-any", "key-secret": 1}}),
    ("blockdev-add", {"driver": "qcow2", "file": "f", "discard-no-unref": 1}),
    ("blockdev-add", {"driver": "luks", "file": "f", "header": 1}),
    ("blockdev-backup", {"device": "x", "target": "y", "sync": "full", "discard-source": 1}),
    ("blockdev-backup", {"device": "x", "target": "y", "sync": "full",
                         "on-cbw-error": "break-snapshot"}),
    ("drive-backup", {"device": "x", "target": "y", "sync": "full", "on-cbw-error": "bogus"}),
    ("blockdev-backup", {"device": "x", "target": "y", "sync": "full",
                         "x-perf": {"min-cluster-size": "big"}}),
    ("blockdev-mirror", {"device": "x", "target": "y", "sync": "full", "target-is-zero": True}),
    ("query-block", {"flat": True}),
    ("query-block", {"flat": 1}),
    ("blockdev-create", {"job-id": "c", "options": {"driver": "luks", "size": 1, "header": 2}}),
    ("blockdev-create", {"job-id": "c", "options": {"driver": "gluster"}}),
    ("block-job-change", {"id": "x"}),
    ("block-job-change", {"id": "x", "type": "mirror"}),
    ("block-job-change", {"id": "x", "type": "mirror", "copy-mode": "bogus"}),
    ("blockdev-set-active", {"active": "yes"}),
    ("blockdev-set-active", {"node-name": "zz"}),
]
JUNK = [None, True, 1, -1, 1.5, 2**63, 2**64, "bogus", "", [], {}, [1], {"x": 1}, 2**32, 70000]


def _damage(rng, v):
    if isinstance(v, dict) and v and rng.random() < 0.8:
        v, key = dict(v), rng.choice(sorted(v))
        r = rng.random()
        if r < 0.3:
            del v[key]
        elif r < 0.5:
            for _ in range(rng.randint(1, 3)):
                v[rng.choice(["a", "b", "x", "extra", "data", "type", "zz"])] = 1
        else:
            v[key] = _damage(rng, v[key]) if r < 0.75 else rng.choice(JUNK)
        return v
    if isinstance(v, list) and v and rng.random() < 0.8:
        v = list(v)
        i = rng.randrange(len(v))
        v[i] = _damage(rng, v[i])
        return v
    return rng.choice(JUNK)


@pytest.fixture(params=KNOWN_VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture()
def qsd(tmp_path, version):
    path = str(tmp_path / "q.sock")
    # a missing oracle fails the tests; it never skips them
    proc = subprocess.Popen([*oracle_command(version), "--chardev", f"socket,id=c0,path={path},server=on,wait=off",
                             "--monitor", "chardev=c0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(path):
            break
        time.sleep(0.01)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    reader = sock.makefile("rb")
    reader.readline()

    def call(name, args):
        sock.sendall(json.dumps({"execute": name, "arguments": args}).encode())
        while True:
            reply = json.loads(reader.readline())
            if "event" not in reply:
                return reply

    call("qmp_capabilities", {})
    yield call
    sock.close()
    proc.kill()
    proc.wait()


def _ours(schema: Schema, name: str, args: dict) -> str | None:
    try:
        schema.validate(name, args)
    except QMPError as exc:
        return exc.desc
    return None


def _theirs(reply: dict) -> str | None:
    """QEMU's message if it refused the arguments themselves, else None."""
    theirs = reply.get("error", {}).get("desc")
    return theirs if theirs is not None and ARG_ERROR.match(theirs) else None


def test_random_arguments_match_qemu(qsd, version):
    schema, rng = Schema.load(version=version), random.Random(1234)
    for _ in range(150):
        name, args = rng.choice(BASE)
        args = _damage(rng, args)
        if not isinstance(args, dict):
            args = {"x": args}
        assert _ours(schema, name, args) == _theirs(qsd(name, args)), (name, args)


def test_version_specific_arguments_match_qemu(qsd, version):
    schema = Schema.load(version=version)
    for name, args in VERSION_PROBES:
        reply = qsd(name, args)
        if name not in schema.commands:
            # a command this version lacks: QEMU does not know it either
            assert reply["error"]["class"] == "CommandNotFound", (name, reply)
            continue
        assert _ours(schema, name, args) == _theirs(reply), (name, args, reply)
