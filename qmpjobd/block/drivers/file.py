"""``file``: a host file (or block device) as a protocol node.

Options (QAPI BlockdevOptionsFile): ``filename`` (required), ``read-only``; ``locking``
(on/off/auto: QEMU's OFD lock bytes, :mod:`qmpjobd.block.locking`, taken for the
permissions the node's users hold); ``aio``, ``aio-max-batch``, ``drop-cache``,
``x-check-cache-dropped`` are accepted and do not change behaviour here;
``pr-manager`` is refused.

All I/O runs in the event loop's default thread pool (``run_in_executor``), so the
loop never blocks on the disk; each request yields the pool's future to the job
engine. Like QEMU, the node's length is the host length rounded up to 512 bytes:
reads past the host end return zeroes, and a write to that tail extends the file.

Only regular files (or symlinks to them) are taken, as QEMU's ``file`` driver does; a
directory, FIFO, socket, character or block device is refused with QEMU's texts. QEMU
opens first and looks afterwards, so a read-only FIFO blocks it until a writer comes;
here FIFOs and devices are recognised by ``stat`` before any open, the open itself
uses ``O_NONBLOCK``, and ``fstat`` on the descriptor settles what was really opened
(the name may have changed in between). Every failure closes what it opened. Under
``--allow-dir`` the open goes through the graph's ``PathPolicy`` (qmpjobd.confine).
"""

from __future__ import annotations

import errno
import os
import stat

from qmpjobd.block.locking import ImageLocks, locking_enabled
from qmpjobd.block.node import BlockNode, discard_host_range, io_error, write_fully
from qmpjobd.block.permissions import WRITE
from qmpjobd.block.syncio import in_pool
from qmpjobd.block.writeback import EarlyWriteback
from qmpjobd.confine import PathPolicy
from qmpjobd.errors import QMPError

SECTOR = 512


# raw_probe_alignment's candidates: powers of two up to the largest block size.
_DIRECT_CANDIDATES = (512, 1024, 2048, 4096)


def probe_direct_alignment(path: str) -> tuple[int, int]:
    """The smallest request size and buffer alignment O_DIRECT reads of ``path``
    accept (each 4096 when none smaller works); OSError when the file cannot be
    opened with O_DIRECT at all."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        page = mmap.mmap(-1, 2 * _DIRECT_CANDIDATES[-1])
        view = memoryview(page)
        try:
            request = next((size for size in _DIRECT_CANDIDATES
                            if _reads(fd, view[:size])), _DIRECT_CANDIDATES[-1])
            memory = next((align for align in _DIRECT_CANDIDATES
                           if _reads(fd, view[align:align + _DIRECT_CANDIDATES[-1]])),
                          _DIRECT_CANDIDATES[-1])
        finally:
            view.release()
            page.close()
    finally:
        os.close(fd)
    return request, memory


def _reads(fd: int, buffer: memoryview) -> bool:
    try:
        os.preadv(fd, [buffer], 0)
    except OSError:
        return False
    return True


class FileNode(BlockNode):
    driver = "file"
    is_protocol = True
    strong_options = ("filename",)
    # Without cache.direct any buffer address will do.
    leaf_min_mem_alignment = 1

    def open(self) -> None:
        if "pr-manager" in self.options:
            raise QMPError("Option 'pr-manager' is not supported by qmpjobd")
        self.path: str = self.options["filename"]
        self.fd: int | None = None
        self.fd, host_length, self.fd_writable = self._open_fd(self.read_only, 0)
        self.writeback = EarlyWriteback(self.fd)
        self._pending_fd: int | None = None
        self.size = -(-host_length // SECTOR) * SECTOR
        # No permission yet, so no lock byte: users bring them (permissions.refresh).
        self.locks = ImageLocks(self.fd, locking_enabled(self.options.get("locking")),
                                self.path)
        self._pending_perms = (0, 0xF)
        self._direct_alignments: tuple[int, int] | None = None
        cache = self.options.get("cache")
        if isinstance(cache, dict) and cache.get("direct"):
            # file-posix opens with O_DIRECT: a file system without it refuses.
            try:
                self._probe_direct()
            except OSError as exc:
                self.close()
                raise QMPError(f"Could not open '{self.path}': {exc.strerror}") from None

    # --- cache.direct -------------------------------------------------------------------

    def _probe_direct(self) -> tuple[int, int]:
        """(request, memory) alignment of O_DIRECT I/O on this file, probed as
        QEMU's raw_probe_alignment does (once). qmpjobd's own I/O stays buffered
        (with the same flushes), so only the limits QEMU reports change."""
        if self._direct_alignments is None:
            self._direct_alignments = probe_direct_alignment(self.path)
        return self._direct_alignments

    def _direct_alignment(self, which: int) -> int:
        """One of the probed alignments for the limits; a cache.direct inherited
        from a parent is only known after the open, so a file system without
        O_DIRECT gets the page size there instead of an error."""
        try:
            return self._probe_direct()[which]
        except OSError:
            return 4096

    def _direct(self) -> bool:
        from qmpjobd.block.query import cache_flag
        return cache_flag(self, "direct")

    def request_alignment(self) -> int:
        return self._direct_alignment(0) if self._direct() else 1

    def block_limits(self) -> dict:
        limits = super().block_limits()
        if self._direct():
            limits["min-mem-alignment"] = self._direct_alignment(1)
        return limits

    def close(self) -> None:
        if self.fd is not None:
            # Closing the descriptor releases its OFD locks.
            self.writeback.switch(None)
            os.close(self.fd)
            self.fd = None

    # --- permissions (qmpjobd.block.permissions.refresh calls these) -------------------

    def _open_fd(self, read_only: bool, perm: int) -> tuple[int, int, bool]:
        """(descriptor, host length, writable) for the node's mode. With
        auto-read-only (QEMU's file-posix opens such a node read-only until a user
        takes the write permission) an image that cannot be opened for writing is
        opened read-only as long as nobody writes; qmpjobd opens it read-write
        where it can, which QMP cannot tell apart."""
        policy = self.graph.path_policy
        if read_only:
            return (*open_regular_file(policy, self.path, True), False)
        try:
            return (*open_regular_file(policy, self.path, False), True)
        except QMPError:
            if not self.options.get("auto-read-only") or perm & WRITE:
                raise
        return (*open_regular_file(policy, self.path, True), False)

    def prepare_permissions(self, perm: int, shared: int) -> None:
        if self.fd is None:
            return
        if perm & WRITE and not self.fd_writable and not self.read_only:
            # raw_check_perm: a writer needs the read-write descriptor first; failing
            # to open it fails the permission change with open's own error.
            self._pending_fd, _ = open_regular_file(self.graph.path_policy, self.path, False)
        self._pending_perms = (perm, shared)
        try:
            self.locks.prepare(perm, shared)
        except BaseException:
            self._drop_pending_fd()
            raise

    def commit_permissions(self) -> None:
        if self.fd is not None:
            self.locks.commit(*self._pending_perms)
            if self._pending_fd is not None:
                fd, self._pending_fd = self._pending_fd, None
                self._switch_fd(fd, True)

    def abort_permissions(self) -> None:
        if self.fd is not None:
            self._drop_pending_fd()
            self.locks.abort()

    def _drop_pending_fd(self) -> None:
        if self._pending_fd is not None:
            os.close(self._pending_fd)
            self._pending_fd = None

    def reopen_fd(self, read_only: bool) -> None:
        """Reopen the image read-only or read-write (blockdev-reopen, with the new
        options in place): a new descriptor where the mode changes takes over the
        committed locks before the old one closes."""
        if self.fd is None or self.fd_writable == read_only:
            fd, _, writable = self._open_fd(read_only, self.locks.perm)
            self._switch_fd(fd, writable)
        self.read_only = read_only

    def _switch_fd(self, fd: int, writable: bool) -> None:
        try:
            self.locks.move_to(fd)
        except BaseException:
            os.close(fd)
            raise
        old, self.fd = self.fd, fd
        self.writeback.switch(fd)
        self.fd_writable = writable
        if old is not None:
            os.close(old)

    def _require_fd(self) -> int:
        if self.fd is None:
            raise io_error(errno.EBADF)
        return self.fd

    async def _preadv(self, offset: int, length: int) -> bytes:
        fd = self._require_fd()
        return await in_pool(read_fully, fd, offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        fd = self._require_fd()
        await in_pool(write_fully, fd, offset, data)
        self.data_written(offset, len(data))

    async def _pdiscard(self, offset: int, length: int) -> None:
        # file-posix punches a hole (the range then reads zeroes and takes no
        # space); where the file system cannot, zeroes are written instead.
        length = min(length, max(0, self.size - offset))
        if not length:
            return
        fd = self._require_fd()
        await in_pool(discard_host_range, fd, offset, length)

    async def _flush(self) -> None:
        fd = self._require_fd()
        if not self.read_only:
            self.writeback.flushed()
            await in_pool(os.fdatasync, fd)

    def _truncate(self, size: int, zero_new: bool) -> None:
        """block_resize: the host file gets exactly ``size`` bytes (QEMU's
        raw_regular_truncate with preallocation off; it may shrink)."""
        try:
            os.ftruncate(self._require_fd(), size)
        except OSError as exc:
            raise QMPError(f"Could not resize file: {os.strerror(exc.errno or errno.EIO)}") from None
        self.size = -(-size // SECTOR) * SECTOR

    def data_written(self, offset: int, length: int) -> None:
        # Own writes and copies into the file alike count toward early writeback.
        self.writeback.written(offset, length)

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        """Data or hole, from the host file's SEEK_DATA/SEEK_HOLE map."""
        fd = self._require_fd()
        try:
            data_start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # no data at or after offset
                return ("zero", length)
            return ("data", length)           # no hole map: treat as data
        if data_start > offset:
            return ("zero", min(data_start - offset, length))
        hole_start = os.lseek(fd, offset, os.SEEK_HOLE)
        return ("data", max(1, min(hole_start - offset, length)))

    def supports_unmap(self) -> bool:
        return True

    def can_write_zeroes_with_unmap(self) -> bool:
        return self.discard_unmap

    def host_file(self) -> tuple[int, int] | None:
        return (self._require_fd(), 0)

    def exact_filename(self) -> str | None:
        return self.path

    def actual_size(self) -> int | None:
        try:
            return os.fstat(self._require_fd()).st_blocks * 512
        except OSError:
            return None

    def has_dirty_flag(self) -> bool:
        return True


def open_regular_file(policy: PathPolicy, path: str, read_only: bool) -> tuple[int, int]:
    """Open ``path`` as the ``file`` driver's image; returns (fd, host length).

    Raises QMPError with QEMU's texts; no descriptor survives a failure.
    """
    # Confinement first: what lies outside is not even looked at (no stat that
    # would tell a client which kind of file sits there).
    policy.check_open(path)
    refuse_special_file(path, read_only)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = policy.open(path, flags)
    except OSError as exc:
        raise QMPError(f"Could not open '{path}': {os.strerror(exc.errno)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular_error(path)
        # O_NONBLOCK only guarded the open; regular files ignore it, but clear it so
        # the descriptor is what QEMU would hold.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def not_regular_error(path: str) -> QMPError:
    return QMPError(f"'file' driver requires '{path}' to be a regular file")


# Kinds QEMU opens successfully and only then refuses: refused here without opening,
# so that a FIFO never blocks and a device never sees an open.
_REFUSED_WITHOUT_OPEN = (stat.S_ISFIFO, stat.S_ISCHR, stat.S_ISBLK)


def refuse_special_file(path: str, read_only: bool) -> None:
    """Refuse a FIFO or device before opening it, with the error QEMU's open-then-
    fstat gives: the permission error when its open would fail, else the regular-file
    message. Anything else (missing, directory, socket) is left to the open, whose
    error is QEMU's."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not any(kind(mode) for kind in _REFUSED_WITHOUT_OPEN):
        return
    wanted = os.R_OK if read_only else os.R_OK | os.W_OK
    if not os.access(path, wanted, effective_ids=os.access in os.supports_effective_ids):
        raise QMPError(f"Could not open '{path}': {os.strerror(errno.EACCES)}")
    raise not_regular_error(path)


def read_fully(fd: int, offset: int, length: int) -> bytes:
    """pread until ``length`` bytes or end of file (short reads are legal)."""
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)
