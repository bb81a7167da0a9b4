"""Loaded by ``stability --io-races`` (via PYTHONPATH) into a qmpjobd process.

It makes every thread-pool file operation complete inside the call that starts it,
so a request's completion lands before the reply of the command that issued it.
Comparing that transcript with a normal one shows where an ordering depends on how
fast file I/O is, which is where QEMU's own order can change from machine to machine.
"""

import asyncio

import qmpjobd.block.drivers.file as file_driver
import qmpjobd.block.offload as offload


class _InstantLoop:
    def run_in_executor(self, executor, function, *args):
        future = asyncio.get_running_loop().create_future()
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting job
            future.set_exception(exc)
        return future


class _AsyncioWithInstantLoop:
    def __getattr__(self, name):
        return getattr(asyncio, name)

    @staticmethod
    def get_running_loop():
        return _InstantLoop()


file_driver.asyncio = _AsyncioWithInstantLoop()
offload.asyncio = _AsyncioWithInstantLoop()
