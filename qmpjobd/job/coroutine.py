"""Stepping coroutines by hand, the way QEMU enters and re-enters its coroutines.

In QEMU, starting or re-entering a job runs it *synchronously* up to its next yield:
``blockdev-backup`` of a null-co node with no speed limit runs the whole copy inside
the command. An asyncio Task would defer every step to the next loop turn, so instead
a :class:`CoroutineRunner` calls ``coro.send(None)`` itself:

* ``enter()`` runs the coroutine now, on the caller's stack, until it yields.
* What the coroutine yields decides how it is resumed:

  - :data:`PARK` (``await park()``): nothing is scheduled. Someone must call
    ``enter()`` again (QEMU's ``qemu_coroutine_yield()`` + ``aio_co_wake()``). Job
    pause points, job sleeps and "wait for my workers" all park.
  - an asyncio future (I/O, clock sleeps): the runner adds a done-callback that
    re-enters the coroutine from the event loop, as asyncio's Task does.
  - ``None`` (a bare yield, e.g. ``asyncio.sleep(0)``): re-entered on the next loop turn.
  - a :class:`Reschedule`: re-entered when its scheduler says so (main-loop bottom half).

Entering a coroutine that is already running, or one that waits for a future, is a
bug and asserts.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, Generator


class _Park:
    """Awaitable that hands control back to whoever entered the coroutine."""

    def __await__(self) -> Generator["_Park", None, None]:
        yield self

    def __repr__(self) -> str:
        return "PARK"


PARK = _Park()


async def park() -> None:
    """Yield to the caller of ``enter()``; resume only when entered again."""
    await PARK


class Reschedule:
    """Awaitable: continue later through ``schedule(resume)``.

    QEMU's ``aio_co_schedule(main context)`` + yield resumes a coroutine from a
    main-loop bottom half; ``JobManager.main_loop_turn()`` and
    ``bottom_half_turn()`` build ones that go through the job manager's bottom
    halves, whose passes decide whether that happens before or after the reply of
    the command that is running.
    """

    def __init__(self, schedule: Callable[[Callable[[], None]], None]) -> None:
        self.schedule = schedule

    def __await__(self) -> Generator["Reschedule", None, None]:
        yield self


DoneCallback = Callable[["CoroutineRunner"], None]


class CoroutineRunner:
    """Owns one coroutine and steps it; see the module docstring."""

    __slots__ = ("name", "_coro", "_on_done", "running", "parked", "finished", "result",
                 "_waiting", "_loop_turn_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], on_done: DoneCallback | None = None,
                 name: str = "") -> None:
        self.name = name
        self._coro = coro
        self._on_done = on_done
        self.running = False       # on the stack right now
        self.parked = False        # yielded PARK: only enter() resumes it
        self.finished = False
        self.result: Any = None
        self._waiting: asyncio.Future | None = None
        self._loop_turn_pending = False   # yielded None: the loop re-enters it

    def __repr__(self) -> str:
        state = ("running" if self.running else "finished" if self.finished
                 else "parked" if self.parked else "waiting" if self._waiting else "new")
        return f"<CoroutineRunner {self.name} {state}>"

    @property
    def waiting_for_future(self) -> bool:
        return self._waiting is not None

    @property
    def awaited_future(self) -> "asyncio.Future | None":
        return self._waiting

    def resume_if_done(self) -> bool:
        """Step now if the awaited future is already done (a drain resolved the
        request early); its done-callback, run later by the loop, is then a no-op."""
        future = self._waiting
        if future is None or not future.done():
            return False
        self._on_future_done(future)
        return True

    def enter(self) -> None:
        """Run the coroutine now until its next yield (QEMU's qemu_coroutine_enter)."""
        assert not self.running, f"{self!r}: entering a running coroutine"
        assert not self.finished, f"{self!r}: entering a finished coroutine"
        assert self._waiting is None, f"{self!r}: entering a coroutine that waits for a future"
        assert not self._loop_turn_pending, f"{self!r}: entering a coroutine that waits for the loop"
        self._step()

    def close(self) -> None:
        """Abandon the coroutine (daemon shutdown): its ``finally`` blocks run now."""
        if self.finished or self.running:
            return
        if self._waiting is not None:
            self._waiting.remove_done_callback(self._on_future_done)
            self._waiting = None
        self.finished = True
        try:
            self._coro.close()
        except RuntimeError:
            # The coroutine awaited inside a ``finally`` (a job's clean-up waits for
            # its in-flight requests): Python refuses that during close. The job is
            # abandoned either way; nothing more can run for it.
            pass

    # -- internals ----------------------------------------------------------------

    def _step(self) -> None:
        self.running = True
        self.parked = False
        try:
            yielded = self._coro.send(None)
        except StopIteration as stop:
            self._finish(stop.value)
            return
        except BaseException:
            # A bug inside the coroutine: mark it dead and let the exception reach
            # whoever entered it (a command handler, or the event loop's logger).
            self.running = False
            self.finished = True
            raise
        self.running = False
        self._wait_for(yielded)

    def _finish(self, value: Any) -> None:
        self.running = False
        self.finished = True
        self.result = value
        if self._on_done is not None:
            self._on_done(self)

    def _wait_for(self, yielded: object) -> None:
        if yielded is PARK:
            self.parked = True
        elif yielded is None:
            self._loop_turn_pending = True
            asyncio.get_event_loop().call_soon(self._resume_from_loop)
        elif isinstance(yielded, Reschedule):
            self._loop_turn_pending = True
            yielded.schedule(self._resume_from_loop)
        elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
            future: asyncio.Future = yielded  # type: ignore[assignment]
            # The await protocol: the consumer of the yield resets the flag (as Task does).
            future._asyncio_future_blocking = False
            self._waiting = future
            future.add_done_callback(self._on_future_done)
        else:
            raise RuntimeError(f"{self!r}: coroutine yielded {yielded!r}, not a future")

    def _on_future_done(self, future: asyncio.Future) -> None:
        if self._waiting is not future:
            return
        self._waiting = None
        if not self.finished:
            self._step()

    def _resume_from_loop(self) -> None:
        self._loop_turn_pending = False
        if not self.finished:
            self._step()
