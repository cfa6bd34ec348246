"""A UDP session over one connected, non-blocking datagram socket (the direct dialer's)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from tunio.dialers.base import Address

#: the largest UDP payload (IPv4: 65535 - 20 - 8; IPv6 jumbograms aside, less again)
MAX_DATAGRAM = 65535

# A datagram the kernel will not take right now is dropped, as UDP may; these errnos say so.
# EMSGSIZE too: one oversized datagram must not end the whole session.
_DROPPED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EMSGSIZE})


def send_or_drop(send: Callable[[], object]) -> bool:
    """Runs one non-blocking datagram send: False if the datagram was dropped (the errnos
    above, or an interrupted call); any other error is raised for the session to end on."""
    try:
        send()
    except OSError as exc:
        if exc.errno in _DROPPED or isinstance(exc, InterruptedError):
            return False
        raise
    return True


class SocketSession:
    """A `DatagramSession` over a UDP socket connected to `dst`.

    Being connected is what makes an ICMP port unreachable from `dst` come back as ECONNREFUSED
    on the next send or receive, and what keeps datagrams from anyone else out: every datagram
    received comes from `dst`.
    """

    __slots__ = ("dst", "sock")

    def __init__(self, sock: socket.socket, dst: Address) -> None:
        self.sock = sock
        self.dst = dst

    def __repr__(self) -> str:
        return f"SocketSession(fd={self.sock.fileno()}, dst={self.dst})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes | memoryview) -> bool:
        return send_or_drop(lambda: self.sock.send(data))

    def recv(self) -> tuple[bytes, Address] | None:
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return None
        return data, self.dst

    def close(self) -> None:
        self.sock.close()
