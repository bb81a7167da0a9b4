"""``raw``: the raw format on top of a protocol child (``file``), optionally a window.

Options (QAPI BlockdevOptionsRaw): ``file`` (inline child or node-name reference),
``offset`` (default 0) and ``size`` (default: the rest of the child). Like QEMU, raw
announces ``read_aio``/``write_aio`` debug events to its child before each request,
which is what makes blkdebug rules on those events fire.
"""

from __future__ import annotations

import errno

from qmpjobd.block.activation import check_child_attach
from qmpjobd.block.node import BlockNode, io_error
from qmpjobd.block.permissions import check_new_parent
from qmpjobd.errors import QMPError

SECTOR = 512


class RawNode(BlockNode):
    driver = "raw"
    is_format = True
    child_roles = ("file",)
    strong_options = ("offset", "size")

    @classmethod
    def check_children(cls, children: dict[str, BlockNode]) -> None:
        if "file" not in children:
            raise QMPError("Parameter 'file' is missing")

    def open(self) -> None:
        child = self.children["file"]
        check_child_attach(self.node_name, "file", child)
        check_new_parent(self)
        child_size = child.size
        self.offset: int = self.options.get("offset", 0)
        self.has_size = "size" in self.options
        if self.offset > child_size:
            raise QMPError(f"Offset ({self.offset}) cannot be greater than size of "
                           f"the containing file ({child_size})")
        if self.has_size:
            size = self.options["size"]
            if self.offset + size > child_size:
                raise QMPError(f"The sum of offset ({self.offset}) and size ({size}) has "
                               "to be smaller or equal to the  actual size of the "
                               f"containing file ({child_size})")
            if size % SECTOR:
                raise QMPError("Specified size is not multiple of 512")
        else:
            size = child_size - self.offset
        self.window = size
        # QEMU keeps lengths in whole sectors.
        self.size = -(-size // SECTOR) * SECTOR

    def _truncate(self, size: int, zero_new: bool) -> None:
        """block_resize: a window of fixed size cannot change; otherwise the child
        is resized to end ``size`` bytes after the window's offset."""
        if self.has_size:
            raise QMPError("Cannot resize fixed-size raw disks")
        if (1 << 63) - 1 - size < self.offset:
            raise QMPError("Disk size too large for the chosen offset")
        child = self.children["file"]
        child.truncate(size + self.offset)
        self.window = max(0, child.size - self.offset)
        self.size = -(-self.window // SECTOR) * SECTOR

    def child_offset(self) -> int:
        return self.offset

    async def _preadv(self, offset: int, length: int) -> bytes:
        child = self.children["file"]
        child.debug_event("read_aio")
        if self.has_size and offset + length > self.window:
            raise io_error(errno.EINVAL)
        return await child.co_pread(self.offset + offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        child = self.children["file"]
        child.debug_event("write_aio")
        if self.has_size and offset + len(data) > self.window:
            raise io_error(errno.ENOSPC)
        await child.co_pwrite(self.offset + offset, data)

    def extend_for_write(self, end: int) -> None:
        # Without a size of its own, a raw window ends where its file does.
        if end > self.size and not self.has_size:
            child = self.children["file"]
            child.extend_for_write(end + self.offset)
            self.window = max(0, child.size - self.offset)
            self.size = -(-self.window // SECTOR) * SECTOR

    def host_file(self) -> tuple[int, int] | None:
        inner = self.children["file"].host_file()
        if inner is None:
            return None
        fd, base = inner
        return (fd, base + self.offset)

    def exact_filename(self) -> str | None:
        # A raw node without its own options is described by its protocol
        # child's name.
        if self.own_strong_options():
            return None
        return self.primary_exact_filename(self.children["file"])

    def image_details(self) -> dict:
        # raw's bdrv_get_info is its child's: over qcow2, its cluster size.
        return self.child_cluster_size(self.children["file"])

    def request_alignment(self) -> int:
        # raw_refresh_limits: a raw node whose format was probed (a backing file
        # named without a format) takes whole sectors only, so that its first
        # sector can be guarded against writes that would change the probe.
        return SECTOR if getattr(self, "probed", False) else 1

    def block_limits(self) -> dict:
        return self.with_child_discard_alignment(self.children["file"])
