"""Real NBD clients against qmpjobd and qemu-storage-daemon 7.2, in the same test:
qemu-img, qemu-io, qemu-nbd --list, nbdinfo, nbdcopy and libnbd's Python module
must see the same thing on both (the set-up is tests/support/nbd_setup.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.support.nbd_setup import DISK_SIZE, nbd_daemon, normalise, uri

PROBE = Path(__file__).with_name("nbd_libnbd_probe.py")
SYSTEM_PYTHON = "/usr/bin/python3"


def run(argv: list[str], daemon) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    # qemu-io prints a timing line after each operation.
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "ops/sec" not in line]
    return normalise(f"[exit {done.returncode}]\n" + "\n".join(lines), daemon)


def both(session) -> tuple[object, object]:
    """``session(daemon, qmp, sock)`` on qemu-storage-daemon, then on qmpjobd."""
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind) as (daemon, qmp, sock):
            results.append(session(daemon, qmp, sock))
    return results[0], results[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_listing_and_info_tools():
    def session(daemon, qmp, sock):
        return [run(argv, daemon) for argv in (
            ["nbdinfo", "--list", f"nbd+unix://?socket={sock}"],
            ["nbdinfo", "--json", uri(sock)],
            ["nbdinfo", "--map", uri(sock)],
            ["nbdinfo", "--map=qemu:allocation-depth", uri(sock)],
            ["nbdinfo", "--map=qemu:allocation-depth", uri(sock, "nul")],
            ["nbdinfo", "--map", "--totals", uri(sock)],
            ["nbdinfo", "--size", uri(sock, "nul")],
            ["nbdinfo", "--can", "trim", uri(sock)],
            ["nbdinfo", "--is", "read-only", uri(sock, "nul")],
            ["nbdinfo", uri(sock, "nosuch")],
            ["qemu-nbd", "--list", "-k", sock],
            ["qemu-img", "info", uri(sock)],
            ["qemu-img", "map", "--output=json", uri(sock)],
            ["qemu-img", "map", "--output=json", uri(sock, "nul")],
        )]

    theirs, ours = both(session)
    assert ours == theirs
    assert "can_multi_conn: true" in ours[0] and "description: Test disk" in ours[0]


def test_qemu_io_reads_writes_zeroes_discards():
    def session(daemon, qmp, sock):
        out = [run(["qemu-io", "-f", "raw",
                    "-c", "read -P 0xaa 0 64k", "-c", "read -P 0xbb 1M 128k",
                    "-c", "read -P 0 64k 64k",
                    "-c", "write -P 0xcc 2M 64k", "-c", "write -P 0xdd 2304k 4k",
                    "-c", "write -z 3M 64k", "-c", "write -z -u 3200k 64k",
                    "-c", "discard 1M 64k", "-c", "flush",
                    "-c", "read -P 0xcc 2M 64k", "-c", "read -P 0 3M 64k",
                    uri(sock)], daemon),
               run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k",
                    "-c", "write 0 4k", uri(sock, "nul")], daemon),
               run(["qemu-io", "-f", "raw", "-c", "read 0 4k", uri(sock, "nul")], daemon),
               run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xaa 0 4k", uri(sock, "nul")], daemon),
               run(["qemu-img", "map", "--output=json", uri(sock)], daemon)]
        out.append(sha(daemon.tmp / "disk.raw"))
        out.append(qmp.ok("query-blockstats", **{"query-nodes": True}))
        return out

    theirs, ours = both(session)
    assert ours == theirs
    assert "[exit 0]" in ours[0] and "Pattern verification failed" not in ours[0]


def test_copies_and_compare(tmp_path):
    def session(daemon, qmp, sock):
        target = daemon.tmp / "copy.raw"
        qcow = daemon.tmp / "copy.qcow2"
        out = [run(["nbdcopy", uri(sock), str(target)], daemon),
               sha(target),
               run(["nbdcopy", "--synchronous", "--requests=1", "--connections=1",
                    uri(sock), "null:"], daemon),
               run(["nbdcopy", "--connections=4", uri(sock), "null:"], daemon),
               run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri(sock), str(qcow)], daemon),
               run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), uri(sock)], daemon),
               run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(daemon.tmp / "disk.raw"),
                    uri(sock)], daemon)]
        # A writable export as a copy target: the source file lands in the disk.
        source = daemon.tmp / "source.raw"
        source.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
        out.append(run(["nbdcopy", str(source), uri(sock)], daemon))
        out.append(sha(daemon.tmp / "disk.raw") == sha(source))
        return out

    theirs, ours = both(session)
    assert ours == theirs
    assert ours[1] == sha_of_disk_image(tmp_path)
    assert ours[-1] is True


def sha_of_disk_image(tmp_path: Path) -> str:
    from tests.support.nbd_setup import make_disk
    make_disk(tmp_path / "expected.raw")
    return sha(tmp_path / "expected.raw")


@pytest.mark.parametrize("export,writable", [("disk", True), ("nul", False)])
def test_libnbd_protocol_corners(export, writable):
    def session(daemon, qmp, sock):
        argv = [SYSTEM_PYTHON, str(PROBE), uri(sock, export)] + (["writable"] if writable else [])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(normalise(done.stdout, daemon))

    theirs, ours = both(session)
    assert ours == theirs
    assert ours["get_structured_replies_negotiated"] is True
    assert ours["meta base:allocation"] is True


def test_command_line_nbd_server_and_export():
    """--nbd-server and --export, as qemu-storage-daemon takes them."""
    from tests.support.daemons import DaemonProcess
    from tests.support.nbd_setup import make_disk

    outputs = []
    for kind in ("qsd", "qmpjobd"):
        daemon = DaemonProcess(kind, [
            "--blockdev", "driver=file,filename=disk.raw,node-name=f0",
            "--blockdev", "driver=raw,file=f0,node-name=disk",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock,max-connections=4",
            "--export", "type=nbd,id=e0,node-name=disk,name=exp,writable=on",
        ], version="7.2")
        make_disk(daemon.tmp / "disk.raw")
        with daemon:
            sock = str(daemon.tmp / "nbd.sock")
            outputs.append([run(["nbdinfo", "--list", f"nbd+unix://?socket={sock}"], daemon),
                            run(["qemu-io", "-f", "raw", "-c", "read -P 0xaa 0 64k",
                                 uri(sock, "exp")], daemon)])
        bad = DaemonProcess(kind, ["--blockdev", "null-co,node-name=n0",
                                   "--export", "type=nbd,id=e0,node-name=n0"], version="7.2")
        with pytest.raises(RuntimeError) as failure:
            bad.start()
        bad.stop()
        outputs[-1].append("NBD server not running" in str(failure.value))
    assert outputs[1] == outputs[0]
    assert "export=\"exp\"" in outputs[1][0] and outputs[1][2] is True


@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_a_daemon_without_a_monitor_serves_its_exports(version):
    """qemu-storage-daemon runs with block nodes and an export but no monitor at
    all (an NBD server started from the command line); so does qmpjobd. Both
    serve the export, take writes, and end on SIGTERM with the same status."""
    import signal
    import time

    from tests.support.daemons import DaemonProcess, is_listening
    from tests.support.nbd_setup import make_disk

    outputs = []
    for kind in ("qsd", "qmpjobd"):
        daemon = DaemonProcess(kind, monitors=0, version=version)
        sock = str(daemon.tmp / "nbd.sock")
        daemon.extra_args = [
            "--blockdev", "driver=file,filename=disk.raw,node-name=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=f0,name=exp,writable=on",
        ]
        make_disk(daemon.tmp / "disk.raw")
        with daemon:
            deadline = time.monotonic() + 20
            while not is_listening(sock):
                assert daemon.proc.poll() is None, daemon.stderr()
                assert time.monotonic() < deadline, f"{kind}: no NBD socket"
                time.sleep(0.01)
            written = run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 64k 64k",
                           uri(sock, "exp")], daemon)
            read = run(["qemu-io", "-f", "raw", "-c", "read -P 0x5c 64k 64k",
                        uri(sock, "exp")], daemon)
            daemon.proc.send_signal(signal.SIGTERM)
            status = daemon.proc.wait(10)
            content = hashlib.sha256((daemon.tmp / "disk.raw").read_bytes()).hexdigest()
        outputs.append([written, read, status, content, daemon.stderr()])
    assert outputs[1] == outputs[0]
    assert "read 65536/65536 bytes" in outputs[1][1]
