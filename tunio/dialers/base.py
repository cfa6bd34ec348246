"""What a dialer is: given a flow's destination (and source), return a connected TCP socket, and
for UDP (optionally) a datagram session; a dialer may also start a connect without a coroutine
(`StartConnect`, optional), and a proxy dialer its handshake too (`StartHandshake`, optional)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

from tunio.errors import DialError

log = logging.getLogger("tunio.dialers")


@dataclass(frozen=True)
class Address:
    host: str  # an IP literal, or a domain name for dialers that take one
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@runtime_checkable
class Dialer(Protocol):
    async def dial(self, dst: Address, src: Address) -> socket.socket:
        """Return a connected, non-blocking TCP socket to `dst`.

        Raise OSError (or tunio.errors.DialError) whose errno is what the app should see:
        ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT, ...
        """
        ...


@runtime_checkable
class StartConnect(Protocol):
    """A dialer that can also start a TCP connect without a coroutine (optional; `direct` can).

    The worker dials such a dialer with `start_connect` instead of `dial`: it watches the socket
    in its own epoll until it is writable and reads SO_ERROR there, so a dial costs no task and
    no future (in Python those are most of what a short connection costs). Dialers without it
    are dialled with `dial` in an asyncio task. Both ways end alike: a connected socket, or the
    errno the app sees, and the same connect timeout.
    """

    def start_connect(self, dst: Address, src: Address) -> socket.socket:
        """Return a non-blocking TCP socket whose connect to `dst` has started (or is done).

        Raise OSError (or tunio.errors.DialError) with the errno the app should see if the
        connect fails at once (EHOSTUNREACH, ENETUNREACH, ...); a failure that comes later is
        the socket's SO_ERROR once it is writable.
        """
        ...


class Handshake(Protocol):
    """A proxy's handshake on a connection to the proxy, driven without a coroutine: the
    worker calls `begin` once the connection is up and `advance` on each readable edge.

    Neither blocks. `advance` reads only what the handshake is made of, never a byte of the
    destination's after it (the worker relays the socket from then on); `leftover` says whether
    such bytes were seen waiting behind the proxy's answer. A failure is raised as OSError (or
    tunio.errors.DialError) with the errno the app should see. `patience`, when not None after
    an `advance` that returned False, is how long (s) the handshake will wait for the rest of
    an error answer before `expire` gives it up (it raises the failure it has)."""

    leftover: bool
    patience: float | None

    def begin(self, sock: socket.socket) -> None:
        """The connection to the proxy is up: send the request (all of it, in one write)."""
        ...

    def advance(self, sock: socket.socket) -> bool:
        """Read what has arrived: True once the tunnel is up, False while more is to come."""
        ...

    def expire(self) -> None:
        """Give up waiting (after `patience`): raise the failure the answer so far says."""
        ...

    def failed_to_connect(self, code: int) -> str:
        """The words for a connection to the proxy that failed with errno `code`."""
        ...


#: the dial tasks inside `toward_proxy`, each with how deep (a chain reaches its inner proxies
#: inside the connection to its outer one)
_toward_proxy: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def toward_proxy() -> Iterator[None]:
    """Marks the dial running in this task as still connecting to its proxy, for the body of
    the `with`. A dial whose timeout comes there never reached the way out, so the app is told
    at once that the destination cannot be reached (EHOSTUNREACH, ICMP host unreachable)
    instead of the silence of a timeout, which would leave it to its own SYN retries (two
    minutes, by Linux's defaults) for a proxy that is down. The built-in proxy dialers use it;
    a dialer of one's own that goes through a proxy may too."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no loop running: no dial to mark
        task = None
    if task is None:
        yield
        return
    _toward_proxy[task] = _toward_proxy.get(task, 0) + 1
    try:
        yield
    finally:
        left = _toward_proxy[task] - 1
        if left:
            _toward_proxy[task] = left
        else:
            del _toward_proxy[task]


def connecting_to_proxy(task: asyncio.Task[Any]) -> bool:
    """Whether the dial in `task` is inside `toward_proxy` now."""
    return task in _toward_proxy


@runtime_checkable
class StartHandshake(Protocol):
    """A proxy dialer that can dial without a coroutine (optional; SOCKS5 and HTTP CONNECT to a
    proxy given by address, reached directly, can): `start_handshake` starts the connect to the
    proxy and returns its socket with the `Handshake` to speak on it once it is up. The worker
    watches the socket in its epoll through the connect and the handshake, as for
    `StartConnect`. None: this dialer dials with `dial` after all (a chain, a proxy name to
    resolve)."""

    def start_handshake(
        self, dst: Address, src: Address
    ) -> tuple[socket.socket, Handshake] | None: ...


class DatagramSession(Protocol):
    """One UDP association towards a destination, as a dialer made it (a connected UDP socket for
    `direct`, a UDP ASSOCIATE relay for SOCKS5). The worker drives it from its event loop: it
    waits for `fileno()` to be readable and then calls `recv()` until it returns None."""

    def fileno(self) -> int:
        """A descriptor that is readable when `recv()` may return a datagram."""
        ...

    def send(self, data: bytes | memoryview) -> bool:
        """Send one datagram without blocking; False if it was dropped (a full buffer), as UDP
        may. Raise OSError for an error the app should learn about (ECONNREFUSED, …)."""
        ...

    def recv(self) -> tuple[bytes, Address] | None:
        """One waiting datagram and the address it came from, or None if none waits. Raise
        OSError (errno ECONNREFUSED when the destination answered ICMP port unreachable, …)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DatagramDialer(Protocol):
    """A dialer that also carries UDP. Dialers without `dial_udp` carry TCP only: their UDP
    sessions are refused (the app gets an ICMP error)."""

    async def dial_udp(self, dst: Address, src: Address) -> DatagramSession:
        """Return a session sending to `dst`; raise OSError with the errno the app should see."""
        ...


@runtime_checkable
class PingDialer(Protocol):
    """A dialer that also carries ICMP echo (ping). A session's `send()` takes one whole ICMP
    echo request message as the stack delivers it (type, code, checksum, identifier, sequence,
    data) and its `recv()` returns whole echo reply messages; the identifier on the wire is the
    session's own (the stack puts the app's back). Dialers without `dial_ping` refuse pings."""

    async def dial_ping(self, dst: Address, src: Address) -> DatagramSession:
        """Return an echo session to `dst` (port 0); raise OSError with the errno the app
        should see (EACCES when pings are not permitted, EHOSTUNREACH, ...)."""
        ...


DialFunction = Callable[[Address, Address], Awaitable[socket.socket]]


class FunctionDialer:
    """A Dialer around an `async def f(dst, src) -> socket`."""

    def __init__(self, func: DialFunction) -> None:
        self.func = func
        self._said_sync = False

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        made: object = self.func(dst, src)
        if not inspect.isawaitable(made):
            self._not_awaitable(made)
        return await made  # type: ignore[no-any-return]

    def _not_awaitable(self, made: object) -> NoReturn:
        """A `def f` given for an `async def f`: its answer closed (a socket with a reset),
        the flow failed with ECONNABORTED, and what to change said once."""
        if not self._said_sync:
            self._said_sync = True
            log.error("%r returned %.80r, not an awaitable: write it `async def`; its flows "
                      "fail with ECONNABORTED", self, made)  # fmt: skip
        if isinstance(made, socket.socket):
            with contextlib.suppress(OSError):
                made.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            made.close()
        raise DialError(errno.ECONNABORTED, f"{self!r}: the function is not async")

    def __repr__(self) -> str:
        return f"FunctionDialer({getattr(self.func, '__qualname__', self.func)!r})"
