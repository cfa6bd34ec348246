"""The direct dialer: a plain outbound TCP connection from this host."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

from tunio.dialers.base import Address
from tunio.errors import DialError

# Not every Python names these; the values are Linux's.
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


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

    async def dial(self, dst: Address, src: Address) -> socket.socket:  # noqa: ARG002
        try:
            ip = ipaddress.ip_address(dst.host)
        except ValueError:
            raise DialError(
                errno.EINVAL, f"direct dialer needs an IP literal, got {dst.host!r}"
            ) from None
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            if self.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.interface.encode())
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, (str(ip), dst.port))
        except OSError as exc:
            sock.close()
            code = exc.errno if exc.errno is not None else errno.ECONNABORTED
            raise DialError(code, f"{dst}: {exc.strerror or exc}") from exc
        except BaseException:
            # cancelled (flow reset, timeout): the half-open socket must not leak
            sock.close()
            raise
        return sock
