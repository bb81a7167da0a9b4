"""The ``create`` job of ``blockdev-create`` (a non-block job: JOB_STATUS_CHANGE only).

Like QEMU's blockdev_create_run: progress is 0/1 while running and 1/1 afterwards,
even on failure. As in file-posix, the image is opened in the job coroutine and
resized in the thread pool: a create that cannot even open its file fails within the
command (``aborting, concluded`` before the reply), any other one finishes after it.
auto-finalize is always on and auto-dismiss always off (the command has no such
options).

The ``file`` and ``qcow2`` drivers can create images here (qcow2 through
qmpjobd.block.formats.qcow2.create, byte-identical to QEMU's). Every other
BlockdevCreateOptions driver fails the job, as QEMU does for a driver it cannot
use: with QEMU's lookup error when the options reference a node that does not
exist, else with "Driver '<d>' is not supported by qmpjobd".
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from typing import TYPE_CHECKING

from qmpjobd.confine import PathPolicy
from qmpjobd.errors import QMPError
from qmpjobd.job.job import Job
from qmpjobd.versions import Behaviour

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.job.manager import JobManager

# What the create job does differently per release (next to the code that honours it).
QCOW2_CREATE_OPENS_LATER = Behaviour(
    "a qcow2 create opens its file from the main loop, so even an option error "
    "ends the job after the command's reply (first seen in 10.0)", since="10.0")

# The member that names the node to format, per create driver (BlockdevRef members).
_NODE_REFERENCES = ("file",)
# qcow2_co_create opens the new image twice through a BlockBackend of its own (to
# make it consistent, then once more to flush it), each time as a node with a
# generated name: a successful create uses up two #blockNNN names in every
# release; one that fails its option checks uses none (a file create none either).
QCOW2_CREATE_OPENS = 2


class CreateJob(Job):
    __slots__ = ("graph", "options")

    job_type = "create"

    def __init__(self, manager: "JobManager", graph: "BlockGraph", job_id: str,
                 options: dict) -> None:
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)
        self.graph = graph
        self.options = options

    def release_run_state(self) -> None:
        super().release_run_state()
        del self.options                 # the request's arguments

    async def run(self) -> int:
        self.progress_set_remaining(1)
        try:
            if self.options["driver"] == "file":
                await create_file_in_pool(self.graph, self.options)
            elif self.options["driver"] == "qcow2":
                if self.graph.personality.has(QCOW2_CREATE_OPENS_LATER):
                    await self.manager.main_loop_turn()
                await create_qcow2(self.graph, self.options)
            else:
                self._refuse_format_driver()
        finally:
            self.progress_update(1)
        return 0

    def _refuse_format_driver(self) -> None:
        for member in _NODE_REFERENCES:
            ref = self.options.get(member)
            if isinstance(ref, str):
                self.graph.lookup(ref)
        raise QMPError(f"Driver '{self.options['driver']}' is not supported by qmpjobd")


async def create_qcow2(graph: "BlockGraph", options: dict) -> None:
    """qcow2_co_create: open the ``file`` reference first (its errors come first),
    then QEMU's option checks, then the image, written through the node."""
    from qmpjobd.block.formats.qcow2.create import (
        CreateOptions,
        create_image,
        refuse_unimplemented,
        validate,
    )
    from qmpjobd.block.formats.qcow2.storage import NodeStorage

    ref = options["file"]
    node = graph.lookup(ref) if isinstance(ref, str) else graph._open_tree(dict(ref))
    try:
        opts = CreateOptions.from_qapi(options)
        validate(opts)
        data_file = options.get("data-file")
        if isinstance(data_file, str):
            graph.lookup(data_file)     # QEMU opens it before it goes on
        refuse_unimplemented(opts)
        check_writable_for_create(node)
        try:
            await create_image(NodeStorage(node), opts)
        except OSError as exc:
            raise QMPError(f"Could not write qcow2 image: {os.strerror(exc.errno or errno.EIO)}") from None
        graph.skip_generated_names(QCOW2_CREATE_OPENS)
    finally:
        if not isinstance(ref, str):
            graph._forget(node)


def check_writable_for_create(node) -> None:
    """QEMU's creation takes write and resize permissions on the node."""
    if node.read_only:
        raise QMPError("Block node is read-only")
    for parent in node.parent_nodes:
        role = next((r for r, child in parent.children.items() if child is node), "file")
        raise QMPError(f"Permission conflict on node '{node.node_name}': permissions "
                       "'write, resize' are both required by an unnamed block device "
                       f"(uses node '{node.node_name}' as 'root' child) and unshared by "
                       f"node '{parent.node_name}' (uses node '{node.node_name}' as "
                       f"'{role}' child).")


async def create_file_in_pool(graph: "BlockGraph", options: dict) -> None:
    """file-posix's raw_co_create: the open and the lock check run in the job
    coroutine (so their failures end run() within the command), the truncations in
    the thread pool (so a successful create completes after the reply)."""
    filename = options["filename"]
    check_not_in_use(graph, filename)
    fd = open_for_create(filename, graph.path_policy)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, resize_and_close, fd, options["size"],
                               options.get("preallocation", "off"))


def check_not_in_use(graph: "BlockGraph", filename: str) -> None:
    """Refuse to rewrite a file that a running job reads or writes through a node.

    QEMU would take image locks here; qmpjobd's rule is simpler and stricter: a file
    in use by a job is never truncated. Also refuses a path outside ``--allow-dir``
    first, so that nothing outside is even looked at.
    """
    graph.path_policy.check_create(filename)
    try:
        wanted = os.stat(filename)
    except OSError:
        return
    for node in graph.nodes.values():
        host = node.host_file() if node.driver == "file" else None
        if host is None or not node.job_users:
            continue
        st = os.fstat(host[0])
        if (st.st_dev, st.st_ino) == (wanted.st_dev, wanted.st_ino):
            raise QMPError(f"Failed to get \"write\" lock\nIs another process using "
                           f"the image [{filename}]?")


def create_file(filename: str, size: int, preallocation: str = "off",
                nocow: bool = False, *, policy: PathPolicy | None = None) -> None:
    """The image creation of drive-mirror/drive-backup: open (creating), empty, then
    grow to ``size``.

    ``preallocation`` off (sparse), falloc (posix_fallocate) or full (zeroes
    written). Raises QMPError with QEMU's texts. ``policy`` confines the path
    (``check_not_in_use`` with the graph checks it beforehand when none is given).

    A character or block device is not truncated: like QEMU, which picks its
    ``host_device`` protocol for such a name, it only has to be large enough.
    """
    policy = policy or PathPolicy()
    if is_device(filename):
        check_device_size(filename, size, policy)
        return
    resize_and_close(open_for_create(filename, policy), size, preallocation)


def is_device(filename: str) -> bool:
    try:
        mode = os.stat(filename).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def check_device_size(filename: str, size: int, policy: PathPolicy) -> None:
    """QEMU's create on a host device (open it, then a non-exact resize): nothing is
    written, the device only has to hold ``size`` bytes."""
    try:
        fd = policy.open(filename, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise QMPError(f"Could not open '{filename}': {os.strerror(exc.errno)}") from None
    try:
        if not is_device_fd(fd):
            # Replaced between the stat and the open: refuse rather than guess.
            raise QMPError(f"Could not open '{filename}': the file changed while opening")
        if os.lseek(fd, 0, os.SEEK_END) < size:
            raise QMPError("Cannot grow device files")
    finally:
        os.close(fd)


def is_device_fd(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def open_for_create(filename: str, policy: PathPolicy | None = None) -> int:
    """Open (creating) an image for writing under ``policy``.

    O_NONBLOCK: a FIFO or terminal given as an image never blocks the event loop;
    its failure comes from the truncation that follows, as in QEMU.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return (policy or PathPolicy()).open(filename, flags, 0o644, create=True)
    except OSError as exc:
        raise QMPError(f"Could not create '{filename}': {os.strerror(exc.errno)}") from None


def resize_and_close(fd: int, size: int, preallocation: str) -> None:
    """Empty the file, then grow it to ``size``; may run in a worker thread."""
    try:
        _resize(fd, size, preallocation)
    finally:
        os.close(fd)


def _as_off_t(size: int) -> int:
    """The schema's uint64 as C's signed off_t: past INT64_MAX it turns negative,
    and the kernel answers EINVAL, as it does for QEMU."""
    return size - (1 << 64) if size >= 1 << 63 else size


def _resize(fd: int, size: int, preallocation: str) -> None:
    size = _as_off_t(size)
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        raise QMPError(f"Could not resize file: {os.strerror(exc.errno)}") from None
    if preallocation not in ("off", "falloc", "full"):
        # Checked after emptying the file, as QEMU's second truncate does.
        raise QMPError(f"Unsupported preallocation mode: {preallocation}")
    if preallocation == "off":
        _truncate(fd, size)
        _allocate_first_block(fd, size)
    elif preallocation == "falloc":
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise QMPError(f"Could not preallocate new data: {os.strerror(code)}") from None
    else:
        _truncate(fd, size)
        _write_zeroes(fd, size)


def _allocate_first_block(fd: int, size: int) -> None:
    """Write zeroes over the first block (at most 4 KiB), as QEMU's file driver does
    after growing a new image: its alignment probing needs an allocated block. It
    shows in query-named-block-nodes as actual-size 4096."""
    length = min(max(size, 0), 4096)
    if length:
        try:
            os.pwrite(fd, bytes(length), 0)
        except OSError:
            pass  # QEMU ignores a failure here too: the image is still usable


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise QMPError(f"Could not resize file: {os.strerror(exc.errno)}") from None


def _write_zeroes(fd: int, size: int) -> None:
    chunk = bytes(1 << 20)
    offset = 0
    try:
        while offset < size:
            n = os.pwrite(fd, chunk[:min(len(chunk), size - offset)], offset)
            offset += n
        os.fsync(fd)
    except OSError as exc:
        raise QMPError(f"Could not write zeros for preallocation: "
                       f"{os.strerror(exc.errno)}") from None
