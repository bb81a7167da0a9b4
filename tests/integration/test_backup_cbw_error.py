"""``on-cbw-error`` of ``blockdev-backup`` (11.1): what a guest write to the source of
a backup job gets when the copy-before-write of its old data fails, on qmpjobd and on
qemu-storage-daemon 11.1 in the same test.

The target is raw over blkdebug, whose rule fails target writes at 1 MiB (the first
cluster of the 0xbb area of tests/support/nbd_setup.py's disk) with EIO, once or every
time. The job (sync=full, 1 byte/s) copies its first cluster and then waits on its
rate limit, so the guest's write at 1 MiB (qemu-io through the writable export) is
the first to copy that cluster; then the speed limit goes and the job finishes.

What qsd 11.1 does, and qmpjobd must: break-guest-write (the default) fails the
guest write with EIO and the job goes on; break-snapshot lets the write through,
and from then on no write copies anything (the filter's snapshot is broken), so the
job later copies the overwritten clusters as they are now. Either way the job is
not told about the failed copy: no BLOCK_JOB_ERROR, it completes without error,
unless its own copy meets the error too (then BLOCK_JOB_ERROR ``write``/``report``
and the job fails with "Input/output error").
"""

from __future__ import annotations

import json

import pytest

from tests.integration.test_backup_bitmaps import run, wait_job_end
from tests.support.nbd_setup import DISK_SIZE, nbd_daemon, normalise, uri

VERSION = "11.1"
KiB = 1024
# Where the target is looked at: the copied first cluster, the cluster of each guest
# write (the written bytes and the rest of the cluster).
PROBES = {"0": 0, "1M": 1024 * KiB, "1028k": 1028 * KiB, "1088k": 1088 * KiB,
          "1092k": 1092 * KiB}


def target(once: bool) -> dict:
    rule: dict = {"event": "write_aio", "errno": 5, "sector": 1024 * KiB // 512}
    if once:
        rule["once"] = True
    return {"driver": "raw", "node-name": "tgt", "file": {
        "driver": "blkdebug", "node-name": "tgt-dbg", "inject-error": [rule],
        "image": {"driver": "file", "filename": "scratch.raw"}}}


def session(daemon, qmp, sock: str, policy: str | None, once: bool) -> list[str]:
    out: list[object] = []
    with open(daemon.tmp / "scratch.raw", "wb") as image:
        image.truncate(DISK_SIZE)
    out.append(qmp.cmd("blockdev-add", **target(once)))
    backup: dict = {"job-id": "j", "device": "disk", "target": "tgt", "sync": "full",
                    "speed": 1}
    if policy is not None:
        backup["on-cbw-error"] = policy
    out.append(qmp.cmd("blockdev-backup", **backup))
    # The first write's copy (cluster 16) fails; the second's (cluster 17) would not.
    out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xdd 1M 4k", uri(sock)], daemon))
    out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xde 1088k 4k", uri(sock)],
                   daemon))
    out.append(qmp.cmd("query-block-jobs"))
    out.append(qmp.cmd("block-job-set-speed", device="j", speed=0))
    out.append(wait_job_end(qmp, "j"))
    out.append(qmp.cmd("query-jobs"))
    out.append([{k: v for k, v in event.items() if k != "timestamp"} for event in qmp.events])
    content = (daemon.tmp / "scratch.raw").read_bytes()
    out.append({name: hex(content[offset]) for name, offset in PROBES.items()})
    return [normalise(json.dumps(item), daemon) for item in out]


# policy, once, then on qsd 11.1: the guest's first write succeeds, the job's error,
# what the target holds at PROBES.
CASES = {
    "default-once": (None, True, False, None,
                     {"0": "0xaa", "1M": "0xbb", "1028k": "0xbb", "1088k": "0xbb",
                      "1092k": "0xbb"}),
    "break-snapshot-once": ("break-snapshot", True, True, None,
                            {"0": "0xaa", "1M": "0xdd", "1028k": "0xbb", "1088k": "0xde",
                             "1092k": "0xbb"}),
    "break-snapshot-always": ("break-snapshot", False, True, "Input/output error",
                              {"0": "0xaa", "1M": "0x0", "1028k": "0x0", "1088k": "0x0",
                               "1092k": "0x0"}),
}


@pytest.mark.parametrize("case", CASES)
def test_failed_copy_before_write_of_a_backup_job(case):
    policy, once, write_ok, job_error, held = CASES[case]
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, VERSION) as (daemon, qmp, sock):
            results.append(session(daemon, qmp, sock, policy, once))
    theirs, ours = results
    assert ours == theirs
    # The transcript shows what this test is about (checked on qsd's).
    assert json.loads(theirs[2]).startswith("[exit 0]") == write_ok, theirs[2]
    assert json.loads(theirs[6])["data"].get("error") == job_error, theirs[6]
    events = [event["event"] for event in json.loads(theirs[8])]
    assert ("BLOCK_JOB_ERROR" in events) == (job_error is not None), events
    assert json.loads(theirs[9]) == held
