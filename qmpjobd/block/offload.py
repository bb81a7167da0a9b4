"""Copy offload for job drivers: copy between two host files in one pool task.

``await copy_range(source, src_offset, target, dst_offset, length)`` copies bytes
from node to node. When both nodes map 1:1 onto host files (``file``, or ``raw``
without error injection on top of ``file``) and the target is writable, one
thread-pool task moves the bytes host file to host file (:func:`host_copy`):
``os.copy_file_range`` where the filesystem shares extents (reflink), else a read
into the pool thread's reused buffer and a write from it, so no data passes through
Python objects (copy-on-read has the kernel copy anyway). Otherwise it falls back to
``co_pread`` + ``co_pwrite``, so blkdebug rules, read-only checks and null-co behave
exactly as for any other request.

Either way the target ends up with the node-level bytes, including QEMU's zero tail
up to the 512-byte rounded length when the source host file is shorter.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import threading

from qmpjobd.block.node import BlockNode, io_error, write_fully

# Errors that mean "copy_file_range cannot do this pair", not "the copy failed".
_NOT_SUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def offload_possible(source: BlockNode, target: BlockNode) -> bool:
    return (source.host_file() is not None and target.host_file() is not None
            and not _read_only_chain(target))


def _read_only_chain(node: BlockNode) -> bool:
    return any(each.read_only for each, _ in node.data_chain())


async def copy_range(source: BlockNode, src_offset: int, target: BlockNode,
                     dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes; raises OSError(errno) like co_pread/co_pwrite."""
    inside = (0 <= src_offset and src_offset + length <= source.size
              and 0 <= dst_offset and dst_offset + length <= target.size)
    if inside and offload_possible(source, target):
        src_fd, src_base = source.host_file()   # type: ignore[misc]
        dst_fd, dst_base = target.host_file()   # type: ignore[misc]
        loop = asyncio.get_running_loop()
        # The target's write request starts with the copy (qemu-storage-daemon
        # reports an armed write threshold before the copy's I/O completes).
        target.chain_write_started(dst_offset, length)
        try:
            copied = await loop.run_in_executor(
                None, host_copy, src_fd, src_base + src_offset, dst_fd, dst_base + dst_offset,
                length)
        finally:
            target.chain_write_finished(dst_offset, length)
        target.write_generation += 1
        if copied < length:
            # Past the source's host end the node reads zeroes (QEMU's rounding).
            await target.co_pwrite(dst_offset + copied, bytes(length - copied))
        return
    if inside and await _copy_into_qcow2(source, src_offset, target, dst_offset, length):
        return
    try:
        data = await source.co_pread(src_offset, length)
    except OSError as exc:
        exc.is_read = True          # type: ignore[attr-defined]
        raise
    await target.co_pwrite(dst_offset, data)


def qcow2_image_on_host(node: BlockNode):  # -> Qcow2Image | None
    """The image of a qcow2 node whose clusters live in a plain host file."""
    if node.driver != "qcow2":
        return None
    image = getattr(node, "image", None)
    file = node.children.get("file")
    if image is None or file is None or file.host_file() is None:
        return None
    return image


async def _copy_into_qcow2(source: BlockNode, src_offset: int, target: BlockNode,
                           dst_offset: int, length: int) -> bool:
    """Whole clusters into a qcow2 target, the kernel copying from the source's
    host file (a raw/file source, or a qcow2 source's normal data clusters).
    The target's write path runs as for the same bytes (request accounting,
    refcounts, data, L2 entries, old clusters freed), so what gets allocated is
    what a plain write allocates; only the data moves host file to host file.
    False when this pair or range does not qualify (nothing done then)."""
    image = qcow2_image_on_host(target)
    if image is None or image.read_only or image.unusable:
        return False
    if interposed(source) or interposed(target):
        return False
    cluster = image.cluster_size
    if dst_offset % cluster or length % cluster or not length:
        return False
    source_image = None
    host = source.host_file()
    if host is not None:
        fd, base = host
        pieces = [(fd, base + src_offset, length)]
    else:
        source_image = qcow2_image_on_host(source)
        if source_image is None or source_image is image:
            return False
        runs = await host_runs(source_image, src_offset, length)
        if runs is None:
            return False
        fd, base = source.children["file"].host_file()   # type: ignore[misc]
        pieces = [(fd, base + at, count) for at, count in runs]
    from qmpjobd.block.formats.qcow2.storage import HostCopy

    try:
        await target.co_pwrite(dst_offset, HostCopy(pieces))  # type: ignore[arg-type]
    finally:
        if source_image is not None:
            source_image.unpin_host_runs()
    return True


def interposed(node: BlockNode) -> bool:
    """A request hook set on the node itself (test-control I/O faults shadow
    co_pread/co_pwrite/host_file): its requests must go the ordinary way."""
    return any(name in vars(node) for name in ("co_pread", "co_pwrite", "host_file"))


async def host_runs(image, offset: int, length: int) -> list[tuple[int, int]] | None:
    """``image.pin_host_runs`` (the caller unpins), its failures marked as reads."""
    try:
        return await image.pin_host_runs(offset, length)
    except OSError as exc:
        exc.is_read = True          # type: ignore[attr-defined]
        raise


def kernel_copy_exact(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
                      length: int, splice: bool = False) -> None:
    """Exactly ``length`` bytes to ``dst_fd`` (blocking); past the source's end,
    zeroes. ``splice``: as :func:`host_copy`."""
    copied = host_copy(src_fd, src_offset, dst_fd, dst_offset, length, splice)
    if copied < length:
        write_fully(dst_fd, dst_offset + copied, bytes(length - copied))


# One writer at a time per target file descriptor, for callers that ask for the
# splice copy. Copies in flight that write into one file at once contend for its
# inode lock in the kernel, and the kernel's waiters spin: with 2-4 stream copies in
# flight, rwsem_spin_on_owner took 5-12% of the daemon's CPU samples (perf, 1 GiB
# stream). Waiting here sleeps instead, while the next copies' zero probes still
# overlap the write. A descriptor number reused for another file only shares a lock.
_WRITER_LOCKS: dict[int, threading.Lock] = {}


def one_writer(fd: int) -> threading.Lock:
    """The lock a splice copy into ``fd`` holds while it writes."""
    lock = _WRITER_LOCKS.get(fd)
    if lock is None:
        lock = _WRITER_LOCKS.setdefault(fd, threading.Lock())
    return lock


def host_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
              length: int, splice: bool = False) -> int:
    """Copy between host files (blocking): bytes copied, short only at the
    source's end.

    Where the filesystem shares extents (a reflink: btrfs, XFS with reflink, ...)
    ``copy_file_range`` copies without moving data. Elsewhere the kernel copies
    through a pipe into the page cache (``splice``): one memcpy instead of a read's
    and a write's. On this machine's ext4 (Linux 6.18, 256 MiB in 0.5-4 MiB
    requests) that took 25-30% less time than a read into a reused buffer and a
    write from it; an earlier session measured the other way (512 MiB in 1 MiB
    requests, 0.30-0.40 s of kernel time against 0.26-0.32 s). Only copy-on-read's
    CheckedCopy asks for ``splice``, holding :func:`one_writer` for the file. The
    jobs with many requests in flight (mirror, backup, commit) keep QEMU's read and
    write (its copy offload is off by default); they are ahead of QEMU as they are,
    and were not measured with it.
    """
    if splice or _shares_extents(src_fd, dst_fd):
        copied = _kernel_copy(src_fd, src_offset, dst_fd, dst_offset, length)
        if copied is not None:
            return copied
    return _bounce_copy(src_fd, src_offset, dst_fd, dst_offset, length)


# struct file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset},
# and FICLONERANGE = _IOW(0x94, 13, that struct).
_FICLONERANGE = 0x4020940D
_CLONE_RANGE = struct.Struct("qQQQ")
# A clone of a range far past any file's end: a filesystem that can share extents
# refuses it as out of range (EINVAL) and changes nothing; one that cannot says so
# before it looks at the range (EOPNOTSUPP, or EXDEV across filesystems). A length
# of 0 would mean "to the end of the source": never probe with that.
_PROBE_OFFSET = 1 << 62
_PROBE_LENGTH = 1 << 16
# (source device, target device) -> whether their filesystem shares extents.
_SHARING: dict[tuple[int, int], bool] = {}
# The same answer per (source fd, target fd), so that a copy makes no fstat: each
# system call of a pool thread gives up the GIL and takes it back, which costs
# futex calls and waits when the loop thread and the other pool threads want it
# too. A descriptor reused for a file elsewhere can only get the slower of two
# correct copies (copy_file_range refused across filesystems falls back).
_SHARING_BY_FDS: dict[tuple[int, int], bool] = {}


def _shares_extents(src_fd: int, dst_fd: int) -> bool:
    """Whether copies between these two files can share extents: probed once per
    pair of devices, remembered per pair of descriptors."""
    known = _SHARING_BY_FDS.get((src_fd, dst_fd))
    if known is None:
        known = _SHARING_BY_FDS[(src_fd, dst_fd)] = _probe_sharing(src_fd, dst_fd)
    return known


def _probe_sharing(src_fd: int, dst_fd: int) -> bool:
    key = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
    known = _SHARING.get(key)
    if known is None:
        probe = _CLONE_RANGE.pack(src_fd, _PROBE_OFFSET, _PROBE_LENGTH, _PROBE_OFFSET)
        try:
            fcntl.ioctl(dst_fd, _FICLONERANGE, probe)
            known = True          # not expected, but then it clearly clones
        except OSError as exc:
            known = exc.errno == errno.EINVAL
        _SHARING[key] = known
    return known


_BUFFERS = threading.local()
# QEMU's job requests are at most 1 MiB; a buffer per pool thread, reused.
BOUNCE_BYTES = 1 << 20


# The largest buffer a pool thread keeps (a stream's batched step).
MAX_BOUNCE_BYTES = 4 << 20


def bounce_buffer(size: int = BOUNCE_BYTES) -> memoryview:
    """This thread's copy buffer, at least ``size`` bytes (at most
    MAX_BOUNCE_BYTES; made on first use, then reused: new buffers would cost
    page faults on every request)."""
    buffer = getattr(_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _BUFFERS.buffer = memoryview(bytearray(max(size, BOUNCE_BYTES)))
    return buffer


def _bounce_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
                 length: int) -> int:
    buffer = bounce_buffer()
    done = 0
    while done < length:
        got = read_into(src_fd, buffer[:min(length - done, BOUNCE_BYTES)], src_offset + done)
        if not got:
            break
        try:
            write_fully(dst_fd, dst_offset + done, buffer[:got])
        except OSError as exc:
            raise io_error(exc.errno or errno.EIO) from None
        done += got
    return done


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """preadv into ``view``: bytes read (short only at the end of the file), its
    errors marked as reads."""
    try:
        return os.preadv(fd, [view], offset)
    except OSError as exc:
        failure = io_error(exc.errno or errno.EIO)
        failure.is_read = True          # type: ignore[attr-defined]
        raise failure from None


def failed_on_read(exc: OSError) -> bool:
    """Whether a copy_range failure came from the source (else from the target)."""
    return bool(getattr(exc, "is_read", False))


def _kernel_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
                 length: int) -> int | None:
    """Bytes copied (short only at the source's end), or None when unsupported."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done,
                                   src_offset + done, dst_offset + done)
        except OSError as exc:
            if done == 0 and exc.errno in _NOT_SUPPORTED:
                return None
            failure = io_error(exc.errno or errno.EIO)
            # The kernel does not say which side failed; space errors are the target's.
            failure.is_read = exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # type: ignore[attr-defined]
            raise failure from None
        if n == 0:
            break
        done += n
    return done
