"""qcow2 layer and block status from one scan of the cached L2 table: the same
answers as asking cluster by cluster, for runs that start mid-cluster, cross L2
tables (512-byte clusters: 64 clusters per table), end at the image's end, and
for tables not cached yet."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from qmpjobd.block.graph import BlockGraph
from qmpjobd.job.clock import VirtualClock
from tests.unit.test_block_drivers import Jobs


CLUSTER = 512
SIZE = 200 * 1024 + 1536       # not a whole number of L2 tables


def build(path: Path, seed: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={CLUSTER}", str(path), str(SIZE)], check=True)
    rng = random.Random(seed)
    commands: list[str] = []
    offset = 0
    while offset < SIZE:
        length = min(rng.randint(1, 90) * CLUSTER, SIZE - offset)
        kind = rng.choice(["data", "zero", "hole", "hole"])
        if kind == "data":
            commands += ["-c", f"write -P {rng.randint(1, 255)} {offset} {length}"]
        elif kind == "zero":
            commands += ["-c", f"write -z {offset} {length}"]
        offset += length
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True,
                   capture_output=True)


def walk(node, offset: int, length: int) -> tuple[str, int]:
    """The reference: one cluster at a time."""
    image = node.image
    end = min(offset + length, image.size)
    kind = node._kind_at(image, offset)
    pos = (offset // CLUSTER + 1) * CLUSTER
    while pos < end and node._kind_at(image, pos) == kind:
        pos += CLUSTER
    return kind, max(1, min(pos, end) - offset)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_layer_and_block_status_match_a_cluster_walk(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "img.qcow2"
    build(path, seed)
    graph = BlockGraph(Jobs(VirtualClock()))
    graph.add({"driver": "file", "node-name": "f", "filename": str(path), "read-only": True})
    node = graph.add({"driver": "qcow2", "node-name": "q", "file": "f", "read-only": True})
    rng = random.Random(seed)
    for _ in range(3000):
        if rng.random() < 0.05:
            node.image.l2_cache.entries.clear()     # the next lookup reads the table
        offset = rng.randrange(SIZE)
        if rng.random() < 0.5:
            offset -= offset % CLUSTER
        length = rng.choice([1, 700, CLUSTER, 64 * CLUSTER, 100 * CLUSTER, SIZE])
        expected = walk(node, offset, length)
        assert node.layer_status(offset, length) == expected, (offset, length)
        kind, count = expected
        # No backing: block status says zero where the layer is unallocated.
        assert node.block_status(offset, length) == \
            ("zero" if kind == "unallocated" else kind, count), (offset, length)
