"""block-stream and block-commit with the test controls, over real sockets.

qemu-storage-daemon has no way to fail a job's prepare step or to hold a job, so
these run against qmpjobd alone, in every personality; what they check is QEMU's
documented guarantee: a job that does not finish leaves the chain, and every image
header, exactly as it was. The images are the three-image chain of
../../../shared/reference/qcow2-and-chains.md (base 0x11, mid 0x22, top 0x33 in
consecutive MiBs), made with qemu-img and qemu-io, and read back with them.
"""

from __future__ import annotations

import subprocess

import pytest

from qmpjobd.versions import KNOWN_VERSIONS
from tests.support.daemons import DaemonProcess, QMPSession

MiB = 1 << 20


def make_chain(directory) -> None:
    for command in (
        "qemu-img create -q -f qcow2 base.qcow2 4M",
        "qemu-io -c 'write -P 0x11 0 1M' base.qcow2",
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 4M",
        "qemu-io -c 'write -P 0x22 1M 1M' mid.qcow2",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M",
        "qemu-io -c 'write -P 0x33 2M 1M' top.qcow2",
    ):
        subprocess.run(command, shell=True, cwd=directory, check=True, capture_output=True)


def add_chain(qmp: QMPSession) -> None:
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        assert qmp.command("blockdev-add", {"driver": "file", "node-name": f"{name}-file",
                                            "filename": f"{name}.qcow2"}) == {"return": {}}
        assert qmp.command("blockdev-add", {"driver": "qcow2", "node-name": name,
                                            "file": f"{name}-file",
                                            "backing": backing}) == {"return": {}}


def graph(qmp: QMPSession) -> dict[str, tuple]:
    """node -> (driver, children) as query-named-block-nodes shows them."""
    nodes = qmp.command("query-named-block-nodes", {"flat": True})["return"]
    return {n["node-name"]: (n["drv"], n.get("backing_file")) for n in nodes}


def headers(directory) -> dict[str, bytes]:
    return {name: (directory / f"{name}.qcow2").read_bytes()[:4096]
            for name in ("base", "mid", "top")}


def read_pattern(directory, image: str, offset: int, pattern: int) -> bool:
    done = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} 1M", image],
                          cwd=directory, capture_output=True, text=True)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


@pytest.fixture(params=KNOWN_VERSIONS)
def chain(request):
    daemon = DaemonProcess("qmpjobd", ["--test-controls"], version=request.param)
    make_chain(daemon.tmp)
    with daemon:
        qmp = QMPSession(daemon)
        add_chain(qmp)
        yield daemon, qmp
        qmp.close()


def test_commit_prepare_fault_leaves_chain_and_headers(chain):
    daemon, qmp = chain
    before_graph, before_headers = graph(qmp), headers(daemon.tmp)
    assert qmp.command("x-qmpjobd-job-fault", {"id": "c", "phase": "prepare",
                                               "errno": 5}) == {"return": {}}
    assert qmp.command("block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                        "auto-finalize": False}) == {"return": {}}
    qmp.wait_event("BLOCK_JOB_PENDING", id="c")
    # While PENDING the filter is in the chain, the headers untouched.
    running = graph(qmp)
    assert [d for d, _ in running.values()].count("commit_top") == 1
    assert qmp.command("job-finalize", {"id": "c"}) == {"return": {}}
    completed = qmp.wait_event("BLOCK_JOB_COMPLETED", device="c")
    assert completed["data"]["error"] == "Input/output error"
    qmp.wait_status("c", "null")
    assert graph(qmp) == before_graph
    assert headers(daemon.tmp) == before_headers


def test_stream_prepare_fault_keeps_backing(chain):
    daemon, qmp = chain
    before_graph, before_headers = graph(qmp), headers(daemon.tmp)
    qmp.command("x-qmpjobd-job-fault", {"type": "stream", "phase": "prepare", "errno": 28})
    assert qmp.command("block-stream", {"job-id": "s", "device": "top"}) == {"return": {}}
    completed = qmp.wait_event("BLOCK_JOB_COMPLETED", device="s")
    assert completed["data"]["error"] == "No space left on device"
    qmp.wait_status("s", "null")
    assert graph(qmp) == before_graph
    # The data was copied (it equals the chain's), the header still names mid.
    assert headers(daemon.tmp)["top"][:512] == before_headers["top"][:512]


def test_commit_then_stream_change_headers(chain):
    """The successful paths, checked with qemu-img/qemu-io after the nodes are gone."""
    daemon, qmp = chain
    assert qmp.command("block-commit", {"job-id": "c", "device": "top",
                                        "top-node": "mid"}) == {"return": {}}
    qmp.wait_status("c", "null")
    assert graph(qmp)["top"] == ("qcow2", "base.qcow2")
    assert qmp.command("block-stream", {"job-id": "s", "device": "top"}) == {"return": {}}
    qmp.wait_status("s", "null")
    assert graph(qmp)["top"] == ("qcow2", None)
    for node in ("top", "top-file", "mid", "mid-file", "base", "base-file"):
        assert qmp.command("blockdev-del", {"node-name": node}) == {"return": {}}
    info = subprocess.run(["qemu-img", "info", "-U", "top.qcow2"], cwd=daemon.tmp,
                          capture_output=True, text=True, check=True).stdout
    assert "backing file" not in info
    for offset, pattern in ((0, 0x11), (MiB, 0x22), (2 * MiB, 0x33)):
        assert read_pattern(daemon.tmp, "top.qcow2", offset, pattern)
    assert read_pattern(daemon.tmp, "base.qcow2", MiB, 0x22)
    for image in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        subprocess.run(["qemu-img", "check", "-U", image], cwd=daemon.tmp, check=True,
                       capture_output=True)


def test_active_commit_hold_and_read_fault(chain):
    """A hold before PENDING keeps the pivot back; a read fault with on-error
    report ends an active commit with the error and no switch."""
    daemon, qmp = chain
    qmp.command("x-qmpjobd-job-hold", {"id": "a", "before": "pending"})
    assert qmp.command("block-commit", {"job-id": "a", "device": "top"}) == {"return": {}}
    qmp.wait_event("BLOCK_JOB_READY", device="a")
    assert qmp.command("job-complete", {"id": "a"}) == {"return": {}}
    qmp.wait_status("a", "waiting")
    assert [j["status"] for j in qmp.command("query-jobs")["return"]] == ["waiting"]
    assert any(d == "mirror_top" for d, _ in graph(qmp).values())
    qmp.command("x-qmpjobd-job-release", {"id": "a"})
    qmp.wait_status("a", "null")
    assert not any(d == "mirror_top" for d, _ in graph(qmp).values())
    assert read_pattern(daemon.tmp, "base.qcow2", 2 * MiB, 0x33)

    qmp.command("x-qmpjobd-job-fault", {"id": "b", "phase": "run", "iotype": "read"})
    before = graph(qmp)
    assert qmp.command("block-commit", {"job-id": "b", "device": "top",
                                        "base-node": "mid"}) == {"return": {}}
    error = qmp.wait_event("BLOCK_JOB_ERROR", device="b")
    assert error["data"] == {"device": "b", "operation": "read", "action": "report"}
    completed = qmp.wait_event("BLOCK_JOB_COMPLETED", device="b")
    assert completed["data"]["error"] == "Input/output error"
    qmp.wait_status("b", "null")
    assert graph(qmp) == before
