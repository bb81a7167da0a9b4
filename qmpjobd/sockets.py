"""Socket helpers shared by the chardev sockets (``qmpjobd.server``) and the NBD
server (``qmpjobd.nbd.server``): both open InetSocketAddress listeners the way
QEMU's util/qemu-sockets.c does, with its error messages, and remove the unix
socket files they made."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from qmpjobd.errors import QMPError

# One address to try: family, type, proto and sockaddr, as getaddrinfo gives them.
ListenCandidate = tuple[int, int, int, Any]


def inet_family(address: Mapping[str, Any]) -> int:
    """The family an InetSocketAddress asks for: ipv4 or ipv6 alone picks one;
    both or neither leave it to the resolver."""
    if address.get("ipv4") and not address.get("ipv6"):
        return socket.AF_INET
    if address.get("ipv6") and not address.get("ipv4"):
        return socket.AF_INET6
    return socket.AF_UNSPEC


def resolve_inet(address: Mapping[str, Any], *, passive: bool) -> list:
    """getaddrinfo for an InetSocketAddress (``passive`` for a listener); a
    failure is a QMPError with QEMU's text."""
    host, port = address["host"], address["port"]
    flags = socket.AI_PASSIVE if passive else 0
    if address.get("numeric"):
        flags |= socket.AI_NUMERICHOST
    try:
        return socket.getaddrinfo(host or None, port, inet_family(address),
                                  socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as exc:
        raise QMPError(f"address resolution failed for {host}:{port}: {exc.strerror}") from None


def listen_first_free(candidates: Iterable[ListenCandidate], backlog: int) -> socket.socket:
    """A listening socket on the first candidate that binds, in QEMU's order: an
    address in use moves on to the next, any other bind error ends the search."""
    last_errno = 0
    for family, kind, proto, sockaddr in candidates:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last_errno = exc.errno or 0
            if exc.errno != errno.EADDRINUSE:
                raise QMPError(f"Failed to bind socket: {os.strerror(last_errno)}") from None
            continue
        return sock
    raise QMPError(f"Failed to find an available port: {os.strerror(last_errno)}")


def unlink_if_same(path: str, dev: int, ino: int) -> None:
    """Remove the socket file we created, unless another socket has taken the name
    since (QEMU would remove that one too)."""
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except OSError:
        pass
