"""The ring buffer chardev's byte semantics and the decoders ringbuf-write uses,
without sockets (the conformance scenario chardev_commands checks them against
qemu-storage-daemon over the wire)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpjobd.commands.char import RingBuffer, qemu_base64_decode, qemu_string_bytes
from qmpjobd.errors import QMPError


class QemuRing:
    """QEMU's ring as it is written: free-running producer and consumer counters
    over a power-of-two array, one byte at a time."""

    def __init__(self, size: int) -> None:
        self.size, self.prod, self.cons = size, 0, 0
        self.cells = bytearray(size)

    def write(self, data: bytes) -> None:
        for byte in data:
            self.cells[self.prod & (self.size - 1)] = byte
            self.prod += 1
            if self.prod - self.cons > self.size:
                self.cons = self.prod - self.size

    def read(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size and self.cons != self.prod:
            out.append(self.cells[self.cons & (self.size - 1)])
            self.cons += 1
        return bytes(out)


operations = st.lists(st.one_of(st.binary(max_size=40).map(lambda b: ("w", b)),
                                st.integers(1, 40).map(lambda n: ("r", n))), max_size=30)


@given(st.sampled_from([1, 2, 8, 16, 64]), operations)
def test_ring_matches_qemus_counters(size, ops):
    ours, qemu = RingBuffer(size), QemuRing(size)
    for op, arg in ops:
        if op == "w":
            ours.write(arg)
            qemu.write(arg)
        else:
            assert ours.read(arg) == qemu.read(arg)
    assert ours.read(1 << 20) == qemu.read(1 << 20)


def test_a_ring_of_size_zero_holds_nothing():
    ring = RingBuffer(0)
    ring.write(b"abc")
    assert ring.read(10) == b""


def test_a_large_ring_costs_only_what_it_holds():
    ring = RingBuffer(1 << 40)
    ring.write(b"x" * 1000)
    assert len(ring.unread) == 1000


@given(st.binary(max_size=64))
def test_base64_of_padded_text_decodes_as_the_standard(data):
    assert qemu_base64_decode(base64.b64encode(data).decode()) == data


@pytest.mark.parametrize("text, decoded", [
    ("YQ", b""),                 # a partial group is dropped
    ("Y", b""),
    ("", b""),
    ("YQ==YWI=YWJj", b"aababc"),  # padding in the middle ends a group, not the data
    ("YWJj\n", b"abc"),          # newlines pass and are skipped
    ("Y=Jj", b"`\x02c"),         # '=' inside a group counts as a zero digit
])
def test_base64_is_as_lenient_as_glib(text, decoded):
    assert qemu_base64_decode(text) == decoded


@pytest.mark.parametrize("text", ["YW Jj", "!!!", "YWJj\r\n", "é"])
def test_base64_refuses_other_characters(text):
    with pytest.raises(QMPError, match="^Base64 data contains invalid characters$"):
        qemu_base64_decode(text)


def test_utf8_strings_are_held_as_modified_utf8():
    assert qemu_string_bytes("a\x00b") == b"a\xc0\x80b"
    assert qemu_string_bytes("h\u00e9\U0001F600") == "h\u00e9\U0001F600".encode()
