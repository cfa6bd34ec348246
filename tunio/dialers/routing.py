"""The tell of a routing loop: a connection that left with the address of the app it is for.

A dialer's connection that the routes send into the TUN again leaves with the TUN's address,
which is what the app's own packets had; one that leaves by another interface never does. The
worker checks the connects it watches itself (tunio/worker/loops.py); the direct dialer checks
those it awaits for a coroutine (a name's, a proxy's, a chain's first hop) and raises
RoutingLoop, so that such a loop fails at its first hop too.
"""

from __future__ import annotations

import errno
import socket

from tunio.dialers.base import Address
from tunio.errors import DialError


class RoutingLoop(DialError):
    """A dial whose connection went into the TUN again; errno ENETUNREACH, as with no route."""

    def __init__(self, to: Address, text: str) -> None:
        super().__init__(errno.ENETUNREACH, text)
        self.to = to  # where the looping connection was to go (a proxy's address, say)


def left_as_the_app(sock: object, app: str) -> bool:
    """Whether socket `sock` (connected, or connecting) has the local address `app`."""
    if not isinstance(sock, socket.socket):
        return False  # (a dialer's own kind of session: nothing to tell by)
    try:
        local = sock.getsockname()
    except OSError:
        return False
    if not isinstance(local, tuple) or not local:
        return False  # (an AF_UNIX socket)
    host = local[0]
    return host == app or (":" in host and ":" in app and _same_ipv6(host, app))


def _same_ipv6(one: str, other: str) -> bool:
    """Two spellings of one IPv6 address (a scope suffix aside) compare alike."""
    try:
        return socket.inet_pton(socket.AF_INET6, one.partition("%")[0]) == \
            socket.inet_pton(socket.AF_INET6, other)  # fmt: skip
    except OSError:
        return False
