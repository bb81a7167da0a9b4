"""Image locks across processes: qmpjobd and qemu-storage-daemon of the same version
hold images the other one, qemu-img and qemu-io want, in both directions.

For each version, every probe is run twice: once with qsd holding the images and
once with qmpjobd holding them; the other daemon, qemu-img and qemu-io must get the
same answers (QEMU's texts, including qemu-img's hint) in both runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS, qemu_img_command

QEMU_IO = "/usr/bin/qemu-io"      # 7.2's; it reads the lock bytes as every version does


def make_chain(directory: Path, version: str) -> None:
    img = qemu_img_command(version)
    subprocess.run([*img, "create", "-q", "-f", "qcow2", str(directory / "base.qcow2"), "1M"],
                   check=True)
    subprocess.run([*img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(directory / "top.qcow2"), "1M"], check=True)


def qcow2(node: str, path: Path, **extra) -> dict:
    file = {"driver": "file", "filename": str(path)}
    if "locking" in extra:
        file["locking"] = extra.pop("locking")
    return {"driver": "qcow2", "node-name": node, "file": file, **extra}


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    return f"rc={done.returncode} {done.stderr.strip()}"


def probe(holder_kind: str, other_kind: str, version: str, directory: Path) -> list[str]:
    """What the other daemon and the tools see while ``holder_kind`` has top.qcow2
    open read-write (its backing base.qcow2 read-only, from the header)."""
    top, base = directory / "top.qcow2", directory / "base.qcow2"
    img = qemu_img_command(version)
    with DaemonProcess(holder_kind, version=version) as holder, \
            DaemonProcess(other_kind, version=version) as other:
        held, tries = QMPSession(holder), QMPSession(other)
        seen = [held.command_raw("blockdev-add", qcow2("top", top)).decode()]
        for options in (qcow2("w", top), qcow2("r", top, **{"read-only": True}),
                        qcow2("off", top, **{"read-only": True, "locking": "off"}),
                        qcow2("share", top, **{"read-only": True, "force-share": True}),
                        qcow2("bw", base, backing=None),
                        qcow2("br", base, backing=None, **{"read-only": True})):
            seen.append(tries.command_raw("blockdev-add", options).decode())
        seen += [run([*img, "info", str(top)]), run([*img, "info", "-U", str(top)]),
                 run([*img, "info", str(base)]),
                 run([QEMU_IO, "-c", "write 0 512", str(base)]),
                 run([QEMU_IO, "-r", "-c", "read 0 512", str(base)])]
        # The holder lets the images go: everything works again.
        seen.append(held.command_raw("blockdev-del", {"node-name": "top"}).decode())
        seen += [run([*img, "info", str(top)]),
                 run([QEMU_IO, "-c", "write 0 512", str(base)])]
        held.close()
        tries.close()
    return seen


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_locks_seen_both_ways(tmp_path: Path, version: str) -> None:
    make_chain(tmp_path, version)
    qsd_holds = probe("qsd", "qmpjobd", version, tmp_path)
    qmpjobd_holds = probe("qmpjobd", "qsd", version, tmp_path)
    assert qmpjobd_holds == qsd_holds
    # And what QEMU does here is what the module says (the probe can fail).
    assert 'Failed to get \\"write\\" lock' in qsd_holds[1]
    assert 'Failed to get shared \\"write\\" lock' in qsd_holds[2]
    assert "Is another process using the image" in qsd_holds[7]
    assert qsd_holds[-2].startswith("rc=0")
