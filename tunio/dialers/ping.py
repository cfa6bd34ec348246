"""ICMP echo sessions: a worker pings the destination for real and hands back its replies.

The stack gives a worker each echo request as a whole ICMP message (type, code, checksum,
identifier, sequence, data) and takes whole echo replies back; it puts the app's identifier into
them itself, so the identifier a session uses on the wire is its own business.

Two kinds of socket can ping without a privileged helper:

- a *ping socket* (``SOCK_DGRAM`` + ``IPPROTO_ICMP``/``IPPROTO_ICMPV6``): the kernel picks the
  identifier, fills in the checksum and delivers only the replies to this socket's echoes. Any
  process whose group is in ``net.ipv4.ping_group_range`` (which also governs ICMPv6) may open
  one; otherwise socket() fails with EACCES.
- a *raw socket*, for processes with CAP_NET_RAW: it sees every ICMP message the host receives,
  so the session chooses an identifier, writes the checksum (IPv4; the kernel does it for
  ICMPv6) and keeps only echo replies from the destination that carry its identifier.

A ping socket is tried first; a raw socket is the fallback; with neither the session fails with
EACCES (the app sees "administratively prohibited") and one log line says how to allow pings.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import socket
import struct

from tunio.dialers.base import Address
from tunio.dialers.udp import send_or_drop
from tunio.errors import DialError

log = logging.getLogger("tunio.dialers.ping")

ECHO_REQUEST: dict[int, int] = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY: dict[int, int] = {socket.AF_INET: 0, socket.AF_INET6: 129}
#: the socket protocol of ICMP, by family
PROTO: dict[int, int] = {
    socket.AF_INET: socket.IPPROTO_ICMP,
    socket.AF_INET6: socket.IPPROTO_ICMPV6,
}
#: the largest ICMP message read in one go
MAX_MESSAGE = 65535
#: an echo's fixed part: type, code, checksum, identifier, sequence
ECHO_HEADER = 8

# IP_RECVERR / IPV6_RECVERR (not exported by every Python), by family: with it an ICMP error
# about the session's echoes (a router's host unreachable, a TTL exceeded) fails the socket's
# next recv with its errno; without it Linux tells a ping socket only of the "hard" ones, so the
# app would hear nothing where a direct ping prints "Destination Host Unreachable"
RECVERR: dict[int, tuple[int, int]] = {
    socket.AF_INET: (socket.IPPROTO_IP, 11),
    socket.AF_INET6: (socket.IPPROTO_IPV6, 25),
}
# Linux's names for the raw-socket ICMP filters (not exported by every Python)
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1

_SYSCTL_HINT = (
    "ICMP echo (ping) through tunio is refused: this worker may open neither a ping socket "
    "(its group is outside net.ipv4.ping_group_range) nor a raw socket (no CAP_NET_RAW); "
    'allow ping sockets with: sysctl -w net.ipv4.ping_group_range="0 2147483647"'
)
_hint_logged = False
#: identifiers of this process's live raw sessions, so two of them never share one
_raw_idents: set[int] = set()


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    buf = bytes(data)
    if len(buf) % 2:
        buf += b"\0"
    total: int = sum(struct.unpack(f"!{len(buf) // 2}H", buf))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _open_socket(family: int, kind: int, proto: int) -> socket.socket:
    """socket(2); a seam for tests that need a refusal this process would not get."""
    return socket.socket(family, kind, proto)


class PingSession:
    """A `DatagramSession` whose datagrams are ICMP echo requests out and echo replies back.

    `raw` says which kind of socket `sock` is (see the module's docstring); `ident` is the
    identifier a raw session writes into its echoes and filters replies by.
    """

    __slots__ = ("dst", "family", "ident", "ip", "raw", "sock")

    def __init__(self, sock: socket.socket, dst: Address, *, raw: bool, ident: int = 0) -> None:
        self.sock = sock
        self.dst = Address(dst.host, 0)
        self.family = sock.family
        self.ip = ipaddress.ip_address(dst.host)
        self.raw = raw
        self.ident = ident

    def __repr__(self) -> str:
        kind = f"raw ident={self.ident:#06x}" if self.raw else "ping socket"
        return f"PingSession(fd={self.sock.fileno()}, dst={self.dst.host}, {kind})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes | memoryview) -> bool:
        """Send one echo request (a whole ICMP message); anything else is dropped (False)."""
        msg = bytearray(data)
        if len(msg) < ECHO_HEADER or msg[0] != ECHO_REQUEST[self.family] or msg[1] != 0:
            return False
        if self.raw:
            struct.pack_into("!HH", msg, 2, 0, self.ident)
            if self.family == socket.AF_INET:  # the kernel sums ICMPv6 itself
                struct.pack_into("!H", msg, 2, checksum(msg))
        return send_or_drop(lambda: self.sock.send(msg))  # a full buffer drops one echo

    def recv(self) -> tuple[bytes, Address] | None:
        """The next echo reply from the destination (a whole ICMP message), or None; OSError
        when an ICMP error about the session's echoes came (RECVERR): the worker ends the
        session with that errno, and the stack answers the app's echo with ICMP unreachable."""
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    continue  # a path MTU learned: that echo is lost, as without RECVERR
                raise
            if not self.raw:
                return data, self.dst  # the kernel matched it to our echo already
            reply = self._our_reply(data, addr)
            if reply is not None:
                return reply, self.dst

    def _our_reply(self, data: bytes, addr: tuple[str, ...]) -> bytes | None:
        """The ICMP message in `data` if it is an echo reply to this session, else None."""
        if self.family == socket.AF_INET:
            # IPv4 raw sockets read the IP header too
            if len(data) < 20:
                return None
            data = data[(data[0] & 0x0F) * 4 :]
        try:
            source = ipaddress.ip_address(addr[0].partition("%")[0])
        except ValueError:
            return None
        if source != self.ip or len(data) < ECHO_HEADER:
            return None
        if data[0] != ECHO_REPLY[self.family] or data[1] != 0:
            return None
        if struct.unpack_from("!H", data, 4)[0] != self.ident:
            return None
        return data

    def close(self) -> None:
        if self.raw:
            _raw_idents.discard(self.ident)
        self.sock.close()


def open_ping(
    dst: Address, *, mark: int | None = None, interface: str | None = None
) -> PingSession:
    """A ping session to `dst` (an IP literal), connected, non-blocking, with the egress mark
    and interface set. Raises DialError: EACCES when pings are not allowed at all, the route's
    errno (EHOSTUNREACH, ENETUNREACH) when `dst` cannot be reached."""
    try:
        ip = ipaddress.ip_address(dst.host)
    except ValueError:
        raise DialError(errno.EINVAL, f"ping needs an IP literal, got {dst.host!r}") from None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sock, raw = _ping_or_raw_socket(family)
    ident: int | None = None
    try:
        sock.setblocking(False)
        sock.setsockopt(*RECVERR[family], 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if raw:
            _only_echo_replies(sock, family)
            ident = _new_ident()
        # connecting picks the route (an unroutable destination fails here) and, for a raw
        # socket, keeps out ICMP from anyone but the destination
        sock.connect((str(ip), 0))
    except OSError as exc:
        if ident is not None:
            _raw_idents.discard(ident)
        sock.close()
        code = exc.errno if exc.errno is not None else errno.ECONNABORTED
        raise DialError(code, f"ping {dst.host}: {exc.strerror or exc}") from exc
    return PingSession(sock, dst, raw=raw, ident=ident or 0)


def _ping_or_raw_socket(family: int) -> tuple[socket.socket, bool]:
    """A ping socket if this process may open one, else a raw ICMP socket; (socket, is_raw)."""
    global _hint_logged  # noqa: PLW0603 - one hint per process, however many sessions fail
    proto = PROTO[family]
    try:
        return _open_socket(family, socket.SOCK_DGRAM, proto), False
    except PermissionError:
        pass  # outside ping_group_range: try a raw socket
    try:
        return _open_socket(family, socket.SOCK_RAW, proto), True
    except PermissionError:
        if not _hint_logged:
            _hint_logged = True
            log.error(_SYSCTL_HINT)
        raise DialError(errno.EACCES, "ping sockets and raw sockets are not permitted") from None


def _only_echo_replies(sock: socket.socket, family: int) -> None:
    """Have the kernel pass this raw socket echo replies only (a set bit blocks a type)."""
    if family == socket.AF_INET:
        blocked = 0xFFFFFFFF & ~(1 << ECHO_REPLY[family])
        sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", blocked))
    else:
        words = [0xFFFFFFFF] * 8
        reply = ECHO_REPLY[family]
        words[reply >> 5] &= ~(1 << (reply & 31)) & 0xFFFFFFFF
        sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))


def _new_ident() -> int:
    """An identifier no live raw session of this process uses (random across processes)."""
    for _ in range(64):
        ident = secrets.randbits(16)
        if ident not in _raw_idents:
            _raw_idents.add(ident)
            return ident
    raise DialError(errno.EAGAIN, "no free ICMP echo identifier")
