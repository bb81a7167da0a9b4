"""Block drivers: the BlockdevDriver names qmpjobd implements, and the refusal for the rest.

A few QEMU drivers are loadable modules in Debian's builds (libblkio's, gluster's).
Where the impersonated daemon would look for the module and not find it, qmpjobd
answers as that daemon does when the module is not installed
(``Unknown driver '<name>'``); elsewhere the refusal names qmpjobd.
"""

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
    "qcow2": "qcow2:Qcow2Node",
    # Filters of issues 11 and 12 (a module not written yet counts as unsupported).
    "copy-on-read": "copy_on_read:CopyOnReadNode",
    "copy-before-write": "copy_before_write:CopyBeforeWriteNode",
    "snapshot-access": "snapshot_access:SnapshotAccessNode",
}


def supported_drivers() -> list[str]:
    return list(_IMPLEMENTED)


def driver_class(name: str) -> type:
    """The node class for ``name``; any other QEMU driver is refused by name."""
    target = _IMPLEMENTED.get(name)
    if target is None:
        raise QMPError(f"Driver '{name}' is not supported by qmpjobd")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module_name}":
            raise
        raise QMPError(f"Driver '{name}' is not supported by qmpjobd") from None
    return getattr(module, class_name)


# Drivers Debian ships as loadable modules that the oracle installations lack.
MODULE_DRIVERS = frozenset({
    "io_uring", "nvme-io_uring", "virtio-blk-vfio-pci", "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa", "gluster",
})


def check_module_drivers(options: dict, modules_absent: bool) -> None:
    """Refuse a module driver anywhere in ``options`` (inline children too) with
    QEMU's "Unknown driver" when ``modules_absent`` (the personality decides)."""
    if not modules_absent:
        return
    for tree in _option_trees(options):
        name = tree.get("driver")
        if name in MODULE_DRIVERS:
            raise QMPError(f"Unknown driver '{name}'")


def uses_module_driver(options: dict) -> bool:
    return any(tree.get("driver") in MODULE_DRIVERS for tree in _option_trees(options))


def _option_trees(options: dict) -> list[dict]:
    """``options`` and every inline child definition below it, parents first."""
    trees = [options]
    for value in options.values():
        if isinstance(value, dict) and "driver" in value:
            trees.extend(_option_trees(value))
    return trees
