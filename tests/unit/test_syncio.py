"""run_now drives block I/O to completion inside a command (qcow2 open/close)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from qmpjobd.block.syncio import in_pool, run_now, synchronous
from qmpjobd.errors import QMPError


async def _thread_of_work() -> tuple[bool, str]:
    def where() -> str:
        return threading.current_thread().name
    return synchronous(), await in_pool(where)


def test_run_now_does_pool_work_inline():
    inside, thread = run_now(_thread_of_work())
    assert inside is True
    assert thread == threading.current_thread().name
    assert synchronous() is False


def test_outside_run_now_the_pool_does_it():
    inside, thread = asyncio.run(_thread_of_work())
    assert inside is False
    assert thread != threading.current_thread().name


def test_a_coroutine_that_really_waits_is_refused_and_closed():
    closed = []

    async def waits() -> None:
        try:
            await asyncio.sleep(0)
        finally:
            closed.append(True)

    with pytest.raises(QMPError, match="answers without waiting"):
        run_now(waits())
    assert closed == [True]
    assert synchronous() is False
