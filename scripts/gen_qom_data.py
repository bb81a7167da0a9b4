#!/usr/bin/env python3
"""Record what the real qemu-storage-daemon of each version answers to
``qom-list-types`` and ``qom-list-properties``, as qmpjobd/data/qom-V.json.

qmpjobd answers those two commands from these files (it has no class
hierarchy of its own to walk), so the oracles are needed only to regenerate
them:

    .venv/bin/python scripts/gen_qom_data.py            # every version
    .venv/bin/python scripts/gen_qom_data.py 10.0

A file holds the daemon's whole type list in its own order (``abstract``
included), per type the ``qom-list-properties`` reply or its error and
the types that ``implements`` it selects, and the
initial value of every property of a freshly created object of each type
qmpjobd creates (``SAMPLES``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.procs import negotiated  # noqa: E402
from tests.support.daemons import DaemonProcess  # noqa: E402
from tests.support.oracles import SUPPORTED_VERSIONS  # noqa: E402

OUT = REPO / "qmpjobd" / "data"
# One object per type qmpjobd implements, created with the fewest arguments.
SAMPLES = {
    "iothread": {},
    "secret": {"data": "x"},
    "throttle-group": {},
}


def ask(client, command: str, arguments: dict) -> dict:
    client.send(json.dumps({"execute": command, "arguments": arguments}))
    while True:
        message = json.loads(client.recv_message(timeout=30))
        if "event" not in message:
            return message


def record(version: str) -> dict:
    """Ask one daemon about every type; a type whose qom-list-properties
    kills the daemon (QEMU aborts on some) is recorded as None, and a fresh
    daemon answers the rest."""
    properties: dict[str, object] = {}
    every: list[dict] = []
    while True:
        with DaemonProcess("qsd", version=version) as daemon:
            client = negotiated(daemon.sockets[0])
            every = every or ask(client, "qom-list-types", {"abstract": True})["return"]
            for info in every:
                name = info["name"]
                if name in properties:
                    continue
                properties[name] = None          # until it answers
                try:
                    reply = ask(client, "qom-list-properties", {"typename": name})
                except EOFError:
                    print(f"{version}: qom-list-properties {name} ends the daemon", file=sys.stderr)
                    break
                properties[name] = reply.get("return", reply.get("error"))
            else:
                return {"version": version, "types": every, "properties": properties,
                        "implementers": implementers(client, every),
                        "initial": initial_values(client, properties)}


def implementers(client, every: list[dict]) -> dict[str, list[str]]:
    """Per type, the types ``qom-list-types implements=`` names (subtypes,
    and for an interface its implementers), abstract ones included."""
    out = {}
    for info in every:
        reply = ask(client, "qom-list-types", {"implements": info["name"], "abstract": True})
        out[info["name"]] = [t["name"] for t in reply["return"]]
    return out


def initial_values(client, properties: dict) -> dict:
    """qom-get of every property of one new object per SAMPLES type."""
    out: dict[str, dict] = {}
    for qom_type, args in SAMPLES.items():
        ident = "sample-" + qom_type
        reply = ask(client, "object-add", {"qom-type": qom_type, "id": ident, **args})
        assert reply == {"return": {}}, reply
        values = {}
        for prop in properties[qom_type]:
            got = ask(client, "qom-get", {"path": f"/objects/{ident}", "property": prop["name"]})
            values[prop["name"]] = got.get("return", got.get("error"))
        out[qom_type] = values
    return out


def main(argv: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    for version in argv or SUPPORTED_VERSIONS:
        data = record(version)
        path = OUT / f"qom-{version}.json"
        path.write_text(json.dumps(data, separators=(",", ":"), sort_keys=False) + "\n")
        print(f"wrote {path.relative_to(REPO)} ({len(data['types'])} types)")


if __name__ == "__main__":
    main(sys.argv[1:])
