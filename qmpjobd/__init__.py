"""qmpjobd: a QMP server that speaks QEMU's monitor protocol and runs QEMU's job lifecycle."""

__version__ = "0.1.0"
