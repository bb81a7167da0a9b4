"""Block I/O driven to completion without the event loop.

QEMU opens, closes and reopens images inside the monitor command: the format
driver's coroutine runs and the monitor polls until it is done, whatever nodes
sit between the format and the host file (a ``blkdebug`` node, a ``raw`` window).
qmpjobd does the same with :func:`run_now`: it sets a context flag while it steps
the coroutine, and :func:`in_pool` (how a node's own reads, writes, discards and
flushes reach the thread pool) then runs that work inline, so the coroutine never
has to wait and no other request runs in between. Outside ``run_now`` nothing
changes. (Job-side copies, which never run inside an open, still use the pool.)
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, Callable, Coroutine, TypeVar

from qmpjobd.errors import QMPError

T = TypeVar("T")

_synchronous: ContextVar[bool] = ContextVar("qmpjobd_synchronous_io", default=False)


def synchronous() -> bool:
    """True while :func:`run_now` drives the current request."""
    return _synchronous.get()


async def in_pool(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the default thread pool; inline under run_now."""
    if _synchronous.get():
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must not wait: its storage answers inline. A request
    that would still wait (an NBD client, a throttled node) is refused."""
    token = _synchronous.set(True)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    finally:
        _synchronous.reset(token)
    coro.close()
    raise QMPError("qcow2 needs a file child that answers without waiting "
                   "(a 'file' node, or a format or filter directly on one)")
