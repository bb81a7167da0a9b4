"""``blkdebug``: error injection in front of an ``image`` child.

Rule model (checked against qemu-io/qemu-storage-daemon 7.2, see tests):

* ``inject-error`` rules belong to an ``event``. A rule becomes *active* when its
  event fires on this node. When an event that has matching inject rules fires, the
  active list is replaced by those rules (in declaration order); events without
  rules leave it alone. Rules on ``none`` are active from the start.
* Events fire from the node's parent and from the block layer: a ``raw`` parent
  announces ``read_aio`` before a read and ``write_aio`` before a write; every write
  reaching this node fires ``pwritev`` first and ``pwritev_done`` after. A job that
  reads a blkdebug node directly therefore never fires ``read_aio``.
* Each request (read, write, flush) checks the active rules in order. The first rule
  whose ``iotype`` (default: read, write, write-zeroes, discard, flush) and
  ``sector`` (default: any; a request covering byte ``sector*512`` matches) match
  fails the request with ``-errno`` (default EIO; 0 or negative means no error).
  ``once`` removes the rule for good after it fired. Without ``immediately`` the
  error is returned after one trip through the event loop, as QEMU does.
  ``delay-ns`` (10.0+) first holds the request that long on the daemon clock; with
  ``errno`` 0 the request then succeeds.
* A rule with ``state`` only takes part while the node's state (initially 1) equals
  it; ``set-state`` rules change the state when their event fires.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from qmpjobd.block.activation import check_child_attach
from qmpjobd.block.node import BlockNode, io_error
from qmpjobd.block.syncio import synchronous
from qmpjobd.errors import QMPError

SECTOR = 512
DEFAULT_IOTYPES = frozenset({"read", "write", "write-zeroes", "discard", "flush"})


@dataclass
class InjectRule:
    event: str
    state: int            # 0 = any state
    errno: int
    sector: int           # -1 = any offset
    once: bool
    immediately: bool
    iotypes: frozenset[str]
    delay_ns: int = 0     # 10.0+: hold the request this long first

    def matches(self, offset: int, length: int, iotype: str) -> bool:
        if iotype not in self.iotypes:
            return False
        if self.sector == -1:
            return True
        target = self.sector * SECTOR
        return length > 0 and offset <= target < offset + length


@dataclass
class SetStateRule:
    event: str
    state: int
    new_state: int


class BlkdebugNode(BlockNode):
    driver = "blkdebug"
    is_filter = True
    is_protocol = True
    child_roles = ("image",)
    # Zero-length reads and writes reach the rules, as in QEMU (an NBD client
    # can send them).
    forwards_empty_requests = True
    strong_options = ("config", "inject-error.", "set-state.", "align", "max-transfer",
                      "opt-write-zero", "max-write-zero", "opt-discard", "max-discard")

    @classmethod
    def check_children(cls, children: dict[str, BlockNode]) -> None:
        if "image" not in children:
            raise QMPError("Parameter 'image' is missing")

    def open(self) -> None:
        check_child_attach(self.node_name, "image", self.children["image"])
        if "config" in self.options:
            raise QMPError("blkdebug option 'config' is not supported by qmpjobd; "
                           "give the rules as inject-error/set-state")
        align = self.options.get("align")
        if align is not None and (align <= 0 or align & (align - 1) or align >= 2**31):
            raise QMPError(f"Cannot meet constraints with align {align}")
        self.inject_rules = [self._inject_rule(r) for r in self.options.get("inject-error", [])]
        self.state_rules = [SetStateRule(r["event"], r.get("state", 0), r["new_state"])
                            for r in self.options.get("set-state", [])]
        self.state = 1
        self.active_rules: list[InjectRule] = [
            r for r in self.inject_rules if r.event == "none"]
        self.size = self.children["image"].size

    @staticmethod
    def _inject_rule(options: dict) -> InjectRule:
        iotype = options.get("iotype")
        return InjectRule(
            event=options["event"],
            state=options.get("state", 0),
            errno=options.get("errno", errno.EIO),
            sector=options.get("sector", -1),
            once=bool(options.get("once", False)),
            immediately=bool(options.get("immediately", False)),
            iotypes=DEFAULT_IOTYPES if iotype is None else frozenset({iotype}),
            delay_ns=max(0, options.get("delay-ns", 0)),
        )

    # --- events and rules -------------------------------------------------------

    def debug_event(self, event: str) -> None:
        new_state = self.state
        fired = [r for r in self.inject_rules
                 if r.event == event and r.state in (0, self.state)]
        if fired:
            self.active_rules = fired
        for rule in self.state_rules:
            if rule.event == event and rule.state in (0, self.state):
                new_state = rule.new_state
        self.state = new_state

    async def _check_rules(self, offset: int, length: int, iotype: str) -> None:
        rule = next((r for r in self.active_rules if r.matches(offset, length, iotype)), None)
        if rule is None or (rule.errno <= 0 and not rule.delay_ns):
            return
        if rule.once:
            self.active_rules.remove(rule)
            self.inject_rules.remove(rule)
        if synchronous():
            # Driven inside a command (an open, a close): QEMU polls the request
            # to its end there, so neither the delay nor the bottom half shows.
            if rule.errno <= 0:
                return
        elif rule.delay_ns:
            # The request waits on the daemon clock, then fails (or, with errno
            # 0, goes on): a slow device rather than a broken one.
            await self.graph.clock.sleep_ns(rule.delay_ns)
            if rule.errno <= 0:
                return
        elif not rule.immediately:
            # QEMU completes the failed request from a bottom half: the job goes on
            # in the same main-loop pass, before the current command's reply.
            await self.graph.jobs.main_loop_turn()
        raise io_error(rule.errno)

    # --- I/O ----------------------------------------------------------------------

    async def _preadv(self, offset: int, length: int) -> bytes:
        await self._check_rules(offset, length, "read")
        return await self.children["image"].co_pread(offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        self.debug_event("pwritev")
        await self._check_rules(offset, len(data), "write")
        await self.children["image"].co_pwrite(offset, data)
        self.debug_event("pwritev_done")

    async def _flush(self) -> None:
        await self._check_rules(0, 0, "flush")
        await self.children["image"].co_flush()

    def extend_for_write(self, end: int) -> None:
        # A format above may write past the end (qcow2 allocating): the request
        # passes to the image, which grows, and this node's length follows it.
        if end > self.size:
            image = self.children["image"]
            image.extend_for_write(end)
            self.size = max(self.size, image.size)

    def request_alignment(self) -> int:
        # ``align`` is the point of the option: requests must be multiples of it.
        return self.options.get("align") or 1

    def exact_filename(self) -> str | None:
        if self.own_strong_options():
            return None
        inner = self.children["image"].exact_filename()
        return None if inner is None else f"blkdebug::{inner}"

    def image_details(self) -> dict:
        # Without a bdrv_get_info of its own, QEMU asks the filtered child.
        return self.child_cluster_size(self.children["image"])

    def block_limits(self) -> dict:
        return self.with_child_discard_alignment(self.children["image"])

