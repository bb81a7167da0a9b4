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
import queue
import threading
import weakref
from typing import Any, Callable

THREAD_NAME_PREFIX = "qmpjobd-io"


class _Request:
    """One thread-pool request of the loop thread: what to run, and what came of it."""

    __slots__ = ("fn", "args", "future", "done", "delivered", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple, future: asyncio.Future) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.done = False           # the work has run (set by the worker)
        self.delivered = False      # the future has its outcome (loop thread)
        self.result: Any = None
        self.error: BaseException | None = None


class DrainableExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor: ``submit`` from the loop thread returns an
    asyncio future of that loop (``run_in_executor`` passes it through as it is),
    which :func:`finish` can resolve before the loop gets to it.

    Requests of the loop thread bypass ThreadPoolExecutor's machinery: its
    concurrent future (a Condition and an RLock each), work item and idle
    semaphore cost more Python per request than a job's whole I/O step. Here a
    request is one small object on a SimpleQueue, and its worker hands it back
    with call_soon_threadsafe. Other threads' submissions use the base class.
    The pool is ThreadPoolExecutor's size, all started with the first request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(thread_name_prefix=THREAD_NAME_PREFIX)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._requests: "queue.SimpleQueue[_Request | None]" = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._by_future: dict[asyncio.Future, _Request] = {}
        # finish() waits here; workers notify only while someone waits.
        self._finished = threading.Condition(threading.Lock())
        self._finish_waiters = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if (kwargs or threading.get_ident() != self._loop_thread or self._loop.is_closed()
                or self._shutdown):
            return super().submit(fn, *args, **kwargs)  # asyncio wraps it as usual
        future = self._loop.create_future()
        request = _Request(fn, args, future)
        self._by_future[future] = request
        if not self._workers:
            # All at once, before any of them is busy: a thread start waits until
            # the new thread holds the GIL, which busy pool threads give up only at
            # their next system call or switch interval (up to 5 ms per start in a
            # running job).
            for _ in range(self._max_workers):
                self._start_worker()
        self._requests.put(request)
        return future

    def _start_worker(self) -> None:
        worker = threading.Thread(target=self._work, daemon=True,
                                  name=f"{THREAD_NAME_PREFIX}_{len(self._workers)}")
        worker.start()
        self._workers.append(worker)

    def _work(self) -> None:
        """A pool thread: run requests until the sentinel. A request whose waiter
        was cancelled (daemon exit) before it started is not run."""
        while (request := self._requests.get()) is not None:
            if not request.future.cancelled():
                try:
                    request.result = request.fn(*request.args)
                except BaseException as exc:  # delivered to the awaiting coroutine
                    request.error = exc
            request.fn = request.args = None   # type: ignore[assignment]
            request.done = True
            if self._finish_waiters:
                with self._finished:
                    self._finished.notify_all()
            try:
                self._loop.call_soon_threadsafe(self._deliver, request)
            except RuntimeError:
                pass            # the loop closed meanwhile

    def _deliver(self, request: _Request) -> None:
        """Loop thread: resolve the request's future unless finish() did."""
        if request.delivered:
            return
        request.delivered = True
        _resolve(request)
        # Forget the request only after the callbacks the result scheduled (the
        # awaiting coroutine's step) have run: a drain in between still finds it
        # and runs the coroutine on itself.
        self._loop.call_soon(self._by_future.pop, request.future, None)

    def finish(self, future: asyncio.Future) -> bool:
        """Wait for the work behind ``future`` and resolve it now; False if
        ``future`` is not one of this executor's (or one long delivered)."""
        request = self._by_future.get(future)
        if request is None:
            return False
        if not request.done:
            with self._finished:
                self._finish_waiters += 1
                try:
                    while not request.done:
                        self._finished.wait()
                finally:
                    self._finish_waiters -= 1
        self._deliver(request)
        return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # The base class first: it marks the pool shut down, so no request of the
        # loop thread is queued behind the sentinels.
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        for _ in self._workers:
            self._requests.put(None)
        if wait:
            for worker in self._workers:
                worker.join()


def _resolve(request: _Request) -> None:
    future = request.future
    if future.done():
        return               # cancelled meanwhile
    if request.error is not None:
        future.set_exception(request.error)
    else:
        future.set_result(request.result)


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
