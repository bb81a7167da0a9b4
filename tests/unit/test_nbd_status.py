"""The export server's pieces that need no daemon: dirty-bitmap extents cut to a
request, and the socket channel's ordering of byte strings and file ranges
(sendfile) under a full socket, its high-water signals and its endings."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

from qmpjobd.block.dirty_bitmap import DirtyBitmap
from qmpjobd.nbd import protocol as nbd
from qmpjobd.nbd.channel import SocketChannel
from qmpjobd.nbd.server import bitmap_runs


def test_bitmap_runs_cover_exactly_the_request():
    bitmap = DirtyBitmap(4 << 20, 65536, "b0")
    bitmap.set_dirty(2 << 20, 4096)            # one granule: 2 MiB .. 2 MiB + 64 KiB
    bitmap.set_dirty(3 << 20, 131072)
    assert list(bitmap_runs(bitmap, 0, 4 << 20)) == [
        (0, 2 << 20), (nbd.STATE_DIRTY, 65536), (0, (1 << 20) - 65536),
        (nbd.STATE_DIRTY, 131072), (0, (1 << 20) - 131072)]
    # A request starting and ending inside granules is cut at its ends.
    assert list(bitmap_runs(bitmap, (2 << 20) + 4096, 8192)) == [(nbd.STATE_DIRTY, 8192)]
    assert list(bitmap_runs(bitmap, (2 << 20) - 512, 1024)) == [(0, 512), (nbd.STATE_DIRTY, 512)]


def test_bitmap_runs_past_a_smaller_bitmap_are_clean():
    bitmap = DirtyBitmap(1 << 20, 65536, "small")
    bitmap.set_dirty(0, 1 << 20)
    assert list(bitmap_runs(bitmap, 0, 4 << 20)) == [(nbd.STATE_DIRTY, 1 << 20), (0, 3 << 20)]


def _channel_run(items: list, high_water: int = 1 << 30) -> tuple[bytes, list[str]]:
    """Queue ``items`` (bytes, or (fd, offset, count)) on a channel whose peer
    does not read until everything is queued; what the peer gets, and the
    pause/resume/lost signals in order."""
    async def main() -> tuple[bytes, list[str]]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        signals: list[str] = []
        lost = asyncio.get_running_loop().create_future()
        channel = SocketChannel(ours, on_data=lambda d: None, on_eof=lambda: None,
                                on_lost=lambda: (signals.append("lost"), lost.set_result(None)),
                                on_pause=lambda: signals.append("pause"),
                                on_resume=lambda: signals.append("resume"),
                                high_water=high_water)
        for item in items:
            if isinstance(item, tuple):
                channel.sendfile(*item)
            else:
                channel.write(item)
        channel.close()
        received = bytearray()
        theirs.setblocking(False)
        while True:
            try:
                chunk = theirs.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not chunk:
                break
            received += chunk
        await lost
        theirs.close()
        return bytes(received), signals

    return asyncio.run(main())


def test_channel_keeps_bytes_and_file_ranges_in_order():
    content = os.urandom(3 << 20)
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.flush()
        items = [b"head", (f.fileno(), 1000, 2 << 20), b"middle" * 10000,
                 (f.fileno(), 0, 17), b"tail"]
        received, signals = _channel_run(items)
    expected = b"head" + content[1000:1000 + (2 << 20)] + b"middle" * 10000 + content[:17] + b"tail"
    assert received == expected
    assert signals == ["lost"]


def test_channel_signals_high_water_and_drains():
    received, signals = _channel_run([b"x" * 300000, b"y" * 300000], high_water=100000)
    assert received == b"x" * 300000 + b"y" * 300000
    assert signals == ["pause", "resume", "lost"]


def test_block_status_bits_are_the_nbd_base_allocation_bits():
    # The NBD server sends qmpjobd.block.status's flags as they are.
    from qmpjobd.block import status
    assert (status.STATE_HOLE, status.STATE_ZERO) == (nbd.STATE_HOLE, nbd.STATE_ZERO)
