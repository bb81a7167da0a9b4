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


class MirrorTopNode(BlockNode):
    driver = "mirror_top"
    is_filter = True
    child_roles = ("backing",)

    def open(self) -> None:
        source = self.children["backing"]
        if not source.active:
            # insert_filter has linked us to the source already; undo that.
            self.detach_children()
            check_child_attach(self.node_name, "backing", source)
        self.size = source.size

    @property
    def file_child(self) -> BlockNode | None:
        return self.children.get("backing")

    async def _preadv(self, offset: int, length: int) -> bytes:
        return await self.children["backing"].co_pread(offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self.children["backing"].co_pwrite(offset, data)

    def exact_filename(self) -> str | None:
        # QEMU's mirror_top takes its child's name, json: or not.
        return self.children["backing"].filename()

    def actual_size(self) -> int | None:
        return self.children["backing"].actual_size()

    def backing_node(self) -> BlockNode | None:
        return self.children["backing"]
