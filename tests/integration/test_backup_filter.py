"""backup's copy-before-write filter above the source, over real sockets, compared
with qemu-storage-daemon of the same version.

While a backup runs, its filter is the parent of the source: an export made
before the job uses the filter (and keeps working through it: an NBD client's
write first saves the old data to the target), a writable export of the source
is refused because the filter does not share write on its ``file`` child, and
block_resize of the source is refused because it does not share resize. After
the job the export is back on the source and a writable export may be added.

Generated filter names differ per run (``#block<counter><pointer digits>``):
both daemons' answers are renumbered the same way before comparing. The drain
pairs an export's BlockBackend shows in a job's events are not compared here.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from tests.integration.test_backup_bitmaps import run, wait_job_end
from tests.integration.test_block_graph_debug import renumbered
from tests.support.nbd_setup import DISK_SIZE, nbd_daemon, normalise, uri
from tests.support.oracles import CONFORMANCE_VERSIONS

AUTO_NAME = re.compile(r"#block\d+")


def generic(text: str) -> str:
    """Generated node names numbered by first appearance (#1, #2, ...)."""
    names: dict[str, str] = {}
    return AUTO_NAME.sub(lambda m: names.setdefault(m.group(), f"#{len(names) + 1}"), text)


def both(version: str, session) -> tuple[list, list]:
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, version) as (daemon, qmp, sock):
            results.append([comparable(item, daemon)
                            for item in session(daemon, qmp, sock)])
    return results[0], results[1]


def comparable(item: object, daemon) -> object:
    """Block graphs come renumbered already; everything else becomes text with
    the daemon's directory and generated names normalised."""
    if isinstance(item, dict) and "nodes" in item:
        return item
    return generic(normalise(json.dumps(item), daemon))


def add_target(daemon, qmp, name: str) -> object:
    path = daemon.tmp / f"{name}.raw"
    with open(path, "wb") as image:
        image.truncate(DISK_SIZE)
    return qmp.cmd("blockdev-add", **{"node-name": name, "driver": "raw",
                                      "file": {"driver": "file", "filename": str(path)}})


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_filter_above_the_source_takes_the_export(version):
    def session(daemon, qmp, sock):
        out: list[object] = [add_target(daemon, qmp, "t1")]
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t1", sync="none",
                           **{"job-id": "b0"}))
        out.append(qmp.cmd("query-block-exports"))
        # The filter unshares write and resize on the source.
        out.append(qmp.cmd("block-export-add", type="nbd", id="e2", name="x2",
                           writable=True, **{"node-name": "disk"}))
        out.append(qmp.cmd("block_resize", **{"node-name": "disk"}, size=2 * DISK_SIZE))
        out.append(renumbered(json.dumps(qmp.cmd("x-debug-query-block-graph")).encode()))
        # The export made before the job writes through the filter: the old
        # clusters reach the target first (progress of the job, too).
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xdd 0 64k",
                        "-c", "write -P 0xde 1M 4k", uri(sock, "disk")], daemon))
        out.append(qmp.cmd("query-block-jobs"))
        out.append(qmp.cmd("block-job-cancel", device="b0"))
        out.append(wait_job_end(qmp, "b0"))
        out.append(qmp.cmd("query-block-exports"))
        out.append(renumbered(json.dumps(qmp.cmd("x-debug-query-block-graph")).encode()))
        out.append(qmp.cmd("block-export-add", type="nbd", id="e2", name="x2",
                           writable=True, **{"node-name": "disk"}))
        out.append(qmp.cmd("block-export-del", id="e2"))
        out.append(sha(daemon.tmp / "t1.raw"))
        # What the copy-before-write saved: the old data of the written clusters.
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xaa 0 64k",
                        "-c", "read -P 0xbb 1M 64k", "-c", "read -P 0 2M 64k",
                        str(daemon.tmp / "t1.raw")], daemon))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    refusal = ("Permission conflict on node 'disk': permissions 'write' are both required "
               "by an unnamed block device (uses node 'disk' as 'root' child) and unshared "
               "by node '#1' (uses node 'disk' as 'file' child).")
    assert refusal in ours[3]
    assert '"node-name": "#1"' in ours[2] and '"node-name": "disk"' in ours[10]
    assert "error" not in ours[11]


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_named_filter_and_a_second_backup_of_the_source(version):
    """filter-node-name names the node exports and conflicts show; a second backup
    of the same source stacks a second filter above the first."""
    def session(daemon, qmp, sock):
        out: list[object] = [add_target(daemon, qmp, "t1"), add_target(daemon, qmp, "t2")]
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t1", sync="none",
                           **{"job-id": "b0", "filter-node-name": "bt"}))
        out.append(qmp.cmd("block-export-add", type="nbd", id="e2", name="x2",
                           writable=True, **{"node-name": "disk"}))
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t2", sync="none",
                           **{"job-id": "b1", "filter-node-name": "bt2"}))
        out.append(qmp.cmd("query-block-exports"))
        out.append(renumbered(json.dumps(qmp.cmd("x-debug-query-block-graph")).encode()))
        out.append(qmp.cmd("query-named-block-nodes", flat=True))
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xdd 0 64k",
                        uri(sock, "disk")], daemon))
        for job in ("b1", "b0"):
            out.append(qmp.cmd("block-job-cancel", device=job))
            out.append(wait_job_end(qmp, job))
            out.append(qmp.cmd("query-block-exports"))
            out.append(renumbered(json.dumps(qmp.cmd("x-debug-query-block-graph")).encode()))
        out.append(sha(daemon.tmp / "t1.raw"))
        out.append(sha(daemon.tmp / "t2.raw"))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    assert "unshared by node 'bt'" in ours[3]
