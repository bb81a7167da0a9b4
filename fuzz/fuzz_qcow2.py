"""Coverage-guided fuzzing of the qcow2 format code over damaged images.

The input is a whole image file (seeds: small images qemu-img made, with data,
compressed clusters, zero clusters and internal snapshots). It is opened
read-only and read-write on a sparse in-memory file; a read-write open then gets
writes, zero writes, discards, a snapshot taken and deleted, and a flush, driven
by the input's last bytes. The properties:

* nothing but ``Qcow2OpenError``/``QMPError`` (refusals) and ``OSError`` (failed
  requests) ever comes out: any other exception is a bug;
* no write touches the header cluster except the header's own fields (the
  overlap check must stop a guest write that a hostile table points there);
* nothing is written below offset 0 (a write past 2^56, where a hostile table
  may point, fails as the file system would fail it).

``exercise`` is also what tests/unit/test_qcow2_fuzz.py runs over seeded
mutations (and compares with qemu-img's verdict on opening).
"""

from __future__ import annotations

import asyncio
import random

from _harness import Bug, run

# Offsets inside the header cluster that header updates write.
HEADER_WRITES = {0, 36, 48, 60, 72}
PAGE = 4096
OFFSET_LIMIT = 1 << 56


class SparseStorage:
    """A file as pages in a dict: a hostile table may point anywhere below 2^56."""

    def __init__(self, data: bytes, header_cluster: int) -> None:
        self.pages: dict[int, bytearray] = {}
        self.size = len(data)
        for start in range(0, len(data), PAGE):
            self.pages[start // PAGE] = bytearray(data[start:start + PAGE].ljust(PAGE, b"\0"))
        self.header_cluster = header_cluster
        self.bad_writes: list[tuple[int, int]] = []

    async def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise Bug(f"read at {offset} length {length}")
        out = bytearray()
        pos = offset
        end = offset + length
        while pos < end:
            page = self.pages.get(pos // PAGE)
            start = pos % PAGE
            take = min(PAGE - start, end - pos)
            out += page[start:start + take] if page is not None else bytes(take)
            pos += take
        return bytes(out)

    async def pwrite(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if offset < 0:
            raise Bug(f"write at {offset} length {len(data)}")
        if end > OFFSET_LIMIT:
            # A hostile table may name such an offset; the file system refuses it.
            raise OSError(27, "File too large")
        if offset < self.header_cluster and offset not in HEADER_WRITES:
            self.bad_writes.append((offset, len(data)))
        if end - offset > 64 << 20:
            raise OSError(27, "File too large")         # keep the fuzzer's memory bounded
        pos = offset
        view = memoryview(data)
        while pos < end:
            page = self.pages.setdefault(pos // PAGE, bytearray(PAGE))
            start = pos % PAGE
            take = min(PAGE - start, end - pos)
            page[start:start + take] = view[pos - offset:pos - offset + take]
            pos += take
        self.size = max(self.size, end)

    async def flush(self) -> None:
        pass

    def debug_event(self, event: str) -> None:
        pass

    def length(self) -> int:
        return self.size

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        self.size = length

    async def discard(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if end > offset:
            await self.pwrite(offset, bytes(end - offset))


def _cluster_size(data: bytes) -> int:
    bits = int.from_bytes(data[20:24], "big") if len(data) >= 24 else 16
    return 1 << bits if 9 <= bits <= 21 else 65536


async def _open(data: bytes, read_only: bool):
    from qmpjobd.block.formats.qcow2.image import Qcow2Image

    storage = SparseStorage(data, _cluster_size(data))
    return storage, await Qcow2Image.open(storage, read_only=read_only)


async def _drive(image, rng: random.Random) -> None:
    """Requests on an open image; each may fail with OSError only."""
    from qmpjobd.block.formats.qcow2 import snapshot as S

    size = max(image.size, 1)
    cluster = image.cluster_size
    for _ in range(6):
        what = rng.randrange(6)
        offset = rng.randrange(size)
        length = min(size - offset, rng.choice((1, 512, cluster, 3 * cluster + 7)))
        try:
            if what == 0:
                await image.read(offset, length)
            elif what == 1:
                await image.write(offset, bytes([rng.randrange(256)]) * length)
            elif what == 2:
                await image.write_zeroes(offset, length, rng.random() < 0.5)
            elif what == 3:
                await image.discard(offset, length)
            elif what == 4:
                snapshot = await S.create_snapshot(image, f"f{rng.randrange(9)}")
                await S.delete_snapshot(image, snapshot.id_str, None)
            else:
                await image.flush()
        except (OSError, S.SnapshotError):
            pass


def exercise(data: bytes, seed: int) -> str:
    """Open ``data`` read-only (and read-write), drive requests from ``seed``.
    Returns the read-only open's verdict: "ok" or the refusal's text. Raises Bug
    when a property breaks."""
    from qmpjobd.errors import QMPError

    async def main() -> str:
        verdict = "ok"
        for read_only in (True, False):
            try:
                storage, image = await _open(data, read_only)
            except QMPError as exc:
                if read_only:
                    verdict = exc.desc
                continue
            except OSError:
                if read_only:
                    verdict = "I/O error"
                continue
            await _drive(image, random.Random(seed))
            if storage.bad_writes:
                raise Bug(f"write into the header cluster: {storage.bad_writes[:3]}")
        return verdict

    try:
        return asyncio.run(main())
    except Bug:
        raise
    except Exception as exc:
        raise Bug(f"{type(exc).__name__}: {exc}") from exc


def one_input(data: bytes) -> None:
    if len(data) < 8:
        return
    exercise(data[:-4], int.from_bytes(data[-4:], "big"))


if __name__ == "__main__":
    run(one_input, lambda: __import__("qmpjobd.block.formats.qcow2.image"))
