"""Live comparison with qemu-storage-daemon 7.2 (the oracle must be installed).

Random damage to valid arguments; whenever QEMU rejects them during argument
checking, our message must be QEMU's, and when QEMU gets past argument
checking, we must accept them too.
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

from tests.support.daemons import oracle_path

QSD = oracle_path()  # a missing oracle fails the tests; it never skips them
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


@pytest.fixture()
def qsd(tmp_path):
    path = str(tmp_path / "q.sock")
    proc = subprocess.Popen([QSD, "--chardev", f"socket,id=c0,path={path},server=on,wait=off",
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


def test_random_arguments_match_qemu(qsd):
    schema, rng = Schema.load(), random.Random(1234)
    for _ in range(150):
        name, args = rng.choice(BASE)
        args = _damage(rng, args)
        if not isinstance(args, dict):
            args = {"x": args}
        try:
            schema.validate(name, args)
            ours = None
        except QMPError as exc:
            ours = exc.desc
        reply = qsd(name, args)
        theirs = reply.get("error", {}).get("desc")
        if theirs is not None and not ARG_ERROR.match(theirs):
            theirs = None
        assert ours == theirs, (name, args)
