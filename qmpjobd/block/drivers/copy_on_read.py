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

How (populate only; a guest read still reads, then writes what it read): an extent
the qcow2 layers below know to be zeroes is zero-written without reading it; data
clusters of a qcow2 layer on a host file go into a qcow2 child in one thread-pool
task that checks them for zeroes and has the kernel copy them (``CheckedCopy``:
the child's write path allocates as for the same bytes, or makes zero clusters).
Nodes with test-control request hooks always get the plain read and write.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from qmpjobd.block.formats.qcow2.backing import (
    UNALLOCATED,
    cow_child,
    is_qcow2,
    layer_status,
    skip_filters,
)
from qmpjobd.block.formats.qcow2.storage import CheckedCopy, MixedZeroes, is_zero
from qmpjobd.block.node import BlockNode
from qmpjobd.block.offload import host_runs, interposed, qcow2_image_on_host
from qmpjobd.errors import QMPError


@dataclass
class _Below:
    """What the layers under the filter's child answer for a range."""

    kind: str
    count: int
    node: BlockNode | None         # the layer that answered
    zeroes: bool                   # reads as zeroes without any file I/O
    plain: bool = False            # every read on the way is an unhooked qcow2 read
    copy: bool = True              # the extent needs copying into the child


def _host_copy_images(child: BlockNode, offset: int, count: int, below: "_Below") -> Any:
    """(child image, source image) when the extent can go as one host copy
    between two qcow2 images on host files, else None."""
    source = below.node
    if below.kind != "data" or not below.plain or source is None:
        return None
    image = qcow2_image_on_host(child)
    source_image = qcow2_image_on_host(source)
    if image is None or source_image is None or image is source_image \
            or image.read_only or image.unusable or interposed(child) or interposed(source):
        return None
    table_span = image.cluster_size * image.l2_entries
    if offset % image.cluster_size or count % image.cluster_size \
            or offset // table_span != (offset + count - 1) // table_span:
        return None       # the zero decision must cover the whole range
    return image, source_image


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

    def extent_below(self, offset: int, length: int) -> "_Below":
        """For a range the child's own layer does not hold (block-stream asked):
        what the layers below answer for its first extent; nothing needs
        copying when that is unallocated down to ``bottom``."""
        below = self._below(self.children["file"], offset, length)
        # With a bottom, only what the chain holds down to it is copied.
        below.copy = self.bottom is None or below.kind != UNALLOCATED
        return below

    async def copy_extent(self, offset: int, below: "_Below", granule: int = 0,
                          on_kept: "Callable[[], None] | None" = None) -> None:
        """Copy the extent ``extent_below`` found (populate's work for it). With a
        ``granule``, the extent stands for several copies of that size QEMU would
        make one after the other (each deciding zero or data on its own).
        ``on_kept`` is called from a pool thread when one pool task copies the
        extent as data (CheckedCopy.on_kept)."""
        await self._copy_extent(self.children["file"], offset, below, granule, on_kept)

    def copies_in_one_task(self, offset: int, below: "_Below") -> bool:
        """Whether ``copy_extent`` makes this extent without reading it into the
        event loop: known zeroes, or data clusters copied by one pool task."""
        return below.zeroes or _host_copy_images(self.children["file"], offset, below.count,
                                                 below) is not None

    async def _copy_extent(self, child: BlockNode, offset: int, below: "_Below",
                           granule: int = 0,
                           on_kept: "Callable[[], None] | None" = None) -> None:
        """Copy one extent the child lacks, the cheapest way that writes what
        QEMU's copy-on-read writes."""
        count = below.count
        if below.zeroes:
            # The chain reads as zeroes here without touching a file (zero or
            # unallocated qcow2 clusters): what the read would return is
            # known, so the zero write goes out without it.
            await child.co_pwrite_zeroes(offset, count)
            return
        try:
            if await self._copy_host_data(child, offset, count, below, granule, on_kept):
                return
        except MixedZeroes:
            # Some granules read as zeroes and some not: one copy each.
            for at in range(offset, offset + count, granule):
                piece = replace(below, count=min(granule, offset + count - at))
                await self._copy_extent(child, at, piece)
            return
        # Read into the loop: a caller that batches keeps such extents to one
        # granule (block-stream), so the zero decision below is per granule.
        await self._copy_into_child(child, offset, await child.co_pread(offset, count))

    async def _read(self, offset: int, length: int, *, want_data: bool) -> bytes:
        child = self.children["file"]
        pieces: list[bytes] = []
        end = offset + length
        while offset < end:
            kind, count = layer_status(child, offset, end - offset)
            count = min(count, end - offset)
            below = None
            if kind == UNALLOCATED:
                below = self.extent_below(offset, count)
                count = below.count
            copy = below is not None and below.copy
            if copy and not want_data:
                await self._copy_extent(child, offset, below)
            elif copy:
                data = await child.co_pread(offset, count)
                await self._copy_into_child(child, offset, data)
                if want_data:
                    pieces.append(data)
            elif want_data:
                pieces.append(await child.co_pread(offset, count))
            offset += count
        return b"".join(pieces)

    def _below(self, child: BlockNode, offset: int, count: int) -> "_Below":
        """What the layers under ``child`` (down to ``bottom``, or the whole chain)
        hold at ``offset``: the first answer that is not unallocated, the length
        it covers, the layer that gave it, and whether every read on the way is
        a plain qcow2 read of the full range (no request hook, no layer that
        ends early), so that zeroes are known without a read."""
        node = skip_filters(cow_child(child))
        last = skip_filters(self.bottom)
        quiet = not interposed(child)
        while node is not None:
            if not is_qcow2(node) or interposed(node) or node.size < offset + count:
                quiet = False
            kind, n = layer_status(node, offset, count)
            count = min(count, n)
            if kind != UNALLOCATED:
                return _Below(kind, count, node, quiet and kind == "zero", quiet)
            if node is last:
                break
            node = cow_child(node)
        # Unallocated down to the end of the chain reads as zeroes; down to a
        # bottom with more below it, nothing is copied anyway.
        return _Below(UNALLOCATED, count, None, quiet and node is None)

    @staticmethod
    async def _copy_host_data(child: BlockNode, offset: int, count: int,
                              below: "_Below", granule: int = 0,
                              on_kept: "Callable[[], None] | None" = None) -> bool:
        """Data clusters of a qcow2 layer copied into a qcow2 child in one
        thread-pool task (read, zero check, write; the child's write path
        allocates and links the clusters as for the same bytes, or makes zero
        clusters when they read as zeroes). False when this range does not
        qualify: nothing was done then. MixedZeroes when granules differ."""
        images = _host_copy_images(child, offset, count, below)
        if images is None:
            return False
        source_image = images[1]
        runs = await host_runs(source_image, offset, count)
        if runs is None:
            return False
        source = below.node
        fd, base = source.children["file"].host_file()   # type: ignore[misc,union-attr]
        try:
            await child.co_pwrite(offset, CheckedCopy(  # type: ignore[arg-type]
                [(fd, base + at, length) for at, length in runs], granule, on_kept))
        finally:
            source_image.unpin_host_runs()
        return True

    @staticmethod
    async def _copy_into_child(child: BlockNode, offset: int, data: bytes) -> None:
        if not is_zero(data):
            await child.co_pwrite(offset, data)
        else:
            await child.co_pwrite_zeroes(offset, len(data))

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self.children["file"].co_pwrite(offset, data)

    async def co_pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False,
                               may_unmap: bool = False) -> None:
        # cor_co_pwrite_zeroes: the request goes to the child as it came, so a
        # commit through this filter still makes zero clusters in a qcow2 base.
        await self.zeroes_to_child(offset, length, no_fallback=no_fallback, may_unmap=may_unmap)

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
