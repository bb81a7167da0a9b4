"""The one clock every wait inside a job goes through (rate limits, latency, timers).

``RealClock`` follows the event loop's monotonic time. ``VirtualClock`` is driven by
hand (``advance``), so tests can run rate-limited jobs deterministically and without
waiting in real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from abc import ABC, abstractmethod
from typing import Callable

from qmpjobd.job.coroutine import Reschedule

NS_PER_SECOND = 1_000_000_000


class Timer(ABC):
    """A pending callback; ``cancel()`` is safe to call at any time, even twice."""

    @abstractmethod
    def cancel(self) -> None: ...

    @property
    @abstractmethod
    def pending(self) -> bool: ...


class Clock(ABC):
    """Time source plus timers, in nanoseconds (QEMU_CLOCK_REALTIME's unit)."""

    @abstractmethod
    def now_ns(self) -> int: ...

    @abstractmethod
    def call_later_ns(self, ns: int, fn: Callable[[], None]) -> Timer:
        """Run ``fn()`` from the event loop once ``ns`` nanoseconds have passed."""

    def sleep_ns(self, ns: int) -> asyncio.Future:
        """A future that completes after ``ns`` nanoseconds (for I/O latency and the like)."""
        future = self._new_future()
        timer = self.call_later_ns(ns, lambda: None if future.done() else future.set_result(None))
        future.add_done_callback(lambda _f: timer.cancel())
        return future

    def _new_future(self) -> asyncio.Future:
        return asyncio.get_event_loop().create_future()


class _LoopTimer(Timer):
    def __init__(self, handle: asyncio.TimerHandle) -> None:
        self._handle = handle
        self._fired = False

    def fire(self, fn: Callable[[], None]) -> None:
        self._fired = True
        fn()

    def cancel(self) -> None:
        self._handle.cancel()

    @property
    def pending(self) -> bool:
        return not (self._fired or self._handle.cancelled())


class RealClock(Clock):
    """The event loop's monotonic clock (``loop.time()``), scaled to nanoseconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # Resolved lazily (the daemon builds its clock before the loop runs), then
        # kept: looking the loop up costs more than the timer itself.
        if self._loop is None:
            self._loop = asyncio.get_event_loop()
        return self._loop

    def now_ns(self) -> int:
        return int(self.loop.time() * NS_PER_SECOND)

    def call_later_ns(self, ns: int, fn: Callable[[], None]) -> Timer:
        timer: _LoopTimer
        handle = self.loop.call_later(max(ns, 0) / NS_PER_SECOND, lambda: timer.fire(fn))
        timer = _LoopTimer(handle)
        return timer

    def _new_future(self) -> asyncio.Future:
        return self.loop.create_future()


class _VirtualTimer(Timer):
    def __init__(self, deadline: int, fn: Callable[[], None]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def pending(self) -> bool:
        return not (self.cancelled or self.fired)


class VirtualClock(Clock):
    """A clock that only moves when told to; timers fire synchronously in ``advance``.

    Futures from ``sleep_ns`` belong to ``loop`` (their done-callbacks run when that
    loop runs), so tests that await them must give the loop a turn after advancing.

    With ``wake_synchronously`` (the daemon's ``--clock virtual``), ``sleep_ns`` is
    awaited by job coroutines only and resumes them from the timer itself, inside
    ``advance``: whatever a clock step sets going has happened when the step
    returns, so a command issued after a step sees the same state on every run.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, start_ns: int = 0,
                 wake_synchronously: bool = False) -> None:
        self._now = start_ns
        self._loop = loop
        self._timers: list[tuple[int, int, _VirtualTimer]] = []
        self._sequence = itertools.count()
        self.wake_synchronously = wake_synchronously

    def sleep_ns(self, ns: int):  # type: ignore[override]
        if not self.wake_synchronously:
            return super().sleep_ns(ns)
        # A Reschedule: the coroutine runner hands us its resume callback.
        return Reschedule(lambda resume: self.call_later_ns(ns, resume))

    def now_ns(self) -> int:
        return self._now

    def call_later_ns(self, ns: int, fn: Callable[[], None]) -> Timer:
        timer = _VirtualTimer(self._now + max(ns, 0), fn)
        heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    def next_deadline(self) -> int | None:
        """When the earliest pending timer fires, or None when none is pending."""
        self._drop_dead_timers()
        return self._timers[0][0] if self._timers else None

    @property
    def pending_timers(self) -> int:
        return sum(1 for _, _, timer in self._timers if timer.pending)

    def advance(self, ns: int, settle: Callable[[], None] | None = None) -> None:
        """Move time forward by ``ns``, firing every timer that falls due, in order.

        ``settle`` runs after each timer (the daemon runs its main-loop bottom
        halves there), so work a timer schedules happens at that timer's time.
        """
        target = self._now + ns
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            _, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, timer.deadline)
            timer.fired = True
            timer.fn()
            if settle is not None:
                settle()
        self._now = target

    def advance_until_idle(self, settle: Callable[[], None] | None = None,
                           limit: int = 1_000_000) -> int:
        """Jump from timer to timer (settling after each) until none is pending;
        returns how many fired. RuntimeError when ``limit`` timers did not do."""
        fired = 0
        if settle is not None:
            settle()
        while fired < limit:
            deadline = self.next_deadline()
            if deadline is None:
                return fired
            self.advance(deadline - self._now, settle)
            fired += 1
        raise RuntimeError(f"virtual clock: still not idle after {limit} timers")

    def run_timers(self, limit: int = 1_000_000) -> int:
        """Jump from timer to timer until none is left; returns how many fired."""
        fired = 0
        while fired < limit:
            deadline = self.next_deadline()
            if deadline is None:
                return fired
            self.advance(deadline - self._now)
            fired += 1
        raise RuntimeError("virtual clock: timers keep re-arming")

    def _drop_dead_timers(self) -> None:
        while self._timers and not self._timers[0][2].pending:
            heapq.heappop(self._timers)

    def _new_future(self) -> asyncio.Future:
        return (self._loop or asyncio.get_event_loop()).create_future()
