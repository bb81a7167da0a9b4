"""Thread-pool requests that a drain can wait for, as QEMU's drains do.

QEMU's ``bdrv_drained_begin`` blocks in ``aio_poll`` until the requests in flight on
the drained nodes have completed and every job using them has reached a pause
point: a rate-limited stream caught inside its copy finishes that chunk, then
pauses (``paused``/``running`` before the command's reply), and the chunk counts.

qmpjobd's commands run synchronously, and its file I/O completes through asyncio
futures of the event loop's default executor, which only the loop resolves, after
the command. The executor installed here hands out futures it can also resolve on
the spot: :func:`finish` blocks until the thread-pool work behind a future is done
and sets its result at once, so a drain can step the job waiting for it on the
drain's own stack (``BlockJob.finish_request_in_flight``). The loop still delivers
every result it was not asked for early; a future resolved early is skipped then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from typing import Any, Callable

THREAD_NAME_PREFIX = "qmpjobd-io"


class DrainableExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor: ``submit`` from the loop thread returns an
    asyncio future of that loop (``run_in_executor`` passes it through as it is),
    which :func:`finish` can resolve before the loop gets to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(thread_name_prefix=THREAD_NAME_PREFIX)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._work: "weakref.WeakKeyDictionary[asyncio.Future, concurrent.futures.Future]" = (
            weakref.WeakKeyDictionary())

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        work = super().submit(fn, *args, **kwargs)
        if threading.get_ident() != self._loop_thread or self._loop.is_closed():
            return work          # not ours to resolve: asyncio wraps it as usual
        future = self._loop.create_future()
        self._work[future] = work
        # A cancelled waiter (daemon exit) cancels work that has not started.
        future.add_done_callback(lambda done: work.cancel() if done.cancelled() else None)
        work.add_done_callback(lambda _work: self._deliver_soon(future, work))
        return future

    def _deliver_soon(self, future: asyncio.Future, work: concurrent.futures.Future) -> None:
        """Thread-pool side: hand the result to the loop (it may be closed by then)."""
        try:
            self._loop.call_soon_threadsafe(_deliver, future, work)
        except RuntimeError:
            pass

    def finish(self, future: asyncio.Future) -> bool:
        """Wait for the work behind ``future`` and resolve it now; False if
        ``future`` is not one of this executor's."""
        work = self._work.get(future)
        if work is None:
            return False
        concurrent.futures.wait([work])
        _deliver(future, work)
        return True


def _deliver(future: asyncio.Future, work: concurrent.futures.Future) -> None:
    if future.done():
        return               # resolved early by finish(), or cancelled
    if work.cancelled():
        future.cancel()
    elif work.exception() is not None:
        future.set_exception(work.exception())  # type: ignore[arg-type]
    else:
        future.set_result(work.result())


_EXECUTORS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DrainableExecutor]" = (
    weakref.WeakKeyDictionary())


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Make the drainable executor ``loop``'s default (once per loop: embedded
    daemons share their program's loop)."""
    if loop in _EXECUTORS:
        return
    executor = DrainableExecutor(loop)
    loop.set_default_executor(executor)
    _EXECUTORS[loop] = executor


def finish(future: Any) -> bool:
    """Resolve the thread-pool request ``future`` now, blocking until its work is
    done (QEMU's aio_poll waiting for a request). False when it is no such request
    (a timer, another coroutine's result, no drainable executor installed)."""
    if not isinstance(future, asyncio.Future):
        return False
    executor = _EXECUTORS.get(future.get_loop())
    return executor is not None and executor.finish(future)
