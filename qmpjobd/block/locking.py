"""Image locking as QEMU's file driver does it: OFD locks on lock bytes of the image.

For each permission bit ``i`` (``qmpjobd.block.permissions``: consistent read,
write, write unchanged, resize) a node that holds the permission keeps a shared
lock on byte ``100 + i`` of the file, and a node that does not share it keeps a
shared lock on byte ``200 + i``. Before taking a permission a node tests for an
exclusive lock on the other's bytes: someone else's lock on ``200 + i`` means
"Failed to get "<perm>" lock", on ``100 + i`` (for what the node will not share)
"Failed to get shared "<perm>" lock". Because the locks are open-file-description
locks (``F_OFD_SETLK``), they are those of QEMU exactly: qemu-img, qemu-io,
qemu-storage-daemon and qmpjobd see one another's, and two nodes of one process on
the same file see each other too, as in QEMU. Closing the descriptor drops them.

``locking``: ``on`` and ``auto`` lock (Linux has OFD locks), ``off`` never locks
and never tests.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from qmpjobd.block.permissions import ALL, BITS, perm_names
from qmpjobd.errors import QMPError

PERM_BASE = 100      # RAW_LOCK_PERM_BASE
SHARED_BASE = 200    # RAW_LOCK_SHARED_BASE

# struct flock on Linux/x86-64 and arm64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi4x"


def _flock(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One fcntl call on one byte; returns the lock type the kernel reports."""
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
    reply = fcntl.fcntl(fd, cmd, request)
    return struct.unpack(_FLOCK, reply)[0]


def lock_byte(fd: int, offset: int) -> None:
    _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)


def unlock_byte(fd: int, offset: int) -> None:
    _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)


def byte_locked_by_others(fd: int, offset: int) -> bool:
    """qemu_lock_fd_test(exclusive=true): would anyone else's lock block a write lock?"""
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _lock_error(text: str, code: int) -> QMPError:
    # EAGAIN (somebody holds the byte) is QEMU's plain message; anything else
    # carries the errno text, as error_setg_errno does.
    if code == errno.EAGAIN:
        return QMPError(text)
    return QMPError(f"{text}: {os.strerror(code)}")


class ImageLocks:
    """The lock bytes one file node holds, and QEMU's prepare/commit/abort steps
    (raw_handle_perm_lock)."""

    def __init__(self, fd: int, enabled: bool, filename: str = "") -> None:
        self.fd = fd
        self.enabled = enabled
        self.filename = filename
        # Committed permissions (QEMU's s->perm, s->shared_perm).
        self.perm = 0
        self.shared = ALL
        # Bytes locked now (s->locked_perm, s->locked_shared_perm).
        self.locked_perm = 0
        self.locked_unshared = 0

    def prepare(self, perm: int, shared: int) -> None:
        """Take what the new permissions need on top of the committed ones and test
        the other side's bytes; on failure put the bytes back and raise."""
        if not self.enabled:
            return
        if (self.perm | perm) == self.perm and (self.shared & shared) == self.shared:
            return     # only loosening: nothing can fail
        try:
            self._apply(self.perm | perm, (~self.shared | ~shared) & ALL, unlock=False)
            try:
                self._check(perm, shared)
            except QMPError as exc:
                # QEMU's hint, printed after the error where a hint is shown (the
                # command line), never in a QMP reply.
                exc.hint = f"Is another process using the image [{self.filename}]?\n"  # type: ignore[attr-defined]
                raise
        except QMPError:
            self.abort()
            raise

    def commit(self, perm: int, shared: int) -> None:
        self.perm, self.shared = perm, shared
        if self.enabled:
            try:
                self._apply(perm, ~shared & ALL, unlock=True)
            except QMPError:
                pass   # QEMU ignores a failed unlock here too

    def abort(self) -> None:
        if self.enabled:
            try:
                self._apply(self.perm, ~self.shared & ALL, unlock=True)
            except QMPError:
                pass

    def move_to(self, fd: int) -> None:
        """Take the committed locks over to a new descriptor (a reopen); the old one's
        go when it is closed."""
        self.fd = fd
        self.locked_perm = self.locked_unshared = 0
        if self.enabled:
            self._apply(self.perm, ~self.shared & ALL, unlock=False)

    def _apply(self, perm_bits: int, unshared_bits: int, unlock: bool) -> None:
        """raw_apply_lock_bytes."""
        for base, wanted, attr in ((PERM_BASE, perm_bits, "locked_perm"),
                                   (SHARED_BASE, unshared_bits, "locked_unshared")):
            locked = getattr(self, attr)
            for index, bit in enumerate(BITS):
                offset = base + index
                if wanted & bit and not locked & bit:
                    try:
                        lock_byte(self.fd, offset)
                    except OSError as exc:
                        raise _lock_error(f"Failed to lock byte {offset}", exc.errno) from None
                    locked |= bit
                elif unlock and locked & bit and not wanted & bit:
                    try:
                        unlock_byte(self.fd, offset)
                    except OSError as exc:
                        raise _lock_error(f"Failed to unlock byte {offset}",
                                          exc.errno) from None
                    locked &= ~bit
                setattr(self, attr, locked)

    def _check(self, perm: int, shared: int) -> None:
        """raw_check_lock_bytes: first what we take, then what we refuse to share."""
        for index, bit in enumerate(BITS):
            if perm & bit and self._held_elsewhere(SHARED_BASE + index):
                raise QMPError(f'Failed to get "{perm_names(bit)}" lock')
        for index, bit in enumerate(BITS):
            if not shared & bit and self._held_elsewhere(PERM_BASE + index):
                raise QMPError(f'Failed to get shared "{perm_names(bit)}" lock')

    def _held_elsewhere(self, offset: int) -> bool:
        try:
            return byte_locked_by_others(self.fd, offset)
        except OSError as exc:
            raise _lock_error("Failed to get lock", exc.errno) from None


def locking_enabled(option: "str | None") -> bool:
    """The ``locking`` option: auto and on lock (OFD locks exist on Linux)."""
    return option != "off"
