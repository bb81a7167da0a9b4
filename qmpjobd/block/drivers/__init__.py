"""Block drivers: the BlockdevDriver names qmpjobd implements, and the refusal for the rest."""

from __future__ import annotations

import importlib

from qmpjobd.errors import QMPError

# driver name -> "module:Class" (imported on first use, keeps start-up cheap).
_IMPLEMENTED = {
    "null-co": "null:NullNode",
    "null-aio": "null:NullAioNode",
    "file": "file:FileNode",
    "raw": "raw:RawNode",
    "blkdebug": "blkdebug:BlkdebugNode",
}


def supported_drivers() -> list[str]:
    return list(_IMPLEMENTED)


def driver_class(name: str) -> type:
    """The node class for ``name``; any other QEMU driver is refused by name."""
    target = _IMPLEMENTED.get(name)
    if target is None:
        raise QMPError(f"Driver '{name}' is not supported by qmpjobd")
    module_name, class_name = target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)
