"""Every event one QMP client receives, recorded in order, and waits on them.

Matching rule (``wait``, ``seen``): an event matches when its name is the one
given (or any name, when none is given) and every keyword equals the member of
the event's ``data`` it names. Keywords spell ``-`` as ``_`` (``node_name=`` for
``node-name``). ``id=`` names a job: it matches ``data["id"]``, or, in the
events that call the job ``device`` and have no ``id`` (BLOCK_JOB_COMPLETED,
BLOCK_JOB_CANCELLED, BLOCK_JOB_ERROR, BLOCK_JOB_READY), ``data["device"]``.
A member the event does not have never matches.

``wait`` reads forward: it returns the first matching event after the one the
previous ``wait`` returned (from the first event, at the start), so a test reads
a sequence in the order it happened, and an event that arrived before the
command's reply is found too. ``seen`` ignores that position.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

Event = dict[str, Any]

# How much of what arrived a timeout message shows.
TIMEOUT_REPORT_EVENTS = 20


class EventTimeout(TimeoutError):
    """No matching event arrived in time; the message lists what did arrive."""


def matches(event: Event, name: str | None, members: dict[str, Any]) -> bool:
    if name is not None and event.get("event") != name:
        return False
    data = event.get("data") or {}
    for keyword, wanted in members.items():
        key = keyword.replace("_", "-")
        if key == "id" and "id" not in data:
            key = "device"
        if key not in data or data[key] != wanted:
            return False
    return True


def describe(name: str | None, members: dict[str, Any]) -> str:
    terms = ", ".join(f"{key}={value!r}" for key, value in members.items())
    return f"{name or 'any event'}({terms})"


class QMPEvents:
    """Records the events of one ``QMPClient`` from ``attach()`` on."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._cursor = 0
        self._waiters: list[asyncio.Future] = []
        self._listener: Any = None
        self._client: QMPClient | None = None

    def attach(self, client: "QMPClient") -> "QMPEvents":
        """Start recording ``client``'s events."""
        from qemu.qmp import EventListener

        recorder = self

        class _Recorder(EventListener):
            # QMPClient awaits put() for each event as it reads it, before it
            # hands over a later reply: an event written before a reply is
            # recorded by the time ``execute`` returns.
            async def put(self, event: Any) -> None:
                if self.accept(event):
                    recorder._record(dict(event))

        self._listener = _Recorder()
        self._client = client
        client.register_listener(self._listener)
        return self

    def detach(self) -> None:
        if self._client is not None and self._listener is not None:
            self._client.remove_listener(self._listener)
        self._client = None
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()

    def _record(self, event: Event) -> None:
        self._events.append(event)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def seen(self, name: str | None = None, **members: Any) -> list[Event]:
        """The events so far, oldest first; with a name or members, those that
        match (see the module docstring)."""
        return [event for event in self._events if matches(event, name, members)]

    def statuses(self, job_id: str) -> list[str]:
        """The job's JOB_STATUS_CHANGE statuses so far, in order."""
        return [event["data"]["status"] for event in self.seen("JOB_STATUS_CHANGE", id=job_id)]

    def _find(self, name: str | None, members: dict[str, Any]) -> Event | None:
        for index in range(self._cursor, len(self._events)):
            if matches(self._events[index], name, members):
                self._cursor = index + 1
                return self._events[index]
        return None

    async def wait(self, name: str | None = None, *, timeout: float = 10.0,
                   **members: Any) -> Event:
        """The next matching event (see the module docstring); waits at most
        ``timeout`` seconds of real time, then raises ``EventTimeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._find(name, members)
            if event is not None:
                return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EventTimeout(self._timeout_message(name, members, timeout))
            arrived = loop.create_future()
            self._waiters.append(arrived)
            try:
                await asyncio.wait_for(arrived, remaining)
            except asyncio.TimeoutError:
                pass

    def _timeout_message(self, name: str | None, members: dict[str, Any], timeout: float) -> str:
        later = self._events[self._cursor:]
        shown = [describe(e.get("event"), e.get("data") or {}) for e in later[-TIMEOUT_REPORT_EVENTS:]]
        skipped = len(later) - len(shown)
        listing = "\n  ".join(([f"... {skipped} earlier"] if skipped else []) + shown) or "(none)"
        return (f"no {describe(name, members)} within {timeout:g} s; "
                f"events since the last wait:\n  {listing}")

    def __len__(self) -> int:
        return len(self._events)
