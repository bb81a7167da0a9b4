"""The block node: one entry of the graph, with its children, users and I/O entry points.

A driver subclasses :class:`BlockNode` and implements ``_preadv``/``_pwritev`` (plus
``open`` for its options). The public ``co_pread``/``co_pwrite`` wrap them with the
checks QEMU's generic block layer does (bounds, read-only), so every driver behaves the
same at the edges.

I/O methods are coroutines awaited from job coroutines that the job engine steps by
hand. A driver that needs no waiting simply returns: awaiting it then completes without
yielding, exactly like a QEMU coroutine that never enters the main loop. A driver that
waits awaits an asyncio future (clock timer or thread-pool result); the future is what
the engine sees and uses to re-enter the job.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from qmpjobd.block.qjson import qdict_order, to_json
from qmpjobd.block.syncio import in_pool
from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph

# Largest single request QEMU's block layer accepts (BDRV_REQUEST_MAX_BYTES).
REQUEST_MAX_BYTES = 0x7FFFFE00
# Largest length a node may have (BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB).
MAX_LENGTH = 0x7FFFFFFFC0000000


# Zero writes that fall back to data go down in pieces of this size.
ZERO_WRITE_CHUNK = 4 * 1024 * 1024
# fallocate(2) modes: zero a range in place / punch a hole keeping the size.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


@functools.cache
def _libc() -> Any:
    """libc with fallocate(2) typed, loaded once (find_library runs ldconfig, and
    a commit's zero writes discard on every freed run)."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return libc


def _fallocate(fd: int, modes: tuple[int, ...], offset: int, length: int) -> bool:
    """fallocate(2) with the first of ``modes`` the file system supports; False
    when it supports none (the caller then writes zeroes)."""
    import ctypes
    libc = _libc()
    for mode in modes:
        if libc.fallocate(fd, mode, offset, length) == 0:
            return True
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise io_error(code)
    return False


def _fallocate_zero(fd: int, offset: int, length: int) -> bool:
    """Zero a host file range without writing data."""
    modes = (_FALLOC_FL_ZERO_RANGE, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
    return _fallocate(fd, modes, offset, length)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a host file range, as file-posix's discard does (it then reads
    zeroes and no longer counts in actual-size)."""
    return _fallocate(fd, (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,), offset, length)


def discard_host_range(fd: int, offset: int, length: int) -> None:
    """file-posix's discard of a host file range (blocking): a punched hole, or
    zeroes written where the file system cannot punch."""
    if not punch_hole(fd, offset, length):
        write_fully(fd, offset, bytes(length))


def write_fully(fd: int, offset: int, data: "bytes | bytearray | memoryview") -> None:
    """pwrite all of ``data`` at ``offset`` (blocking; short writes continue)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


async def _zero_host_range(node: "BlockNode", host: tuple[int, int], offset: int,
                           length: int) -> bool:
    """Zero ``length`` bytes at ``offset`` of ``node`` in its host file, in the
    thread pool, accounted as a write on every node of its chain."""
    fd, base = host
    for member, _ in node.data_chain(offset):
        member.write_generation += 1
    node.chain_write_started(offset, length)
    try:
        with node._request():
            return await in_pool(_fallocate_zero, fd, base + offset, length)
    finally:
        node.chain_write_finished(offset, length, data=False)


def io_error(code: int) -> OSError:
    """The exception every layer raises for a failed request: errno plus libc text."""
    return OSError(code, os.strerror(code))


@dataclass
class Blocker:
    """An operation blocker on a node, as a block job installs on the nodes it uses."""

    owner: Any          # the job that installed it
    reason: str         # e.g. "block device is in use by block job: mirror"


class BlockNode:
    """A node of the block graph. Drivers subclass it; see the module docstring."""

    # The QAPI BlockdevDriver name, set by each driver class.
    driver: ClassVar[str] = ""
    # True for format drivers (raw): they sit on a protocol child called "file".
    is_format: ClassVar[bool] = False
    # True for filter drivers (blkdebug): they pass I/O through to one child.
    is_filter: ClassVar[bool] = False
    # True for drivers QEMU gives a protocol_name (file, null-co, blkdebug): only a
    # protocol child's plain filename can stand for a format node above it.
    is_protocol: ClassVar[bool] = False
    # Option members that name children (inline dict or node-name reference).
    child_roles: ClassVar[tuple[str, ...]] = ()
    # QEMU hands an aligned zero-length read or write to the driver too; True for
    # the drivers where that is observable and harmless (blkdebug checks its
    # rules). Elsewhere a zero-length request does nothing.
    forwards_empty_requests: ClassVar[bool] = False

    def __init__(self, graph: "BlockGraph", node_name: str, options: dict,
                 children: dict[str, "BlockNode"], auto_named: bool) -> None:
        self.graph = graph
        self.node_name = node_name
        # The options as given (parse order kept), minus children given inline;
        # used for json: filenames and query output.
        self.options = options
        self.children = children          # role ("file", "image") -> child node
        self.auto_named = auto_named      # name generated ("#block123"), not chosen
        self.read_only: bool = bool(options.get("read-only", False))
        # The options as QEMU stores them (flattened, in its insertion order); the
        # graph sets this before open() for nodes it creates.
        self.flat_options: dict = flatten_options(options)
        self.size: int = 0
        self.monitor_owned = False        # added by blockdev-add at top level
        # Opened by the daemon for a job (drive-mirror/drive-backup target): dropped
        # when its last job user detaches.
        self.release_when_unused = False
        self.job_users: list[Any] = []    # jobs that hold this node (may repeat)
        # Jobs holding a plain reference without an edge (QEMU's bdrv_ref in an
        # amend job): blockdev-del says "in use" until the job is dismissed.
        self.holders: list[Any] = []
        # Jobs that reach this node through a BlockBackend of their own (QEMU's
        # blk_new + blk_insert_bs, e.g. a mirror target): blockdev-del then says
        # "Node <n> is in use" before it looks at blockers.
        self.backend_users: list[Any] = []
        self.blockers: list[Blocker] = []
        # Dirty bitmaps, newest first (qmpjobd.block.dirty_bitmap.DirtyBitmap); a
        # mirror job may still put a callable returning BlockDirtyInfo here.
        self.dirty_bitmaps: list[Any] = []
        # Nested drained sections currently applied to this node.
        self.quiesce_counter = 0
        # Requests inside this node's driver (QEMU's bs->in_flight): a drain waits
        # for them.
        self.in_flight = 0
        # Writes started / generation covered by the last flush (QEMU write_gen).
        self.write_generation = 0
        self.flushed_generation = 0
        # QEMU's bs->wr_highest_offset (query-blockstats) and the one-shot write
        # threshold of block-set-write-threshold (0: disarmed).
        self.wr_highest_offset = 0
        self.write_threshold = 0
        # Copy-before-write notifiers (a backup job's filter, which sits above
        # this node in QEMU): each is awaited with (offset, length) before a
        # write, zero write or discard reaches this node, to save the old data.
        self.before_write_notifiers: list[Any] = []
        # QEMU's BDRV_O_INACTIVE cleared (10.0+ personalities can change it with
        # blockdev-add active=false and blockdev-set-active; 7.2 has no way to).
        self.active: bool = bool(options.get("active", True))
        self.parent_nodes: list[BlockNode] = []
        for child in children.values():
            child.parent_nodes.append(self)

    # --- lifetime -----------------------------------------------------------------

    @classmethod
    def check_children(cls, children: dict[str, "BlockNode"]) -> None:
        """Raise QMPError when a mandatory child is missing."""

    def open(self) -> None:
        """Check driver options and acquire resources; raise QMPError on failure."""

    def close(self) -> None:
        """Release resources (file descriptors). Called once the node leaves the graph."""

    # --- relations ----------------------------------------------------------------

    @property
    def file_child(self) -> "BlockNode | None":
        """The child that holds the data (``file`` for formats, ``image`` for blkdebug)."""
        return self.children.get("file") or self.children.get("image")

    def detach_children(self) -> list["BlockNode"]:
        """Unlink this node from its children; returns them."""
        children = list(self.children.values())
        for child in children:
            if self in child.parent_nodes:
                child.parent_nodes.remove(self)
        return children

    def ancestors(self) -> list["BlockNode"]:
        """Every node above this one (parents, their parents, ...), each once."""
        seen: list[BlockNode] = []
        stack = list(self.parent_nodes)
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.append(node)
                stack.extend(node.parent_nodes)
        return seen

    # --- users and blockers ---------------------------------------------------------

    def add_job_user(self, job: Any, *, backend: bool = False,
                     blocker: str | None = None) -> None:
        """Register ``job`` as a user of this node (QEMU: the job's BdrvChild).

        A job that attaches to a node which is already drained is paused once per
        drained section, as QEMU does when a new parent attaches to a quiesced node;
        this is how a backup started inside a transaction shows ``paused``.
        ``blocker`` (e.g. "block device is in use by block job: mirror") makes other
        operations on the node fail with "Node '<n>' is busy: <blocker>".
        """
        self.job_users.append(job)
        if backend:
            self.backend_users.append(job)
        if blocker is not None:
            self.add_blocker(job, blocker)
        for _ in range(self.quiesce_counter):
            self.graph.pause_job_for_drain(job)

    def remove_job_user(self, job: Any) -> None:
        """Detach ``job``; undoes the drain pauses it got from this node."""
        if job not in self.job_users:
            return
        self.job_users.remove(job)
        if job in self.backend_users:
            self.backend_users.remove(job)
        if job not in self.job_users:
            self.remove_blockers(job)
        for _ in range(self.quiesce_counter):
            self.graph.resume_job_after_drain(job)
        if self.release_when_unused and not self.job_users:
            self.graph.release_implicit(self)

    def add_blocker(self, owner: Any, reason: str) -> None:
        # QEMU inserts op blockers at the head of the list, so the newest one
        # names itself in "is busy" errors.
        self.blockers.insert(0, Blocker(owner, reason))

    def remove_blockers(self, owner: Any) -> None:
        self.blockers = [b for b in self.blockers if b.owner is not owner]

    def check_not_busy(self) -> None:
        """Raise QEMU's "busy" error if a job blocks operations on this node."""
        if self.blockers:
            raise QMPError(f"Node '{self.node_name}' is busy: {self.blockers[0].reason}")

    def is_inserted(self) -> bool:
        """QEMU's bdrv_is_inserted: a node is "inserted" while every child is (a
        format whose image was marked corrupt drops its driver and answers False)."""
        return all(child.is_inserted() for child in self.children.values())

    # --- I/O ------------------------------------------------------------------------

    async def co_pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; past the end reads as zeroes."""
        self._check_request(offset, length)
        inside = max(0, min(length, self.size - offset))
        data = b""
        if inside:
            with self._request():
                data = await self._preadv(offset, inside)
        elif not length and self.forwards_empty_requests \
                and offset % self.request_alignment() == 0:
            with self._request():
                await self._preadv(offset, 0)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    async def co_pwrite(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``. Read-only nodes and writes past the end fail."""
        self._check_write_request(offset, len(data))
        if data:
            if self.before_write_notifiers:
                await self.notify_before_write(offset, len(data))
            self.write_generation += 1
            self.write_request_started(offset, len(data))
            try:
                with self._request():
                    await self._pwritev(offset, data)
            finally:
                self.write_request_finished(offset, len(data))
        elif self.forwards_empty_requests and offset % self.request_alignment() == 0:
            with self._request():
                await self._pwritev(offset, data)

    async def notify_before_write(self, offset: int, length: int) -> None:
        """Run the copy-before-write notifiers for a request about to change
        ``length`` bytes at ``offset``; a notifier's OSError fails the request."""
        for notifier in list(self.before_write_notifiers):
            await notifier(offset, length)

    def extend_for_write(self, end: int) -> None:
        """Let a format driver above write up to ``end`` (QEMU allows a format to
        write past its file's end): a plain host file grows, other nodes do not."""
        if end > self.size and self.file_child is None and self.host_file() is not None:
            self.size = -(-end // 512) * 512

    def write_request_started(self, offset: int, length: int) -> None:
        """QEMU's write-request prepare step: an armed threshold that the request
        ends past fires BLOCK_WRITE_THRESHOLD once and disarms itself."""
        end = offset + length
        threshold = self.write_threshold
        if threshold and end > threshold:
            self.write_threshold = 0
            self.graph.jobs.emit("BLOCK_WRITE_THRESHOLD", {
                "node-name": self.node_name, "amount-exceeded": end - threshold,
                "write-threshold": threshold})

    def write_request_finished(self, offset: int, length: int) -> None:
        """QEMU's write-request finish step; it runs whether the write failed or not."""
        self.wr_highest_offset = max(self.wr_highest_offset, offset + length)
        if self.dirty_bitmaps:
            self.mark_dirty(offset, length)

    def mark_dirty(self, offset: int, length: int) -> None:
        """Set the bits of every recording dirty bitmap of this node (QEMU's
        bdrv_set_dirty). The generic write, zero-write and discard paths call it
        when a request finishes, failed or not, whoever made it."""
        for bitmap in self.dirty_bitmaps:
            if not hasattr(bitmap, "set_dirty"):
                continue
            # A write that grew the node (a format writing past its file's
            # end) grows the bitmaps with it, as QEMU's write-finish step does.
            if bitmap.size < self.size and offset + length > bitmap.size:
                bitmap.truncate(self.size)
            if bitmap.recording:
                bitmap.set_dirty(offset, length)

    def find_dirty_bitmap(self, name: str) -> Any:
        """The dirty bitmap called ``name`` on this node, or None."""
        for bitmap in self.dirty_bitmaps:
            if getattr(bitmap, "name", None) == name:
                return bitmap
        return None

    def add_dirty_bitmap(self, bitmap: Any) -> None:
        """Attach ``bitmap`` as the newest of this node's bitmaps."""
        bitmap.node = self
        self.dirty_bitmaps.insert(0, bitmap)

    def remove_dirty_bitmap(self, bitmap: Any) -> None:
        if bitmap in self.dirty_bitmaps:
            self.dirty_bitmaps.remove(bitmap)

    def data_chain(self, offset: int = 0) -> Iterator[tuple["BlockNode", int]]:
        """This node and every data child below it, each with where ``offset`` lies
        in it (a raw ``offset`` shifts it)."""
        node: BlockNode | None = self
        while node is not None:
            yield node, offset
            offset += node.child_offset()
            node = node.file_child

    def chain_write_started(self, offset: int, length: int) -> None:
        """A write that passes this node and every data child below it without going
        through their co_pwrite (copy offload, a zero write skipped as redundant)."""
        for node, at in self.data_chain(offset):
            node.write_request_started(at, length)

    def chain_write_finished(self, offset: int, length: int, *, data: bool = True) -> None:
        """``data``: bytes were written (not a range zeroed without writing)."""
        for node, at in self.data_chain(offset):
            node.write_request_finished(at, length)
            if data:
                node.data_written(at, length)

    def data_written(self, offset: int, length: int) -> None:
        """Bytes reached this node's host file without its ``_pwritev`` (copy
        offload); a host file driver starts writeback early
        (qmpjobd.block.writeback), other nodes ignore it."""

    async def co_pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False,
                               may_unmap: bool = False) -> None:
        """Make a range read as zeroes (QEMU's bdrv_co_pwrite_zeroes). ``may_unmap``
        (BDRV_REQ_MAY_UNMAP) only matters to formats with zero clusters.

        Where the node maps 1:1 onto a host file the range is zeroed without
        writing data (fallocate, as QEMU's file driver does); elsewhere zeroes
        are written through ``co_pwrite``, unless ``no_fallback`` (QEMU's
        BDRV_REQ_NO_FALLBACK) asks for ENOTSUP instead. Either way the write is
        seen by every node of the chain like any other write.
        """
        self._check_write_request(offset, length)
        if not length:
            return
        if self.before_write_notifiers:
            await self.notify_before_write(offset, length)
        host = self.host_file()
        if host is not None and await _zero_host_range(self, host, offset, length):
            return
        if no_fallback:
            raise io_error(errno.ENOTSUP)
        end = offset + length
        while offset < end:
            count = min(ZERO_WRITE_CHUNK, end - offset)
            await self.co_pwrite(offset, bytes(count))
            offset += count

    async def zeroes_to_child(self, offset: int, length: int, *, no_fallback: bool,
                              may_unmap: bool, before: Any = None) -> None:
        """A filter's zero write: the checks every write passes, ``before(offset,
        length)`` if given, then the request as it came (flags too) to the child."""
        self._check_write_request(offset, length)
        if not length:
            return
        if self.before_write_notifiers:
            await self.notify_before_write(offset, length)
        with self._request():
            if before is not None:
                await before(offset, length)
            await self.file_child.co_pwrite_zeroes(  # type: ignore[union-attr]
                offset, length, no_fallback=no_fallback, may_unmap=may_unmap)

    @property
    def discard_unmap(self) -> bool:
        """Opened with discard=unmap (QEMU's BDRV_O_UNMAP): discards reach the driver.
        A node its parent opened (inline options, a backing named in a header)
        defaults to unmap, as bdrv_inherited_options makes it in QEMU."""
        discard = self.options.get("discard")
        if discard is None:
            return not self.monitor_owned
        return discard in ("unmap", "on")

    async def co_pdiscard(self, offset: int, length: int) -> None:
        """Discard a range: nothing happens (and nothing yields) unless the node was
        opened with discard=unmap, as in QEMU. The range then reads as zeroes."""
        self._check_request(offset, length)
        if not self.discard_unmap or not length:
            return
        if self.read_only:
            raise io_error(errno.EPERM)
        if self.before_write_notifiers:
            await self.notify_before_write(offset, length)
        self.write_generation += 1
        self.write_request_started(offset, length)
        try:
            with self._request():
                await self._pdiscard(offset, length)
        finally:
            # A discard dirties bitmaps like a write (not wr_highest_offset).
            if self.dirty_bitmaps:
                self.mark_dirty(offset, length)

    async def _pdiscard(self, offset: int, length: int) -> None:
        """Driver discard; formats and filters pass it to their data child, a
        driver without a data child ignores it (QEMU's null-co)."""
        child = self.file_child
        if child is not None:
            await child._pdiscard(offset + self.child_offset(), length)
            # The discard reached the child: its bitmaps see it (QEMU passes
            # it through the child's own discard request).
            if child.dirty_bitmaps:
                child.mark_dirty(offset + self.child_offset(), length)

    async def co_flush(self) -> None:
        """Make written data durable. A node not written since its last flush does
        nothing, as in QEMU (so blkdebug flush rules only fire after writes)."""
        generation = self.write_generation
        if generation == self.flushed_generation:
            return
        with self._request():
            await self._flush()
        self.flushed_generation = generation

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """Count a request as in flight while the driver handles it."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _flush(self) -> None:
        """Driver flush; the default passes it to the data child."""
        child = self.file_child
        if child is not None:
            await child.co_flush()

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        """``(kind, bytes)`` for the extent starting at ``offset``.

        kind is "data" (must be copied), "zero" (reads as zeroes; a copy may write
        zeroes instead) or "unknown" (neither; QEMU's null-co without read-zeroes).
        The default asks the data child, as QEMU's format/filter drivers do.
        """
        child = self.file_child
        if child is not None:
            return child.block_status(offset + self.child_offset(), length)
        return ("data", length)

    def can_write_zeroes_with_unmap(self) -> bool:
        """QEMU's bdrv_can_write_zeroes_with_unmap: discard=unmap and a driver that
        can punch holes (file, and formats/filters passing it to such a child)."""
        if not self.discard_unmap:
            return False
        child = self.file_child
        return child is not None and child.supports_unmap()

    def supports_unmap(self) -> bool:
        child = self.file_child
        return child is not None and child.supports_unmap()

    def child_offset(self) -> int:
        """Where this node's byte 0 lies in its data child (raw ``offset``)."""
        return 0

    # --- resizing (block_resize) ----------------------------------------------------

    def truncate(self, size: int) -> None:
        """QEMU's bdrv_co_truncate: the generic checks, in QEMU's order and with its
        texts, then the driver's ``_truncate``. Synchronous: block_resize runs it
        on a drained node. ``zero_new``: the backing file is longer than the old
        size, so the new area must be made to read as zeroes."""
        if size < 0:
            raise QMPError("Cannot truncate to a negative size")
        if size > MAX_LENGTH:
            raise QMPError(f"offset({size}) exceeds maximum({MAX_LENGTH})")
        if self.read_only:
            raise QMPError("Image is read-only")
        backing = self.backing_node()
        zero_new = size > self.size and backing is not None and backing.size > self.size
        self._truncate(size, zero_new)
        if self.dirty_bitmaps:
            # The node's dirty bitmaps follow its new length (bdrv_dirty_bitmap_truncate).
            from qmpjobd.block.dirty_bitmap import truncate_bitmaps
            truncate_bitmaps(self, self.size)

    def _truncate(self, size: int, zero_new: bool) -> None:
        """Driver resize; a filter passes it to its child, other drivers cannot."""
        child = self.file_child
        if self.is_filter and child is not None:
            child.truncate(size)
            self.size = child.size
            return
        raise QMPError("Image format driver does not support resize")

    def _check_request(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or length > REQUEST_MAX_BYTES:
            raise io_error(errno.EIO)

    def _check_write_request(self, offset: int, length: int) -> None:
        """The checks a write or zero write passes first. Their order decides the
        errno a client sees: a malformed request, a read-only node, a range past
        the end."""
        self._check_request(offset, length)
        if self.read_only:
            raise io_error(errno.EPERM)
        if offset + length > self.size:
            raise io_error(errno.EIO)

    async def _preadv(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def _pwritev(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def backing_linked(self) -> None:
        """The graph changed this node's backing child (a format reads through it)."""

    def debug_event(self, event: str) -> None:
        """A format driver announces an I/O event to its child (blkdebug listens)."""

    # --- copy offload -----------------------------------------------------------------

    def host_file(self) -> "tuple[int, int] | None":
        """``(fd, base_offset)`` when reads/writes map 1:1 onto a host file region.

        Lets job drivers offload copies to the kernel (``copy_file_range``). Nodes that
        transform data or inject errors return None and must be copied through
        ``co_pread``/``co_pwrite``.
        """
        return None

    # --- names QEMU reports ---------------------------------------------------------

    # Options that change what the node is; QEMU's "strong runtime options". They
    # decide whether a plain filename can describe the node, and fill json: names.
    strong_options: ClassVar[tuple[str, ...]] = ()

    def own_strong_options(self) -> dict:
        """Strong options given for this node, flattened as QEMU stores them."""
        flat = self.flat_options
        # QEMU copies them by walking the flattened dict, i.e. in hash order.
        return {k: flat[k] for k in qdict_order(list(flat))
                if any(k == s or (s.endswith(".") and k.startswith(s))
                       for s in self.strong_options)}

    def full_open_options(self) -> dict:
        """What it takes to reopen this node: driver, strong options, children."""
        opts: dict = {}
        for role, child in self.children.items():
            opts[role] = child.full_open_options()
        opts.update(self.own_strong_options())
        opts["driver"] = self.driver
        return opts

    def exact_filename(self) -> str | None:
        """A plain filename that fully describes the node, if there is one."""
        return None

    def primary_exact_filename(self, child: "BlockNode") -> str | None:
        """bdrv_refresh_filename's default for a format node without strong options
        or an overridden backing: the child's plain name, but only when the child
        is a protocol node (raw over qcow2, qcow2 over raw get json: names)."""
        return child.exact_filename() if child.is_protocol else None

    def filename(self) -> str:
        """The name QEMU reports as ``file`` / ``image.filename``."""
        exact = self.exact_filename()
        if exact is not None:
            return exact
        return "json:" + to_json(self.full_open_options())

    def actual_size(self) -> int | None:
        """Host bytes allocated, or None when the driver cannot tell (member left out)."""
        if self.children and not self.is_filter:
            sizes = [child.actual_size() for child in self.children.values()]
            return None if None in sizes else sum(sizes)
        return None

    def has_dirty_flag(self) -> bool:
        """QEMU reports ``dirty-flag`` when bdrv_get_info works (file-backed data)."""
        child = self.file_child
        return child.has_dirty_flag() if child is not None else False

    def backing_file_name(self) -> "str | None":
        """BlockDeviceInfo's backing_file: a format's backing node's filename."""
        return None

    def image_dirty(self) -> bool:
        """The image's dirty flag (qcow2's dirty bit); False for formats without one."""
        return False

    def image_details(self) -> dict:
        """Format members of ImageInfo beyond the generic ones (qcow2: cluster-size,
        backing-filename, ...), in QAPI declaration order."""
        return {}

    def child_cluster_size(self, child: "BlockNode") -> dict:
        """ImageInfo's cluster-size of a node whose bdrv_get_info is its child's
        (raw, and filters without one of their own): a qcow2 child's shows."""
        cluster = child.image_details().get("cluster-size")
        return {"cluster-size": cluster} if cluster is not None else {}

    def with_child_discard_alignment(self, child: "BlockNode") -> dict:
        """block_limits() plus the child's discard alignment, which QEMU merges
        into the parent's limits (the zero-write alignment it does not), placed
        in BlockLimitsInfo order."""
        limits = BlockNode.block_limits(self)
        inner = child.block_limits()
        ordered = {"request-alignment": limits.pop("request-alignment")}
        if "discard-alignment" in inner:
            ordered["discard-alignment"] = inner["discard-alignment"]
        ordered.update(limits)
        return ordered

    def format_specific_info(self, who: Any) -> "dict | None":
        """ImageInfoSpecific of a format driver, or None."""
        return None

    def backing_node(self) -> "BlockNode | None":
        """The COW backing child (only mirror's filter has one in qmpjobd)."""
        return None

    def filter_or_cow_child(self) -> "BlockNode | None":
        """QEMU's bdrv_filter_or_cow_bs: the backing child, else the filtered child of
        a filter driver (blkdebug's image). The non-flat query walks this chain."""
        backing = self.backing_node()
        if backing is not None:
            return backing
        return self.file_child if self.is_filter else None

    # --- I/O limits (QEMU's BlockLimits, query-named-block-nodes image.limits) ------

    # A leaf node's memory alignments before its driver refines them (QEMU's
    # defaults for a node without children: 512 bytes, the host page size).
    leaf_min_mem_alignment: ClassVar[int] = 512
    leaf_opt_mem_alignment: ClassVar[int] = 4096
    # IOV_MAX on Linux.
    leaf_max_iov: ClassVar[int] = 1024

    def request_alignment(self) -> int:
        """The node's own request alignment; 1 for every driver that takes byte
        requests (blkdebug's ``align`` raises it)."""
        return 1

    def block_limits(self) -> dict:
        """BlockLimitsInfo members this node has, in QAPI declaration order.

        A node with a data child merges the child's limits (alignments: the
        larger, max-iov: the smaller), as QEMU's bdrv_refresh_limits does; a
        leaf starts from the defaults above.
        """
        child = self.file_child
        if child is None:
            min_mem = self.leaf_min_mem_alignment
            opt_mem = self.leaf_opt_mem_alignment
            max_iov = self.leaf_max_iov
        else:
            inner = child.block_limits()
            min_mem = inner["min-mem-alignment"]
            opt_mem = inner["opt-mem-alignment"]
            max_iov = inner["max-iov"]
        cow = None if self.is_filter else self.backing_node()
        if cow is not None and child is not None and not cow.is_filter:
            # A COW child's limits are merged too (bdrv_refresh_limits: every
            # DATA, FILTERED or COW child): a null-co backing raises min-mem. A
            # job's filter slid in below is not: QEMU does not refresh the parent
            # then (a filter that is there from the open is taken as not either).
            below = cow.block_limits()
            min_mem = max(min_mem, below["min-mem-alignment"])
            opt_mem = max(opt_mem, below["opt-mem-alignment"])
            max_iov = min(max_iov, below["max-iov"])
        return {"request-alignment": self.request_alignment(), "max-iov": max_iov,
                "min-mem-alignment": min_mem, "opt-mem-alignment": opt_mem}

    def dirty_bitmap_infos(self) -> list[dict]:
        """BlockDirtyInfo of this node's dirty bitmaps, newest first."""
        return [bitmap.info() if hasattr(bitmap, "info") else bitmap()
                for bitmap in self.dirty_bitmaps]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r} size={self.size}>"


# QAPI declaration order of the option structs whose members end up in json:
# filenames. QEMU turns the options back into a dict in this order before
# flattening, and the order decides ties between keys in the same hash bucket.
DECLARATION_ORDER = {
    "": ["driver", "node-name", "discard", "cache", "read-only", "auto-read-only",
         "force-share", "detect-zeroes",
         "file", "offset", "size",                                   # raw
         "filename", "pr-manager", "locking", "aio", "aio-max-batch",  # file
         "drop-cache", "x-check-cache-dropped",
         "latency-ns", "read-zeroes",                                # null-co
         "image", "config", "align", "max-transfer", "opt-write-zero",  # blkdebug
         "max-write-zero", "opt-discard", "max-discard", "inject-error", "set-state",
         "take-child-perms", "unshare-child-perms"],
    "inject-error": ["event", "state", "iotype", "errno", "delay-ns", "sector", "once",
                     "immediately"],
    "set-state": ["event", "state", "new_state"],
}


def _declared(options: dict, struct: str) -> dict:
    order = DECLARATION_ORDER.get(struct, [])
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(options.items(), key=lambda kv: rank.get(kv[0], len(order))))


def extract_child_options(flat: dict, role: str) -> dict:
    """QEMU's qdict_extract_subqdict: a child's flattened options, taken from its
    parent's by walking the parent's dict in hash order."""
    prefix = role + "."
    return {key[len(prefix):]: flat[key] for key in qdict_order(list(flat))
            if key.startswith(prefix)}


def flatten_options(options: dict, prefix: str = "", struct: str = "") -> dict:
    """QEMU's qdict_flatten of the re-visited options: nested lists/dicts become
    dotted keys, each dict walked in QDict hash order of its declaration order."""
    ordered = _declared(options, struct)
    flat: dict = {}
    for key in qdict_order(list(ordered)):
        value = ordered[key]
        name = prefix + key
        if isinstance(value, dict):
            # Child references (file, image) are BlockdevOptions again.
            nested = "" if key in ("file", "image") else key
            flat.update(flatten_options(value, name + ".", nested))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    flat.update(flatten_options(item, f"{name}.{index}.", key))
                else:
                    flat[f"{name}.{index}"] = item
        else:
            flat[name] = value
    return flat
