"""The drainable thread pool: results, errors, early resolution by a drain,
cancellation, and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from qmpjobd.block import iowait


def _run(coro_fn):
    loop = asyncio.new_event_loop()
    try:
        iowait.install(loop)
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_results_and_errors_reach_the_awaiting_coroutine():
    async def body(loop):
        assert await loop.run_in_executor(None, sum, (1, 2, 3)) == 6

        def fail():
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError) as raised:
            await loop.run_in_executor(None, fail)
        assert raised.value.errno == 28
        # Many at once: every request answered, in whatever order they end.
        results = await asyncio.gather(*(loop.run_in_executor(None, pow, i, 2) for i in range(50)))
        return results

    assert _run(body) == [i * i for i in range(50)]


def test_finish_resolves_a_request_before_the_loop_delivers_it():
    gate = threading.Event()

    async def body(loop):
        future = loop.run_in_executor(None, lambda: (gate.wait(5), "done")[1])
        assert not future.done()
        threading.Timer(0.05, gate.set).start()
        started = time.monotonic()
        assert iowait.finish(future)          # blocks until the work is done
        assert time.monotonic() - started >= 0.04
        assert future.done() and future.result() == "done"
        # The loop's own delivery comes later and changes nothing.
        await asyncio.sleep(0.05)
        return future.result()

    assert _run(body) == "done"


def test_finish_refuses_what_is_not_a_pool_request():
    async def body(loop):
        other = loop.create_future()
        assert not iowait.finish(other)
        assert not iowait.finish(object())
        other.cancel()
        return True

    assert _run(body)


def test_a_request_cancelled_before_it_starts_is_not_run():
    gate = threading.Event()
    ran: list[int] = []

    async def body(loop):
        executor = iowait._EXECUTORS[loop]
        # Occupy every worker, then queue one more request and cancel it.
        blockers = [loop.run_in_executor(None, gate.wait, 5) for _ in range(executor._max_workers)]
        queued = loop.run_in_executor(None, ran.append, 1)
        queued.cancel()
        gate.set()
        await asyncio.gather(*blockers)
        await asyncio.sleep(0.05)
        return queued.cancelled()

    assert _run(body)
    assert ran == []


def test_other_threads_use_the_plain_pool():
    async def body(loop):
        executor = iowait._EXECUTORS[loop]
        box: list[object] = []
        thread = threading.Thread(target=lambda: box.append(executor.submit(pow, 3, 3).result(5)))
        thread.start()
        await loop.run_in_executor(None, thread.join, 5)
        return box

    assert _run(body) == [27]


def test_shutdown_stops_the_workers():
    loop = asyncio.new_event_loop()
    iowait.install(loop)
    executor = iowait._EXECUTORS[loop]
    loop.run_until_complete(asyncio.gather(*(loop.run_in_executor(None, time.sleep, 0.01)
                                             for _ in range(4))))
    workers = list(executor._workers)
    # The whole pool starts with the first request, before any thread is busy.
    assert len(workers) == executor._max_workers
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
    assert not any(worker.is_alive() for worker in workers)


def test_finish_still_knows_a_request_whose_waiter_has_not_run_yet():
    """A drain between the loop's delivery of a result and the awaiting
    coroutine's step must still find the request (it then runs the coroutine on
    itself): the request is forgotten only after the result's callbacks ran."""
    seen: list[bool] = []

    async def body(loop):
        future = loop.run_in_executor(None, pow, 2, 10)
        future.add_done_callback(lambda done: seen.append(iowait.finish(done)))
        value = await future
        await asyncio.sleep(0)
        seen.append(iowait.finish(future))     # long delivered: no longer a request
        return value

    assert _run(body) == 1024
    assert seen == [True, False]
