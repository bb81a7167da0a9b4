"""``mirror_top``: the implicit filter a mirror job puts above its source.

Not available to blockdev-add (QEMU does not list it in BlockdevDriver either); the
mirror job inserts it with ``BlockGraph.insert_filter`` and drops it when it ends.
It matters for what clients can see: it shows in query-named-block-nodes (with
``backing_file_depth`` 1 and the source as ``backing-image`` when not flat), and it
makes the source a non-root node, so a second mirror of the same source is refused
with "Need a root block node".
"""

from __future__ import annotations

from qmpjobd.block.activation import check_child_attach
from qmpjobd.block.node import BlockNode


def leaf_block_limits(node: BlockNode) -> dict:
    """BlockLimitsInfo of a node without children (QEMU's defaults)."""
    return {"request-alignment": node.request_alignment(), "max-iov": node.leaf_max_iov,
            "min-mem-alignment": node.leaf_min_mem_alignment,
            "opt-mem-alignment": node.leaf_opt_mem_alignment}


class BackingFilterNode(BlockNode):
    """A job's implicit filter over one ``backing`` child (mirror_top, commit_top):
    reads go to the child, and queries describe the filter by its child."""

    is_filter = True
    child_roles = ("backing",)

    @property
    def file_child(self) -> BlockNode | None:
        return self.children.get("backing")

    async def _preadv(self, offset: int, length: int) -> bytes:
        return await self.children["backing"].co_pread(offset, length)

    def exact_filename(self) -> str | None:
        # QEMU's job filters take their child's name, json: or not.
        return self.children["backing"].filename()

    def actual_size(self) -> int | None:
        return self.children["backing"].actual_size()

    def backing_node(self) -> BlockNode | None:
        return self.children["backing"]

    def image_details(self) -> dict:
        # bdrv_get_info reaches the filtered child: its cluster size shows.
        cluster = self.children["backing"].image_details().get("cluster-size")
        return {"cluster-size": cluster} if cluster is not None else {}

    def image_dirty(self) -> bool:
        return self.children["backing"].image_dirty()

    def block_limits(self) -> dict:
        # QEMU computes the filter's limits when it opens, before its child is
        # attached, and not again: a leaf's defaults.
        return leaf_block_limits(self)


class MirrorTopNode(BackingFilterNode):
    driver = "mirror_top"

    def open(self) -> None:
        source = self.children["backing"]
        if not source.active:
            # insert_filter has linked us to the source already; undo that.
            self.detach_children()
            check_child_attach(self.node_name, "backing", source)
        self.size = source.size

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self.children["backing"].co_pwrite(offset, data)
