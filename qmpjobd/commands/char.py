"""Character devices: the sockets the daemon listens on (--chardev, --socket, --tcp)."""

from __future__ import annotations

from qmpjobd.commands import Context, command

# What ``query-chardev-backends`` of qemu-storage-daemon 7.2 (Debian build) lists, in
# its order. qmpjobd itself opens only ``socket`` chardevs, from the command line.
QSD_CHARDEV_BACKENDS = ("serial", "mux", "pipe", "parallel", "null", "ringbuf", "stdio",
                        "socket", "file", "memory", "udp", "pty")


@command("query-chardev")
def query_chardev(ctx: Context, args: dict) -> list:
    server = getattr(ctx.connection, "server", None)
    return server.chardev_info() if server is not None else []


@command("query-chardev-backends")
def query_chardev_backends(ctx: Context, args: dict) -> list:
    return [{"name": name} for name in QSD_CHARDEV_BACKENDS]
