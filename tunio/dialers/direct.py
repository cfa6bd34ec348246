"""The direct dialer: a plain outbound TCP connection (or UDP socket) from this host.

A destination that is a name (a flow to a fake-IP address) is resolved here through the
dialer's resolver (tunio.dialers.resolve: --dns-upstream, asked from marked sockets), and a TCP
connect then races the addresses by happy eyeballs (RFC 8305)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from tunio.dialers.base import Address
from tunio.dialers.hostlocal import for_flow_from
from tunio.dialers.ping import PingSession, open_ping
from tunio.dialers.resolve import Resolver, happy_eyeballs, interleave
from tunio.dialers.routing import RoutingLoop, left_as_the_app
from tunio.dialers.udp import SocketSession
from tunio.errors import ConfigError, DialError

# Not every Python names these; the values are Linux's.
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
#: receive buffer asked for on UDP sessions (bytes)
UDP_RCVBUF = 1 << 20


class _RunEgress:
    """The way out of the run this process works for (`use_run_egress`): what a DirectDialer
    made without a mark or an interface, or without a resolver, uses instead. Outside a run,
    nothing."""

    mark: int | None = None
    interface: str | None = None
    resolver: Resolver | None = None


_run = _RunEgress()


def use_run_egress(
    mark: int | None, interface: str | None, resolver: Resolver | None = None
) -> None:
    """Called in each worker with the run's egress mark (--egress-mark, or --auto-bypass's),
    --egress-interface and --dns-upstream resolver: a DirectDialer that a policy or a dialer of
    the user's made bare (`DirectDialer()`, or a proxy dialer's own) then leaves past the TUN
    as the run's own dialers do, instead of looping back into it."""
    _run.mark, _run.interface, _run.resolver = mark, interface, resolver


MAX_MARK = 0xFFFFFFFF  # SO_MARK is 32 bits


class DirectDialer:
    """Connects straight to the destination (an IP literal).

    `mark` sets SO_MARK and `interface` sets SO_BINDTODEVICE on the outbound socket, so that the
    worker's own traffic can be routed around the TUN device instead of back into it. With
    neither, a worker of tunio-run uses the run's (`use_run_egress`); `mark=0` is no mark.
    """

    def __init__(
        self,
        *,
        mark: int | None = None,
        interface: str | None = None,
        nodelay: bool = False,
        resolver: Resolver | None = None,
    ) -> None:
        """`resolver` resolves names (tunio-run gives one with --dns: --dns-upstream from
        marked sockets); without one a name is EINVAL, as before names could come."""
        # checked here, where the program makes it: a wrong one would fail every dial in the
        # workers with a TypeError from setsockopt instead
        if mark is not None and (isinstance(mark, bool) or not isinstance(mark, int)
                                 or not 0 <= mark <= MAX_MARK):  # fmt: skip
            raise ConfigError(f"DirectDialer(mark={mark!r}): give a firewall mark, an integer "
                              f"0..{MAX_MARK:#x} (0: no mark)")  # fmt: skip
        if interface is not None and (not isinstance(interface, str) or not interface):
            raise ConfigError(f"DirectDialer(interface={interface!r}): give an interface name")
        self.mark = mark
        self.interface = interface
        self.nodelay = nodelay
        self.resolver = resolver

    def __repr__(self) -> str:
        return f"DirectDialer(mark={self.mark!r}, interface={self.interface!r})"

    def _resolver(self, dst: Address) -> Resolver:
        resolver = self.resolver if self.resolver is not None else _run.resolver
        if resolver is None:
            raise DialError(
                errno.EINVAL, f"direct dialer needs an IP literal (or a resolver), got {dst.host!r}"
            )
        return resolver

    def egress(self) -> tuple[int | None, str | None]:
        """The mark and interface its sockets get: its own, or the run's if it has neither."""
        if self.mark is None and self.interface is None:
            return _run.mark, _run.interface
        return self.mark, self.interface

    async def _addresses(
        self, dst: Address, src: Address, prefer_v4: bool = False
    ) -> list[Address]:
        """`dst` itself if it is an IP address, else the addresses of its name (IPv6 and IPv4
        alternating, IPv6 first, or IPv4 first with `prefer_v4`), less those that would be
        this host's own for a flow from another (tunio/dialers/hostlocal.py)."""
        if is_literal(dst.host):
            return [dst]
        v6, v4 = await self._resolver(dst).resolve(dst.host)
        v6, v4 = for_flow_from(src.host, dst.host, v6, v4)
        order = interleave(v4, v6) if prefer_v4 else interleave(v6, v4)
        return [Address(ip, dst.port) for ip in order]

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
        mark, interface = self.egress()
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)  # non-blocking without an ioctl
        try:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
        except OSError as exc:
            sock.close()
            raise _dial_error(dst, exc) from exc
        return sock, (host, dst.port)

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        if not is_literal(dst.host):
            addresses = await self._addresses(dst, src)

            async def attempt(ip: str) -> socket.socket:
                return await self._dial_ip(Address(ip, dst.port), src)

            return await happy_eyeballs([a.host for a in addresses], attempt)
        return await self._dial_ip(dst, src)

    async def _dial_ip(self, dst: Address, src: Address) -> socket.socket:
        sock, addr = self._socket(dst, socket.SOCK_STREAM)
        try:
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = sock.connect_ex(addr)
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, os.strerror(rc))
            # the route is picked, the source with it: one into the TUN again is a loop, to
            # fail now (its SYN is already on the way back as the loop's next hop)
            if left_as_the_app(sock, src.host):
                raise RoutingLoop(dst, f"{dst}: a routing loop: the connection from {src.host} "
                                  "went into the TUN again")  # fmt: skip
            if rc:
                await _connected(sock)
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

    async def dial_udp(self, dst: Address, src: Address) -> SocketSession:
        """A UDP socket connected to `dst`: connecting only picks a route and a source port, so
        this does not wait; an unroutable destination fails here (EHOSTUNREACH, ENETUNREACH).
        A name takes its first IPv4 address, else its first IPv6 one (UDP has no handshake to
        race: a datagram cannot tell a dead family from a silent peer)."""
        dst = (await self._addresses(dst, src, prefer_v4=True))[0]
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

    async def dial_ping(self, dst: Address, src: Address) -> PingSession:
        """An ICMP echo session to `dst` from this host (tunio/dialers/ping.py): a ping socket,
        or a raw one for a process with CAP_NET_RAW; EACCES if neither is allowed."""
        dst = (await self._addresses(dst, src, prefer_v4=True))[0]
        mark, interface = self.egress()
        return open_ping(dst, mark=mark, interface=interface)


async def _connected(sock: socket.socket) -> None:
    """Wait for `sock`'s connect (started, in progress) to end; OSError if it failed."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    fd = sock.fileno()

    def writable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, writable)
    try:
        await done
    finally:
        loop.remove_writer(fd)
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


def is_literal(host: str) -> bool:
    """Whether `host` is an IP address rather than a name (a name never has a colon, and the
    fake-IP DNS never names an all-digit IPv4 address a name: such a name is dialled as one)."""
    return ":" in host or host.replace(".", "").isdigit()


def _dial_error(dst: Address, exc: OSError) -> DialError:
    if isinstance(exc, DialError):
        return exc
    code = exc.errno if exc.errno is not None else errno.ECONNABORTED
    return DialError(code, f"{dst}: {exc.strerror or exc}")
