"""Daemon exit with NBD exports: like qemu-storage-daemon, every export is deleted
(BLOCK_EXPORT_DELETED, oldest first on 7.2 and newest first from 10.0) before quit's
reply; the NBD server's unix socket file is left as QEMU leaves it."""

from __future__ import annotations

import os

import pytest

from tests.integration.procs import negotiated, read_until_eof
from tests.support.daemons import DaemonProcess
from tests.support.oracles import SUPPORTED_VERSIONS


def quit_with_exports(kind: str, version: str) -> tuple[list[str], bool]:
    proc = DaemonProcess(kind, version=version)
    nbd = str(proc.tmp / "nbd.sock")
    proc.extra_args = ["--blockdev", "null-co,node-name=n",
                       "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                       "--export", "type=nbd,id=first,node-name=n",
                       "--export", "type=nbd,id=second,node-name=n,name=other"]
    with proc:
        client = negotiated(proc.sockets[0])
        assert os.path.exists(nbd)
        client.send(b'{"execute":"quit","id":"q"}')
        messages = read_until_eof(client)
        proc.proc.wait(20)
        return messages, os.path.exists(nbd)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_exit_deletes_every_export_as_qemu_does(version):
    theirs, theirs_left = quit_with_exports("qsd", version)
    ours, ours_left = quit_with_exports("qmpjobd", version)
    assert ours == theirs
    assert len(ours) == 3 and ours[-1] == '{"id": "q", "return": {}}'
    # QEMU leaves the NBD server's socket file at exit (only nbd-server-stop
    # removes it); so does qmpjobd.
    assert ours_left == theirs_left
