"""``qcow2``: the qcow2 format on a protocol child (``file``), with a ``backing`` child.

The format itself lives in :mod:`qmpjobd.block.formats.qcow2`; this module makes
it a graph node. Options (QAPI BlockdevOptionsQcow2): ``file``; ``backing`` as a
node name, inline options (opened read-only unless they say otherwise), ``null``
(no backing) or absent (the chain named in the image headers is opened read-only,
each node with a generated name, relative names resolved against the overlay's
directory); ``lazy-refcounts``, ``discard-no-unref``, the cache sizes,
``overlap-check`` and ``pass-discard-*`` are accepted (``pass-discard-request``
decides whether freed clusters are discarded on the file); ``encrypt`` and
``data-file`` are refused.

Opening reads the header and tables synchronously, as QEMU's blockdev-add does
(the monitor waits for the open); closing writes the caches back the same way.
Requests run through the image's async paths (the thread pool for data).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

from qmpjobd.block.activation import check_child_attach
from qmpjobd.block.formats.qcow2 import bitmaps as qcow2_bitmaps
from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.backing import full_backing_filename, open_header_backing
from qmpjobd.block.formats.qcow2.header import check_runtime_options
from qmpjobd.block.formats.qcow2.image import CorruptionError, Options, Qcow2Image, table_entries
from qmpjobd.block.formats.qcow2.repair import repair_if_dirty
from qmpjobd.block.formats.qcow2.storage import NodeStorage
from qmpjobd.block.node import BlockNode, discard_host_range, io_error, write_fully
from qmpjobd.block.permissions import check_new_parent
from qmpjobd.block.syncio import run_now
from qmpjobd.block.personality import QEMU_OPT_SIZE_RANGE_REWORDED
from qmpjobd.errors import QMPError

_ABSENT = object()
_L2_ENTRY = struct.Struct(">Q")


_KIND_MASK = C.OFLAG_KIND | C.L2E_OFFSET_MASK


def _entry_kind_name(entry: int) -> str:
    """Block status's name for the kind of cluster an L2 entry describes."""
    if entry & C.OFLAG_KIND == C.OFLAG_ZERO:
        return "zero"
    return "data" if entry & _KIND_MASK else "unallocated"


# Entries unpacked at a time: a run usually ends within a request's few clusters,
# but status over a whole device scans tables to their end.
_SCAN_BLOCK = 128


def _first_other_kind(table: bytes | bytearray, first: int, count: int, kind: str) -> int:
    """How many of the ``count`` entries from ``first`` on are of ``kind``
    (the index, relative to ``first``, of the first one that is not).

    Block status asks this for every chunk a job copies, and over whole tables
    for a device: the tests are written out per kind (no call per entry), a
    block of empty entries is recognised at C speed."""
    done = 0
    while done < count:
        block = min(_SCAN_BLOCK, count - done)
        same = _same_in_block(table_entries(table, first + done, block), kind)
        done += same
        if same < block:
            break
    return done


def _same_in_block(entries: tuple[int, ...], kind: str) -> int:
    if kind == "unallocated":
        if not any(entries):
            return len(entries)
        for i, entry in enumerate(entries):
            if entry & _KIND_MASK:
                return i
    elif kind == "zero":
        for i, entry in enumerate(entries):
            if entry & C.OFLAG_KIND != C.OFLAG_ZERO:
                return i
    else:
        for i, entry in enumerate(entries):
            if not entry & _KIND_MASK or entry & C.OFLAG_KIND == C.OFLAG_ZERO:
                return i
    return len(entries)


class SyncStorage(NodeStorage):
    """The child's host file read and written directly (open and close only)."""

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.host = node.host_file()

    async def pread(self, offset: int, length: int) -> bytes:
        if self.host is None:
            return await super().pread(offset, length)
        fd, base = self.host
        data = os.pread(fd, length, base + offset)
        return data + bytes(length - len(data))

    async def pwrite(self, offset: int, data: bytes) -> None:
        if self.host is None:
            await super().pwrite(offset, data)
            return
        self.node.extend_for_write(offset + len(data))
        fd, base = self.host
        write_fully(fd, base + offset, data)

    async def flush(self) -> None:
        if self.host is not None and not self.node.read_only:
            os.fdatasync(self.host[0])

    async def discard(self, offset: int, length: int) -> None:
        if self.host is None:
            await super().discard(offset, length)
            return
        # The file driver's discard, here directly, as the open and resize paths
        # do I/O.
        fd, base = self.host
        start = base + offset
        end = min(start + length, os.fstat(fd).st_size)
        if end > start and self.node.discard_unmap:
            discard_host_range(fd, start, end - start)


def write_back(node: BlockNode, image: "Qcow2Image", *, flush: bool = False,
               ordering_flushes: bool = True, mark_clean: bool = False) -> None:
    """Write ``image``'s cached metadata (dirty L2 tables, refcount blocks) to
    ``node``'s file, synchronously: used where the node is drained or closing
    (close, going read-only, inactivation), so nothing else is in flight.

    ``ordering_flushes`` False leaves out the flushes between dependent tables:
    what is written reaches the kernel in order, which is all a SIGKILL needs (a
    power cut waits for the node's next flush, as with QEMU).

    ``mark_clean`` (close, going read-only, inactivation: where QEMU calls
    qcow2_mark_clean) then clears a dirty bit the image still has, after the
    tables: one a repair left because corruption it cannot fix remained."""
    if image.read_only:
        return
    storage = SyncStorage(node.children["file"])
    for step in image.pending_writes():
        if step is None:
            if ordering_flushes:
                run_now(storage.flush())
        else:
            run_now(storage.pwrite(*step))
    if mark_clean and image.header.dirty and not image.unusable:
        run_now(storage.flush())
        image.header.incompatible_features &= ~C.INCOMPAT_DIRTY
        try:
            header = image.header.pack()
        except QMPError:
            header = None       # a header that no longer fits: QEMU's update fails too
        if header is not None:
            run_now(storage.pwrite(0, header))
        flush = True
    if flush:
        run_now(storage.flush())


class Qcow2Node(BlockNode):
    driver = "qcow2"
    is_format = True
    child_roles = ("file",)
    # Only encrypt.key-secret would be; encryption is refused.
    strong_options = ()

    @classmethod
    def check_children(cls, children: dict[str, BlockNode]) -> None:
        if "file" not in children:
            raise QMPError("Parameter 'file' is missing")

    # --- open and close -----------------------------------------------------------------

    def open(self) -> None:
        file = self.children["file"]
        check_child_attach(self.node_name, "file", file)
        if file.read_only:
            self.read_only = True
        # The file edge's permissions (and image locks) come before the header is
        # read, as QEMU attaches the child before qcow2_open looks at it.
        check_new_parent(self)
        self._refuse_options()
        if file.read_only:
            self.read_only = True
        self.image: Qcow2Image | None = None
        self.opened_backing_from_header = False
        image = self.read_image(self.read_only)
        check_runtime_options(image.header, self.options,
                              self.graph.personality.has(QEMU_OPT_SIZE_RANGE_REWORDED))
        self.image = image
        self.size = image.size
        qcow2_bitmaps.on_open(self)
        try:
            # After the bitmaps are loaded, as in qcow2_do_open.
            repair_if_dirty(self)
        except BaseException:
            self.image = None      # a failed open writes nothing at close
            raise

    def read_image(self, read_only: bool, options: Options | None = None) -> Qcow2Image:
        """The image read from the file child (open, reopen, activation), with the
        node's hooks in place: I/O through the file node, discards as the node
        passes them, corruption events, reads of the backing child."""
        file = self.children["file"]
        image = run_now(Qcow2Image.open(SyncStorage(file), read_only=read_only,
                                        options=options or self._image_options(), repair=False))
        image.storage = NodeStorage(file)
        image.passes_request_discards = self._passes_request_discards
        image.corruption_listener = self._corruption_event
        image.backing = self._read_backing if self.backing_node() is not None else None
        return image

    def backing_linked(self) -> None:
        if self.image is not None:
            self.image.backing = self._read_backing if self.backing_node() is not None else None

    def open_backing(self) -> bool:
        """The second step of opening, which the graph runs once the format is open
        (QEMU's bdrv_open_backing_file); True when a backing child was attached."""
        self._open_backing()
        self.backing_linked()
        return self.backing_node() is not None

    def _refuse_options(self) -> None:
        if "data-file" in self.options:
            raise QMPError("'data-file' can only be set for images with an external "
                           "data file")

    def _image_options(self) -> Options:
        encrypt = self.options.get("encrypt")
        encrypt = encrypt if isinstance(encrypt, dict) else {}
        options = Options(discard_no_unref=bool(self.options.get("discard-no-unref")),
                          encrypt_format=encrypt.get("format"),
                          encrypt_secret=encrypt.get("key-secret"),
                          has_secret=self.graph.has_secret)
        cluster = 1 << 16
        l2_size = self.options.get("l2-cache-size")
        if isinstance(l2_size, int) and l2_size > 0:
            options.l2_cache_entries = max(2, l2_size // cluster)
        return options

    def _open_backing(self) -> None:
        """Attach the backing child as the ``backing`` option says. The node takes
        its place in the node list first: QEMU names a format node before it opens
        its backing chain."""
        ref = self.options.get("backing", _ABSENT)
        if ref is None:
            return
        graph = self.graph
        placed = self.node_name not in graph.nodes
        if placed:
            graph.nodes[self.node_name] = self
        try:
            if isinstance(ref, str):
                backing = graph.find(ref)
                if backing is None:
                    raise QMPError(f"Could not open backing file: Cannot find device='{ref}' "
                                   f"nor node-name='{ref}'")
            elif isinstance(ref, dict):
                backing = self._open_inline_backing(dict(ref))
            else:
                backing = self._open_header_backing()
                if backing is None:
                    return
        except BaseException:
            if placed:
                graph.nodes.pop(self.node_name, None)
            raise
        # Most recently attached first, as QEMU lists a node's children.
        self.children = {"backing": backing, **self.children}
        backing.parent_nodes.append(self)
        backing.add_blocker(self, f"node is used as backing hd of '{self.node_name}'")

    def _open_inline_backing(self, options: dict) -> BlockNode:
        options.setdefault("read-only", True)
        header = self.image.header if self.image is not None else None
        if isinstance(options.get("file"), str) and getattr(header, "backing_file", None):
            # bdrv_open_backing_file hands the header's backing name to the backing's
            # open as its file's filename, which a file given by reference refuses
            # (and the half-made backing node is dropped again).
            self.graph.graph_changes("close")
            raise QMPError("Could not open backing file: Cannot reference an existing block "
                           "device with additional options or a new filename")
        try:
            return self.graph._open_tree(options, inline_child=True)
        except QMPError as exc:
            raise QMPError(f"Could not open backing file: {exc.desc}") from None

    def _open_header_backing(self) -> BlockNode | None:
        return open_header_backing(self)

    def _resolve(self, name: str) -> str:
        """QEMU's path_combine: relative to the directory of the overlay's file."""
        return full_backing_filename(name, self.children["file"].exact_filename())

    def _probe(self, path: str) -> str:
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError:
            return "raw"
        return "qcow2" if magic == b"QFI\xfb" else "raw"

    def close(self) -> None:
        backing = self.backing_node()
        if backing is not None:
            backing.remove_blockers(self)
        image = self.image
        if not self.active:
            # An inactive node's image belongs to someone else: QEMU's close
            # writes nothing (the inactivation already stored everything).
            return
        if image is not None:
            qcow2_bitmaps.on_close(self)
        if image is None or image.read_only:
            return
        self.image = None
        try:
            write_back(self, image, mark_clean=True)
        except OSError:
            pass     # QEMU reports a failed close flush on stderr and goes on

    def inactivate_image(self) -> None:
        """blockdev-set-active false (formats/qcow2/activation.py)."""
        from qmpjobd.block.formats.qcow2.activation import inactivate_image
        inactivate_image(self)

    def activate_image(self) -> None:
        """blockdev-set-active true: read the image again (formats/qcow2/activation.py)."""
        from qmpjobd.block.formats.qcow2.activation import activate_image
        activate_image(self)

    # --- I/O ----------------------------------------------------------------------------

    def _require_image(self) -> Qcow2Image:
        if self.image is None:
            raise io_error(errno.EBADF)
        return self.image

    async def _read_backing(self, offset: int, length: int) -> bytes:
        backing = self.backing_node()
        if backing is None or offset >= backing.size:
            return bytes(length)
        inside = min(length, backing.size - offset)
        data = await backing.co_pread(offset, inside)
        return data + bytes(length - len(data))

    async def _preadv(self, offset: int, length: int) -> bytes:
        return await self._require_image().read(offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self._require_image().write(offset, data)

    async def co_pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False,
                               may_unmap: bool = False) -> None:
        """Zero writes with the zero flag (the generic version would write data).
        MAY_UNMAP only counts on a node opened with discard=unmap, as in QEMU."""
        self._check_write_request(offset, length)
        if not length:
            return
        if self.before_write_notifiers:
            # A copy-before-write user saves the old data first, as for any write.
            await self.notify_before_write(offset, length)
        self.write_generation += 1
        self.write_request_started(offset, length)
        try:
            with self._request():
                await self._require_image().write_zeroes(offset, length,
                                                         may_unmap and self.discard_unmap)
        finally:
            self.write_request_finished(offset, length)

    async def _pdiscard(self, offset: int, length: int) -> None:
        await self._require_image().discard(offset, length)

    async def _flush(self) -> None:
        # QEMU's flush announces both halves on the file child (blkdebug rules).
        file = self.children["file"]
        file.debug_event("flush_to_os")
        image = self._require_image()
        await image.flush(to_disk=False)
        file.debug_event("flush_to_disk")
        await file.co_flush()
        image.data_since_flush = False

    def _truncate(self, size: int, zero_new: bool) -> None:
        # block_resize: the format's side is qmpjobd.block.formats.qcow2.resize.
        from qmpjobd.block.formats.qcow2.resize import resize_node

        resize_node(self, size, zero_new)

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        """Data, zero or (unallocated) the backing chain's answer, for the run of
        clusters like the one at ``offset``."""
        image = self._require_image()
        if image.unusable:
            raise io_error(errno.ENOMEDIUM)
        end = min(offset + length, image.size)
        try:
            kind, pos = self._run_from(image, offset, end, strict=False)
        except CorruptionError as exc:
            # Block status meets damaged tables like a read does.
            self.run_metadata_operation(
                lambda img: img.signal_corruption(exc.fatal, exc.corrupt_offset,
                                                  exc.corrupt_size, exc.message))
            raise io_error(errno.EIO) from None
        count = max(1, min(pos, end) - offset)
        if kind == "unallocated":
            backing = self.backing_node()
            if backing is None or offset >= backing.size:
                return ("zero", count)
            return backing.block_status(offset, min(count, backing.size - offset))
        return (kind, count)

    def layer_status(self, offset: int, length: int) -> tuple[str, int]:
        """This image's own answer for the run of clusters like the one at
        ``offset`` (no backing consulted): ``data``, ``zero`` or ``unallocated``,
        and the run's length within [offset, offset+length) (at least 1).
        Damaged tables met on the way raise, as a lookup per cluster would."""
        image = self._require_image()
        end = min(offset + length, image.size)
        if offset >= end:
            return "unallocated", max(length, 1)
        kind, pos = self._run_from(image, offset, end, strict=True)
        return kind, max(1, min(pos, end) - offset)

    def _run_from(self, image: Qcow2Image, offset: int, end: int,
                  strict: bool) -> tuple[str, int]:
        """The kind of the cluster at ``offset`` and where the run of its kind
        ends (see _same_kind_end), with one table lookup for both when the
        table is cached. Damaged tables at ``offset`` raise CorruptionError."""
        cs = image.cluster_size
        start = offset - offset % cs
        l2_offset = image.l2_table_offset(offset)
        table = image.l2_cache.lookup(l2_offset) if l2_offset else None
        if table is None:
            kind = self._kind_at(image, offset)     # reads the table, or none there
            return kind, self._same_kind_end(image, start + cs, end, kind, strict)
        table_span = cs * image.l2_entries
        table_end = min(end, (offset // table_span + 1) * table_span)
        count = max(1, -(-(table_end - start) // cs))
        first = (offset // cs) % image.l2_entries
        kind = _entry_kind_name(_L2_ENTRY.unpack_from(table, first * 8)[0])
        same = 1 + _first_other_kind(table, first + 1, count - 1, kind)
        pos = start + same * cs
        if same == count and pos < end:
            pos = self._same_kind_end(image, pos, end, kind, strict)
        return kind, pos

    def _same_kind_end(self, image: Qcow2Image, pos: int, end: int, kind: str,
                       strict: bool = False) -> int:
        """Where the run of ``kind`` clusters going on at cluster-aligned ``pos``
        ends (``end`` at most, give or take the last cluster): a cached L2 table is
        scanned in one pass instead of one cache lookup per cluster (block status
        is asked for every chunk a job copies). Damaged tables end the run, or
        raise when ``strict``."""
        cs = image.cluster_size
        table_span = cs * image.l2_entries
        kind_at = self._kind_at if strict else self._kind_at_or_none
        while pos < end:
            table_end = min(end, (pos // table_span + 1) * table_span)
            try:
                l2_offset = image.l2_table_offset(pos)
            except CorruptionError:
                if strict:
                    raise
                return pos
            table = image.l2_cache.lookup(l2_offset) if l2_offset else None
            if table is None:
                if l2_offset:
                    # Not cached: cluster by cluster (the first one reads it).
                    while pos < table_end and kind_at(image, pos) == kind:
                        pos += cs
                    if pos < table_end:
                        return pos
                elif kind != "unallocated":
                    return pos            # no L2 table: all unallocated
                pos = table_end
                continue
            first = (pos // cs) % image.l2_entries
            count = -(-(table_end - pos) // cs)
            other = _first_other_kind(table, first, count, kind)
            if other < count:
                return pos + other * cs
            pos += count * cs
        return pos

    def _kind_at_or_none(self, image: Qcow2Image, offset: int) -> str | None:
        """The kind further on, None where the tables are damaged (the run ends
        there; a request that starts there meets the damage itself)."""
        try:
            return self._kind_at(image, offset)
        except CorruptionError:
            return None

    def _kind_at(self, image: Qcow2Image, offset: int) -> str:
        entry = image.cached_entry(offset)
        if entry is None:
            # Not cached: read the L2 table here (a small metadata read, as
            # QEMU's block-status does inside its request).
            l2_offset = image.l2_table_offset(offset)
            file = self.children["file"]
            file.debug_event("l2_load")
            table = run_now(SyncStorage(file).pread(l2_offset, image.cluster_size))
            image.remember_l2(l2_offset, table)
            entry = image.entry_from(table, offset)
        return _entry_kind_name(entry)

    def _passes_request_discards(self) -> bool:
        """pass-discard-request, by default on exactly when the node itself takes
        discards (discard=unmap, or the default of a node its parent opened)."""
        option = self.options.get("pass-discard-request")
        return self.discard_unmap if option is None else bool(option)

    def can_write_zeroes_with_unmap(self) -> bool:
        return self.discard_unmap

    def block_limits(self) -> dict:
        limits = super().block_limits()
        cluster = self.image.cluster_size if self.image is not None else 65536
        # Zero and discard requests work in whole clusters.
        ordered = {"request-alignment": limits.pop("request-alignment"),
                   "discard-alignment": cluster, "write-zeroes-alignment": cluster}
        ordered.update(limits)
        return ordered

    def supports_unmap(self) -> bool:
        return True

    # --- relations and names ------------------------------------------------------------

    def backing_node(self) -> BlockNode | None:
        return self.children.get("backing")

    def backing_file_name(self) -> str | None:
        backing = self.backing_node()
        return backing.filename() if backing is not None else None

    def _backing_overridden(self) -> bool:
        """QEMU's rule for json: filenames: the backing differs from what the
        header names (or the header names one and there is none)."""
        image = self.image
        header_name = image.header.backing_file if image is not None else None
        backing = self.backing_node()
        if backing is None:
            return header_name is not None
        if self.opened_backing_from_header:
            return False
        return header_name != backing.filename()

    def full_open_options(self) -> dict:
        opts: dict = {"file": self.children["file"].full_open_options()}
        if self._backing_overridden():
            backing = self.backing_node()
            opts["backing"] = backing.full_open_options() if backing is not None else None
        opts["driver"] = self.driver
        return opts

    def exact_filename(self) -> str | None:
        if self._backing_overridden():
            return None
        return self.primary_exact_filename(self.children["file"])

    def actual_size(self) -> int | None:
        return self.children["file"].actual_size()

    def has_dirty_flag(self) -> bool:
        return True

    def image_dirty(self) -> bool:
        return bool(self.image is not None and self.image.header.dirty)

    def image_details(self) -> dict:
        image = self.image
        if image is None:
            return {}
        if image.unusable:
            # QEMU dropped the driver after a fatal corruption: bdrv_query_image_info
            # then fails, and with it the whole query.
            raise QMPError(f"Block device {self.node_name} is ejected")
        header = image.header
        details: dict = {"cluster-size": header.cluster_size}
        if header.backing_file is not None:
            details["backing-filename"] = header.backing_file
            details["full-backing-filename"] = self._resolve(header.backing_file)
            if header.backing_format is not None:
                details["backing-filename-format"] = header.backing_format
        if image.snapshots:
            details["snapshots"] = image.snapshot_list()
        return details

    # --- internal snapshots and damaged metadata (formats/qcow2/snapshot.py) -----------

    def is_inserted(self) -> bool:
        """QEMU's bdrv_is_inserted: false once a fatal corruption dropped the
        driver (jobs then refuse the node: "Device is not inserted: ...")."""
        return self.image is None or not self.image.unusable

    def run_metadata_operation(self, operation: Any) -> Any:
        """Run ``operation(image)`` (a coroutine function) to completion now, with
        the image's I/O done directly on the host file: QEMU runs snapshot
        commands inside the monitor command, on a drained node."""
        image = self._require_image()
        async_storage = image.storage
        image.storage = SyncStorage(self.children["file"])
        try:
            return run_now(self._guarded(image, operation))
        finally:
            image.storage = async_storage

    @staticmethod
    async def _guarded(image: Qcow2Image, operation: Any) -> Any:
        from qmpjobd.block.formats.qcow2.image import CorruptionError, eio
        try:
            return await operation(image)
        except CorruptionError as exc:
            await image.signal_corruption(exc.fatal, exc.corrupt_offset, exc.corrupt_size,
                                          exc.message)
            raise eio() from None

    def _corruption_event(self, fatal: bool, offset: int, size: int, message: str) -> None:
        """What QEMU's qcow2_signal_corruption prints and sends."""
        import sys
        if fatal:
            line = (f"qcow2: Marking image as corrupt: {message}; further corruption "
                    "events will be suppressed")
        else:
            line = (f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                    "events will be suppressed")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        data: dict = {"device": "", "node-name": self.node_name, "msg": message}
        if offset >= 0:
            data["offset"] = offset
        if size >= 0:
            data["size"] = size
        data["fatal"] = fatal
        self.graph.jobs.emit("BLOCK_IMAGE_CORRUPTED", data)

    def format_specific_info(self, who: Any) -> dict | None:
        image = self.image
        if image is None:
            return None
        header = image.header
        data: dict = {"compat": "0.10" if header.version == 2 else "1.1"}
        if header.version >= 3:
            data["extended-l2"] = header.extended_l2
            data["lazy-refcounts"] = header.lazy_refcounts
            data["corrupt"] = header.corrupt
        data["refcount-bits"] = header.refcount_bits
        bitmaps = qcow2_bitmaps.stored_bitmap_infos(self) if header.version >= 3 else None
        if bitmaps is not None:
            data["bitmaps"] = bitmaps
        data["compression-type"] = ("zlib" if header.compression_type == C.COMPRESSION_ZLIB
                                    else "zstd")
        return {"type": "qcow2", "data": data}
