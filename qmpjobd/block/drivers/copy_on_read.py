"""``copy-on-read``: a filter that writes what it reads from the backing chain
into its child, so the child ends up holding the data itself.

Options (QAPI BlockdevOptionsCor): ``file`` (the child, inline or by name) and
``bottom``: copy only what the chain holds down to and including that node; data
below it is read but not copied. ``block-stream`` inserts one of these (implicit,
``#blockNNN``, unless ``filter-node-name``) above the node it streams into and
populates through it (``populate``: QEMU's prefetch read, which copies without
returning data).

What is copied: an extent the child's own layer does not hold, but a layer down to
``bottom`` does. Extents that read as zeroes are written as zero writes (a qcow2
child gets zero clusters), others as data, as QEMU's copy-on-read does.
"""

from __future__ import annotations

from qmpjobd.block.formats.qcow2.backing import UNALLOCATED, cow_child, layer_status, status_in_layers
from qmpjobd.block.node import BlockNode
from qmpjobd.errors import QMPError


class CopyOnReadNode(BlockNode):
    driver = "copy-on-read"
    is_filter = True
    child_roles = ("file",)
    strong_options = ()

    @classmethod
    def check_children(cls, children: dict[str, BlockNode]) -> None:
        if "file" not in children:
            raise QMPError('A block device must be specified for "file"')

    # Inserted by a job without a name from the user (QEMU's bs->implicit): it
    # then shows its child's names, as QEMU copies them from the single child.
    implicit = False

    def open(self) -> None:
        self.bottom: BlockNode | None = None
        bottom = self.options.get("bottom")
        if bottom is not None:
            node = self.graph.find(bottom)
            if node is None:
                raise QMPError(f"Bottom node '{bottom}' not found")
            if node.is_filter:
                raise QMPError(f"Bottom node '{bottom}' is a filter")
            self.bottom = node
        self.size = self.children["file"].size

    # --- I/O ----------------------------------------------------------------------------

    async def _preadv(self, offset: int, length: int) -> bytes:
        return await self._read(offset, length, want_data=True)

    async def populate(self, offset: int, length: int) -> None:
        """Copy what [offset, offset+length) needs copying, reading nothing else."""
        await self._read(offset, length, want_data=False)

    async def _read(self, offset: int, length: int, *, want_data: bool) -> bytes:
        child = self.children["file"]
        pieces: list[bytes] = []
        end = offset + length
        while offset < end:
            kind, count = layer_status(child, offset, end - offset)
            count = min(count, end - offset)
            copy = kind == UNALLOCATED
            if copy and self.bottom is not None:
                # Only what the chain holds down to bottom is copied.
                below, count = status_in_layers(cow_child(child), self.bottom, offset, count)
                copy = below != UNALLOCATED
            if copy:
                data = await child.co_pread(offset, count)
                await self._copy_into_child(child, offset, data)
                if want_data:
                    pieces.append(data)
            elif want_data:
                pieces.append(await child.co_pread(offset, count))
            offset += count
        return b"".join(pieces)

    @staticmethod
    async def _copy_into_child(child: BlockNode, offset: int, data: bytes) -> None:
        if data.count(0) != len(data):
            await child.co_pwrite(offset, data)
        else:
            await child.co_pwrite_zeroes(offset, len(data))

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self.children["file"].co_pwrite(offset, data)

    # --- names and queries ----------------------------------------------------------------

    @property
    def file_child(self) -> BlockNode | None:
        return self.children.get("file")

    def exact_filename(self) -> str | None:
        # An implicit filter shows its child's name; one the user named is
        # described by its options (json:).
        return self.children["file"].filename() if self.implicit else None

    def full_open_options(self) -> dict:
        if self.implicit:
            return self.children["file"].full_open_options()
        return super().full_open_options()

    def actual_size(self) -> int | None:
        return self.children["file"].actual_size()

    def image_details(self) -> dict:
        # bdrv_get_info reaches the filtered child: its cluster size shows.
        cluster = self.children["file"].image_details().get("cluster-size")
        return {"cluster-size": cluster} if cluster is not None else {}

    def image_dirty(self) -> bool:
        return self.children["file"].image_dirty()

    def block_limits(self) -> dict:
        # The filtered child's discard alignment carries over (its zero-write
        # alignment does not), as QEMU 11.1 reports for the filter.
        limits = super().block_limits()
        inner = self.children["file"].block_limits()
        ordered = {"request-alignment": limits.pop("request-alignment")}
        if "discard-alignment" in inner:
            ordered["discard-alignment"] = inner["discard-alignment"]
        ordered.update(limits)
        return ordered
