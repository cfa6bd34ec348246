"""The direct dialer: a plain outbound TCP connection (or UDP socket) from this host."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from tunio.dialers.base import Address
from tunio.dialers.ping import PingSession, open_ping
from tunio.dialers.udp import SocketSession
from tunio.errors import DialError

# Not every Python names these; the values are Linux's.
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
#: receive buffer asked for on UDP sessions (bytes)
UDP_RCVBUF = 1 << 20


class DirectDialer:
    """Connects straight to the destination (an IP literal).

    `mark` sets SO_MARK and `interface` sets SO_BINDTODEVICE on the outbound socket, so that the
    worker's own traffic can be routed around the TUN device instead of back into it.
    """

    def __init__(
        self, *, mark: int | None = None, interface: str | None = None, nodelay: bool = False
    ) -> None:
        self.mark = mark
        self.interface = interface
        self.nodelay = nodelay

    def __repr__(self) -> str:
        return f"DirectDialer(mark={self.mark!r}, interface={self.interface!r})"

    def _socket(self, dst: Address, kind: int) -> tuple[socket.socket, tuple[str, int]]:
        """A non-blocking socket of `kind` for `dst`, with our mark and interface set."""
        host = dst.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # inet_pton checks the literal as ipaddress would, at a tenth of its cost (a dial
            # is most of what a short connection costs in a worker)
            socket.inet_pton(family, host.partition("%")[0] if family == socket.AF_INET6 else host)
        except OSError:
            raise DialError(
                errno.EINVAL, f"direct dialer needs an IP literal, got {dst.host!r}"
            ) from None
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)  # non-blocking without an ioctl
        try:
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            if self.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.interface.encode())
        except OSError as exc:
            sock.close()
            raise _dial_error(dst, exc) from exc
        return sock, (host, dst.port)

    async def dial(self, dst: Address, src: Address) -> socket.socket:  # noqa: ARG002
        sock, addr = self._socket(dst, socket.SOCK_STREAM)
        try:
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            raise _dial_error(dst, exc) from exc
        except BaseException:
            # cancelled (flow reset, timeout): the half-open socket must not leak
            sock.close()
            raise
        return sock

    def start_connect(self, dst: Address, src: Address) -> socket.socket:  # noqa: ARG002
        """`dial` without the coroutine (tunio.dialers.base.StartConnect): a non-blocking socket
        whose connect has started.

        The worker waits for it to become writable itself and reads SO_ERROR (a task and a
        future per connection are most of what dialing costs in Python). Raises DialError if
        the connect fails at once (EHOSTUNREACH, ENETUNREACH, ...).
        """
        sock, addr = self._socket(dst, socket.SOCK_STREAM)
        try:
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = sock.connect_ex(addr)
        except OSError as exc:
            sock.close()
            raise _dial_error(dst, exc) from exc
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            raise _dial_error(dst, OSError(rc, os.strerror(rc)))
        return sock

    async def dial_udp(self, dst: Address, src: Address) -> SocketSession:  # noqa: ARG002
        """A UDP socket connected to `dst`: connecting only picks a route and a source port, so
        this does not wait; an unroutable destination fails here (EHOSTUNREACH, ENETUNREACH)."""
        sock, addr = self._socket(dst, socket.SOCK_DGRAM)
        try:
            # A burst of replies waits here while the worker is busy with other flows: room for
            # a full credit window of them (the kernel caps this at twice net.core.rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            raise _dial_error(dst, exc) from exc
        return SocketSession(sock, dst)

    async def dial_ping(self, dst: Address, src: Address) -> PingSession:  # noqa: ARG002
        """An ICMP echo session to `dst` from this host (tunio/dialers/ping.py): a ping socket,
        or a raw one for a process with CAP_NET_RAW; EACCES if neither is allowed."""
        return open_ping(dst, mark=self.mark, interface=self.interface)


def _dial_error(dst: Address, exc: OSError) -> DialError:
    if isinstance(exc, DialError):
        return exc
    code = exc.errno if exc.errno is not None else errno.ECONNABORTED
    return DialError(code, f"{dst}: {exc.strerror or exc}")
