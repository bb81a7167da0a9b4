#!/usr/bin/env python3
"""The README's quick start: one backup on the demo nodes of `make run`.

Usage: quickstart.py [SOCKET]   (default ./qmp.sock)
"""

import asyncio
import sys

from qemu.qmp import EventListener, QMPClient


async def main(socket_path: str) -> None:
    qmp = QMPClient("example")
    await qmp.connect(socket_path)
    events = EventListener()
    with qmp.listen(events):
        await qmp.execute("blockdev-backup", {"job-id": "b0", "device": "demo-src",
                                              "target": "demo-tgt", "sync": "full",
                                              "auto-dismiss": False})
        async for event in events:
            print(event["event"], event.get("data"))
            if event.get("data", {}).get("status") == "concluded":
                break
    print(await qmp.execute("query-jobs"))
    await qmp.execute("job-dismiss", {"id": "b0"})
    await qmp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "./qmp.sock"))
