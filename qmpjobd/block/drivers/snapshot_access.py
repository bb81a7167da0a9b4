"""``snapshot-access``: read the point-in-time view a copy-before-write filter keeps.

Its one child, ``file``, is a ``copy-before-write`` node. Reads and block status
give the content the filter's ``file`` had when the filter was opened: clusters
the filter has saved come from its target, the others (not yet overwritten) from
the filter's ``file``. Writes and zero writes fail with ENOTSUP; a discard gives up
the saved copy of the whole clusters it covers (they become unreadable), which
frees space in the target. Over any other kind of node the node opens, and every
read fails with ENOTSUP, as QEMU's does.
"""

from __future__ import annotations

import errno
from typing import Any

from qmpjobd.block.node import BlockNode, io_error


class SnapshotAccessNode(BlockNode):
    driver = "snapshot-access"
    is_filter = True
    child_roles = ("file",)

    def open(self) -> None:
        self.size = self.children["file"].size

    def _snapshot(self) -> Any:
        """The copy-before-write state behind ``file``, or None."""
        return getattr(self.children["file"], "state", None) \
            if self.children["file"].driver == "copy-before-write" else None

    async def _preadv(self, offset: int, length: int) -> bytes:
        state = self._snapshot()
        if state is None:
            raise io_error(errno.ENOTSUP)
        return await state.snapshot_read(offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        raise io_error(errno.ENOTSUP)

    async def co_pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False,
                               **_flags: Any) -> None:
        self._check_write_request(offset, length)
        if length:
            raise io_error(errno.ENOTSUP)

    async def _pdiscard(self, offset: int, length: int) -> None:
        state = self._snapshot()
        if state is None:
            raise io_error(errno.ENOTSUP)
        await state.snapshot_discard(offset, length)

    async def _flush(self) -> None:
        # Nothing of the snapshot needs to reach a disk.
        return None

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        state = self._snapshot()
        if state is None:
            return ("data", length)
        return state.snapshot_block_status(offset, length)

    def host_file(self) -> "tuple[int, int] | None":
        return None

    def has_dirty_flag(self) -> bool:
        # QEMU's bdrv_get_info fails on it: no dirty-flag in queries.
        return False

    def exact_filename(self) -> str | None:
        return self.children["file"].filename()

    def actual_size(self) -> int | None:
        return self.children["file"].actual_size()
