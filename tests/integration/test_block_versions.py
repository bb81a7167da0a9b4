"""Block behaviour per QEMU version, over real sockets, against the real daemon of the
same version: what a user sees outside the QMP transcript (stderr, image files) and
the copy-mode switch of a running mirror. The QMP transcripts themselves are the
block_versions_* conformance scenarios."""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import SUPPORTED_VERSIONS

MiB = 1 << 20


Session = QMPSession


def both(version: str, args: list[str], workdir: pathlib.Path):
    """qemu-storage-daemon and qmpjobd of ``version`` on the same command line."""
    for kind in ("qsd", "qmpjobd"):
        where = workdir / kind
        where.mkdir()
        yield kind, DaemonProcess(kind, args, version=version, workdir=where), where


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_backup_block_size_warning_on_stderr(version: str, tmp_path: pathlib.Path) -> None:
    """Same warning lines, same words, same prefix as the real daemon prints: one per
    backup onto a target that cannot tell its block size (null-co), none for files,
    also when the job then fails on its speed."""
    args = ["--blockdev", "null-co,node-name=s,size=1048576",
            "--blockdev", "null-co,node-name=t,size=1048576"]
    warnings = {}
    for kind, daemon, where in both(version, args, tmp_path):
        (where / "f.raw").write_bytes(bytes(MiB))
        with daemon:
            session = Session(daemon)
            session.command("blockdev-add", {"driver": "file", "node-name": "f",
                                             "filename": str(where / "f.raw")})
            for job, target in (("b1", "t"), ("b2", "f")):
                assert session.command("blockdev-backup", {
                    "job-id": job, "device": "s", "target": target, "sync": "full"}) == \
                    {"return": {}}
                session.wait_status(job, "null")
            failed = session.command("blockdev-backup", {"job-id": "b3", "device": "s",
                                                         "target": "t", "sync": "full",
                                                         "speed": -1})
            assert "error" in failed
            session.close()
            warnings[kind] = [line for line in daemon.stderr().splitlines()
                              if "warning" in line]
    assert len(warnings["qsd"]) == 2
    assert warnings["qmpjobd"] == warnings["qsd"]


@pytest.mark.parametrize("version", ["10.0", "11.1"])
def test_discard_source_reaches_only_an_unmap_source(version: str,
                                                     tmp_path: pathlib.Path) -> None:
    """backup discard-source: a source opened with discard=unmap reads as zeroes
    afterwards (and its blocks are freed), one without keeps its data; the files end
    up the same as the real daemon leaves them."""
    data = os.urandom(2 * MiB)
    results = {}
    for kind, daemon, where in both(version, [], tmp_path):
        for name in ("keep.raw", "drop.raw"):
            (where / name).write_bytes(data)
        with daemon:
            session = Session(daemon)
            for node, name, discard in (("keep", "keep.raw", "ignore"),
                                        ("drop", "drop.raw", "unmap")):
                session.command("blockdev-add", {
                    "driver": "raw", "node-name": node, "discard": discard,
                    "file": {"driver": "file", "discard": discard,
                             "filename": str(where / name)}})
                session.command("blockdev-add", {"driver": "null-co", "node-name": node + "-t",
                                                 "size": 2 * MiB})
                reply = session.command("blockdev-backup", {
                    "job-id": node, "device": node, "target": node + "-t", "sync": "full",
                    "discard-source": True})
                assert reply == {"return": {}}
                session.wait_status(node, "null")
            session.close()
        results[kind] = {name: (where / name).read_bytes() for name in ("keep.raw", "drop.raw")}
        results[kind + "-blocks"] = os.stat(where / "drop.raw").st_blocks
    assert results["qsd"]["keep.raw"] == data and results["qsd"]["drop.raw"] == bytes(2 * MiB)
    assert results["qmpjobd"] == results["qsd"]


@pytest.mark.parametrize("version", ["10.0", "11.1"])
def test_block_job_change_makes_a_ready_mirror_actively_synced(
        version: str, tmp_path: pathlib.Path) -> None:
    """Not at once: the mirror takes the new mode at its next loop turn (QEMU's READY
    mirror wakes every 100 ms), so the flag is polled until it turns, on both."""
    args = ["--blockdev", "null-co,node-name=s,size=8388608",
            "--blockdev", "null-co,node-name=t,size=8388608"]
    for kind, daemon, _ in both(version, args, tmp_path):
        with daemon:
            session = Session(daemon)
            session.command("blockdev-mirror", {"job-id": "m", "device": "s", "target": "t",
                                                "sync": "full"})
            session.wait_status("m", "ready")
            assert session.command("query-block-jobs")["return"][0]["actively-synced"] is False
            assert session.command("block-job-change", {
                "id": "m", "type": "mirror", "copy-mode": "write-blocking"}) == {"return": {}}
            polls = 0
            while not session.command("query-block-jobs")["return"][0]["actively-synced"]:
                polls += 1
                assert polls < 1000, f"{kind}: never actively synced"
                time.sleep(0.01)
            session.close()
