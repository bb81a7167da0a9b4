"""``null-co`` and ``null-aio``: nodes of a given size that discard writes and read nothing.

Options (QAPI BlockdevOptionsNull): ``size`` (default 1 GiB), ``read-zeroes``
(block status reports zeroes), ``latency-ns`` (every request first waits that long
on the daemon clock; without it null-co requests complete without yielding, while
null-aio requests, like QEMU's AIO emulation, complete from a bottom half).
"""

from __future__ import annotations

from qmpjobd.block.node import BlockNode
from qmpjobd.errors import QMPError

DEFAULT_SIZE = 1 << 30
SECTOR = 512


class NullNode(BlockNode):
    driver = "null-co"
    is_protocol = True
    strong_options = ("size", "read-zeroes")

    def open(self) -> None:
        self.latency_ns: int = self.options.get("latency-ns", 0)
        # uint64 in the schema (a negative number has wrapped); QEMU keeps it in
        # an int64 and refuses what does not fit.
        if not 0 <= self.latency_ns < 1 << 63:
            raise QMPError("latency-ns is invalid")
        self.read_zeroes: bool = bool(self.options.get("read-zeroes", False))
        # QEMU keeps the length in 512-byte sectors, rounding up.
        requested = self.options.get("size", DEFAULT_SIZE)
        self.size = -(-requested // SECTOR) * SECTOR

    async def _wait(self) -> None:
        if self.latency_ns:
            await self.graph.clock.sleep_ns(self.latency_ns)

    async def _preadv(self, offset: int, length: int) -> bytes:
        await self._wait()
        # Without read-zeroes QEMU leaves the buffer untouched ("unspecified");
        # zeroes are one valid instance of that and keep copies deterministic.
        return bytes(length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self._wait()

    async def _flush(self) -> None:
        # QEMU's null drivers complete a flush like any request (latency, and a
        # bottom half for null-aio); co_flush only gets here after a write.
        await self._wait()

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        return ("zero" if self.read_zeroes else "unknown", length)

    def exact_filename(self) -> str | None:
        return None if self.own_strong_options() else f"{self.driver}://"

    def actual_size(self) -> int | None:
        return 0


class NullAioNode(NullNode):
    driver = "null-aio"

    async def _wait(self) -> None:
        if self.latency_ns:
            await self.graph.clock.sleep_ns(self.latency_ns)
        else:
            # QEMU completes the request from a one-shot bottom half.
            await self.graph.jobs.bottom_half_turn()
