"""A qcow2 node's image keeps the node's hooks when it is read again: after a
blockdev-reopen between read-only and read-write and after an inactive node is
activated, the image still passes discards as the node does, reports corruption
through the node and reads its backing child."""

from __future__ import annotations

import subprocess

from qmpjobd.testing import Daemon


async def test_reopened_and_activated_images_keep_the_node_hooks(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top), "1M"], check=True)
    async with Daemon(version="11.1") as daemon:
        client = await daemon.client()
        await client.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "top", "discard": "unmap",
            "file": {"driver": "file", "filename": str(top)}})
        node = daemon._running.daemon.graph.find("top")

        def hooks() -> tuple:
            image = node.image
            return (image.passes_request_discards(), image.corruption_listener is not None,
                    image.backing is not None)

        assert hooks() == (True, True, True)
        for read_only in (True, False):
            await client.execute("blockdev-reopen", {"options": [{
                "driver": "qcow2", "node-name": "top", "discard": "unmap",
                "read-only": read_only, "file": node.children["file"].node_name,
                "backing": node.children["backing"].node_name}]})
            assert hooks() == (True, True, True)
        await client.execute("blockdev-set-active", {"node-name": "top", "active": False})
        await client.execute("blockdev-set-active", {"node-name": "top", "active": True})
        assert hooks() == (True, True, True)
