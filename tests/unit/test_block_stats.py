"""Write thresholds, per-node statistics and mirror's discard method, through the
command handlers on real files (the orders and payloads are qemu-storage-daemon's:
tests/conformance/scenarios/block_stats_chardev.qmp compares them on the wire)."""

from __future__ import annotations

import pathlib

from tests.unit.test_block_jobs import Harness, MiB


def node_stats(h: Harness, name: str) -> dict:
    return next(s for s in h("query-blockstats", {"query-nodes": True})
                if s["node-name"] == name)


async def test_write_threshold_fires_once_and_disarms(tmp_path: pathlib.Path) -> None:
    image = tmp_path / "t.raw"
    image.write_bytes(bytes(MiB))
    h = Harness()
    h("blockdev-add", {"driver": "null-co", "node-name": "src", "size": MiB})
    h("blockdev-add", {"driver": "raw", "node-name": "t", "file": {
        "driver": "file", "node-name": "tf", "filename": str(image)}})
    h("block-set-write-threshold", {"node-name": "t", "write-threshold": 4096})
    h("block-set-write-threshold", {"node-name": "tf", "write-threshold": 2 * MiB})
    info = {n["node-name"]: n for n in h("query-named-block-nodes", {"flat": True})}
    assert (info["t"]["write_threshold"], info["tf"]["write_threshold"]) == (4096, 2 * MiB)
    assert h.error("block-set-write-threshold", {"node-name": "zz", "write-threshold": 1}) \
        == "Device 'zz' not found"
    assert node_stats(h, "t")["stats"]["wr_highest_offset"] == 0
    h("blockdev-backup", {"job-id": "b", "device": "src", "target": "t", "sync": "full"})
    await h.until(lambda: h.seen("null"))
    thresholds = [data for name, data in h.events if name == "BLOCK_WRITE_THRESHOLD"]
    # One 1 MiB write request: reported once, by the node that was armed below it.
    assert thresholds == [{"node-name": "t", "amount-exceeded": MiB - 4096,
                           "write-threshold": 4096}]
    info = {n["node-name"]: n for n in h("query-named-block-nodes", {"flat": True})}
    assert (info["t"]["write_threshold"], info["tf"]["write_threshold"]) == (0, 2 * MiB)
    stats = node_stats(h, "t")
    assert stats["stats"]["wr_highest_offset"] == MiB
    assert stats["parent"]["node-name"] == "tf"
    assert stats["parent"]["stats"]["wr_highest_offset"] == MiB
    assert stats["parent"]["driver-specific"] == {
        "driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0, "discard-bytes-ok": 0}
    assert "driver-specific" not in stats and "parent" not in node_stats(h, "src")
    assert h("query-blockstats") == [] and h("query-block") == []


async def test_mirror_discards_what_is_neither_data_nor_zero(tmp_path: pathlib.Path) -> None:
    """null-co without read-zeroes: QEMU discards on the target instead of copying.
    Without discard=unmap the target keeps its bytes; with it the range reads as zeroes."""
    for discard, expected in ((None, b"\x5a" * MiB), ("unmap", bytes(MiB))):
        image = tmp_path / f"t-{discard}.raw"
        image.write_bytes(b"\x5a" * MiB)
        h = Harness()
        h("blockdev-add", {"driver": "null-co", "node-name": "src", "size": MiB})
        target = {"driver": "raw", "node-name": "t",
                  "file": {"driver": "file", "filename": str(image)}}
        if discard:
            target["discard"] = discard
        h("blockdev-add", target)
        h("blockdev-mirror", {"job-id": "m", "device": "src", "target": "t", "sync": "full"})
        await h.until(lambda: h.seen("BLOCK_JOB_READY"))
        h("job-complete", {"id": "m"})
        await h.until(lambda: h.seen("null"))
        assert image.read_bytes() == expected, discard


async def test_null_aio_backup_copies_and_completes() -> None:
    h = Harness()
    for name in ("a", "b"):
        h("blockdev-add", {"driver": "null-aio", "node-name": name, "size": 4 * MiB})
    h("blockdev-backup", {"job-id": "b", "device": "a", "target": "b", "sync": "full"})
    await h.until(lambda: h.seen("null"))
    assert "BLOCK_JOB_COMPLETED" in h.take()
    info = {n["node-name"]: n for n in h("query-named-block-nodes")}
    assert info["a"]["image"]["filename"] == 'json:{"driver": "null-aio", "size": 4194304}'
